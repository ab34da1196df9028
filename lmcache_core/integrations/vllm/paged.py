"""Moving KV between vLLM's paged cache and lmcache-core chunk buffers: one op, ``copy_paged_kv``.

A thin wrapper over :mod:`lmcache_kernels` (``kernels/`` in the repository), kept so the connector
and its callers name one op with a direction: ``"save"`` is :func:`lmcache_kernels.gather` (pages to
buffer), ``"load"`` is :func:`lmcache_kernels.scatter` (buffer to pages). Those dispatch to a Triton
kernel on CUDA and to the torch reference elsewhere (``LMCACHE_KERNELS=reference`` forces the
reference); the layouts (:class:`PagedLayout`) and their views (:func:`token_views`) are defined in
:mod:`lmcache_kernels.layouts` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lmcache_kernels import gather, scatter
from lmcache_kernels.layouts import PagedLayout, check_buffer, token_views

Direction = Literal["save", "load"]

__all__ = ["Direction", "PagedLayout", "copy_paged_kv", "slots_for", "token_views"]


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
