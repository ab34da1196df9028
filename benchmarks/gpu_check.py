"""GPU check, for a host with CUDA: paged-KV <-> pinned-host copies and the cpu tier, beside raw copies.

    python benchmarks/gpu_check.py            # prints a markdown table

Measures, for a Llama-3-8B-like layout (32 layers, 8 kv heads x 128, bf16, 16-token pages), moving
256-token chunks between a paged GPU KV cache and host memory:

- save: gather from scattered pages into a pinned host buffer (``copy_paged_kv``) vs one contiguous
  device-to-host ``copy_`` of the same bytes (the PCIe/NVLink-C2C ceiling);
- load: the reverse, host to scattered pages;
- engine round trip: ``CacheEngine.store`` from GPU KV and ``retrieve`` back to the GPU vs raw copies.
Times are CUDA-synchronised medians of 10 runs after 3 warm-ups.
"""

from __future__ import annotations

import torch
from bench_kernels import timed  # benchmarks/ is the script's folder, so on sys.path

from lmcache_core.engine import CacheEngine
from lmcache_core.integrations.vllm.paged import PagedLayout, copy_paged_kv
from lmcache_core.keys import KVLayout

LAYERS, HEADS, HEAD_DIM, BLOCK, CHUNK = 32, 8, 128, 16, 256


def main() -> None:
    assert torch.cuda.is_available(), "needs CUDA"
    dtype = torch.bfloat16
    tokens = 16 * CHUNK  # 4096 tokens = 16 chunks, 512 MiB of KV
    blocks = 4 * tokens // BLOCK
    cache = [torch.randn(blocks, HEADS, BLOCK, 2 * HEAD_DIM, device="cuda", dtype=dtype) for _ in range(LAYERS)]
    generator = torch.Generator().manual_seed(0)
    pages = torch.randperm(blocks, generator=generator)[: tokens // BLOCK]
    slots = (pages[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)
    shape = (LAYERS, 2, tokens, HEADS, HEAD_DIM)
    host = torch.empty(shape, dtype=dtype, pin_memory=True)
    device_dense = torch.randn(shape, device="cuda", dtype=dtype)
    nbytes = host.nbytes
    rows = []

    save = timed(lambda: copy_paged_kv(cache, host, slots, PagedLayout.STANDARD, "save"), repeat=10)
    raw_d2h = timed(lambda: host.copy_(device_dense, non_blocking=True), repeat=10)
    load = timed(lambda: copy_paged_kv(cache, host, slots, PagedLayout.STANDARD, "load"), repeat=10)
    raw_h2d = timed(lambda: device_dense.copy_(host, non_blocking=True), repeat=10)
    rows.append(("save: paged GPU -> pinned host (copy_paged_kv)", nbytes / save, "dense D2H copy_", nbytes / raw_d2h))
    rows.append(("load: pinned host -> paged GPU (copy_paged_kv)", nbytes / load, "dense H2D copy_", nbytes / raw_h2d))

    engine = CacheEngine.from_env(
        model_name="gpu-check", layout=KVLayout(LAYERS, HEADS, HEAD_DIM, "bfloat16"),
        environ={"LMCACHE_CPU__MAX_SIZE": "8GiB"},
    )
    token_ids = list(range(tokens))

    def store() -> None:
        engine.stack.delete(engine.keys(token_ids))
        engine.store(token_ids, device_dense)

    store_s = timed(store, repeat=5, warmup=1)
    retrieve_s = timed(lambda: engine.retrieve(token_ids, device="cuda"), repeat=5, warmup=1)
    rows.append(("engine.store from GPU KV (cpu tier)", nbytes / store_s, "dense D2H copy_", nbytes / raw_d2h))
    rows.append(("engine.retrieve to GPU (cpu tier)", nbytes / retrieve_s, "dense H2D copy_", nbytes / raw_h2d))
    assert torch.equal(engine.retrieve(token_ids, device="cuda"), device_dense)
    engine.close()

    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | {nbytes / 2**20:.0f} MiB per op")
    print("| operation | lmcache-core GB/s | baseline | baseline GB/s | ratio |")
    print("|---|---|---|---|---|")
    for name, ours, base_name, base in rows:
        print(f"| {name} | {ours / 1e9:.1f} | {base_name} | {base / 1e9:.1f} | {ours / base:.2f}x |")


if __name__ == "__main__":
    main()
