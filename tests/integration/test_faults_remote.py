"""Fault matrix, remote rows (docs/reliability.md): real redis-server and moto S3 servers driven
into failure through the engine API, one case per test.

Each case checks that during the fault a lookup is a miss and a retrieve is ``None`` (or a correct
prefix) within ``BOUND_S``, that writes are dropped and counted, that no wrong KV is ever
returned, that the tier is used again once the fault ends, and that the password never appears
in a log line (logs captured at DEBUG). ``BOUND_S`` (``S3_BOUND_S``) is the configured timeout
plus scheduling slack for a loaded 2-core CI machine: a correctness bound (a call must not hang),
not a speed benchmark; with the shipped default timeouts the bound is three times the default.
Kills, SIGSTOP and restarts in the general form are in test_remote_faults.py, whose helpers these
tests share.

Faults a real server cannot produce on demand (HTTP 500/503, delayed or damaged responses from an
object store) come from a loopback proxy in front of moto (``FaultyHttpProxy`` in services.py).
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from services import FaultyHttpProxy, MotoServer, PasswordRedisServer, RedisServer
from test_remote_faults import LAYOUT, SLACK_S, TIMEOUT_S, engine, eventually, prompt, timed

from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVLayout
from lmcache_redis.settings import RedisSettings
from lmcache_s3.settings import S3Settings

pytestmark = [pytest.mark.integration, pytest.mark.faults]

BOUND_S = TIMEOUT_S + SLACK_S
# S3 requests pass through a Python proxy to moto, logged at DEBUG, on a loaded machine: a healthy
# batch has taken over 2 s there, so these tests give S3 more time than Redis.
S3_TIMEOUT_S = 4.0
S3_BOUND_S = S3_TIMEOUT_S + SLACK_S
PASSWORD = "Redis-pw-7f3a9c-never-logged"
WRONG_PASSWORD = "Wrong-pw-0b1d2e-never-logged"
AWS_SECRET = "Aws-secret-5e6f7a-never-logged"


@pytest.fixture(autouse=True)
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log line at DEBUG, from before the first engine starts; after the test, none may
    hold a secret. (``caplog.text`` holds only the current phase's lines: in teardown, those of
    the teardown.)"""
    caplog.set_level(logging.DEBUG)
    yield caplog
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    lines = [caplog.handler.format(record) for record in records]  # with tracebacks
    for secret in (PASSWORD, WRONG_PASSWORD, AWS_SECRET):
        leaks = [line for line in lines if secret in line]
        assert not leaks, leaks[:3]


def never_wrong(reader: CacheEngine, tokens: list[int], kv: torch.Tensor) -> torch.Tensor | None:
    """Retrieve ``tokens``: nothing, or exactly the stored KV of a prefix."""
    retrieved = reader.retrieve(tokens)
    assert retrieved is None or torch.equal(retrieved, kv[:, :, : retrieved.shape[2]])
    return retrieved


def misses_within_bound(reader: CacheEngine, tokens: list[int], kv: torch.Tensor, bound_s: float = BOUND_S) -> None:
    found, elapsed = timed(lambda: reader.lookup(tokens))
    assert found == 0 and elapsed < bound_s, (found, elapsed)
    retrieved, elapsed = timed(lambda: never_wrong(reader, tokens, kv))
    assert retrieved is None and elapsed < bound_s, elapsed


def served_again(writer: CacheEngine, reader: CacheEngine, within_s: float = 15) -> None:
    """A new store reaches the remote tier and reads back exactly (the stacks back off 1 s, 2 s, ...)."""
    seeds = iter(range(500, 600))

    def a_new_store_reads_back() -> bool:
        tokens, kv = prompt(next(seeds))
        writer.store(tokens, kv)
        writer.flush(timeout=10)
        retrieved = never_wrong(reader, tokens, kv)
        return retrieved is not None and retrieved.shape[2] == 64

    assert eventually(a_new_store_reads_back, within_s=within_s)


def stored(writer: CacheEngine, reader: CacheEngine, seed: int) -> tuple[list[int], torch.Tensor]:
    tokens, kv = prompt(seed)
    writer.store(tokens, kv)
    assert writer.flush(timeout=10)
    assert reader.lookup(tokens) == 64
    return tokens, kv


# --- redis --------------------------------------------------------------------------------------


def redis_env(url: str, timeout_s: float | None = TIMEOUT_S) -> dict[str, str]:
    if timeout_s is None:
        return {"LMCACHE_REDIS__URL": url}
    return {"LMCACHE_REDIS__URL": url, "LMCACHE_REDIS__TIMEOUT": str(timeout_s),
            "LMCACHE_REDIS__CONNECT_TIMEOUT": str(timeout_s)}


@pytest.fixture
def redis(password_redis_factory: Callable[..., PasswordRedisServer]) -> PasswordRedisServer:
    return password_redis_factory(PASSWORD, "--enable-debug-command", "local", "--busy-reply-threshold", "100")


@pytest.fixture
def redis_pair(redis: PasswordRedisServer) -> Iterator[tuple[CacheEngine, CacheEngine]]:
    """A serving instance (cpu in front, redis written behind) and one that only reads redis."""
    writer, reader = engine("cpu,redis", redis_env(redis.url)), engine("redis", redis_env(redis.url))
    yield writer, reader
    writer.close()
    reader.close()


class RawClient:
    """A second client on its own connection, for commands that block the server."""

    def __init__(self, server: PasswordRedisServer) -> None:
        self.connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.connection.sendall(f"AUTH {server.password}\r\n".encode())
        assert self.connection.recv(64).startswith(b"+OK")

    def send(self, command: str) -> None:
        self.connection.sendall(command.encode() + b"\r\n")

    def close(self) -> None:
        self.connection.close()


def test_redis_killed_then_restarted_empty(
    redis: PasswordRedisServer, redis_pair: tuple[CacheEngine, CacheEngine]
) -> None:
    writer, reader = redis_pair
    tokens, kv = stored(writer, reader, seed=1)
    redis.kill()
    misses_within_bound(reader, tokens, kv)
    _, elapsed = timed(lambda: writer.store(*prompt(2)))
    assert elapsed < BOUND_S and writer.flush(timeout=10)
    assert writer.stats()["redis"]["errors"] + writer.stats()["redis"]["dropped_writes"] >= 1
    redis.start()  # same port, same password, no data
    served_again(writer, reader)
    assert reader.lookup(tokens) == 0  # what the restart lost is a miss
    assert never_wrong(reader, tokens, kv) is None


def test_redis_hung_with_default_timeouts(redis: PasswordRedisServer) -> None:
    """SIGSTOP (connections accepted, nothing answers) with the shipped defaults: a lookup must not
    wait for minutes, and an engine built meanwhile must start."""
    default_s = RedisSettings().timeout
    reader = engine("redis", redis_env(redis.url, timeout_s=None))
    writer = engine("cpu,redis", redis_env(redis.url, timeout_s=None))
    tokens, kv = stored(writer, reader, seed=1)
    redis.pause()
    try:
        misses_within_bound(reader, tokens, kv, bound_s=3 * default_s)
        started, elapsed = timed(lambda: engine("redis", redis_env(redis.url, timeout_s=None)))
        assert isinstance(started, CacheEngine) and elapsed < 3 * default_s
        started.close()
    finally:
        redis.resume()
    assert eventually(lambda: reader.lookup(tokens) == 64, within_s=15)
    writer.close()
    reader.close()


@pytest.mark.parametrize("pause", ["DEBUG SLEEP", "CLIENT PAUSE ALL"])
def test_redis_stalled_past_the_timeout(
    pause: str, redis: PasswordRedisServer, redis_pair: tuple[CacheEngine, CacheEngine]
) -> None:
    writer, reader = redis_pair
    tokens, kv = stored(writer, reader, seed=1)
    stall_s = 4 * TIMEOUT_S
    blocker = RawClient(redis)
    blocker.send(f"DEBUG SLEEP {stall_s}" if pause == "DEBUG SLEEP" else f"CLIENT PAUSE {int(stall_s * 1000)} ALL")
    time.sleep(0.1)
    misses_within_bound(reader, tokens, kv)
    assert reader.stats()["redis"]["errors"] >= 1
    blocker.close()
    assert eventually(lambda: reader.lookup(tokens) == 64, within_s=15)
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    served_again(writer, reader)


def test_redis_hung_mid_reply(redis: PasswordRedisServer) -> None:
    """SIGSTOP while 32 MiB of values stream back (read straight into tensors by the backend's own
    reply parser): the retrieve fails within the bound, never returns a partly filled tensor, and
    the next one, on a new connection, is exact."""
    layout = KVLayout(32, 8, 128, "bfloat16")  # 2 MiB per 16-token chunk
    environ = {"LMCACHE_TIERS": "redis", "LMCACHE_CHUNK_SIZE": "16", **redis_env(redis.url)}
    reader = CacheEngine.from_env(model_name="m", layout=layout, environ=environ)
    tokens = list(range(256))
    kv = torch.randn(layout.chunk_shape(256), generator=torch.Generator().manual_seed(3)).bfloat16()
    reader.store(tokens, kv)
    assert reader.lookup(tokens) == 256
    for delay_s in (0.0, 0.01, 0.03):
        pause = threading.Timer(delay_s, redis.pause)
        pause.start()
        _, elapsed = timed(lambda: never_wrong(reader, tokens, kv))
        pause.join()
        redis.resume()
        assert elapsed < BOUND_S
        assert eventually(lambda: reader.lookup(tokens) == 256, within_s=15)
    assert reader.stats()["redis"]["errors"] >= 1  # some pause landed inside a call
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    reader.close()


def test_redis_slowed_within_the_timeout_still_hits(
    redis: PasswordRedisServer, redis_pair: tuple[CacheEngine, CacheEngine]
) -> None:
    writer, reader = redis_pair
    tokens, kv = stored(writer, reader, seed=1)
    blocker = RawClient(redis)
    blocker.send(f"DEBUG SLEEP {TIMEOUT_S / 5}")
    time.sleep(0.05)
    found, elapsed = timed(lambda: reader.lookup(tokens))
    assert found == 64 and elapsed < BOUND_S
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    assert reader.stats()["redis"]["errors"] == 0
    blocker.close()


def test_redis_writes_paused_reads_still_served(
    redis: PasswordRedisServer, redis_pair: tuple[CacheEngine, CacheEngine]
) -> None:
    """CLIENT PAUSE WRITE: SETs block past the timeout; they are dropped and counted, and another
    instance keeps reading what is stored."""
    writer, reader = redis_pair
    tokens, kv = stored(writer, reader, seed=1)
    blocker = RawClient(redis)
    blocker.send(f"CLIENT PAUSE {int(6 * TIMEOUT_S * 1000)} WRITE")
    time.sleep(0.1)
    other_tokens, other_kv = prompt(2)
    _, elapsed = timed(lambda: writer.store(other_tokens, other_kv))
    assert elapsed < BOUND_S
    _, elapsed = timed(lambda: writer.flush(timeout=10))
    assert elapsed < BOUND_S
    assert writer.stats()["redis"]["errors"] >= 1
    assert reader.lookup(tokens) == 64
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    blocker.send("CLIENT UNPAUSE")
    blocker.close()
    never_wrong(reader, other_tokens, other_kv)
    served_again(writer, reader)


def test_redis_full_refuses_writes_and_keeps_serving_reads(
    password_redis_factory: Callable[..., PasswordRedisServer]
) -> None:
    """maxmemory below what the server uses, noeviction: every SET is answered with an OOM error.
    Those writes are dropped and counted, and the tier keeps serving reads, also in the instances
    whose writes were refused."""
    redis = password_redis_factory(PASSWORD, "--maxmemory-policy", "noeviction")
    writer, reader = engine("cpu,redis", redis_env(redis.url)), engine("redis", redis_env(redis.url))
    tokens, kv = stored(writer, reader, seed=1)
    assert redis.call("CONFIG", "SET", "maxmemory", "1").startswith(b"+OK")  # full
    writer.store(*prompt(2))
    assert writer.flush(timeout=10)
    full = writer.stats()["redis"]
    assert full["errors"] == 0 and full["healthy"] == 1.0, full  # a full cache is not a broken one
    refused_before = full["dropped_full"]
    assert refused_before == 4  # the four chunks of prompt 2
    reader.store(*prompt(3))  # the reader's only tier is redis: this write is refused now
    assert reader.stats()["redis"]["dropped_full"] >= 1
    found, elapsed = timed(lambda: reader.lookup(tokens))
    assert found == 64 and elapsed < BOUND_S  # no backoff: what is stored is still served
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    writer.store(*prompt(4))
    writer.flush(timeout=10)
    assert writer.stats()["redis"]["dropped_full"] > refused_before
    assert redis.call("CONFIG", "SET", "maxmemory", "0").startswith(b"+OK")  # room again
    served_again(writer, reader)
    writer.close()
    reader.close()


@pytest.mark.parametrize("given_in", ["url", "setting"])
def test_redis_wrong_password(
    given_in: str, redis: PasswordRedisServer
) -> None:
    right = engine("redis", redis_env(redis.url))
    tokens, kv = prompt(1)
    right.store(tokens, kv)
    assert right.lookup(tokens) == 64
    if given_in == "url":
        wrong = redis_env(f"redis://:{WRONG_PASSWORD}@127.0.0.1:{redis.port}/0")
    else:
        wrong = {**redis_env(f"redis://127.0.0.1:{redis.port}/0"), "LMCACHE_REDIS__PASSWORD": WRONG_PASSWORD}
    writer, reader = engine("cpu,redis", wrong), engine("redis", wrong)
    misses_within_bound(reader, tokens, kv)
    writer.store(*prompt(2))
    assert writer.flush(timeout=10)
    assert writer.stats()["redis"]["errors"] + writer.stats()["redis"]["dropped_writes"] >= 1
    assert reader.stats()["redis"]["errors"] >= 1
    # the fault ends: the server is given the password these instances use
    assert redis.call("CONFIG", "SET", "requirepass", WRONG_PASSWORD).startswith(b"+OK")
    redis.password = WRONG_PASSWORD
    served_again(writer, reader)
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    for instance in (right, writer, reader):
        instance.close()


def test_redis_answering_errors(
    redis: PasswordRedisServer, redis_pair: tuple[CacheEngine, CacheEngine]
) -> None:
    """A script that never ends: after busy-reply-threshold the server answers every command with
    a BUSY error, quickly, until SCRIPT KILL."""
    writer, reader = redis_pair
    tokens, kv = stored(writer, reader, seed=1)
    blocker = RawClient(redis)
    blocker.send('EVAL "while true do end" 0')
    time.sleep(0.3)
    try:
        misses_within_bound(reader, tokens, kv)
        assert reader.stats()["redis"]["errors"] >= 1
        writer.store(*prompt(2))
        assert writer.flush(timeout=10)
        assert writer.stats()["redis"]["errors"] + writer.stats()["redis"]["dropped_writes"] >= 1
    finally:
        assert redis.call("SCRIPT", "KILL").startswith(b"+OK")
        blocker.close()
    assert eventually(lambda: reader.lookup(tokens) == 64, within_s=15)
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    served_again(writer, reader)


def test_redis_foreign_value_type_is_a_miss(
    redis: PasswordRedisServer, redis_pair: tuple[CacheEngine, CacheEngine]
) -> None:
    """Another application put a hash under one of our key names: Redis answers that key's GET
    with a WRONGTYPE error. That chunk is a miss (the chunks before it still load) and the tier
    stays in use for everything else."""
    writer, reader = redis_pair
    tokens, kv = stored(writer, reader, seed=1)
    other_tokens, other_kv = stored(writer, reader, seed=2)
    taken = str(reader.keys(tokens)[2])
    assert redis.call("DEL", taken).startswith(b":1")
    assert redis.call("HSET", taken, "field", "value").startswith(b":1")
    retrieved = never_wrong(reader, tokens, kv)
    assert retrieved is not None and retrieved.shape[2] == 32  # chunks 0 and 1
    counters = reader.stats()["redis"]
    assert counters["errors"] == 0 and counters["corrupt_entries"] == 1, counters
    assert reader.lookup(tokens) == 32  # no longer advertised: vLLM will not plan to load it
    assert reader.lookup(other_tokens) == 64
    assert torch.equal(never_wrong(reader, other_tokens, other_kv), other_kv)


def test_redis_cluster_node_hung(
    private_redis_cluster: list[RedisServer]
) -> None:
    """One node of three SIGSTOPped: a batch with keys on it fails within about one timeout, not
    one timeout per key on that node."""
    environ = {**redis_env(private_redis_cluster[0].url), "LMCACHE_REDIS__MODE": "cluster"}
    writer, reader = engine("cpu,redis", environ), engine("redis", environ)
    tokens = list(range(256))  # 16 chunks, spread over the three nodes
    kv = torch.randn(LAYOUT.chunk_shape(256), generator=torch.Generator().manual_seed(7)).bfloat16()
    writer.store(tokens, kv)
    assert writer.flush(timeout=10)
    assert reader.lookup(tokens) == 256
    private_redis_cluster[1].pause()
    try:
        misses_within_bound(reader, tokens, kv)
        time.sleep(1.1)  # past the stack's first backoff: this call first refreshes the slot map,
        retrieved, elapsed = timed(lambda: never_wrong(reader, tokens, kv))  # which may ask the hung node
        assert elapsed < BOUND_S + TIMEOUT_S and (retrieved is None or retrieved.shape[2] < 256), elapsed
        _, elapsed = timed(lambda: writer.store(*prompt(2)))
        assert elapsed < BOUND_S and writer.flush(timeout=10)
    finally:
        private_redis_cluster[1].resume()
    assert eventually(lambda: reader.lookup(tokens) == 256, within_s=15)
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    served_again(writer, reader)
    writer.close()
    reader.close()


def test_redis_cluster_slots_moved(private_redis_cluster: list[RedisServer]) -> None:
    """A reshard moves a node's slots (and keys) under a running instance: its slot map is stale,
    the nodes answer MOVED, and every chunk is still found, exactly."""
    environ = {**redis_env(private_redis_cluster[0].url), "LMCACHE_REDIS__MODE": "cluster"}
    writer, reader = engine("cpu,redis", environ), engine("redis", environ)
    tokens = list(range(256))
    kv = torch.randn(LAYOUT.chunk_shape(256), generator=torch.Generator().manual_seed(7)).bfloat16()
    writer.store(tokens, kv)
    assert writer.flush(timeout=10)
    assert reader.lookup(tokens) == 256
    source, target = (node.call("CLUSTER", "MYID").split(b"\r\n")[1].decode() for node in private_redis_cluster[1:])
    cli = shutil.which("redis-cli")
    assert cli is not None
    subprocess.run(
        [cli, "--cluster", "reshard", f"127.0.0.1:{private_redis_cluster[0].port}", "--cluster-from", source,
         "--cluster-to", target, "--cluster-slots", "16384", "--cluster-yes"],
        check=True, capture_output=True, timeout=120,
    )
    assert reader.lookup(tokens) == 256
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    assert reader.stats()["redis"]["errors"] == 0
    served_again(writer, reader)
    writer.close()
    reader.close()


# --- s3 -----------------------------------------------------------------------------------------


def s3_env(endpoint: str, bucket: str, timeout_s: float | None = S3_TIMEOUT_S) -> dict[str, str]:
    environ = {"LMCACHE_S3__URL": f"s3://{bucket}/cache", "LMCACHE_S3__ENDPOINT_URL": endpoint}
    if timeout_s is not None:
        environ.update({"LMCACHE_S3__TIMEOUT": str(timeout_s), "LMCACHE_S3__CONNECT_TIMEOUT": str(timeout_s)})
    return environ


@pytest.fixture
def s3_pair(
    s3_fault_proxy: tuple[FaultyHttpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[CacheEngine, CacheEngine, FaultyHttpProxy]]:
    """Two instances reaching moto through the fault proxy, with a secret key worth scanning for."""
    proxy, bucket = s3_fault_proxy
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    environ = s3_env(proxy.endpoint_url, bucket)
    writer, reader = engine("cpu,s3", environ), engine("s3", environ)
    yield writer, reader, proxy
    proxy.heal()
    writer.close()
    reader.close()


def test_s3_stopped_then_started(
    moto_server_factory: Callable[[], MotoServer], aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    server = moto_server_factory()
    server.create_bucket("lmcache-stopped")
    environ = s3_env(server.endpoint_url, "lmcache-stopped")
    writer, reader = engine("cpu,s3", environ), engine("s3", environ)
    tokens, kv = stored(writer, reader, seed=1)
    server.kill()
    misses_within_bound(reader, tokens, kv, bound_s=S3_BOUND_S)
    _, elapsed = timed(lambda: writer.store(*prompt(2)))
    assert elapsed < S3_BOUND_S and writer.flush(timeout=10)
    assert writer.stats()["s3"]["errors"] + writer.stats()["s3"]["dropped_writes"] >= 1
    server.start()
    server.create_bucket("lmcache-stopped")  # moto keeps buckets in memory; a real store keeps them
    served_again(writer, reader, within_s=20)
    assert never_wrong(reader, tokens, kv) is None  # moto lost it: a miss
    writer.close()
    reader.close()


@pytest.mark.parametrize("status", [500, 503])
def test_s3_answering_errors(
    status: int, s3_pair: tuple[CacheEngine, CacheEngine, FaultyHttpProxy]
) -> None:
    writer, reader, proxy = s3_pair
    tokens, kv = stored(writer, reader, seed=1)
    proxy.status = status
    misses_within_bound(reader, tokens, kv, bound_s=S3_BOUND_S)
    assert reader.stats()["s3"]["errors"] >= 1
    writer.store(*prompt(2))
    assert writer.flush(timeout=10)
    assert writer.stats()["s3"]["errors"] + writer.stats()["s3"]["dropped_writes"] >= 1
    proxy.heal()
    assert eventually(lambda: reader.lookup(tokens) == 64, within_s=15)
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    served_again(writer, reader)


def test_s3_slow(s3_pair: tuple[CacheEngine, CacheEngine, FaultyHttpProxy]) -> None:
    writer, reader, proxy = s3_pair
    tokens, kv = stored(writer, reader, seed=1)
    proxy.delay_s = S3_TIMEOUT_S / 5  # slower, within the timeout: still hits, exactly
    assert reader.lookup(tokens) == 64
    assert torch.equal(never_wrong(reader, tokens, kv), kv)
    assert reader.stats()["s3"]["errors"] == 0
    proxy.delay_s = 2 * S3_TIMEOUT_S  # past it: a miss within the bound
    misses_within_bound(reader, tokens, kv, bound_s=S3_BOUND_S)
    assert reader.stats()["s3"]["errors"] >= 1
    _, elapsed = timed(lambda: writer.store(*prompt(2)))
    assert elapsed < S3_BOUND_S and writer.flush(timeout=10)
    assert writer.stats()["s3"]["errors"] + writer.stats()["s3"]["dropped_writes"] >= 1
    proxy.heal()
    assert eventually(lambda: reader.lookup(tokens) == 64, within_s=15)
    served_again(writer, reader)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_s3_damaged_responses_are_misses_and_keep_the_object(
    damage: str, s3_pair: tuple[CacheEngine, CacheEngine, FaultyHttpProxy]
) -> None:
    """A body cut short or altered in transit: a miss, never wrong KV, and the stored object (which
    is fine) stays for when the network heals."""
    writer, reader, proxy = s3_pair
    tokens, kv = stored(writer, reader, seed=1)
    proxy.damage_body = damage
    retrieved, elapsed = timed(lambda: never_wrong(reader, tokens, kv))
    assert retrieved is None and elapsed < S3_BOUND_S
    counters = reader.stats()["s3"]
    assert counters["errors"] + counters.get("corrupt_entries", 0) >= 1, counters
    proxy.heal()
    assert eventually(lambda: reader.lookup(tokens) == 64, within_s=15)
    assert torch.equal(never_wrong(reader, tokens, kv), kv)


def test_s3_hung_with_default_timeouts(
    moto_server_factory: Callable[[], MotoServer], aws_env: dict[str, str]
) -> None:
    """SIGSTOP with the shipped defaults: a lookup must not wait for minutes."""
    default_s = S3Settings().timeout
    server = moto_server_factory()
    server.create_bucket("lmcache-hung")
    environ = s3_env(server.endpoint_url, "lmcache-hung", timeout_s=None)
    writer, reader = engine("cpu,s3", environ), engine("s3", environ)
    tokens, kv = stored(writer, reader, seed=1)
    server.pause()
    try:
        misses_within_bound(reader, tokens, kv, bound_s=3 * default_s)
    finally:
        server.resume()
    assert eventually(lambda: reader.lookup(tokens) == 64, within_s=15)
    writer.close()
    reader.close()
