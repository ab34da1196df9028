"""``scatter``: one dense buffer of KV into vLLM's paged cache at a list of slots, every layer.

The inverse of :mod:`.gather` (same buffer shape, same layouts); the slots must be distinct. One name
through every piece:

- :func:`scatter_reference`: torch, any device, layout and stride order; the tests' oracle and the CPU path;
- :func:`_scatter_kernel`: Triton, the GPU layouts of :mod:`.addressing`, all layers in one launch;
- :func:`scatter_triton`: the kernel's wrapper (where the buffer lives, staging);
- :func:`scatter`: the dispatch point (:mod:`.dispatch`) everything else calls;
- tests: ``tests/unit/test_kernel_scatter.py``; benchmark: ``benchmarks/bench_kernels.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_kernels._triton import jit, tl
from lmcache_kernels.addressing import launch, paged_strides, paged_tile
from lmcache_kernels.dispatch import triton_strides
from lmcache_kernels.layouts import PagedLayout, block_size_of, check_buffer, token_views, whole_blocks


def scatter(paged: Sequence[torch.Tensor], buffer: torch.Tensor, slots: torch.Tensor, layout: PagedLayout) -> None:
    """Write ``buffer`` into the per-layer tensors ``paged`` at ``slots`` (distinct).

    Runs the Triton kernel when :mod:`.dispatch` allows, else :func:`scatter_reference`. Ordered on
    the current stream like a ``copy_(non_blocking=True)``.
    """
    check_buffer(paged, buffer, slots, layout)
    if slots.numel() == 0:
        return
    if triton_strides(paged, buffer, layout) is None:
        scatter_reference(paged, buffer, slots, layout)
    else:
        scatter_triton(paged, buffer, slots, layout)


def scatter_reference(paged: Sequence[torch.Tensor], buffer: torch.Tensor, slots: torch.Tensor,
                      layout: PagedLayout) -> None:
    """Torch reference: advanced indexing on :func:`.layouts.token_views`, so any device and stride order.

    Whole blocks in order move as pages (one ``index_copy_`` per K/V view); other slots token by token.
    """
    for index, layer in enumerate(paged):
        views = token_views(layer, layout)
        block_size = block_size_of(views)
        whole = whole_blocks(slots, block_size)
        if whole is not None:
            _scatter_blocks(views, buffer[index], whole.to(layer.device))
            continue
        device_slots = slots.to(layer.device, non_blocking=True)
        blocks = torch.div(device_slots, block_size, rounding_mode="floor")
        offsets = device_slots - blocks * block_size
        for part, view in enumerate(views):
            group_size = view.shape[2]
            where = (blocks, torch.div(offsets, group_size, rounding_mode="floor"), offsets % group_size)
            view[where] = buffer[index, part].to(layer.device, non_blocking=True).unflatten(-1, view.shape[-2:])


def _scatter_blocks(views: list[torch.Tensor], buffer: torch.Tensor, blocks: torch.Tensor) -> None:
    """Whole-block path: one ``index_copy_`` along the block axis of each K/V view."""
    for part, view in enumerate(views):  # [blocks, token groups, tokens, heads, dim groups, dims], aliasing the cache
        tokens = buffer[part].unflatten(0, (blocks.numel(), *view.shape[1:3])).unflatten(-1, view.shape[-2:])
        view.index_copy_(0, blocks, tokens.to(view.device, non_blocking=True))


def scatter_triton(paged: Sequence[torch.Tensor], buffer: torch.Tensor, slots: torch.Tensor, layout: PagedLayout,
                   *, zero_copy: bool = False) -> None:
    """Run :func:`_scatter_kernel`; ``buffer`` must have the cache's dtype.

    A buffer on the cache's device is read directly; a host buffer is first copied to the device in
    one ``copy_`` (the copy engine's job, leaving the SMs to the forward pass). ``zero_copy=True``
    lets the kernel read a pinned host buffer itself; see :func:`.gather.gather_triton`.
    """
    strides = paged_strides(paged, layout)
    if strides is None:
        raise ValueError(f"the Triton scatter does not handle {layout.value!r} caches of this shape; use scatter()")
    device = paged[0].device
    if not (buffer.device == device or (zero_copy and buffer.is_pinned())):
        buffer = buffer.to(device, non_blocking=True)
    launch(_scatter_kernel, paged, buffer, slots, strides)


@jit
def _scatter_kernel(
    cache, layer_offsets, buffer, slots, num_tokens,
    stride_block, stride_token, stride_part, stride_head, stride_dim,
    buffer_stride_layer, buffer_stride_part, buffer_stride_token, buffer_stride_head, buffer_stride_dim,
    KV_FACTOR: tl.constexpr, LAYER_ALIGN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One tile of one (layer, part): buffer -> cache. The addressing is :func:`.addressing.paged_tile`."""
    cache_ptrs, buffer_ptrs, mask = paged_tile(
        cache, layer_offsets, buffer, slots, num_tokens,
        stride_block, stride_token, stride_part, stride_head, stride_dim,
        buffer_stride_layer, buffer_stride_part, buffer_stride_token, buffer_stride_head, buffer_stride_dim,
        KV_FACTOR, LAYER_ALIGN, BLOCK_SIZE, HEADS, HEAD_DIM, BLOCK_T, BLOCK_H, BLOCK_D,
    )
    tl.store(cache_ptrs, tl.load(buffer_ptrs, mask=mask), mask=mask)
