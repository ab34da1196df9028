"""``lmcache-core ls``, ``clear --yes`` and ``prune`` against a real redis-server and a real S3 API (moto) that
other applications and other tenants share: only this namespace's chunks are listed and deleted,
``--all-namespaces`` reaches the other tenants, and nothing that is not a chunk key is touched."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from services import RedisServer

from lmcache_core.backend import BackendContext, Chunk, SerializingBackend
from lmcache_core.cli import main
from lmcache_core.keys import CacheScope, ChunkHasher, ChunkKey
from lmcache_core.testing.conformance import LAYOUT, make_chunks
from lmcache_redis.backend import RedisBackend
from lmcache_redis.settings import RedisSettings
from lmcache_s3.backend import ObjectStoreBackend
from lmcache_s3.settings import S3Settings

pytestmark = pytest.mark.integration

OURS, THEIRS = "tenant-a", "tenant-b"
FOREIGN = "visits:2024:10"  # another application's key: starts with "v", ends in ":<hex>"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fill(backend: SerializingBackend) -> tuple[set[str], set[str]]:
    """Three chunks of our namespace and two of another tenant's, under one model."""
    ours, theirs = make_chunks(3, namespace=OURS), make_chunks(2, seed=1, namespace=THEIRS)
    backend.put_many(ours + theirs)
    return {str(c.key) for c in ours}, {str(c.key) for c in theirs}


class _Store:
    """One shared store as the CLI sees it (through LMCACHE_* variables) and as a test sees it."""

    def __init__(self, tier: str, backend: SerializingBackend, names: Callable[[], set[str]],
                 put_foreign: Callable[[], None]) -> None:
        self.tier, self.backend, self.names, self.put_foreign = tier, backend, names, put_foreign


@pytest.fixture
def redis_store(redis_server: RedisServer, redis_url: str, clean_env: None,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[_Store]:
    monkeypatch.setenv("LMCACHE_TIERS", "redis")
    monkeypatch.setenv("LMCACHE_REDIS__URL", redis_url)
    backend = RedisBackend(RedisSettings(url=redis_url), BackendContext("redis", "raw"))

    def names() -> set[str]:
        return {raw.decode() for raw in backend._client().scan_iter(match="*")}

    yield _Store("redis", backend, names, lambda: redis_server.call("SET", FOREIGN, "42"))
    backend.close()


@pytest.fixture
def s3_store(s3_url: str, clean_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Store]:
    monkeypatch.setenv("LMCACHE_TIERS", "s3")
    monkeypatch.setenv("LMCACHE_S3__URL", s3_url)
    backend = ObjectStoreBackend(S3Settings(url=s3_url), BackendContext("s3", "raw"))
    fs = backend._filesystem()
    root = s3_url.removeprefix("s3://")

    def names() -> set[str]:
        return {path[len(root) + 1 :].replace("/", ":") for path in fs.find(root)}

    def put_foreign() -> None:  # an object under our prefix that some other tool wrote
        fs.pipe_file(f"{root}/{FOREIGN.replace(':', '/')}", b"42")

    yield _Store("s3", backend, names, put_foreign)
    backend.close()


@pytest.fixture(params=["redis", "s3"])
def store(request: pytest.FixtureRequest) -> _Store:
    return request.getfixturevalue(f"{request.param}_store")


def test_clear_deletes_only_this_namespaces_chunks(
    store: _Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ours, theirs = fill(store.backend)
    store.put_foreign()
    assert store.names() == ours | theirs | {FOREIGN}
    monkeypatch.setenv("LMCACHE_NAMESPACE", OURS)

    code, out, err = run_cli(capsys, "clear", "--yes")

    assert code == 0, err
    assert store.names() == theirs | {FOREIGN}, "clear touched another tenant's or application's data"
    assert f"{store.tier}: removed 3 chunks of namespace {OURS!r}" in out


def test_clear_all_namespaces_still_leaves_other_applications_keys(
    store: _Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(store.backend)
    store.put_foreign()
    monkeypatch.setenv("LMCACHE_NAMESPACE", OURS)

    code, out, err = run_cli(capsys, "clear", "--yes", "--all-namespaces")

    assert code == 0, err
    assert store.names() == {FOREIGN}
    assert f"{store.tier}: removed 5 chunks of every namespace" in out


def test_ls_lists_only_this_namespace_unless_asked(
    store: _Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ours, theirs = fill(store.backend)
    store.put_foreign()
    monkeypatch.setenv("LMCACHE_NAMESPACE", OURS)

    code, out, _ = run_cli(capsys, "ls", "--fresh")
    assert code == 0
    assert {line.split("\t")[1] for line in out.splitlines()} == ours

    code, out, _ = run_cli(capsys, "ls", "--fresh", "--all-namespaces")
    assert code == 0
    assert {line.split("\t")[1] for line in out.splitlines()} == ours | theirs


def test_iter_keys_lists_every_namespace_and_no_foreign_name(store: _Store) -> None:
    ours, theirs = fill(store.backend)
    store.put_foreign()
    assert set(store.backend.iter_keys()) == ours | theirs


def test_clear_without_yes_deletes_nothing(
    store: _Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ours, theirs = fill(store.backend)
    monkeypatch.setenv("LMCACHE_NAMESPACE", OURS)
    code, _, err = run_cli(capsys, "clear")
    assert code == 2 and "--yes" in err and OURS in err
    assert store.names() == ours | theirs


def old_schema_chunk() -> Chunk:
    """A chunk written under an earlier key schema (``v0``): never looked up again by this version."""
    current = make_chunks(1, seed=7, namespace=OURS)[0]
    old = ChunkKey("v0" + current.key.prefix[current.key.prefix.index(":"):], current.key.digest)
    return Chunk(old, current.kv, 0)


def chunks_of_model(model: str, digest: str = "f" * 16) -> list[Chunk]:
    hasher = ChunkHasher(CacheScope(OURS, model, digest, LAYOUT), chunk_size=16)
    keys = hasher.keys(np.arange(32, dtype=np.uint32))
    return [Chunk(key, torch.zeros(LAYOUT.chunk_shape(16), dtype=getattr(torch, LAYOUT.dtype)), i)
            for i, key in enumerate(keys)]


def test_prune_counts_then_removes_older_key_schemas_only(
    store: _Store, capsys: pytest.CaptureFixture[str]
) -> None:
    ours, theirs = fill(store.backend)
    old = old_schema_chunk()
    store.backend.put_many([old])
    store.put_foreign()
    code, out, _ = run_cli(capsys, "prune")
    assert code == 0 and f"{store.tier}: 1 stale chunks (repeat with --yes" in out
    assert str(old.key) in store.names()
    code, out, _ = run_cli(capsys, "prune", "--yes")
    assert code == 0 and f"{store.tier}: removed 1 stale chunks" in out
    assert store.names() == ours | theirs | {FOREIGN}  # current chunks of every tenant, and the foreign key, stay


def test_prune_removes_a_replaced_checkpoint_or_a_tenant(
    store: _Store, capsys: pytest.CaptureFixture[str]
) -> None:
    ours, theirs = fill(store.backend)
    replaced, other_model = chunks_of_model("conformance-model", "e" * 16), chunks_of_model("org/other-model")
    store.backend.put_many(replaced + other_model)
    # one checkpoint of a model (the digest as `ls` shows it), then a whole model by name, then a tenant
    assert run_cli(capsys, "prune", "--yes", "--model", "conformance-model@eeeeeeee")[0] == 0
    assert store.names() == ours | theirs | {str(c.key) for c in other_model}
    assert run_cli(capsys, "prune", "--yes", "--model", "org/other-model")[0] == 0
    assert store.names() == ours | theirs
    assert run_cli(capsys, "prune", "--yes", "--namespace", THEIRS)[0] == 0
    assert store.names() == ours
