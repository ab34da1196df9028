"""Where the Triton kernels find a token: every GPU layout as five element strides, and where each
layer starts, in one device table.

Each layout vLLM uses on GPUs keeps element (block, offset, part, head, dim) of a layer at
``layer + block*s_block + offset*s_token + part*s_part + head*s_head + dim*s_dim`` (part 0 is K or
the MLA latent, part 1 is V), whatever the physical stride order: vLLM's ``kv_cache_layout`` may
allocate the ``standard`` cache NHD (``[B, N, H, 2D]`` in memory) or HND. The strides are read off
:func:`.layouts.token_views`, which define the layouts, so :mod:`.gather` and :mod:`.scatter` need
one kernel each for all of them, and a layout added there is addressed here without new code.

The CPU layouts (``cpu``, ``cpu_amx``) stay with the torch references: vLLM only uses them in its
CPU backend, where no Triton kernel runs (``cpu_amx`` also interleaves tokens in groups, which five
strides cannot say).

Why a table: vLLM allocates one tensor per layer, so a kernel that copies all layers in one launch
(one launch per chunk, not one per layer) reads where each layer is from an ``int64`` device tensor,
as LMCache's and vLLM's multi-layer copy kernels read a table of pointers. Ours holds each layer's
offset from the first layer instead of its address, for the alignment (:func:`layer_offsets`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcache_kernels._triton import jit, next_power_of_2, tl
from lmcache_kernels.layouts import PagedLayout, token_views

TRITON_LAYOUTS = frozenset(
    {PagedLayout.STANDARD, PagedLayout.FLASH_ATTN, PagedLayout.FLASHINFER_NHD, PagedLayout.FLASHINFER_HND,
     PagedLayout.MLA}
)

# Elements one program moves per part: 8 KiB of bf16, 32 elements (four 16-byte vectors) per thread
# of 4 warps. Small tiles give many programs: a 256-token Llama-3-8B chunk is 4096 programs.
_TILE_ELEMENTS = 4096
_VECTOR_ELEMENTS = 16  # an alignment hint above 16 elements buys nothing: vectors are 16 bytes


@dataclass(frozen=True)
class PagedStrides:
    """One layer's geometry in elements, shared by all layers (the kernels use one for all)."""

    block_size: int
    heads: int
    head_dim: int
    block: int
    token: int
    part: int  # from K to V; 0 for MLA
    head: int
    dim: int


def paged_strides(paged: Sequence[torch.Tensor], layout: PagedLayout) -> PagedStrides | None:
    """The geometry of ``paged`` for the kernels, or None when they cannot address it: a CPU layout,
    or layers that differ in shape, strides, dtype or device."""
    if layout not in TRITON_LAYOUTS or not paged:
        return None
    first = paged[0]
    for layer in paged[1:]:
        if (layer.shape, layer.stride(), layer.dtype, layer.device) != (first.shape, first.stride(), first.dtype,
                                                                         first.device):
            return None
    views = token_views(first, layout)  # [B, 1, N, H, 1, D] each
    key = views[0]
    if key.data_ptr() != first.data_ptr():  # every layout above starts at the layer's first element
        return None
    stride = key.stride()
    return PagedStrides(
        block_size=key.shape[2], heads=key.shape[3], head_dim=key.shape[5],
        block=stride[0], token=stride[2], part=(views[-1].data_ptr() - key.data_ptr()) // first.element_size(),
        head=stride[3], dim=stride[5],
    )


@functools.lru_cache(maxsize=64)
def _offset_table(offsets: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, int]:
    # Cached: vLLM's layers never move, so a cache's table is copied to the device once (keyed by the
    # offsets, not the addresses, so that one-layer calls of a layer-by-layer transfer share one entry).
    return torch.tensor(offsets, dtype=torch.int64).to(device), math.gcd(_VECTOR_ELEMENTS, *offsets)


def layer_offsets(paged: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``int64[layers]``: where each layer starts, in elements from the first layer, on their device; and
    the largest power of two (up to 16) that divides them all.

    Offsets from the first layer rather than raw addresses: the first layer is then a real pointer
    argument, whose 16-byte alignment Triton sees, and ``tl.multiple_of(offset, LAYER_ALIGN)`` carries
    it to every layer, so loads and stores compile to 16-byte vectors (a cast from a loaded address
    would hide the alignment and give 2-byte accesses)."""
    first = paged[0]
    start, size = first.data_ptr(), first.element_size()
    return _offset_table(tuple((layer.data_ptr() - start) // size for layer in paged), first.device)


def launch(kernel: Any, paged: Sequence[torch.Tensor], buffer: torch.Tensor, slots: torch.Tensor,
           strides: PagedStrides) -> None:
    """Launch ``kernel`` (:func:`.gather._gather_kernel` or :func:`.scatter._scatter_kernel`, which share
    this signature) over all layers, parts and tokens of ``slots``; ``buffer`` must be addressable from
    the cache's device (the same device, or pinned host memory for a CUDA cache)."""
    device = paged[0].device
    slots = slots.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()
    num_tokens = slots.numel()
    block_d = next_power_of_2(strides.head_dim)
    block_h = min(next_power_of_2(strides.heads), max(1, _TILE_ELEMENTS // block_d))
    block_t = min(max(1, _TILE_ELEMENTS // (block_h * block_d)), next_power_of_2(num_tokens))
    kv_factor = buffer.shape[1]
    grid = (-(-num_tokens // block_t), -(-strides.heads // block_h), len(paged) * kv_factor)
    offsets, align = layer_offsets(paged)
    kernel[grid](
        paged[0], offsets, buffer, slots, num_tokens,
        strides.block, strides.token, strides.part, strides.head, strides.dim,
        *buffer.stride(),
        KV_FACTOR=kv_factor, LAYER_ALIGN=align,
        BLOCK_SIZE=strides.block_size, HEADS=strides.heads, HEAD_DIM=strides.head_dim,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
    )


@jit
def paged_tile(
    cache, layer_offsets, buffer, slots, num_tokens,
    stride_block, stride_token, stride_part, stride_head, stride_dim,
    buffer_stride_layer, buffer_stride_part, buffer_stride_token, buffer_stride_head, buffer_stride_dim,
    KV_FACTOR: tl.constexpr, LAYER_ALIGN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This program's tile ``[BLOCK_T tokens, BLOCK_H heads, BLOCK_D dims]`` of one (layer, part):
    pointers into the cache and into the buffer, and the mask of real elements.

    Program ids: (token tile, head tile, layer * KV_FACTOR + part). ``dim`` is the fastest axis of the
    tile, so loads and stores run along ``head_dim`` (contiguous in every GPU layout and in the buffer).
    Offsets are int64: a buffer of many tokens or a large cache passes 2**31 elements.
    """
    layer_part = tl.program_id(2)
    layer = layer_part // KV_FACTOR
    part = (layer_part % KV_FACTOR).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    real_tokens = tokens < num_tokens
    slot = tl.load(slots + tokens, mask=real_tokens, other=0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    layer_start = tl.multiple_of(tl.load(layer_offsets + layer), LAYER_ALIGN)
    cache_rows = layer_start + block * stride_block + offset * stride_token + part * stride_part
    cache_ptrs = (cache + cache_rows[:, None, None] + (heads * stride_head)[None, :, None]
                  + (dims * stride_dim)[None, None, :])
    buffer_rows = (layer.to(tl.int64) * buffer_stride_layer + part * buffer_stride_part
                   + tokens.to(tl.int64) * buffer_stride_token)
    buffer_ptrs = (buffer + buffer_rows[:, None, None] + (heads * buffer_stride_head)[None, :, None]
                   + (dims * buffer_stride_dim)[None, None, :])
    mask = real_tokens[:, None, None] & (heads < HEADS)[None, :, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & (dims < HEAD_DIM)[None, None, :]
    return cache_ptrs, buffer_ptrs, mask
