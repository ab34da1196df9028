"""Moving KV between vLLM's paged cache and lmcache-core chunk buffers: one op, ``copy_paged_kv``.

vLLM keeps each attention layer's KV in fixed-size pages ("blocks"); a token lives at *slot*
``block_id * block_size + offset``. lmcache-core keeps KV as dense buffers
``[layers, kv_factor, tokens, kv_heads, head_dim]`` (``kv_factor`` is 2 for K and V, 1 for MLA's
single latent). ``copy_paged_kv`` gathers (``save``) or scatters (``load``) the tokens at a list of
slots, for every layer, in one call.

This module is the torch reference implementation and the CPU path. It works on any device and any
stride order because it only uses advanced indexing on views. A CUDA kernel (the kernels issue)
replaces it on GPUs under the same name, and is tested against it.

Layouts (per layer tensor as vLLM hands it to ``register_kv_caches``):

=================  ====================================  ==============================================
name               shape                                 where K and V are
=================  ====================================  ==============================================
``cpu``            ``[B, H, N, 2*D]`` (vLLM CPU backend,  per (block, head): K transposed ``[D, N]``,
                   ISAs ``vec``, ``vec16``)              then V ``[N, D]`` (see the design notes)
``cpu_amx``        ``[B, H, N, 2*D]`` (vLLM CPU backend,  per (block, head): K as ``[N/16, D/2, 16, 2]``,
                   ISA ``amx``)                          then V as ``[D/16, N/2, 16, 2]`` (AMX tiles)
``standard``       ``[B, H, N, 2*D]`` logical view        ``[..., :D]`` is K, ``[..., D:]`` is V
                   (vLLM >= 0.2x FlashAttention,          (any physical stride order)
                   FlashInfer, Triton)
``flash_attn``     ``[2, B, N, H, D]`` (older vLLM FA)    dim 0
``flashinfer_nhd`` ``[B, 2, N, H, D]`` (older FlashInfer) dim 1
``flashinfer_hnd`` ``[B, 2, H, N, D]``                    dim 1
``mla``            ``[B, N, C]`` or ``[B, 1, N, C]``      one latent per token (``kv_factor`` 1)
=================  ====================================  ==============================================

(B = blocks, N = block_size, H = kv heads, D = head_dim.) vLLM's ``--kv-cache-dtype fp8`` caches are
``uint8`` tensors in the same ``cpu`` / ``cpu_amx`` layouts, one byte per element: they are copied as
bytes, never converted.

Internally every layout is seen through 6-d views ``[B, token groups, tokens per group, H, dim groups,
dims per group]``; for most layouts both groupings are trivial (``[B, 1, N, H, 1, D]``). The AMX
layout is the reason for the grouping: it interleaves tokens in groups of 16 (K) and pairs (V).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Literal

import torch

Direction = Literal["save", "load"]


class PagedLayout(str, Enum):
    CPU = "cpu"
    CPU_AMX = "cpu_amx"
    STANDARD = "standard"
    FLASH_ATTN = "flash_attn"
    FLASHINFER_NHD = "flashinfer_nhd"
    FLASHINFER_HND = "flashinfer_hnd"
    MLA = "mla"

    @property
    def kv_factor(self) -> int:
        """2 for separate K and V, 1 for MLA's single latent vector."""
        return 1 if self is PagedLayout.MLA else 2


# vLLM's AMX kernel packs K for 16-row tiles (AMX_TILE_ROW_NUM) and V for 16-column tiles
# (64-byte rows / 4-byte dot-product groups); pairs of 16-bit (or 8-bit fp8) values share one group.
_AMX_TILE_ROWS = 16
_AMX_TILE_COLUMNS = 16


def token_views(layer: torch.Tensor, layout: PagedLayout) -> list[torch.Tensor]:
    """Views ``[B, token groups, tokens per group, H, dim groups, dims per group]`` of one layer's K
    and V (or of the MLA latent, with H = 1).

    Token ``offset`` of a block is (group, index) = ``divmod(offset, tokens per group)``, and element
    ``d`` of a head is ``divmod(d, dims per group)``. Every view aliases ``layer``: indexing it reads
    or writes the cache.
    """
    if layout is PagedLayout.CPU_AMX:
        return _amx_views(layer)
    return [view.unsqueeze(1).unsqueeze(4) for view in _flat_token_views(layer, layout)]


def _flat_token_views(layer: torch.Tensor, layout: PagedLayout) -> list[torch.Tensor]:
    """Views ``[B, N, H, D]`` of the layouts that keep each token's elements in one run."""
    if layout is PagedLayout.CPU:
        blocks, heads, block_size, width = layer.shape
        head_dim = width // 2
        halves = layer.view(blocks, heads, 2, block_size * head_dim)  # a view: never a copy
        key = halves[:, :, 0].unflatten(-1, (head_dim, block_size)).permute(0, 3, 1, 2)
        value = halves[:, :, 1].unflatten(-1, (block_size, head_dim)).permute(0, 2, 1, 3)
        return [key, value]
    if layout is PagedLayout.STANDARD:
        head_dim = layer.shape[-1] // 2
        return [layer[..., :head_dim].permute(0, 2, 1, 3), layer[..., head_dim:].permute(0, 2, 1, 3)]
    if layout is PagedLayout.FLASH_ATTN:
        return [layer[0], layer[1]]
    if layout is PagedLayout.FLASHINFER_NHD:
        return [layer[:, 0], layer[:, 1]]
    if layout is PagedLayout.FLASHINFER_HND:
        return [layer[:, 0].permute(0, 2, 1, 3), layer[:, 1].permute(0, 2, 1, 3)]
    if layout is PagedLayout.MLA:
        if layer.dim() == 4:  # [B, 1, N, C]
            return [layer.permute(0, 2, 1, 3)]
        return [layer.unsqueeze(2)]
    raise ValueError(f"unknown paged layout {layout!r}")


def _amx_views(layer: torch.Tensor) -> list[torch.Tensor]:
    """vLLM CPU ``amx`` kernel, per (block, head), K then V:

    - K ``[N/16, D/2, 16, 2]``: tokens in groups of 16; inside a group, for each pair of dims, the 16
      tokens' pairs side by side (element (t, d) at ``[t // 16, d // 2, t % 16, d % 2]``);
    - V ``[D/16, N/2, 16, 2]``: dims in groups of 16; inside, for each pair of tokens, 16 dims of both
      tokens interleaved (element (t, d) at ``[d // 16, t // 2, d % 16, t % 2]``).

    "Pairs" are the 4-byte groups of AMX dot products: 2 bf16/fp16 values, and also 2 fp8 bytes
    (vLLM packs fp8 caches like 16-bit ones). 4-byte elements come one per group.
    """
    blocks, heads, block_size, width = layer.shape
    head_dim = width // 2
    pair = 2 if layer.element_size() <= 2 else 1
    halves = layer.view(blocks, heads, 2, block_size * head_dim)
    key = halves[:, :, 0].unflatten(-1, (block_size // _AMX_TILE_ROWS, head_dim // pair, _AMX_TILE_ROWS, pair))
    value = halves[:, :, 1].unflatten(-1, (head_dim // _AMX_TILE_COLUMNS, block_size // pair, _AMX_TILE_COLUMNS, pair))
    # key: [B, H, token group, dim pair, token, element] -> [B, token group, token, H, dim pair, element]
    # value: [B, H, dim group, token pair, dim, token] -> [B, token pair, token, H, dim group, dim]
    return [key.permute(0, 2, 4, 1, 3, 5), value.permute(0, 3, 5, 1, 2, 4)]


def copy_paged_kv(
    paged: Sequence[torch.Tensor],
    buffer: torch.Tensor,
    slots: torch.Tensor,
    layout: PagedLayout,
    direction: Direction,
) -> None:
    """Copy the KV of ``slots`` between the per-layer paged tensors and ``buffer``.

    ``buffer`` is ``[layers, kv_factor, len(slots), kv_heads, head_dim]`` and may live on another
    device than the cache (the copy moves it). ``direction="save"`` fills ``buffer`` from the cache,
    ``"load"`` writes ``buffer`` into the cache. Slots must be distinct for ``load``.

    When the slots cover whole blocks in order (the usual case: hits and chunks are block-aligned),
    blocks move as contiguous pages and are re-laid out in bulk; otherwise tokens are indexed one by
    one, which is several times slower on layouts that interleave tokens (the CPU backend's K).
    """
    if len(paged) != buffer.shape[0]:
        raise ValueError(f"buffer has {buffer.shape[0]} layers, the cache {len(paged)}")
    if buffer.shape[1] != layout.kv_factor or buffer.shape[2] != slots.numel():
        raise ValueError(
            f"buffer must be [layers, {layout.kv_factor}, {slots.numel()}, heads, dim], got {tuple(buffer.shape)}"
        )
    if direction not in ("save", "load"):
        raise ValueError(f"direction must be 'save' or 'load', got {direction!r}")
    if slots.numel() == 0:
        return
    for index, layer in enumerate(paged):
        views = token_views(layer, layout)
        block_size = views[0].shape[1] * views[0].shape[2]
        whole = _whole_blocks(slots, block_size)
        if whole is not None:
            _copy_blocks(views, buffer[index], whole.to(layer.device), direction)
            continue
        device_slots = slots.to(layer.device, non_blocking=True)
        blocks = torch.div(device_slots, block_size, rounding_mode="floor")
        offsets = device_slots - blocks * block_size
        for part, view in enumerate(views):
            group_size = view.shape[2]
            where = (blocks, torch.div(offsets, group_size, rounding_mode="floor"), offsets % group_size)
            dims = view.shape[-2:]
            if direction == "save":
                buffer[index, part].copy_(view[where].flatten(-2), non_blocking=True)
            else:
                view[where] = buffer[index, part].to(layer.device, non_blocking=True).unflatten(-1, dims)


def _whole_blocks(slots: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """The block ids when ``slots`` are complete blocks, each in order; else None."""
    if slots.numel() % block_size:
        return None
    rows = slots.view(-1, block_size)
    starts = rows[:, 0]
    if bool((starts % block_size).any()):
        return None
    if not torch.equal(rows, starts[:, None] + torch.arange(block_size, device=slots.device)):
        return None
    return torch.div(starts, block_size, rounding_mode="floor")


def _copy_blocks(views: list[torch.Tensor], buffer: torch.Tensor, blocks: torch.Tensor, direction: Direction) -> None:
    """Whole-block path: one ``index_select`` / ``index_copy_`` along the block axis of each K/V view
    re-lays the pages out in the same pass (~4 GB/s on one CPU core, against ~2.5 GB/s for gathering
    the pages first and re-laying them out after)."""
    for part, view in enumerate(views):  # [blocks, token groups, tokens, heads, dim groups, dims], aliasing the cache
        tokens = buffer[part].unflatten(0, (blocks.numel(), *view.shape[1:3])).unflatten(-1, view.shape[-2:])
        if direction == "save":
            if tokens.device == view.device and tokens.is_contiguous():
                torch.index_select(view, 0, blocks, out=tokens)
            else:
                tokens.copy_(view.index_select(0, blocks), non_blocking=True)
        else:
            view.index_copy_(0, blocks, tokens.to(view.device, non_blocking=True))


def slots_for(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slot numbers of tokens ``[start, end)`` of a request whose pages are ``block_ids``."""
    positions = torch.arange(start, end, dtype=torch.int64)
    table = torch.as_tensor(block_ids, dtype=torch.int64)
    return table[positions // block_size] * block_size + positions % block_size
