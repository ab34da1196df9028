"""copy_paged_kv against a per-token oracle on synthetic paged caches of every supported layout.

The oracle spells out, element by element, where each layout keeps a token's K and V. The vLLM CPU
layouts (one per attention ISA, and fp8 caches as bytes) are also checked against vLLM's own
cache-write op when vLLM is installed, for every ISA this machine and build can write.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_core.integrations.vllm.paged import PagedLayout, copy_paged_kv, slots_for

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM, LAYERS = 6, 2, 32, 16, 3  # the AMX layout needs multiples of 16


def make_layer(layout: PagedLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = {
        PagedLayout.CPU: (BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM),
        PagedLayout.CPU_AMX: (BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM),
        PagedLayout.STANDARD: (BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM),
        PagedLayout.FLASH_ATTN: (2, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM),
        PagedLayout.FLASHINFER_NHD: (BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD_DIM),
        PagedLayout.FLASHINFER_HND: (BLOCKS, 2, HEADS, BLOCK_SIZE, HEAD_DIM),
        PagedLayout.MLA: (BLOCKS, BLOCK_SIZE, 3 * HEAD_DIM),
    }[layout]
    if dtype == torch.uint8:  # an fp8 cache: vLLM keeps it as bytes
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.randn(shape).to(dtype)


def oracle_get(layer: torch.Tensor, layout: PagedLayout, part: int, slot: int) -> torch.Tensor:
    """[heads, dim] of one token, read with explicit per-element addressing."""
    block, offset = divmod(slot, BLOCK_SIZE)
    if layout is PagedLayout.CPU:
        flat = layer.reshape(BLOCKS, HEADS, 2 * BLOCK_SIZE * HEAD_DIM)
        if part == 0:  # K stored transposed: element (offset, d) at d * BLOCK_SIZE + offset
            index = torch.arange(HEAD_DIM) * BLOCK_SIZE + offset
        else:  # V after all of K: (offset, d) at BLOCK_SIZE*HEAD_DIM + offset*HEAD_DIM + d
            index = BLOCK_SIZE * HEAD_DIM + offset * HEAD_DIM + torch.arange(HEAD_DIM)
        return flat[block][:, index]
    if layout is PagedLayout.CPU_AMX:
        flat = layer.reshape(BLOCKS, HEADS, 2 * BLOCK_SIZE * HEAD_DIM)
        pair = 2 if layer.element_size() <= 2 else 1  # values per 4-byte AMX group
        dim = torch.arange(HEAD_DIM)
        if part == 0:  # K: 16-token groups; in each, per dim pair, 16 tokens x pair
            index = (offset // 16) * 16 * HEAD_DIM + (dim // pair) * 16 * pair + (offset % 16) * pair + dim % pair
        else:  # V after K: 16-dim groups; in each, per token pair, 16 dims x pair tokens
            index = (BLOCK_SIZE * HEAD_DIM + (dim // 16) * BLOCK_SIZE * 16 + (offset // pair) * 16 * pair
                     + (dim % 16) * pair + offset % pair)
        return flat[block][:, index]
    if layout is PagedLayout.STANDARD:
        return layer[block, :, offset, part * HEAD_DIM : (part + 1) * HEAD_DIM]
    if layout is PagedLayout.FLASH_ATTN:
        return layer[part, block, offset]
    if layout is PagedLayout.FLASHINFER_NHD:
        return layer[block, part, offset]
    if layout is PagedLayout.FLASHINFER_HND:
        return layer[block, part, :, offset]
    return layer[block, offset].unsqueeze(0)  # MLA


def buffer_for(layout: PagedLayout, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    if layout is PagedLayout.MLA:
        return torch.empty(LAYERS, 1, num_tokens, 1, 3 * HEAD_DIM, dtype=dtype)
    return torch.empty(LAYERS, 2, num_tokens, HEADS, HEAD_DIM, dtype=dtype)


def some_slots(kind: str) -> torch.Tensor:
    """Random single tokens (token-by-token path) or whole blocks in random order (page path)."""
    if kind == "tokens":
        return torch.randperm(BLOCKS * BLOCK_SIZE)[:13]
    blocks = torch.randperm(BLOCKS)[:3]
    return (blocks[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()


@pytest.mark.parametrize("kind", ["tokens", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", list(PagedLayout))
def test_save_matches_oracle(layout: PagedLayout, dtype: torch.dtype, kind: str) -> None:
    torch.manual_seed(0)
    paged = [make_layer(layout, dtype) for _ in range(LAYERS)]
    slots = some_slots(kind)
    buffer = buffer_for(layout, len(slots), dtype)
    copy_paged_kv(paged, buffer, slots, layout, "save")
    for layer_index, layer in enumerate(paged):
        for part in range(layout.kv_factor):
            for token, slot in enumerate(slots.tolist()):
                assert torch.equal(buffer[layer_index, part, token], oracle_get(layer, layout, part, slot))


@pytest.mark.parametrize("kind", ["tokens", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", list(PagedLayout))
def test_load_writes_only_its_slots(layout: PagedLayout, dtype: torch.dtype, kind: str) -> None:
    torch.manual_seed(1)
    paged = [make_layer(layout, dtype) for _ in range(LAYERS)]
    before = [layer.clone() for layer in paged]
    slots = some_slots(kind)
    buffer = buffer_for(layout, len(slots), dtype)
    buffer.copy_(torch.randint(0, 256, buffer.shape) if dtype == torch.uint8 else torch.randn(buffer.shape))
    copy_paged_kv(paged, buffer, slots, layout, "load")
    touched = set(slots.tolist())
    for layer_index, (layer, old) in enumerate(zip(paged, before, strict=True)):
        for part in range(layout.kv_factor):
            for slot in range(BLOCKS * BLOCK_SIZE):
                got = oracle_get(layer, layout, part, slot)
                if slot in touched:
                    token = slots.tolist().index(slot)
                    assert torch.equal(got, buffer[layer_index, part, token])
                else:
                    assert torch.equal(got, oracle_get(old, layout, part, slot))


@pytest.mark.parametrize("kind", ["tokens", "blocks"])
def test_round_trip_on_a_non_contiguous_standard_cache(kind: str) -> None:
    """vLLM may allocate [B, N, H, 2D] physically and hand out the logical [B, H, N, 2D] view."""
    physical = torch.randn(BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM)
    logical = physical.permute(0, 2, 1, 3)
    assert not logical.is_contiguous()
    slots = torch.tensor([3, 17, 40, 41]) if kind == "tokens" else some_slots("blocks")
    saved = buffer_for(PagedLayout.STANDARD, len(slots), torch.float32)
    copy_paged_kv([logical] * LAYERS, saved, slots, PagedLayout.STANDARD, "save")
    target = torch.zeros_like(physical)
    copy_paged_kv([target.permute(0, 2, 1, 3)] * LAYERS, saved, slots, PagedLayout.STANDARD, "load")
    for slot in slots.tolist():
        block, offset = divmod(slot, BLOCK_SIZE)
        assert torch.equal(target[block, offset], physical[block, offset])


def test_slots_for_maps_positions_through_the_block_table() -> None:
    slots = slots_for([5, 2, 9], block_size=4, start=3, end=9)
    assert slots.tolist() == [5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0]


def test_shape_errors_name_the_expected_shape() -> None:
    paged = [make_layer(PagedLayout.STANDARD) for _ in range(LAYERS)]
    with pytest.raises(ValueError, match="buffer must be"):
        copy_paged_kv(paged, torch.empty(LAYERS, 2, 5, HEADS, HEAD_DIM), torch.arange(4), PagedLayout.STANDARD, "save")


ISAS = ["vec", "vec16", "amx"]  # every ISA vLLM's CPU backend picks on x86 (cpu_attn._get_attn_isa)
KV_CACHE_DTYPES = ["auto", "bfloat16", "fp8_e4m3", "fp8_e5m2"]


def _vllm_can_pick(isa: str, kv_cache_dtype: str, block_size: int) -> bool:
    """vLLM never picks ``amx`` for 16-token blocks (its tiles are 32 tokens) nor ``vec16`` for fp8
    caches (fp8 needs vec or amx): its cache-write op refuses those, on every machine."""
    if isa == "amx" and block_size % 32:
        return False
    return not (isa == "vec16" and kv_cache_dtype.startswith("fp8"))


CACHE_WRITE_CASES = [
    pytest.param(isa, dtype, kv_cache_dtype, block_size, id=f"{isa}-{str(dtype)[6:]}-{kv_cache_dtype}-{block_size}")
    for isa in ISAS
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for kv_cache_dtype in KV_CACHE_DTYPES
    for block_size in (16, 32, 128)
    if _vllm_can_pick(isa, kv_cache_dtype, block_size)
]


# Importing vLLM emits deprecation warnings from its dependencies; they are not ours to fix.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize(("isa", "dtype", "kv_cache_dtype", "block_size"), CACHE_WRITE_CASES)
def test_cpu_layout_matches_vllm_cache_write(
    isa: str, dtype: torch.dtype, kv_cache_dtype: str, block_size: int
) -> None:
    """The ground truth for the CPU layouts is vLLM's own cache-write kernel, for each ISA it has.

    Combinations vLLM never picks are not generated (:func:`_vllm_can_pick`); one is skipped, with
    vLLM's reason, only where this machine's vLLM build cannot write it.
    """
    pytest.importorskip("vllm")
    from lmcache_core.integrations.vllm.layouts import (
        CPU_ISA_LAYOUTS,
        CacheWriteUnavailable,
        cpu_layout_for,
        layout_reads,
        vllm_cpu_cache_write,
    )

    shape = {"isa": isa, "dtype": dtype, "block_size": block_size, "num_kv_heads": 2,
             "head_dim": 80 if isa == "vec16" else 64,  # vLLM picks vec16 for head sizes not a multiple of 32
             "kv_cache_dtype": kv_cache_dtype}
    try:
        written = vllm_cpu_cache_write(**shape)
    except CacheWriteUnavailable as error:
        pytest.skip(str(error))
    assert layout_reads(CPU_ISA_LAYOUTS[isa], written)
    assert cpu_layout_for(**shape) is CPU_ISA_LAYOUTS[isa]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [32, 128])
def test_the_isa_vllm_picks_here_has_a_verified_layout(
    dtype: torch.dtype, block_size: int, kv_cache_dtype: str
) -> None:
    """What the connector's start-up check does on this machine (AMX hosts pick ``amx`` for bf16)."""
    pytest.importorskip("vllm")
    from lmcache_core.integrations.vllm.layouts import CPU_ISA_LAYOUTS, cpu_attention_isa, cpu_layout_for

    try:
        isa = cpu_attention_isa(dtype, block_size, 64, kv_cache_dtype)
    except NotImplementedError as error:  # fp8 needs AVX-512 or AMX: vLLM itself refuses to start
        pytest.skip(f"vLLM refuses kv_cache_dtype={kv_cache_dtype} on this CPU: {error}")
    layout = cpu_layout_for(isa=isa, dtype=dtype, block_size=block_size, num_kv_heads=2, head_dim=64,
                            kv_cache_dtype=kv_cache_dtype)
    assert layout is CPU_ISA_LAYOUTS[isa]
