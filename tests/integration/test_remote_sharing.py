"""Two real processes share a remote tier: what one stores, the other finds, configured only
through environment variables (ours and LMCache's). Other namespaces and other models never see it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from services import AWS_TEST_ENV, MotoServer

pytestmark = pytest.mark.integration

# Each process: a cpu tier in front of the remote one, so the reader's hits can only come from the
# remote tier (its own cpu tier starts empty).
WORKER = r"""
import json, sys
import torch
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVLayout

layout = KVLayout(2, 2, 16, "bfloat16")
tokens = list(range(1000, 1064))
kv = torch.randn(layout.chunk_shape(64), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
if sys.argv[1] == "store":
    engine = CacheEngine.from_env(model_name="model-a", layout=layout)
    stored = engine.store(tokens, kv)
    assert engine.flush(timeout=30)
    engine.close()
    print(json.dumps({"stored": stored}))
else:
    report = {}
    for label, model, overrides in (("same", "model-a", {}), ("other_namespace", "model-a", {"namespace": "team-b"}),
                                    ("other_model", "model-b", {})):
        engine = CacheEngine.from_env(model_name=model, layout=layout, **overrides)
        hit = engine.lookup(tokens)
        got = engine.retrieve(tokens)
        equal = got is not None and torch.equal(got, kv[:, :, : got.shape[2]])
        report[label] = {"hit": hit, "equal": equal, "remote_hits": engine.stats()[engine.settings.tiers[-1]]["hits"]}
        engine.close()
    print(json.dumps(report))
"""


def run_worker(role: str, environ: dict[str, str]) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("LMCACHE_", "AWS_"))}
    env.update(environ)
    result = subprocess.run(
        [sys.executable, "-c", WORKER, role], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_sharing(writer: dict[str, str], reader: dict[str, str]) -> None:
    common = {"LMCACHE_NAMESPACE": "team-a", "LMCACHE_CHUNK_SIZE": "16"}
    assert run_worker("store", {**common, **writer}) == {"stored": 64}
    report = run_worker("lookup", {**common, **reader})
    assert report["same"] == {"hit": 64, "equal": True, "remote_hits": 4}
    assert report["other_namespace"]["hit"] == 0
    assert report["other_model"]["hit"] == 0


def test_two_processes_share_redis(redis_url: str) -> None:
    """The writer names the tier with our variables; the reader with LMCache's (the cpu tier stays
    on and LMCACHE_REMOTE_URL adds the backend serving redis://): both reach the same keys."""
    check_sharing(
        writer={"LMCACHE_TIERS": "cpu,redis", "LMCACHE_REDIS__URL": redis_url},
        reader={"LMCACHE_REMOTE_URL": redis_url, "LMCACHE_REMOTE_SERDE": "naive"},
    )


def test_two_processes_share_s3(moto_server: MotoServer, s3_url: str) -> None:
    aws = {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": moto_server.endpoint_url}
    check_sharing(
        writer={"LMCACHE_TIERS": "cpu,s3", "LMCACHE_S3__URL": s3_url, **aws},
        reader={"LMCACHE_REMOTE_URL": s3_url, **aws},
    )
