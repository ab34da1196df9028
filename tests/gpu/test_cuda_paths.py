"""CUDA paths: pinned host buffers and the paged-KV copy on a real GPU, checked against the CPU reference.

Skipped, with the reason, on machines without CUDA (CI has none); run on a GPU host with
``pytest tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_core.memory import MemoryPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: this machine has no GPU"),
]


def test_pool_pins_host_memory_when_cuda_is_present() -> None:
    pool = MemoryPool(2**20)
    buffer = pool.allocate((1024,), torch.float32)
    assert buffer is not None and buffer.is_pinned()


@pytest.mark.parametrize("layout_name", ["standard", "flash_attn", "flashinfer_nhd", "flashinfer_hnd", "mla"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_copy_on_cuda_matches_cpu_reference(layout_name: str, dtype: torch.dtype) -> None:
    from lmcache_core.integrations.vllm.paged import PagedLayout, copy_paged_kv

    layout = PagedLayout(layout_name)
    blocks, block_size, heads, head_dim, layers = 64, 16, 4, 64, 3
    shapes = {
        "standard": (blocks, heads, block_size, 2 * head_dim),
        "flash_attn": (2, blocks, block_size, heads, head_dim),
        "flashinfer_nhd": (blocks, 2, block_size, heads, head_dim),
        "flashinfer_hnd": (blocks, 2, heads, block_size, head_dim),
        "mla": (blocks, block_size, head_dim),
    }
    generator = torch.Generator().manual_seed(0)
    cpu_cache = [torch.randn(shapes[layout_name], generator=generator).to(dtype) for _ in range(layers)]
    gpu_cache = [layer.cuda() for layer in cpu_cache]
    slots = torch.randperm(blocks * block_size, generator=generator)[:200]
    factor, kv_heads = layout.kv_factor, (1 if layout is PagedLayout.MLA else heads)
    shape = (layers, factor, len(slots), kv_heads, head_dim)
    expected = torch.empty(shape, dtype=dtype)
    copy_paged_kv(cpu_cache, expected, slots, layout, "save")
    gathered = torch.empty(shape, dtype=dtype, pin_memory=True)
    copy_paged_kv(gpu_cache, gathered, slots, layout, "save")
    torch.cuda.synchronize()
    assert torch.equal(gathered, expected)

    fresh = torch.randn(shape, generator=generator).to(dtype)
    copy_paged_kv(cpu_cache, fresh, slots, layout, "load")
    copy_paged_kv(gpu_cache, fresh.pin_memory(), slots, layout, "load")
    torch.cuda.synchronize()
    for cpu_layer, gpu_layer in zip(cpu_cache, gpu_cache, strict=True):
        assert torch.equal(gpu_layer.cpu(), cpu_layer)
