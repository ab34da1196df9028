"""The Triton gather/scatter on a real GPU: chosen by the dispatch point, and equal to the torch reference
for device, staged-host and zero-copy buffers. The interpreter tests (tests/unit/test_kernel_*.py) cover
layouts and slot patterns; these check what only a GPU shows (launch, alignment hints, pinned memory).

Skipped, with the reason, without CUDA or Triton; run on a GPU host with ``pytest tests/gpu``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lmcache_kernels import PagedLayout, gather, gather_reference, gather_triton, scatter_triton, triton_strides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: this machine has no GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="needs Triton: pip install 'lmcache-core[cuda]'"),
]

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM, LAYERS = 64, 8, 16, 128, 4


def standard_cache(order: str) -> list[torch.Tensor]:
    shape = (BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM) if order == "HND" else (BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM)
    layers = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    return layers if order == "HND" else [layer.permute(0, 2, 1, 3) for layer in layers]


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("where", ["device", "host", "host zero-copy"])
def test_triton_ops_on_cuda_equal_the_reference(order: str, where: str) -> None:
    torch.manual_seed(0)
    cache = standard_cache(order)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE)[:300]
    shape = (LAYERS, 2, len(slots), HEADS, HEAD_DIM)
    expected = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    assert triton_strides(cache, expected, PagedLayout.STANDARD) is not None  # gather() picks the kernel
    gather_reference(cache, expected, slots, PagedLayout.STANDARD)
    buffer = (torch.empty(shape, dtype=torch.bfloat16, device="cuda") if where == "device"
              else torch.empty(shape, dtype=torch.bfloat16, pin_memory=True))
    zero_copy = where == "host zero-copy"
    gather_triton(cache, buffer, slots, PagedLayout.STANDARD, zero_copy=zero_copy)
    torch.cuda.synchronize()
    assert torch.equal(buffer.cuda(), expected)

    fresh = torch.randn(shape).to(torch.bfloat16)
    fresh = fresh.cuda() if where == "device" else fresh.pin_memory()
    scatter_triton(cache, fresh, slots, PagedLayout.STANDARD, zero_copy=zero_copy)
    gather(cache, expected, slots, PagedLayout.STANDARD)
    torch.cuda.synchronize()
    assert torch.equal(expected, fresh.cuda())
