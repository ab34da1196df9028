"""copy_pages (page-packed chunks, vLLM's CPU layouts) against the token-major copy_paged_kv.

A page-packed chunk is whole pages in the cache's own byte order, so every token it holds must
land where copy_paged_kv would put the same token's K and V: whole pages, parts of pages at either
end, and slots that are not whole pages of the cache.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_core.integrations.vllm.paged import PagedLayout, Piece, copy_paged_kv, copy_pages, copy_piece, slots_for

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM, LAYERS = 8, 2, 32, 16, 3
CHUNK_PAGES = 3  # a 96-token chunk


def cache(dtype: torch.dtype) -> list[torch.Tensor]:
    shape = (BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    if dtype == torch.uint8:
        return [torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(LAYERS)]
    return [torch.randn(shape).to(dtype) for _ in range(LAYERS)]


def packed_chunk(dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([layer[:CHUNK_PAGES] for layer in cache(dtype)])  # [layers, pages, heads, N, 2D]


def token_major(packed: torch.Tensor, layout: PagedLayout) -> torch.Tensor:
    """The chunk's tokens as [layers, 2, tokens, heads, dim], read with the token-major op."""
    tokens = packed.shape[1] * BLOCK_SIZE
    out = torch.empty(LAYERS, 2, tokens, HEADS, HEAD_DIM, dtype=packed.dtype)
    copy_paged_kv(list(packed.unbind(0)), out, torch.arange(tokens), layout, "save")
    return out


# (first token, end token) of the chunk
RANGES = [(0, 96), (32, 96), (0, 95), (40, 96), (7, 61), (64, 70), (3, 3)]


@pytest.mark.parametrize("named", [False, True], ids=["pages from slots", "pages named"])
@pytest.mark.parametrize("request_pages", [[5, 0, 6], [2, 3, 4], [6, 7, 1]], ids=["scattered", "a run", "mixed"])
@pytest.mark.parametrize("span", RANGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", [PagedLayout.CPU, PagedLayout.CPU_AMX])
def test_load_puts_every_token_where_the_token_major_copy_would(
    layout: PagedLayout, dtype: torch.dtype, span: tuple[int, int], request_pages: list[int], named: bool
) -> None:
    torch.manual_seed(0)
    first, end = span
    pages, packed = cache(dtype), packed_chunk(dtype)
    expected = [layer.clone() for layer in pages]
    slots = slots_for(request_pages, BLOCK_SIZE, first, end)
    copy_paged_kv(expected, token_major(packed, layout)[:, :, first:end].contiguous(), slots, layout, "load")
    named_pages = request_pages[first // BLOCK_SIZE : (end - 1) // BLOCK_SIZE + 1] if named else None
    copy_pages(pages, packed, first, slots, layout, "load", pages=named_pages)
    for got, want in zip(pages, expected, strict=True):
        assert torch.equal(got, want)  # the tokens in range written, every other byte untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [PagedLayout.CPU, PagedLayout.CPU_AMX])
def test_save_then_load_round_trips_through_other_pages(layout: PagedLayout, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    pages = cache(dtype)
    packed = torch.empty(LAYERS, CHUNK_PAGES, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, dtype=dtype)
    source = slots_for([4, 1, 7], BLOCK_SIZE, 0, 96)
    copy_piece(pages, Piece(packed, source, first=0), layout, "save")
    for index, layer in enumerate(pages):  # whole pages: the bytes themselves
        assert torch.equal(packed[index], layer[[4, 1, 7]])
    target = slots_for([2, 3, 0], BLOCK_SIZE, 0, 96)
    copy_piece(pages, Piece(packed, target, first=0), layout, "load")
    for layer in pages:
        assert torch.equal(layer[[2, 3, 0]], layer[[4, 1, 7]])


def test_slots_that_are_not_whole_pages_go_token_by_token() -> None:
    torch.manual_seed(2)
    layout = PagedLayout.CPU
    pages, packed = cache(torch.float32), packed_chunk(torch.float32)
    expected = [layer.clone() for layer in pages]
    slots = torch.randperm(BLOCKS * BLOCK_SIZE)[:64]  # a whole page's worth of tokens, scattered
    copy_paged_kv(expected, token_major(packed, layout)[:, :, 32:96].contiguous(), slots, layout, "load")
    copy_pages(pages, packed, 32, slots, layout, "load")
    for got, want in zip(pages, expected, strict=True):
        assert torch.equal(got, want)


def test_a_piece_counts_the_bytes_of_its_tokens_only() -> None:
    packed = packed_chunk(torch.float32)
    piece = Piece(packed, torch.arange(40), first=10)
    assert piece.nbytes == packed.nbytes // 96 * 40
    assert piece.layer(1).buffer.shape == (1, *packed.shape[1:])


def test_out_of_range_tokens_and_foreign_pages_are_refused() -> None:
    packed = packed_chunk(torch.float32)
    with pytest.raises(ValueError, match="outside a chunk of 96"):
        copy_pages(cache(torch.float32), packed, 90, torch.arange(10), PagedLayout.CPU, "load")
    other = [torch.zeros(BLOCKS, HEADS, 16, 4 * HEAD_DIM) for _ in range(LAYERS)]
    with pytest.raises(ValueError, match="does not fit pages"):
        copy_pages(other, packed, 0, torch.arange(16), PagedLayout.CPU, "load")
