"""Security rows of the fault matrix (docs/security.md), against a real redis-server and disk tier:

- tenants in different namespaces never read each other's KV, even when they share a Redis;
- with ``LMCACHE_KEY_SECRET`` set, a well-formed object that someone with write access to the
  store planted under one of our names (no MAC, or a MAC under another secret) is a miss, counted
  as ``forged_entries``, and never loaded;
- neither a Redis password nor the key secret appears in any log line, at DEBUG, through failures;
- the load path never unpickles, on any tier.
"""

from __future__ import annotations

import _pickle
import ast
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis
import torch
from services import RedisServer

from lmcache_core.engine import CacheEngine
from lmcache_core.errors import BackendUnavailableError
from lmcache_core.keys import ChunkKey, KVLayout
from lmcache_core.serde import derive_mac_key, encode_to_bytes

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LAYOUT = KVLayout(2, 2, 16, "bfloat16")
CHUNK = 16
SECRET = "tenant-a-key-secret-4f1d9c"
REPO = Path(__file__).resolve().parents[2]

EngineFactory = Callable[..., CacheEngine]


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[EngineFactory]:
    """``make_engine(tiers, **LMCACHE_* variables)``: engines closed at the end of the test."""
    engines: list[CacheEngine] = []

    def factory(tiers: str, **environ: str) -> CacheEngine:
        env = {"LMCACHE_TIERS": tiers, "LMCACHE_CHUNK_SIZE": str(CHUNK),
               "LMCACHE_DISK__PATH": str(tmp_path / "disk"), **environ}
        engine = CacheEngine.from_env(model_name="m", layout=LAYOUT, environ=env)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.close()


def prompt(seed: int, num_tokens: int = 4 * CHUNK) -> tuple[list[int], torch.Tensor]:
    tokens = [seed * 1000 + i for i in range(num_tokens)]
    generator = torch.Generator().manual_seed(seed)
    return tokens, torch.randn(LAYOUT.chunk_shape(num_tokens), generator=generator).bfloat16()


def bit_equal(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def plant(tier: str, engine: CacheEngine, key: ChunkKey, data: bytes, redis_url: str | None) -> None:
    """Write ``data`` under ``key`` straight into the store, as an attacker with write access would."""
    if tier == "redis":
        assert redis_url is not None
        with redis.Redis.from_url(redis_url) as client:
            client.set(str(key), data)
    else:
        path = engine.stack.backends[0].root / f"{key}.lmc"
        path.write_bytes(data)


# --- namespaces ---------------------------------------------------------------------------------


def test_namespaces_sharing_one_redis_never_read_each_other(make_engine: EngineFactory, redis_url: str) -> None:
    tenant_a = make_engine("redis", LMCACHE_NAMESPACE="a", LMCACHE_REDIS__URL=redis_url)
    tenant_b = make_engine("redis", LMCACHE_NAMESPACE="b", LMCACHE_REDIS__URL=redis_url)
    tokens, kv_a = prompt(1)
    _, kv_b = prompt(2)
    tenant_a.store(tokens, kv_a)
    assert tenant_a.flush()
    assert tenant_a.lookup(tokens) == len(tokens)
    assert tenant_b.lookup(tokens) == 0 and tenant_b.retrieve(tokens) is None

    # b stores other KV for the same tokens: each tenant keeps reading its own
    assert tenant_b.store(tokens, kv_b) == len(tokens) and tenant_b.flush()
    assert bit_equal(tenant_a.retrieve(tokens), kv_a)
    assert bit_equal(tenant_b.retrieve(tokens), kv_b)

    # a tenant that can write the store copies a's objects under b's names: b sees misses
    with redis.Redis.from_url(redis_url) as client:
        for key_a, key_b in zip(tenant_a.keys(tokens), tenant_b.keys(tokens), strict=True):
            client.set(str(key_b), client.get(str(key_a)))
    assert tenant_b.retrieve(tokens) is None
    assert tenant_b.stats()["redis"]["corrupt_entries"] >= 1


# --- forged objects -----------------------------------------------------------------------------


def unauthenticated(key: ChunkKey, kv: torch.Tensor) -> bytes:
    """Well-formed for ``key`` (right key digest, checksums, shape) but without any MAC."""
    return encode_to_bytes(key, kv)


def under_another_secret(key: ChunkKey, kv: torch.Tensor) -> bytes:
    return encode_to_bytes(key, kv, mac_key=derive_mac_key(b"the attacker's own secret"))


@pytest.mark.parametrize("forge", [unauthenticated, under_another_secret])
@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_forged_object_is_a_miss_with_a_key_secret(
    make_engine: EngineFactory, redis_server: RedisServer, tier: str,
    forge: Callable[[ChunkKey, torch.Tensor], bytes],
) -> None:
    assert redis_server.call("FLUSHALL").startswith(b"+OK")
    engine = make_engine(tier, LMCACHE_KEY_SECRET=SECRET, LMCACHE_REDIS__URL=redis_server.url)
    tokens, kv = prompt(3)
    _, evil = prompt(4)
    engine.store(tokens, kv)
    assert engine.flush()
    keys = engine.keys(tokens)
    plant(tier, engine, keys[1], forge(keys[1], evil[:, :, CHUNK : 2 * CHUNK]), redis_server.url)

    loaded = engine.retrieve(tokens)
    assert bit_equal(loaded, kv[:, :, :CHUNK])  # the chunk before the forged one, never the forgery
    assert engine.stats()[tier]["forged_entries"] == 1
    assert engine.stats()[tier].get("corrupt_entries", 0) == 0
    assert engine.lookup(tokens) == CHUNK  # the forgery was removed: the name is free for our own copy
    assert engine.store(tokens, kv) == 3 * CHUNK and engine.flush()
    assert bit_equal(engine.retrieve(tokens), kv)


# --- secrets never logged -----------------------------------------------------------------------

PASSWORD = "redis-pass-7c2e91"
WRONG_PASSWORD = "wrong-pass-0b44d3"


def leaks(text: str) -> list[str]:
    return [name for name, secret in [("password", PASSWORD), ("wrong password", WRONG_PASSWORD),
                                      ("key secret", SECRET)] if secret in text]


def test_no_secret_in_any_log_line(
    make_engine: EngineFactory, redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture,
) -> None:
    """Every log record of every logger at DEBUG, through a wrong password, forged and damaged
    objects, a killed server and a required tier that is down; and `lmcache-core -v info`."""
    server = redis_server_factory()
    assert server.call("CONFIG", "SET", "requirepass", PASSWORD).startswith(b"+OK")  # after the fixture's PING
    url = f"redis://default:{PASSWORD}@127.0.0.1:{server.port}/0"
    wrong_url = f"redis://default:{WRONG_PASSWORD}@127.0.0.1:{server.port}/0"
    tokens, kv = prompt(5)
    with caplog.at_level(logging.DEBUG):
        locked_out = make_engine("cpu,redis", LMCACHE_REDIS__URL=wrong_url, LMCACHE_KEY_SECRET=SECRET)
        locked_out.store(tokens, kv)
        locked_out.flush()
        assert locked_out.stats()["redis"].get("written_bytes", 0) == 0

        engine = make_engine("redis", LMCACHE_REDIS__URL=url, LMCACHE_KEY_SECRET=SECRET)
        engine.store(tokens, kv)
        assert engine.flush()
        keys = engine.keys(tokens)
        plant("redis", engine, keys[2], unauthenticated(keys[2], kv[:, :, 2 * CHUNK : 3 * CHUNK]), url)
        plant("redis", engine, keys[1], b"garbage" * 40, url)
        assert bit_equal(engine.retrieve(tokens), kv[:, :, :CHUNK])
        server.kill()
        assert engine.lookup(tokens) == 0 and engine.retrieve(tokens) is None
        engine.store(*prompt(6))
        engine.flush(timeout=5)
        with pytest.raises(BackendUnavailableError) as down:
            make_engine("redis", LMCACHE_REDIS__URL=url, LMCACHE_KEY_SECRET=SECRET, LMCACHE_REDIS__REQUIRED="1")
        assert not leaks(str(down.value)), str(down.value)

    assert any(record.levelno >= logging.WARNING for record in caplog.records)  # the failures were logged
    assert any("forged" in record.getMessage() or "MAC" in record.getMessage() for record in caplog.records)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in caplog.records:
        line = formatter.format(record)  # with its traceback, if any
        assert not leaks(line), line

    server.start()
    assert server.call("CONFIG", "SET", "requirepass", PASSWORD).startswith(b"+OK")
    info = subprocess.run(
        [sys.executable, "-m", "lmcache_core.cli", "-v", "info"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "LMCACHE_TIERS": "cpu,redis", "LMCACHE_REDIS__URL": url, "LMCACHE_KEY_SECRET": SECRET},
    )
    assert info.returncode == 0, info.stderr
    assert "redis" in info.stdout and not leaks(info.stdout + info.stderr), info.stdout + info.stderr


# --- no pickle in the load path -----------------------------------------------------------------


def _refuse(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("something unpickled")


@pytest.fixture
def tier_environ(request: pytest.FixtureRequest) -> dict[str, str]:
    tier = request.param
    if tier == "redis":
        return {"LMCACHE_REDIS__URL": request.getfixturevalue("redis_url")}
    if tier == "s3":
        return {"LMCACHE_S3__URL": request.getfixturevalue("s3_url")}
    return {}


@pytest.mark.parametrize("tier_environ", ["cpu", "disk", "redis", "s3"], indirect=True)
def test_no_tier_unpickles_on_store_or_load(
    make_engine: EngineFactory, tier_environ: dict[str, str], request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tier = request.node.callspec.id
    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, _refuse)
    writer = make_engine(tier, LMCACHE_KEY_SECRET=SECRET, **tier_environ)
    tokens, kv = prompt(7)
    writer.store(tokens, kv)
    assert writer.flush()
    reader = writer if tier == "cpu" else make_engine(tier, LMCACHE_KEY_SECRET=SECRET, **tier_environ)
    assert reader.lookup(tokens) == len(tokens)
    assert bit_equal(reader.retrieve(tokens), kv)


UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
UNPICKLING_CALLS = {("torch", "load"), ("np", "load"), ("numpy", "load")}  # torch.load unpickles; np.load can


def test_no_module_of_the_core_or_the_plugins_can_unpickle() -> None:
    """Static: no import of an unpickling module and no torch.load / numpy.load anywhere in
    lmcache_core or plugins (the runtime test above covers the paths it drives)."""
    found: list[str] = []
    files = [*REPO.joinpath("lmcache_core").rglob("*.py"), *REPO.joinpath("plugins").rglob("*.py")]
    assert len(files) > 20
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                modules = ["pickle"] if (node.value.id, node.attr) in UNPICKLING_CALLS else []
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
                modules = ["__import__"]  # a dynamic import could be anything
            else:
                continue
            found += [where for module in modules if module.split(".")[0] in {*UNPICKLING_MODULES, "__import__"}]
    assert not found, found
