"""A running "instance" without vLLM: real lookup servers over real engines, and a control server.

Shared by test_cli_live.py and test_control_faults.py. Each test gets its own private runtime
directory (``XDG_RUNTIME_DIR``), so instances of concurrent test runs never meet.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

from lmcache_core.engine import CacheEngine
from lmcache_core.integrations.vllm.control import ControlServer, EngineControl, InstanceInfo
from lmcache_core.integrations.vllm.lookup import LookupClient, LookupServer, socket_path
from lmcache_core.keys import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32")
CHUNK = 16


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="lc-", dir="/tmp")  # short: socket paths stay under 108 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class LiveInstance:
    engines: list[CacheEngine]
    servers: list[LookupServer]
    client: LookupClient
    control: ControlServer
    stored: dict[int, set[str]] = field(default_factory=dict)  # rank -> keys stored

    @property
    def id(self) -> str:
        return self.control.info.instance_id


def store_chunks(engine: CacheEngine, count: int, seed: int) -> set[str]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32_000, (count * CHUNK,), generator=generator).tolist()
    engine.store(tokens, torch.randn(LAYOUT.chunk_shape(count * CHUNK), generator=generator))
    return {str(key) for key in engine.keys(tokens)}


@contextmanager
def live_instance(ranks: int = 2, chunks: int = 3, missing_ranks: tuple[int, ...] = ()) -> Iterator[LiveInstance]:
    """``ranks`` workers with a cpu tier each holding ``chunks`` chunks; ``missing_ranks`` serve nothing."""
    engine_id = str(uuid.uuid4())
    environ = {"LMCACHE_PLUGINS__ALLOW": "codecs,cpu", "LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": str(CHUNK)}
    engines = [CacheEngine.from_env(model_name="live-model", layout=LAYOUT, tp_rank=rank, tp_world_size=ranks,
                                    environ=environ) for rank in range(ranks)]
    paths = [socket_path(engine_id, 0, rank) for rank in range(ranks)]
    servers = [LookupServer(path, lambda tokens: (0, 0), control=EngineControl(engine))
               for rank, (path, engine) in enumerate(zip(paths, engines, strict=True)) if rank not in missing_ranks]
    client = LookupClient(paths)
    control = ControlServer(client, InstanceInfo(engine_id, 0, "live-model", ("cpu",)), rank_timeout_s=2.0).start()
    instance = LiveInstance(engines, servers, client, control)
    for rank, engine in enumerate(engines):
        instance.stored[rank] = store_chunks(engine, chunks, seed=rank)
    try:
        yield instance
    finally:
        control.close()
        client.close()
        for server in servers:
            server.close()
        for engine in engines:
            engine.close()
