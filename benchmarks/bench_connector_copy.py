"""The vLLM connector's load and save paths on the CPU, against a plain torch copy of the same bytes.

    python benchmarks/bench_connector_copy.py [--tokens 2048] [--repeat 5]

Drives the connector's worker half as vLLM does in a step (``bind_connector_metadata``,
``start_load_kv`` / ``wait_for_save``) over CPU pages in vLLM's CPU attention layout (``cpu``:
K transposed per block, the ``vec`` kernel's), block size 128, with the cpu tier, for both kinds
of chunk: page-packed (what the worker uses on vLLM's CPU layouts: whole pages, copied as bytes)
and token-major (the portable form: every copy re-lays K out):

- load: chunks held by the cpu tier -> the request's pages;
- save: the pages -> chunk buffers handed to the cpu tier (gather + store), as vLLM runs it: from
  the worker's reserve of buffers faulted in between steps (the wait for its refill, the gap
  between two steps, is not timed), and from fresh memory (the reserve empty: a first touch of
  every page inside the step).

Effective GB/s is KV bytes moved over wall time; the reference is ``dst.copy_(src)`` of one dense
tensor of the same size (what memory bandwidth allows one copy). Two model shapes: the tiny test
model (fp32) and a Llama-3-8B-like one (32 layers, 8 KV heads x 128, bf16). Torch uses its default
threads for both sides.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch

from lmcache_core.engine import CacheEngine
from lmcache_core.integrations.vllm.metadata import LMCacheCoreMetadata, Transfer
from lmcache_core.integrations.vllm.paged import PagedLayout
from lmcache_core.integrations.vllm.worker import LMCacheCoreWorker
from lmcache_core.keys import KVLayout

BLOCK, CHUNK = 128, 256
SHAPES = {
    "tiny (4 x 2 x 64, fp32)": (4, 2, 64, torch.float32),
    "Llama-3-8B-like (32 x 8 x 128, bf16)": (32, 8, 128, torch.bfloat16),
}


def standalone_worker(layers: int, heads: int, head_dim: int, dtype: torch.dtype, num_blocks: int,
                      packed: bool) -> Any:
    """The worker half around CPU pages and a cpu tier, without vLLM (as the unit tests build it)."""
    worker = LMCacheCoreWorker.__new__(LMCacheCoreWorker)
    worker._init_state()
    worker._chunk_size, worker._block_size = CHUNK, BLOCK
    pages = {"page_layout": PagedLayout.CPU.value, "block_size": BLOCK} if packed else {}
    worker._engine = CacheEngine.from_env(
        model_name="bench", layout=KVLayout(layers, heads, head_dim, str(dtype).removeprefix("torch."), **pages),
        environ={"LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_CPU__MAX_SIZE": "12GiB"},
    )
    worker._layers = [torch.randn(num_blocks, heads, BLOCK, 2 * head_dim).to(dtype) for _ in range(layers)]
    worker._layout = PagedLayout.CPU
    return worker


def median_s(function: Any, repeat: int, between: Any = None) -> float:
    """Median wall time of ``function``; ``between`` runs untimed after each call (a gap between steps)."""
    function()  # warm-up
    times = []
    for _ in range(repeat):
        if between is not None:
            between()
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, shape: tuple[int, int, int, torch.dtype], tokens: int, repeat: int, packed: bool) -> list[str]:
    layers, heads, head_dim, dtype = shape
    blocks_per_request = tokens // BLOCK
    worker = standalone_worker(layers, heads, head_dim, dtype, num_blocks=4 * blocks_per_request, packed=packed)
    rng = np.random.default_rng(0)
    request_blocks = rng.permutation(4 * blocks_per_request)[:blocks_per_request].tolist()
    nbytes = tokens * layers * 2 * heads * head_dim * dtype.itemsize
    counter = iter(range(1_000_000))

    def save() -> None:  # fresh token ids each time: the cpu tier stores each chunk once
        ids = np.arange(tokens, dtype=np.uint32) + 1_000_000 * (next(counter) + 1)
        worker.bind_connector_metadata(LMCacheCoreMetadata(saves=[Transfer("s", ids, request_blocks, 0, tokens)]))
        worker.wait_for_save()

    stored = np.arange(tokens, dtype=np.uint32)
    worker.bind_connector_metadata(LMCacheCoreMetadata(saves=[Transfer("s", stored, request_blocks, 0, tokens)]))
    worker.wait_for_save()

    def load() -> None:
        worker.bind_connector_metadata(LMCacheCoreMetadata(loads=[Transfer("l", stored, request_blocks, 0, tokens)]))
        worker.start_load_kv(None)
        assert not worker.get_block_ids_with_load_errors()

    source = torch.empty(nbytes, dtype=torch.uint8).random_()
    target = torch.empty_like(source)
    copy_s = median_s(lambda: target.copy_(source), repeat)
    load_s, fresh_save_s = median_s(load, repeat), median_s(save, repeat)
    worker._start_reserve(tokens)  # the reserve the worker builds in vLLM: a step's chunks, refilled between steps
    reserve = worker._reserve

    def refilled() -> None:
        while reserve.ready < reserve.target:
            time.sleep(0.001)

    reserve_save_s = median_s(save, repeat, between=refilled)
    reserve.close()
    worker._engine.close()
    gbps = lambda seconds: nbytes / seconds / 1e9  # noqa: E731
    kind = "page-packed" if packed else "token-major"
    return [
        f"| {name} | {kind} | {path} | {nbytes / 2**20:.0f} | {gbps(seconds):.2f} | {gbps(copy_s):.2f} "
        f"| {copy_s / seconds:.2f}x |"
        for path, seconds in (("load", load_s), ("save (reserve)", reserve_save_s),
                              ("save (fresh memory)", fresh_save_s))
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    lines = [
        f"Connector copy paths, {args.tokens} tokens per step, CPU layout `cpu`, block {BLOCK}, "
        f"{torch.get_num_threads()} torch threads.",
        "",
        "| model shape | chunks | path | MiB | connector GB/s | torch copy GB/s | vs torch copy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, shape in SHAPES.items():
        for packed in (True, False):
            lines += measure(name, shape, args.tokens, args.repeat, packed)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
