"""SegmentStore: documents stored once as segments, found again in another order after another
prefix, through real tiers (cpu, and disk: serialized and read back), and blended."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed with vLLM

from lmcache_core.backend import Chunk  # noqa: E402
from lmcache_core.blend.blender import blend  # noqa: E402
from lmcache_core.blend.llama import LlamaFamilyModel, prefill  # noqa: E402
from lmcache_core.blend.segment_store import SegmentStore  # noqa: E402
from lmcache_core.blend.segments import Segment, split_by_separator  # noqa: E402
from lmcache_core.engine import CacheEngine  # noqa: E402
from lmcache_core.keys import KVLayout  # noqa: E402

VOCAB, SEPARATOR = 96, [95, 94]


@pytest.fixture(scope="module")
def model() -> LlamaFamilyModel:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    return LlamaFamilyModel(config, dict(hf.state_dict()))


@pytest.fixture(params=["cpu", "disk"])
def store(request: pytest.FixtureRequest, model: LlamaFamilyModel, tmp_path: Path) -> Iterator[SegmentStore]:
    engine = CacheEngine.from_env(
        model_name="tiny", layout=KVLayout(model.num_layers, model.num_kv_heads, model.head_dim, "float32"),
        environ={"LMCACHE_TIERS": request.param, "LMCACHE_DISK__PATH": str(tmp_path)},
    )
    yield SegmentStore(engine, model.inv_freq)
    engine.close()


def tokens(seed: int, count: int) -> torch.Tensor:
    return torch.randint(0, 90, (count,), generator=torch.Generator().manual_seed(seed))


def test_documents_hit_in_another_order_and_blend(model: LlamaFamilyModel, store: SegmentStore) -> None:
    doc_a, doc_b = tokens(1, 30), tokens(2, 20)
    separator = torch.tensor(SEPARATOR)
    first = torch.cat([tokens(3, 10), separator, doc_a, separator, doc_b, separator, tokens(4, 6)])
    with torch.no_grad():
        computed = prefill(model, first)
    segments = split_by_separator(first.tolist(), SEPARATOR)
    assert [len(s) for s in segments] == [10, 30, 20, 6]
    assert store.store(first, computed.kv, segments[1:3]) == 2
    store.engine.flush()

    second = torch.cat([tokens(5, 14), separator, doc_b, separator, doc_a, separator, tokens(6, 8)])
    placed = store.place(second, split_by_separator(second.tolist(), SEPARATOR))
    assert [len(s) for s in placed.hits] == [20, 30]  # both documents, in their new places
    assert int(placed.cached.sum()) == 50
    with torch.no_grad():
        full = prefill(model, second)
        result = blend(model, second, placed.kv, placed.cached, recompute_ratio=0.15, max_deviation=float("inf"))
        naive = blend(model, second, placed.kv, placed.cached, recompute_ratio=0.0, max_deviation=float("inf"))
    error = float((result.logits - full.logits).norm() / full.logits.norm())
    naive_error = float((naive.logits - full.logits).norm() / full.logits.norm())
    assert error < naive_error
    assert int(result.recomputed.sum()) == len(second) - 50 + 8  # uncached + ceil(15% of 50)


def test_a_segment_placed_where_it_was_computed_is_its_own_kv(model: LlamaFamilyModel, store: SegmentStore) -> None:
    """Rotated back to 0 for storage and forward again on the way out: the same keys, the same values."""
    prompt = tokens(7, 40)
    with torch.no_grad():
        computed = prefill(model, prompt)
    segment = Segment(12, 32)
    store.store(prompt, computed.kv, [segment])
    store.engine.flush()
    placed = store.place(prompt, [segment])
    torch.testing.assert_close(placed.kv[:, :, 12:32], computed.kv[:, :, 12:32], rtol=1e-4, atol=1e-4)
    assert placed.cached.tolist() == [12 <= i < 32 for i in range(40)]


def test_a_stored_segment_of_another_length_or_a_missing_one_is_a_miss(model: LlamaFamilyModel,
                                                                      store: SegmentStore) -> None:
    prompt = tokens(8, 24)
    placed = store.place(prompt, [Segment(0, 12), Segment(12, 24)])
    assert placed.hits == [] and not placed.cached.any() and not placed.kv.any()
    key = store.engine.hasher.segment_key(prompt[:12].numpy())
    store.engine.save([Chunk(key, torch.zeros(4, 2, 11, 2, 16), 0)])  # 11 tokens under a 12-token segment's key
    store.engine.flush()
    assert store.place(prompt, [Segment(0, 12)]).hits == []


def test_page_packed_engines_are_refused(model: LlamaFamilyModel) -> None:
    layout = KVLayout(4, 2, 16, "float32", page_layout="cpu", block_size=16)
    engine = CacheEngine.from_env(model_name="tiny", layout=layout, environ={"LMCACHE_TIERS": "cpu"})
    try:
        with pytest.raises(ValueError, match="token-major"):
            SegmentStore(engine, model.inv_freq)
    finally:
        engine.close()
