"""The redis backend against real redis-server processes on loopback: the conformance suite
(standalone and Redis Cluster), TLS, unix sockets, ACL users, Sentinel, pipelining, TTL and the
value-size limit."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
import torch
from pydantic import SecretStr
from services import RedisServer, SentinelServer, service_unavailable

from lmcache_core.backend import BackendContext
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVLayout
from lmcache_core.serde import encode_chunk
from lmcache_core.testing.conformance import SerializingBackendConformance, assert_same, make_chunks
from lmcache_redis.backend import RedisBackend
from lmcache_redis.settings import RedisSettings

pytestmark = pytest.mark.integration


def make_backend(url: str, **settings: object) -> RedisBackend:
    return RedisBackend(RedisSettings(url=url, **settings), BackendContext("redis", "raw"))  # type: ignore[arg-type]


def round_trip(backend: RedisBackend, count: int = 3) -> None:
    chunks = make_chunks(count, seed=count)
    backend.put_many(chunks)
    assert backend.contains([c.key for c in chunks]) == count
    for chunk, got in zip(chunks, backend.get_many([c.key for c in chunks]), strict=True):
        assert_same(got, chunk.kv)


class TestRedisConformance(SerializingBackendConformance):
    @pytest.fixture
    def backend(self, redis_url: str):
        backend = make_backend(redis_url)
        yield backend
        backend.close()


class TestRedisClusterConformance(SerializingBackendConformance):
    """The same suite through redis-py's cluster client: keys spread over three masters."""

    @pytest.fixture
    def backend(self, redis_cluster: list[RedisServer]):
        for node in redis_cluster:
            node.call("FLUSHALL")
        backend = make_backend(redis_cluster[0].url, mode="cluster")
        yield backend
        backend.close()


def test_cluster_spreads_keys_over_the_masters(redis_cluster: list[RedisServer]) -> None:
    for node in redis_cluster:
        node.call("FLUSHALL")
    backend = make_backend(redis_cluster[0].url, mode="cluster")
    round_trip(backend, count=24)
    backend.close()
    sizes = [int(node.call("DBSIZE").strip()[1:]) for node in redis_cluster]
    assert sum(sizes) == 24 and all(sizes), sizes


def test_each_batch_is_one_round_trip(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sends: list[int] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sends.append(1)
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    backend = make_backend(redis_url)
    backend.check_health()
    chunks = make_chunks(16)
    keys = [c.key for c in chunks]
    for operation in (lambda: backend.put_many(chunks), lambda: backend.contains(keys),
                      lambda: backend.get_many(keys), lambda: backend.delete(keys)):
        sends.clear()
        operation()
        assert len(sends) == 1
    backend.close()


def test_large_values_arrive_in_writable_memory(redis_url: str) -> None:
    """Read straight from the socket into the buffer the tensor uses: no copy in the decoder."""
    layout = KVLayout(4, 8, 128, "bfloat16")
    chunks = make_chunks(2, tokens_per_chunk=64, layout=layout)
    backend = make_backend(redis_url)
    backend.put_many(chunks)
    blobs = backend._read_blobs([str(c.key) for c in chunks])
    assert all(isinstance(blob, memoryview) and not blob.readonly for blob in blobs)
    for chunk, got in zip(chunks, backend.get_many([c.key for c in chunks]), strict=True):
        assert_same(got, chunk.kv)
    backend.close()


@pytest.mark.parametrize(("settings", "expected"), [({"ttl": 120}, 120), ({}, 7 * 24 * 3600), ({"ttl": 0}, -1)],
                         ids=["set", "default 7 days", "0 = never"])
def test_ttl_is_set_on_every_value(redis_server: RedisServer, redis_url: str, settings: dict[str, int],
                                   expected: int) -> None:
    backend = make_backend(redis_url, **settings)
    chunks = make_chunks(2, seed=100 + expected)  # keys of their own: a key written twice takes the last TTL
    backend.put_many(chunks)
    for chunk in chunks:
        ttl = int(redis_server.call("TTL", str(chunk.key)).strip()[1:])
        assert ttl == -1 if expected == -1 else 0 < ttl <= expected  # -1: no expiry
    backend.close()


def test_values_over_the_limit_are_refused_with_a_clear_message(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = make_backend(redis_url, max_value_size="1KiB")
    small = make_chunks(1, tokens_per_chunk=1, layout=KVLayout(1, 1, 8, "float16"))
    large = make_chunks(2, seed=5)
    with caplog.at_level(logging.WARNING):
        backend.put_many(small + large)
    assert backend.contains([small[0].key]) == 1
    assert backend.contains([c.key for c in large]) == 0
    assert backend.counters["dropped_too_large"] == 2
    assert backend.counters["written_bytes"] == sum(part.nbytes for part in encode_chunk(small[0].key, small[0].kv))
    assert sum("LMCACHE_REDIS__MAX_VALUE_SIZE" in record.message for record in caplog.records) == 1
    backend.close()


def test_iter_keys_ignores_other_applications_keys(redis_server: RedisServer, redis_url: str) -> None:
    redis_server.call("SET", "session:42", "x")
    redis_server.call("SET", "v9-not-a-chunk", "x")
    backend = make_backend(redis_url)
    chunks = make_chunks(2)
    backend.put_many(chunks)
    assert sorted(backend.iter_keys()) == sorted(str(c.key) for c in chunks)
    backend.close()


def test_acl_user_and_password_from_url_or_settings(
    redis_server_factory, caplog: pytest.LogCaptureFixture
) -> None:
    server: RedisServer = redis_server_factory()
    assert server.call("ACL", "SETUSER", "cache", "on", ">s3cret-pw", "~*", "+@all").startswith(b"+OK")
    assert server.call("ACL", "SETUSER", "default", "off").startswith(b"+OK")
    host = f"127.0.0.1:{server.port}"

    from_url = make_backend(f"redis://cache:s3cret-pw@{host}/0")
    round_trip(from_url)
    from_url.close()
    from_settings = make_backend(f"redis://cache:wrong@{host}/0", password=SecretStr("s3cret-pw"))
    round_trip(from_settings)  # the explicit setting wins over the URL
    from_settings.close()

    environ = {"LMCACHE_TIERS": "cpu,redis", "LMCACHE_REDIS__URL": f"redis://cache:not-the-pw@{host}/0"}
    with caplog.at_level(logging.WARNING):
        engine = CacheEngine.from_env(model_name="m", layout=KVLayout(1, 1, 8, "float16"), environ=environ)
    engine.close()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"redis://cache:***@{host}/0" in logged and "unreachable" in logged
    assert "not-the-pw" not in logged


def test_unix_socket(redis_server_factory, tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    redis_server_factory("--unixsocket", str(path), "--unixsocketperm", "700")
    backend = make_backend(f"unix://{path}?db=0")
    backend.check_health()
    round_trip(backend)
    backend.close()


def test_tls(redis_server_factory, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        service_unavailable("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    server: RedisServer = redis_server_factory(tls=(cert, key))
    backend = make_backend(f"{server.url}?ssl_ca_certs={cert}")
    backend.check_health()
    round_trip(backend)
    backend.close()
    untrusted = make_backend(server.url)  # the system CAs do not know our certificate
    with pytest.raises(ConnectionError):
        untrusted.check_health()
    untrusted.close()


def test_sentinel_finds_the_master(redis_server_factory, sentinel_factory) -> None:
    master: RedisServer = redis_server_factory()
    sentinel: SentinelServer = sentinel_factory(master)
    backend = make_backend(f"redis://127.0.0.1:{sentinel.port}/0", mode="sentinel", sentinel_master="mymaster")
    backend.check_health()
    round_trip(backend, count=4)
    backend.close()
    assert master.call("DBSIZE").strip() == b":4"


def test_engine_round_trip_through_remote_url(redis_url: str) -> None:
    """LMCache's variable names: LMCACHE_REMOTE_URL picks the backend by its URL scheme."""
    layout = KVLayout(2, 2, 16, "bfloat16")
    environ = {"LMCACHE_LOCAL_CPU": "false", "LMCACHE_REMOTE_URL": redis_url, "LMCACHE_REMOTE_SERDE": "naive",
               "LMCACHE_CHUNK_SIZE": "16"}
    engine = CacheEngine.from_env(model_name="m", layout=layout, environ=environ)
    assert engine.settings.tiers == ["redis"]
    tokens = list(range(64))
    kv = torch.randn(layout.chunk_shape(64)).to(torch.bfloat16)
    assert engine.store(tokens, kv) == 64
    assert engine.lookup(tokens) == 64
    retrieved = engine.retrieve(tokens)
    assert retrieved is not None and torch.equal(retrieved, kv)
    engine.close()
