"""Moving KV between vLLM's paged cache and lmcache-core chunk buffers: ``copy_paged_kv``, ``copy_piece``.

A thin wrapper over :mod:`lmcache_kernels` (``kernels/`` in the repository), kept so the connector
and its callers name one op with a direction: ``"save"`` is :func:`lmcache_kernels.gather` (pages to
buffer), ``"load"`` is :func:`lmcache_kernels.scatter` (buffer to pages). Those dispatch to a Triton
kernel on CUDA and to the torch reference elsewhere (``LMCACHE_KERNELS=reference`` forces the
reference); the layouts (:class:`PagedLayout`) and their views (:func:`token_views`) are defined in
:mod:`lmcache_kernels.layouts` and re-exported here.

Chunks of a page-packed scope (:attr:`lmcache_core.keys.KVLayout.page_layout`, used for vLLM's CPU
layouts) are whole pages in the cache's own byte order: :func:`copy_pages` moves them as pages
(one ``copy_`` of contiguous memory per run of consecutive pages) and re-lays out only
tokens of a page that is moved in part. :class:`Piece` carries either kind and :func:`copy_piece`
picks the op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from lmcache_kernels import gather, scatter
from lmcache_kernels.layouts import PagedLayout, check_buffer, token_views, whole_blocks

Direction = Literal["save", "load"]

__all__ = ["Direction", "PagedLayout", "Piece", "copy_paged_kv", "copy_pages", "copy_piece", "slots_for",
           "token_views"]


@dataclass(frozen=True)
class Piece:
    """Tokens to move between a chunk buffer and the pages, and the slots they occupy there.

    A token-major ``buffer`` (``first`` None) is ``[layers, kv_factor, tokens, heads, dim]`` holding
    exactly these tokens. A page-packed one is a whole chunk ``[layers, pages, heads, block_size,
    width]`` and the tokens are ``first, first + 1, ...`` of it; ``pages`` may then name the cache
    page of each chunk page the tokens touch (the request's block table from the page of token
    ``first`` on), which must agree with ``slots``: whole pages are then found without a look at
    every slot.
    """

    buffer: torch.Tensor
    slots: torch.Tensor
    first: int | None = None
    pages: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of KV the piece moves (not the whole buffer's, for part of a page-packed chunk)."""
        if self.first is None:
            return self.buffer.nbytes
        return self.buffer.nbytes // (self.buffer.shape[1] * self.buffer.shape[3]) * self.slots.numel()

    def layer(self, index: int) -> Piece:
        """The same tokens of one layer (its buffer keeps the layer axis, of size 1)."""
        return replace(self, buffer=self.buffer[index : index + 1])


def copy_piece(paged: Sequence[torch.Tensor], piece: Piece, layout: PagedLayout, direction: Direction) -> None:
    """:func:`copy_paged_kv` or :func:`copy_pages`, as the piece's buffer is laid out."""
    if piece.first is None:
        copy_paged_kv(paged, piece.buffer, piece.slots, layout, direction)
    else:
        copy_pages(paged, piece.buffer, piece.first, piece.slots, layout, direction, pages=piece.pages)


def copy_pages(
    paged: Sequence[torch.Tensor],
    packed: torch.Tensor,
    first: int,
    slots: torch.Tensor,
    layout: PagedLayout,
    direction: Direction,
    pages: Sequence[int] | None = None,
) -> None:
    """Copy tokens ``first, first + 1, ...`` of a page-packed chunk between ``packed`` and the cache.

    ``packed`` is ``[layers, pages, *page shape]``: each ``packed[l]`` is laid out like the cache's
    layer ``l`` (:data:`PagedLayout` ``layout``). The pages that move whole, to whole pages of the
    cache, are copied as bytes; the tokens of a page moved in part (a hit that vLLM's own prefix
    cache partly covers, a load that ends before a prompt's last token) go through the token-major
    ops, converted on the way. ``pages``: see :class:`Piece`.
    """
    if len(paged) != packed.shape[0] or tuple(paged[0].shape[1:]) != tuple(packed.shape[2:]):
        raise ValueError(f"page-packed buffer {tuple(packed.shape)} does not fit pages {tuple(paged[0].shape)} "
                         f"of {len(paged)} layers")
    block_size = packed.shape[3]
    end = first + slots.numel()
    if not 0 <= first <= end <= packed.shape[1] * block_size:
        raise ValueError(f"tokens [{first}, {end}) are outside a chunk of {packed.shape[1] * block_size}")
    whole_from = min(-(-first // block_size) * block_size, end)
    whole_to = max(end // block_size * block_size, whole_from)
    whole: list[int] | None = None
    if whole_to > whole_from and pages is not None:
        skip = whole_from // block_size - first // block_size
        whole = list(pages[skip : skip + (whole_to - whole_from) // block_size])
    elif whole_to > whole_from:
        found = whole_blocks(slots[whole_from - first : whole_to - first], block_size)
        whole = None if found is None else found.tolist()
    if whole is None:  # no whole page, or the pages are not whole pages of the cache: token by token
        whole_from = whole_to = end
    else:
        runs = _page_runs(whole, whole_from // block_size)
        for index, layer in enumerate(paged):
            for local, page, count in runs:
                if direction == "load":
                    layer[page : page + count].copy_(packed[index, local : local + count])
                else:
                    packed[index, local : local + count].copy_(layer[page : page + count])
    for start, stop in ((first, whole_from), (whole_to, end)):
        if stop > start:
            _copy_tokens(paged, packed, start, slots[start - first : stop - first], layout, direction)


def _page_runs(pages: list[int], first_local: int) -> list[tuple[int, int, int]]:
    """``(chunk page, cache page, count)`` for each run of consecutive pages: one ``copy_`` of
    contiguous memory per run (torch's ``index_copy_`` moves element by element, 2-3x slower on
    CPU, and vLLM hands out consecutive pages more often than not)."""
    runs: list[tuple[int, int, int]] = []
    for offset, page in enumerate(pages):
        if runs and runs[-1][1] + runs[-1][2] == page:
            local, start, count = runs[-1]
            runs[-1] = (local, start, count + 1)
        else:
            runs.append((first_local + offset, page, 1))
    return runs


def _copy_tokens(paged: Sequence[torch.Tensor], packed: torch.Tensor, start: int, slots: torch.Tensor,
                 layout: PagedLayout, direction: Direction) -> None:
    """Tokens ``start, ...`` of ``packed`` <-> ``slots`` through a token-major buffer (each
    ``packed[l]`` read or written as a small paged cache of its own)."""
    heads = paged[0].shape[1]
    head_dim = packed.shape[-1] // layout.kv_factor
    staging = torch.empty(len(paged), layout.kv_factor, slots.numel(), heads, head_dim,
                          dtype=packed.dtype, device=packed.device)
    chunk_pages = list(packed.unbind(0))
    local = torch.arange(start, start + slots.numel(), dtype=torch.int64)
    if direction == "load":
        gather(chunk_pages, staging, local, layout)
        scatter(paged, staging, slots, layout)
    else:
        gather(paged, staging, slots, layout)
        scatter(chunk_pages, staging, local, layout)


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
    """
    if direction == "save":
        gather(paged, buffer, slots, layout)
    elif direction == "load":
        scatter(paged, buffer, slots, layout)
    else:
        check_buffer(paged, buffer, slots, layout)  # a wrong shape is reported first, as it always was
        raise ValueError(f"direction must be 'save' or 'load', got {direction!r}")


def slots_for(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slot numbers of tokens ``[start, end)`` of a request whose pages are ``block_ids``."""
    positions = torch.arange(start, end, dtype=torch.int64)
    table = torch.as_tensor(block_ids, dtype=torch.int64)
    return table[positions // block_size] * block_size + positions % block_size
