"""Layer-by-layer transfers on a real GPU: the side stream, the per-layer events and pinned buffers
(:mod:`lmcache_core.integrations.vllm.layerwise`), checked against one whole-step copy.

Skipped, with the reason, on machines without CUDA (CI has none); run on a GPU host with
``pytest tests/gpu``. The CPU path of the same class is covered by ``tests/unit/test_vllm_layerwise.py``.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_core.integrations.vllm.layerwise import LayerwiseCopies
from lmcache_core.integrations.vllm.paged import PagedLayout, Piece, copy_paged_kv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: this machine has no GPU"),
]

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM, LAYERS, CHUNK = 64, 4, 16, 64, 4, 64
LAYOUT = PagedLayout.STANDARD
NAMES = [f"layers.{index}.attn" for index in range(LAYERS)]


def cache() -> list[torch.Tensor]:
    return [torch.randn(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            for _ in range(LAYERS)]


def chunk_slots(first_block: int) -> torch.Tensor:
    blocks = torch.arange(first_block, first_block + CHUNK // BLOCK_SIZE)
    return (blocks[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()


def host_chunk(pinned: bool) -> torch.Tensor:
    chunk = torch.randn(LAYERS, 2, CHUNK, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    return chunk.pin_memory() if pinned else chunk


def test_each_layer_is_loaded_once_the_compute_stream_waits_for_it() -> None:
    torch.manual_seed(0)
    pages = cache()
    expected = [page.clone() for page in pages]
    pieces = [Piece(host_chunk(pinned=True), chunk_slots(0)), Piece(host_chunk(pinned=False), chunk_slots(8))]
    for piece in pieces:
        copy_paged_kv(expected, piece.buffer, piece.slots, LAYOUT, "load")
    copies = LayerwiseCopies(NAMES, pages, LAYOUT)
    copies.start_loads(pieces)
    for index, name in enumerate(NAMES):
        copies.wait_for_layer(name)
        # Ordered after the layer's event on this (the compute) stream, as attention would be.
        assert torch.equal(pages[index], expected[index]), f"layer {index}"
    copies.finish()
    assert copies.reset_counters()[2:] == (LAYERS, 0)


def test_each_layer_is_saved_after_the_compute_stream_wrote_it() -> None:
    torch.manual_seed(0)
    pages = cache()
    slots = [chunk_slots(0), chunk_slots(8)]
    buffers = [torch.empty(LAYERS, 2, CHUNK, HEADS, HEAD_DIM, dtype=torch.bfloat16, pin_memory=True) for _ in slots]
    copies = LayerwiseCopies(NAMES, pages, LAYOUT)
    copies.start_saves([Piece(buffer, chunk) for buffer, chunk in zip(buffers, slots, strict=True)])
    busy = torch.randn(4096, 4096, device="cuda")
    for index, name in enumerate(NAMES):
        busy = busy @ busy.T / 4096  # keeps the compute stream busy, ahead of the host
        pages[index].mul_(2)  # the layer's KV of this step, written on the compute stream
        copies.save_layer(name)
    copies.finish()  # the buffers are complete when it returns
    for buffer, chunk in zip(buffers, slots, strict=True):
        expected = torch.empty_like(buffer)
        copy_paged_kv(pages, expected, chunk, LAYOUT, "save")
        torch.cuda.synchronize()
        assert torch.equal(buffer, expected)


def test_saves_from_a_gpu_cache_refuse_pageable_buffers() -> None:
    copies = LayerwiseCopies(NAMES, cache(), LAYOUT)
    with pytest.raises(ValueError, match="pinned"):
        copies.start_saves([Piece(host_chunk(pinned=False), chunk_slots(0))])
