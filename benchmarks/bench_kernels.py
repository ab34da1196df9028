"""lmcache_kernels on a GPU: paged KV <-> pinned host, per 256-token chunk, and a simulated forward pass
with layer-by-layer transfers on a side stream.

    python benchmarks/bench_kernels.py        # on a CUDA host with Triton; prints markdown tables

A Llama-3-8B-shaped cache (32 layers, 8 KV heads x 128, bf16, 16-token blocks, ``standard`` layout in
both physical stride orders vLLM may pick, NHD and HND) with chunks at random blocks.

1. Copies, one 256-token chunk (32 MiB) per call, GB/s of chunk bytes:

   - save = gather + device-to-host into a pinned buffer, load = host-to-device + scatter;
   - ``triton, staged``: the kernel into a device buffer, then one ``copy_`` (what ``gather`` does with
     a host buffer); ``triton, zero-copy``: the kernel reads or writes pinned memory itself;
   - ``torch reference``: ``gather_reference`` / ``scatter_reference`` (the whole-block path);
   - ``naive per-block loop``: one ``copy_`` per (layer, block) of the raw page, as ``swap_blocks``
     does; it does not even re-lay pages out into the chunk layout, so it flatters the naive way;
   - ``dense copy_``: one contiguous pinned copy of the same bytes: the link's ceiling.

   Each method's result is checked against the reference before it is timed.

2. A simulated forward: 32 layers of one bf16 matmul each (sized to ~1 ms on this GPU), alone and
   with the KV of 4096 tokens per layer (16 chunks) saved or loaded layer by layer, either on the
   compute stream (serialized) or on a side stream (overlapped: an event per layer says when a
   layer's KV is ready to save, or when a loaded layer may run).

Imports only torch, triton and lmcache_kernels (the GPU machine has no vLLM and no lmcache-core
dependencies). Times are medians of CUDA-synchronised wall-clock runs after warm-ups (Triton compiles
during the warm-ups).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections.abc import Callable

import torch

from lmcache_kernels import PagedLayout, gather_reference, gather_triton, scatter_reference, scatter_triton

LAYERS, HEADS, HEAD_DIM, BLOCK, CHUNK = 32, 8, 128, 16, 256
BLOCKS = 2048  # pages per layer: 4 GiB of cache in all
FORWARD_TOKENS = 4096  # tokens whose KV moves per layer in the forward simulation
LAYOUT = PagedLayout.STANDARD
DTYPE = torch.bfloat16


def timed(function: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of one call, synchronised."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_cache(order: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The logical ``[B, H, N, 2D]`` layers and their physical pages (``[B, ...]``, contiguous)."""
    shape = (BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM) if order == "HND" else (BLOCKS, BLOCK, HEADS, 2 * HEAD_DIM)
    pages = [torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(LAYERS)]
    logical = pages if order == "HND" else [page.permute(0, 2, 1, 3) for page in pages]
    return logical, pages


def block_slots(blocks: torch.Tensor) -> torch.Tensor:
    return (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()


def chunk_shape(tokens: int) -> tuple[int, ...]:
    return (LAYERS, 2, tokens, HEADS, HEAD_DIM)


def naive_save(pages: list[torch.Tensor], host_pages: torch.Tensor, blocks: list[int]) -> None:
    for layer, page in enumerate(pages):
        for index, block in enumerate(blocks):
            host_pages[layer, index].copy_(page[block], non_blocking=True)


def naive_load(pages: list[torch.Tensor], host_pages: torch.Tensor, blocks: list[int]) -> None:
    for layer, page in enumerate(pages):
        for index, block in enumerate(blocks):
            page[block].copy_(host_pages[layer, index], non_blocking=True)


def copy_rows(order: str) -> list[tuple[str, str, float]]:
    """(direction, method, seconds per chunk) for one stride order."""
    cache, pages = make_cache(order)
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randperm(BLOCKS, generator=generator)[: CHUNK // BLOCK] for _ in range(8)]
    next_chunk = itertools.cycle(chunks).__next__
    host = torch.empty(chunk_shape(CHUNK), dtype=DTYPE, pin_memory=True)
    expected = torch.empty_like(host)
    device_dense = torch.randn(chunk_shape(CHUNK), dtype=DTYPE, device="cuda")
    host_pages = torch.empty((LAYERS, CHUNK // BLOCK, *pages[0].shape[1:]), dtype=DTYPE, pin_memory=True)

    # Each method's result against the reference, once, before timing.
    slots = block_slots(chunks[0])
    gather_reference(cache, expected, slots, LAYOUT)
    torch.cuda.synchronize()
    for zero_copy in (False, True):
        host.zero_()
        gather_triton(cache, host, slots, LAYOUT, zero_copy=zero_copy)
        torch.cuda.synchronize()
        assert torch.equal(host, expected), f"{order}: triton gather (zero_copy={zero_copy}) differs from the reference"
        probe = torch.randn(host.shape, dtype=DTYPE).pin_memory()
        scatter_triton(cache, probe, slots, LAYOUT, zero_copy=zero_copy)
        gather_reference(cache, expected, slots, LAYOUT)
        torch.cuda.synchronize()
        assert torch.equal(expected, probe), f"{order}: triton scatter (zero_copy={zero_copy}) differs from reference"

    def run(operation: Callable[[torch.Tensor], None]) -> float:
        return timed(lambda: operation(block_slots(next_chunk())))

    return [
        ("save", "triton, staged", run(lambda s: gather_triton(cache, host, s, LAYOUT))),
        ("save", "triton, zero-copy", run(lambda s: gather_triton(cache, host, s, LAYOUT, zero_copy=True))),
        ("save", "torch reference", run(lambda s: gather_reference(cache, host, s, LAYOUT))),
        ("save", "naive per-block loop", timed(lambda: naive_save(pages, host_pages, next_chunk().tolist()))),
        ("save", "dense copy_ (ceiling)", timed(lambda: host.copy_(device_dense, non_blocking=True))),
        ("load", "triton, staged", run(lambda s: scatter_triton(cache, host, s, LAYOUT))),
        ("load", "triton, zero-copy", run(lambda s: scatter_triton(cache, host, s, LAYOUT, zero_copy=True))),
        ("load", "torch reference", run(lambda s: scatter_reference(cache, host, s, LAYOUT))),
        ("load", "naive per-block loop", timed(lambda: naive_load(pages, host_pages, next_chunk().tolist()))),
        ("load", "dense copy_ (ceiling)", timed(lambda: device_dense.copy_(host, non_blocking=True))),
    ]


def calibrated_matmul(target_s: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Square bf16 operands whose product takes about ``target_s`` on this GPU."""
    size = 4096
    for _ in range(3):
        a = torch.randn(size, size, device="cuda", dtype=DTYPE)
        b = torch.randn(size, size, device="cuda", dtype=DTYPE)
        out = torch.empty_like(a)
        seconds = timed(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out), repeat=10)
        size = max(256, round(size * (target_s / seconds) ** (1 / 3) / 256) * 256)
    return a, b, out


def forward_rows() -> list[tuple[str, float, float]]:
    """(scenario, compute-stream ms, ms until every transfer is done) of one simulated forward."""
    cache, _ = make_cache("NHD")
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randperm(BLOCKS, generator=generator)[: FORWARD_TOKENS // BLOCK]
    slots = block_slots(blocks).cuda()
    host = torch.empty((LAYERS, 2, FORWARD_TOKENS, HEADS, HEAD_DIM), dtype=DTYPE, pin_memory=True)
    host.copy_(torch.randn(host.shape, dtype=DTYPE, device="cuda"))
    a, b, out = calibrated_matmul()
    side = torch.cuda.Stream()

    def save(layer: int) -> None:
        gather_triton([cache[layer]], host[layer : layer + 1], slots, LAYOUT)

    def load(layer: int) -> None:
        scatter_triton([cache[layer]], host[layer : layer + 1], slots, LAYOUT)

    def forward(transfer: Callable[[int], None] | None, when: str, overlapped: bool) -> tuple[float, float]:
        main = torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        loaded: list[torch.cuda.Event] = []
        torch.cuda.synchronize()
        began = time.perf_counter()
        start.record()
        if transfer is not None and when == "before" and overlapped:
            with torch.cuda.stream(side):
                for layer in range(LAYERS):
                    transfer(layer)
                    loaded.append(torch.cuda.Event())
                    loaded[-1].record()
        for layer in range(LAYERS):
            if transfer is not None and when == "before":
                if overlapped:
                    main.wait_event(loaded[layer])
                else:
                    transfer(layer)
            torch.matmul(a, b, out=out)
            if transfer is not None and when == "after":
                if overlapped:
                    ready = torch.cuda.Event()
                    ready.record()
                    with torch.cuda.stream(side):
                        side.wait_event(ready)
                        transfer(layer)
                else:
                    transfer(layer)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), (time.perf_counter() - began) * 1e3

    scenarios = [
        ("forward alone", None, "after", False),
        ("+ save each layer's KV, same stream", save, "after", False),
        ("+ save each layer's KV, side stream", save, "after", True),
        ("+ load each layer's KV first, same stream", load, "before", False),
        ("+ load each layer's KV first, side stream", load, "before", True),
    ]
    rows = []
    for name, transfer, when, overlapped in scenarios:
        runs = [forward(transfer, when, overlapped) for _ in range(8)][2:]  # two warm-ups
        rows.append((name, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")
    try:
        import triton
    except ImportError:
        sys.exit("bench_kernels: needs Triton (pip install 'lmcache-core[cuda]'); nothing was measured")

    chunk_bytes = LAYERS * 2 * CHUNK * HEADS * HEAD_DIM * DTYPE.itemsize
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"Llama-3-8B-shaped cache, {CHUNK}-token chunks ({chunk_bytes / 2**20:.0f} MiB), random blocks\n")
    print("| order | direction | method | µs per chunk | GB/s | share of dense copy_ speed |")
    print("|---|---|---|---|---|---|")
    for order in ("NHD", "HND"):
        rows = copy_rows(order)
        ceiling = {direction: seconds for direction, method, seconds in rows if method.startswith("dense")}
        for direction, method, seconds in rows:
            print(f"| {order} | {direction} | {method} | {seconds * 1e6:.0f} | {chunk_bytes / seconds / 1e9:.1f} "
                  f"| {ceiling[direction] / seconds:.0%} |")
        torch.cuda.empty_cache()

    layer_bytes = 2 * FORWARD_TOKENS * HEADS * HEAD_DIM * DTYPE.itemsize
    print(f"\nSimulated forward: {LAYERS} layers of one ~1 ms matmul; {layer_bytes / 2**20:.0f} MiB of KV "
          f"({FORWARD_TOKENS} tokens) per layer moved with the Triton ops, NHD cache\n")
    print("| scenario | compute stream ms | ms until transfers done |")
    print("|---|---|---|")
    for name, compute_ms, total_ms in forward_rows():
        print(f"| {name} | {compute_ms:.2f} | {total_ms:.2f} |")


if __name__ == "__main__":
    main()
