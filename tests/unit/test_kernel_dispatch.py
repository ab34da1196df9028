"""The dispatch point: which caches the Triton kernels address, and ``LMCACHE_KERNELS``."""

from __future__ import annotations

import pytest
import torch

from lmcache_kernels import KERNELS_VARIABLE, PagedLayout, gather, triton_strides
from lmcache_kernels.addressing import paged_strides

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM = 4, 2, 16, 8


def test_strides_follow_the_physical_order_of_a_standard_cache() -> None:
    hnd = torch.empty(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    nhd = torch.empty(BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3)  # same logical shape
    for layer in (hnd, nhd):
        strides = paged_strides([layer], PagedLayout.STANDARD)
        assert strides is not None
        assert (strides.block_size, strides.heads, strides.head_dim) == (BLOCK_SIZE, HEADS, HEAD_DIM)
        assert (strides.block, strides.token, strides.head, strides.dim, strides.part) == (
            layer.stride(0), layer.stride(2), layer.stride(1), 1, HEAD_DIM)


def test_mla_has_one_part() -> None:
    strides = paged_strides([torch.empty(BLOCKS, BLOCK_SIZE, 3 * HEAD_DIM)], PagedLayout.MLA)
    assert strides is not None and (strides.heads, strides.head_dim, strides.part) == (1, 3 * HEAD_DIM, 0)


@pytest.mark.parametrize("layout", [PagedLayout.CPU, PagedLayout.CPU_AMX])
def test_cpu_layouts_stay_with_the_reference(layout: PagedLayout) -> None:
    assert paged_strides([torch.empty(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)], layout) is None


def test_layers_of_different_geometry_stay_with_the_reference() -> None:
    layers = [torch.empty(blocks, HEADS, BLOCK_SIZE, 2 * HEAD_DIM) for blocks in (BLOCKS, BLOCKS + 1)]
    assert paged_strides(layers, PagedLayout.STANDARD) is None


def test_cpu_caches_use_the_reference() -> None:
    layer = torch.empty(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    assert triton_strides([layer], torch.empty(1, 2, 1, HEADS, HEAD_DIM), PagedLayout.STANDARD) is None


def test_a_wrong_kernels_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNELS_VARIABLE, "fastest")
    layer = torch.zeros(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    with pytest.raises(ValueError, match=f"{KERNELS_VARIABLE}: expected one of auto, reference, got 'fastest'"):
        gather([layer], torch.empty(1, 2, 1, HEADS, HEAD_DIM), torch.tensor([0]), PagedLayout.STANDARD)
