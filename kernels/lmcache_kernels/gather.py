"""``gather``: the KV of a list of slots, every layer, from vLLM's paged cache into one dense buffer.

``buffer`` is ``[layers, kv_factor, len(slots), kv_heads, head_dim]`` (see :mod:`.layouts`) and may be
pinned host memory (a save to the cpu tier) or a device buffer. One name through every piece, as in
FlashInfer and the Triton tutorials:

- :func:`gather_reference`: torch, any device, layout and stride order; the tests' oracle and the CPU path;
- :func:`_gather_kernel`: Triton, the GPU layouts of :mod:`.addressing`, all layers in one launch;
- :func:`gather_triton`: the kernel's wrapper (where the buffer lives, staging);
- :func:`gather`: the dispatch point (:mod:`.dispatch`) everything else calls;
- tests: ``tests/unit/test_kernel_gather.py``; benchmark: ``benchmarks/bench_kernels.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_kernels._triton import jit, tl
from lmcache_kernels.addressing import launch, paged_strides, paged_tile
from lmcache_kernels.dispatch import triton_strides
from lmcache_kernels.layouts import PagedLayout, block_size_of, check_buffer, token_views, whole_blocks


def gather(paged: Sequence[torch.Tensor], buffer: torch.Tensor, slots: torch.Tensor, layout: PagedLayout) -> None:
    """Fill ``buffer`` with the KV of ``slots`` from the per-layer tensors ``paged``.

    Runs the Triton kernel when :mod:`.dispatch` allows, else :func:`gather_reference`. Like a
    ``copy_(non_blocking=True)``, it may return before a copy into pinned host memory is complete.
    """
    check_buffer(paged, buffer, slots, layout)
    if slots.numel() == 0:
        return
    if triton_strides(paged, buffer, layout) is None:
        gather_reference(paged, buffer, slots, layout)
    else:
        gather_triton(paged, buffer, slots, layout)


def gather_reference(paged: Sequence[torch.Tensor], buffer: torch.Tensor, slots: torch.Tensor,
                     layout: PagedLayout) -> None:
    """Torch reference: advanced indexing on :func:`.layouts.token_views`, so any device and stride order.

    When the slots cover whole blocks in order (the usual case: hits and chunks are block-aligned),
    blocks move as contiguous pages and are re-laid out in bulk; otherwise tokens are indexed one by
    one, which is several times slower on layouts that interleave tokens (the CPU backend's K).
    """
    for index, layer in enumerate(paged):
        views = token_views(layer, layout)
        block_size = block_size_of(views)
        whole = whole_blocks(slots, block_size)
        if whole is not None:
            _gather_blocks(views, buffer[index], whole.to(layer.device))
            continue
        device_slots = slots.to(layer.device, non_blocking=True)
        blocks = torch.div(device_slots, block_size, rounding_mode="floor")
        offsets = device_slots - blocks * block_size
        for part, view in enumerate(views):
            group_size = view.shape[2]
            where = (blocks, torch.div(offsets, group_size, rounding_mode="floor"), offsets % group_size)
            buffer[index, part].copy_(view[where].flatten(-2), non_blocking=True)


def _gather_blocks(views: list[torch.Tensor], buffer: torch.Tensor, blocks: torch.Tensor) -> None:
    """Whole-block path: one ``index_select`` along the block axis of each K/V view re-lays the pages
    out in the same pass (~4 GB/s on one CPU core, against ~2.5 GB/s for gathering the pages first
    and re-laying them out after)."""
    for part, view in enumerate(views):  # [blocks, token groups, tokens, heads, dim groups, dims], aliasing the cache
        tokens = buffer[part].unflatten(0, (blocks.numel(), *view.shape[1:3])).unflatten(-1, view.shape[-2:])
        if tokens.device == view.device and tokens.is_contiguous():
            torch.index_select(view, 0, blocks, out=tokens)
        else:
            tokens.copy_(view.index_select(0, blocks), non_blocking=True)


def gather_triton(paged: Sequence[torch.Tensor], buffer: torch.Tensor, slots: torch.Tensor, layout: PagedLayout,
                  *, zero_copy: bool = False) -> None:
    """Run :func:`_gather_kernel`; ``buffer`` must have the cache's dtype.

    A buffer on the cache's device is written directly. A host buffer is filled through a device
    staging buffer and one ``copy_``: the copy engine moves the bytes at the link's speed while the
    SMs stay free for the forward pass. ``zero_copy=True`` lets the kernel write a pinned host buffer
    itself (through unified addressing, as LMCache's kernels do), saving the staging memory; whether
    that is faster is what ``benchmarks/bench_kernels.py`` measures, so it is off by default.
    """
    strides = paged_strides(paged, layout)
    if strides is None:
        raise ValueError(f"the Triton gather does not handle {layout.value!r} caches of this shape; use gather()")
    device = paged[0].device
    if buffer.device == device or (zero_copy and buffer.is_pinned()):
        launch(_gather_kernel, paged, buffer, slots, strides)
        return
    staging = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
    launch(_gather_kernel, paged, staging, slots, strides)
    buffer.copy_(staging, non_blocking=True)


@jit
def _gather_kernel(
    cache, layer_offsets, buffer, slots, num_tokens,
    stride_block, stride_token, stride_part, stride_head, stride_dim,
    buffer_stride_layer, buffer_stride_part, buffer_stride_token, buffer_stride_head, buffer_stride_dim,
    KV_FACTOR: tl.constexpr, LAYER_ALIGN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One tile of one (layer, part): cache -> buffer. The addressing is :func:`.addressing.paged_tile`."""
    cache_ptrs, buffer_ptrs, mask = paged_tile(
        cache, layer_offsets, buffer, slots, num_tokens,
        stride_block, stride_token, stride_part, stride_head, stride_dim,
        buffer_stride_layer, buffer_stride_part, buffer_stride_token, buffer_stride_head, buffer_stride_dim,
        KV_FACTOR, LAYER_ALIGN, BLOCK_SIZE, HEADS, HEAD_DIM, BLOCK_T, BLOCK_H, BLOCK_D,
    )
    tl.store(buffer_ptrs, tl.load(cache_ptrs, mask=mask), mask=mask)
