"""Storage benchmarks, each measured side by side with the raw baseline in one run.

- ``hash``: ns/token of ChunkHasher.keys vs one raw library call over the same token bytes.
- ``cpu``: cpu-tier put and get (+ copy into a destination, as a KV load does) vs ``Tensor.copy_``.
- ``disk``: disk-tier put/get (framing, checksums, atomic rename) vs plain file write/read.

Results are printed as a markdown table of GB/s and the ratio ours/baseline (higher is better),
and optionally written as JSON. Each figure is the median of ``--repeat`` runs.

    python benchmarks/bench_storage.py --repeat 5           # or: make bench
    python benchmarks/bench_storage.py disk --disk-dir /var/cache/kv --chunk-mib 4

It runs from a source checkout (it is not in the wheel) against the installed package and plugins.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import torch
import xxhash

from lmcache_core.backend import BackendContext, Chunk
from lmcache_core.keys import CacheScope, ChunkHasher, KVLayout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", nargs="*", choices=[[], "hash", "cpu", "disk"], help="default: all")
    parser.add_argument("--chunk-mib", type=float, default=8.0, help="payload of one chunk (MiB)")
    parser.add_argument("--total-mib", type=float, default=512.0, help="data moved per measurement (MiB)")
    parser.add_argument("--repeat", type=int, default=5, help="measurements per figure (median reported)")
    parser.add_argument("--disk-dir", default=None, help="directory for the disk benchmark (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def _median_seconds(function: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layout_for(chunk_bytes: int, tokens: int = 256) -> KVLayout:
    """A Llama-like layout (8 kv heads x 128, bf16) with as many layers as fill ``chunk_bytes``."""
    per_layer = 2 * tokens * 8 * 128 * 2
    return KVLayout(max(1, chunk_bytes // per_layer), 8, 128, "bfloat16")


def _chunks(layout: KVLayout, count: int, tokens: int = 256) -> list[Chunk]:
    scope = CacheScope("bench", "bench-model", "0" * 16, layout)
    keys = ChunkHasher(scope, chunk_size=tokens).keys(np.arange(count * tokens) % 50_000)
    return [Chunk(key, torch.randn(layout.chunk_shape(tokens)).to(torch.bfloat16), i) for i, key in enumerate(keys)]


def bench_hash(args: argparse.Namespace) -> list[dict]:
    tokens = np.random.default_rng(0).integers(0, 128_000, size=1_000_000, dtype=np.uint32)
    data = tokens.tobytes()
    layout = KVLayout(32, 8, 128, "bfloat16")
    scope = CacheScope("bench", "bench-model", "0" * 16, layout)
    raw = {
        "blake3": lambda: blake3.blake3(data).digest(),
        "sha256": lambda: hashlib.sha256(data).digest(),
        "xxh3_128": lambda: xxhash.xxh3_128_digest(data),
    }
    rows = []
    for algorithm, baseline in raw.items():
        hasher = ChunkHasher(scope, chunk_size=256, algorithm=algorithm)
        ours = _median_seconds(lambda h=hasher: h.keys(tokens), args.repeat)
        base = _median_seconds(baseline, args.repeat)
        rows.append({
            "benchmark": f"hash {algorithm} (256-token chunks)",
            "ours": f"{ours / len(tokens) * 1e9:.2f} ns/token",
            "baseline": f"{base / len(tokens) * 1e9:.2f} ns/token (one {algorithm} call over all token bytes)",
            "ratio": base / ours,
        })
    return rows


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _workload(args: argparse.Namespace) -> tuple[list[Chunk], int]:
    """The chunks one measurement moves, and their total bytes."""
    count = max(1, int(args.total_mib / args.chunk_mib))
    chunks = _chunks(_layout_for(int(args.chunk_mib * 2**20)), count)
    return chunks, sum(c.kv.nbytes for c in chunks)


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    from lmcache_cpu.backend import CpuBackend
    from lmcache_cpu.settings import CpuSettings

    chunks, nbytes = _workload(args)
    count, keys = len(chunks), [c.key for c in chunks]
    destinations = [torch.empty_like(c.kv) for c in chunks]
    for d in destinations:
        d.fill_(0)  # fault the pages in so the baseline is a pure copy

    def baseline() -> None:
        for d, c in zip(destinations, chunks, strict=True):
            d.copy_(c.kv)

    backend = CpuBackend(CpuSettings(max_size=nbytes * 2 + 2**20), BackendContext("cpu", "raw"))
    put = _median_seconds(lambda: backend.put_many(chunks), args.repeat, setup=lambda: backend.delete(keys))

    def get_and_copy() -> None:
        for d, got in zip(destinations, backend.get_many(keys), strict=True):
            d.copy_(got)

    get = _median_seconds(get_and_copy, args.repeat)
    base = _median_seconds(baseline, args.repeat)
    backend.close()
    size = f"{count} x {nbytes // count / 2**20:.1f} MiB"
    return [
        {"benchmark": f"cpu tier put ({size})", "ours": f"{_gbps(nbytes, put):.2f} GB/s",
         "baseline": f"{_gbps(nbytes, base):.2f} GB/s (Tensor.copy_)", "ratio": base / put},
        {"benchmark": f"cpu tier get + copy into KV buffer ({size})", "ours": f"{_gbps(nbytes, get):.2f} GB/s",
         "baseline": f"{_gbps(nbytes, base):.2f} GB/s (Tensor.copy_)", "ratio": base / get},
    ]


def bench_disk(args: argparse.Namespace) -> list[dict]:
    from lmcache_disk.backend import DiskBackend
    from lmcache_disk.settings import DiskSettings

    chunks, nbytes = _workload(args)
    count, keys = len(chunks), [c.key for c in chunks]
    with tempfile.TemporaryDirectory(dir=args.disk_dir) as directory:
        root = Path(directory)
        tier_dir, raw_dir = root / "tier", root / "raw"
        raw_dir.mkdir()
        backend = DiskBackend(DiskSettings(path=tier_dir, max_size=nbytes * 2 + 2**24), BackendContext("disk", "raw"))
        payloads = [memoryview(c.kv.view(torch.uint8).numpy()).cast("B") for c in chunks]

        def raw_write() -> None:
            for i, payload in enumerate(payloads):
                with open(raw_dir / f"{i}.bin", "wb", buffering=0) as file:
                    file.write(payload)

        def raw_read() -> None:
            for i in range(count):
                with open(raw_dir / f"{i}.bin", "rb", buffering=0) as file:
                    buffer = bytearray(os.fstat(file.fileno()).st_size)
                    file.readinto(buffer)

        put = _median_seconds(lambda: backend.put_many(chunks), args.repeat, setup=lambda: backend.delete(keys))
        def raw_unlink() -> None:
            for path in raw_dir.iterdir():
                path.unlink()

        base_write = _median_seconds(raw_write, args.repeat, setup=raw_unlink)
        raw_write()
        get = _median_seconds(lambda: backend.get_many(keys), args.repeat)
        base_read = _median_seconds(raw_read, args.repeat)
        assert all(got is not None for got in backend.get_many(keys))
        backend.close()
    size = f"{count} x {nbytes // count / 2**20:.1f} MiB, page cache warm"
    return [
        {"benchmark": f"disk tier write ({size})", "ours": f"{_gbps(nbytes, put):.2f} GB/s",
         "baseline": f"{_gbps(nbytes, base_write):.2f} GB/s (open/write/close)", "ratio": base_write / put},
        {"benchmark": f"disk tier read ({size})", "ours": f"{_gbps(nbytes, get):.2f} GB/s",
         "baseline": f"{_gbps(nbytes, base_read):.2f} GB/s (open/readinto/close)", "ratio": base_read / get},
    ]


BENCHMARKS = {"hash": bench_hash, "cpu": bench_cpu, "disk": bench_disk}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in args.which or list(BENCHMARKS):
        rows.extend(BENCHMARKS[name](args))
    print("| benchmark | lmcache-core | baseline | ratio (ours / baseline speed) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['benchmark']} | {row['ours']} | {row['baseline']} | {row['ratio']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
