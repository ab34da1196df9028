"""Remote tiers side by side with their raw clients, in one run, on the same bytes.

- redis: the ``redis`` tier's ``put_many`` / ``get_many`` vs raw redis-py pipelined SET / GET of the
  same framed objects (default client settings).
- s3: the ``s3`` tier's ``put_many`` / ``get_many`` vs raw s3fs ``pipe(dict)`` / ``cat(list)`` (both
  concurrent) of the same framed objects, against moto's S3 server.

Tier figures include everything a tier does: framing, the xxh3 checksum, key verification and
turning the bytes into a tensor (get) or a tensor into bytes (put). Both servers are started here,
on free loopback ports, and stopped at the end. Raw and tier measurements alternate, so machine
noise hits both sides alike; a trial takes the median of ``--rounds`` runs of each, and the table
gives the median over ``--trials`` trials with the lowest and highest trial's ratio beside it (on a
small shared machine one trial's ratio can move by 0.1).

    python benchmarks/bench_remote.py                      # redis and s3, 1 and 4 MiB chunks
    python benchmarks/bench_remote.py --sizes 1,4,16 --batch-mib 64 --rounds 9 --only redis
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lmcache_core.backend import BackendContext, Chunk
from lmcache_core.keys import CacheScope, ChunkHasher, KVLayout
from lmcache_core.serde import encode_to_bytes

MIB = 1024 * 1024
TOKENS = 64


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(command: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None) -> Iterator[None]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 30
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not start")
            time.sleep(0.05)
        yield
    finally:
        process.kill()
        process.wait()


def redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except OSError:
        return False


def make_chunks(chunk_mib: float, count: int) -> list[Chunk]:
    """``count`` chunks of a Llama-like bf16 layout (8 kv heads x 128) with layers filling ``chunk_mib``."""
    layers = max(1, round(chunk_mib * MIB / (2 * TOKENS * 8 * 128 * 2)))
    layout = KVLayout(layers, 8, 128, "bfloat16")
    scope = CacheScope("bench", "bench-model", "0" * 16, layout)
    keys = ChunkHasher(scope, chunk_size=TOKENS).keys(np.arange(count * TOKENS) % 50_000)
    generator = torch.Generator().manual_seed(0)
    return [Chunk(key, torch.randn(layout.chunk_shape(TOKENS), generator=generator).bfloat16(), i)
            for i, key in enumerate(keys)]


def measure(pairs: list[tuple[str, Callable[[], object]]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, the functions alternating round by round."""
    for _, function in pairs:  # warm-up: connections, first allocations
        function()
    times: dict[str, list[float]] = {name: [] for name, _ in pairs}
    for _ in range(rounds):
        for name, function in pairs:
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


Row = tuple[str, str, float, float, list[float]]  # backend, operation, tier B/s, raw B/s, ratio per trial


def compare(backend: str, label: str, nbytes: int, pairs: list[tuple[str, Callable[[], object]]],
            rounds: int, trials: int) -> list[Row]:
    """Put and get rows for one payload size: ``pairs`` holds raw/tier put and get functions."""
    runs = [measure(pairs, rounds) for _ in range(trials)]
    rows = []
    for operation in ("put", "get"):
        tier = [nbytes / run[f"tier {operation}"] for run in runs]
        raw = [nbytes / run[f"raw {operation}"] for run in runs]
        ratios = [t / r for t, r in zip(tier, raw, strict=True)]
        rows.append((backend, f"{operation} ({label})", statistics.median(tier), statistics.median(raw), ratios))
    return rows


def bench_redis(sizes: list[float], batch_mib: float, rounds: int, trials: int) -> list[Row]:
    import redis

    from lmcache_redis.backend import RedisBackend
    from lmcache_redis.settings import RedisSettings

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory() as workdir, server(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        lambda: redis_ready(port),
    ):
        url = f"redis://127.0.0.1:{port}/0"
        tier = RedisBackend(RedisSettings(url=url), BackendContext("redis", "raw"))
        raw = redis.Redis(host="127.0.0.1", port=port)
        for size in sizes:
            count = max(1, round(batch_mib / size))
            chunks = make_chunks(size, count)
            keys = [c.key for c in chunks]
            payloads = {f"raw:{c.key}": encode_to_bytes(c.key, c.kv) for c in chunks}
            nbytes = sum(len(p) for p in payloads.values())

            def raw_put(payloads: dict[str, bytes] = payloads) -> None:
                pipeline = raw.pipeline(transaction=False)
                for name, payload in payloads.items():
                    pipeline.set(name, payload)
                pipeline.execute()

            def raw_get(payloads: dict[str, bytes] = payloads) -> None:
                pipeline = raw.pipeline(transaction=False)
                for name in payloads:
                    pipeline.get(name)
                pipeline.execute()

            pairs = [("raw put", raw_put), ("tier put", lambda c=chunks: tier.put_many(c)),
                     ("raw get", raw_get), ("tier get", lambda k=keys: tier.get_many(k))]
            rows += compare("redis", f"{count} x {size:g} MiB", nbytes, pairs, rounds, trials)
        tier.close()
        raw.close()
    return rows


def bench_s3(sizes: list[float], batch_mib: float, rounds: int, trials: int) -> list[Row]:
    import s3fs

    from lmcache_s3.backend import ObjectStoreBackend
    from lmcache_s3.settings import S3Settings

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    rows = []
    with server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                lambda: http_ready(f"{endpoint}/moto-api/"), env=dict(os.environ)):
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        tier = ObjectStoreBackend(S3Settings(url=f"s3://{bucket}/tier", endpoint_url=endpoint, create_bucket=True),
                                  BackendContext("s3", "raw"))
        tier.check_health()
        raw = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        for size in sizes:
            count = max(1, round(batch_mib / size))
            chunks = make_chunks(size, count)
            keys = [c.key for c in chunks]
            payloads = {f"{bucket}/raw/{i}": encode_to_bytes(c.key, c.kv) for i, c in enumerate(chunks)}
            nbytes = sum(len(p) for p in payloads.values())
            pairs = [("raw put", lambda p=payloads: raw.pipe(p)), ("tier put", lambda c=chunks: tier.put_many(c)),
                     ("raw get", lambda p=list(payloads): raw.cat(p)), ("tier get", lambda k=keys: tier.get_many(k))]
            rows += compare("s3 (moto)", f"{count} x {size:g} MiB", nbytes, pairs, rounds, trials)
        tier.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4", help="chunk payloads in MiB, comma-separated")
    parser.add_argument("--batch-mib", type=float, default=32.0, help="data per batch (one put_many / get_many)")
    parser.add_argument("--rounds", type=int, default=7, help="runs of each function per trial (median taken)")
    parser.add_argument("--trials", type=int, default=3, help="trials per figure (median reported, ratio range shown)")
    parser.add_argument("--only", choices=["redis", "s3"], default=None)
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    sizes = [float(size) for size in args.sizes.split(",")]

    rows = []
    if args.only in (None, "redis"):
        rows += bench_redis(sizes, args.batch_mib, args.rounds, args.trials)
    if args.only in (None, "s3"):
        rows += bench_s3(sizes, args.batch_mib, max(3, args.rounds // 2), args.trials)
    lines = ["| backend | operation | tier GB/s | raw client GB/s | ratio (tier / raw) | lowest - highest trial |",
             "|---|---|---|---|---|---|"]
    for backend, operation, tier_speed, raw_speed, ratios in rows:
        lines.append(f"| {backend} | {operation} | {tier_speed / 1e9:.2f} | {raw_speed / 1e9:.2f} | "
                     f"{statistics.median(ratios):.2f}x | {min(ratios):.2f} - {max(ratios):.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.output is not None:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
