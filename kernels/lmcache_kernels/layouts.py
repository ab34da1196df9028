"""vLLM's paged KV layouts, the views that say where each token's K and V live, and the checks every op shares.

vLLM keeps each attention layer's KV in fixed-size pages ("blocks"); a token lives at *slot*
``block_id * block_size + offset``. lmcache-core keeps KV as dense buffers
``[layers, kv_factor, tokens, kv_heads, head_dim]`` (``kv_factor`` is 2 for K and V, 1 for MLA's
single latent). The ops of this package (:mod:`.gather`, :mod:`.scatter`) move the tokens at a list
of slots between the two, for every layer, in one call.

Layouts (per layer tensor as vLLM hands it to ``register_kv_caches``):

=================  ====================================  ==============================================
name               shape                                 where K and V are
=================  ====================================  ==============================================
``cpu``            ``[B, H, N, 2*D]`` (vLLM CPU backend,  per (block, head): K transposed ``[D, N]``,
                   ISAs ``vec``, ``vec16``)              then V ``[N, D]`` (see the design notes)
``cpu_amx``        ``[B, H, N, 2*D]`` (vLLM CPU backend,  per (block, head): K as ``[N/16, D/2, 16, 2]``,
                   ISA ``amx``)                          then V as ``[D/16, N/2, 16, 2]`` (AMX tiles)
``standard``       ``[B, H, N, 2*D]`` logical view        ``[..., :D]`` is K, ``[..., D:]`` is V
                   (vLLM >= 0.2x FlashAttention,          (any physical stride order: vLLM's
                   FlashInfer, Triton)                   kv_cache_layout picks NHD or HND)
``flash_attn``     ``[2, B, N, H, D]`` (older vLLM FA)    dim 0
``flashinfer_nhd`` ``[B, 2, N, H, D]`` (older FlashInfer) dim 1
``flashinfer_hnd`` ``[B, 2, H, N, D]``                    dim 1
``mla``            ``[B, N, C]`` or ``[B, 1, N, C]``      one latent per token (``kv_factor`` 1)
=================  ====================================  ==============================================

(B = blocks, N = block_size, H = kv heads, D = head_dim.) vLLM's ``--kv-cache-dtype fp8`` caches are
``uint8`` tensors in the same layouts, one byte per element: they are copied as bytes, never converted.

Internally every layout is seen through 6-d views ``[B, token groups, tokens per group, H, dim groups,
dims per group]``; for most layouts both groupings are trivial (``[B, 1, N, H, 1, D]``). The AMX
layout is the reason for the grouping: it interleaves tokens in groups of 16 (K) and pairs (V).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch


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


def check_buffer(paged: Sequence[torch.Tensor], buffer: torch.Tensor, slots: torch.Tensor, layout: PagedLayout) -> None:
    """Raise ``ValueError`` naming the expected shape when ``buffer`` cannot hold ``slots`` of ``paged``:
    every op checks the same way, whichever implementation then runs."""
    if len(paged) != buffer.shape[0]:
        raise ValueError(f"buffer has {buffer.shape[0]} layers, the cache {len(paged)}")
    if buffer.shape[1] != layout.kv_factor or buffer.shape[2] != slots.numel():
        raise ValueError(
            f"buffer must be [layers, {layout.kv_factor}, {slots.numel()}, heads, dim], got {tuple(buffer.shape)}"
        )


def whole_blocks(slots: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """The block ids when ``slots`` are complete blocks, each in order; else None.

    Hits and chunks are block-aligned in the usual case, and whole pages move much faster than
    tokens one by one in the references (one ``index_select`` per K/V view)."""
    if slots.numel() % block_size:
        return None
    rows = slots.view(-1, block_size)
    starts = rows[:, 0]
    if bool((starts % block_size).any()):
        return None
    if not torch.equal(rows, starts[:, None] + torch.arange(block_size, device=slots.device)):
        return None
    return torch.div(starts, block_size, rounding_mode="floor")


def block_size_of(views: list[torch.Tensor]) -> int:
    """Tokens per page, from a layer's :func:`token_views`."""
    return views[0].shape[1] * views[0].shape[2]
