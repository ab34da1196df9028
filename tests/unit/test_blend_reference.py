"""The blending reference (lmcache_core.blend) on small random Llama-family models.

The forward must equal transformers' own (the weights and names vLLM loads); re-rotated keys must
equal keys computed at the new positions; blending must reduce to a full prefill when it recomputes
everything, when the cached KV is exact, or when its quality guard trips; and on a document reused
at another position, recomputing a few tokens must get closer to the full prefill than reusing the
KV as it is.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed with vLLM

from lmcache_core.blend.blender import blend  # noqa: E402
from lmcache_core.blend.llama import LlamaFamilyModel, prefill, unsupported_reason  # noqa: E402
from lmcache_core.blend.rope import rerotate_keys  # noqa: E402

VOCAB = 96


def hf_model(architecture: str, **extra: Any) -> Any:
    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[architecture]
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          architectures=[architecture], **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).eval()
    return model


def ours(model: Any) -> LlamaFamilyModel:
    return LlamaFamilyModel(model.config, dict(model.state_dict()))


def hf_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s K and V from a transformers cache, as [tokens, kv_heads, dim]."""
    entry = cache.layers[layer]
    return entry.keys[0].transpose(0, 1), entry.values[0].transpose(0, 1)


MODELS = [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("Qwen2ForCausalLM", {}),  # biases on q/k/v
    ("MistralForCausalLM", {"sliding_window": 16}),
]


@pytest.mark.parametrize(("architecture", "extra"), MODELS, ids=["llama", "llama3-rope", "qwen2", "mistral-window"])
def test_prefill_equals_transformers(architecture: str, extra: dict[str, Any]) -> None:
    model = hf_model(architecture, **extra)
    tokens = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(tokens[None], use_cache=True)
        mine = prefill(ours(model), tokens)
    torch.testing.assert_close(mine.logits, output.logits[0, -1], rtol=1e-4, atol=1e-4)
    for layer in range(model.config.num_hidden_layers):
        keys, values = hf_kv(output.past_key_values, layer)
        kept = keys.shape[0]  # a sliding-window cache keeps the last tokens only
        assert kept == 40 or (extra.get("sliding_window") and kept >= extra["sliding_window"] - 1)
        torch.testing.assert_close(mine.kv[layer, 0, -kept:], keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.kv[layer, 1, -kept:], values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("architecture", "extra"), MODELS[:2], ids=["llama", "llama3-rope"])
def test_rerotated_keys_equal_keys_computed_at_the_new_positions(architecture: str, extra: dict[str, Any]) -> None:
    model = ours(hf_model(architecture, **extra))
    hidden = torch.randn(12, 64)
    before, after = torch.arange(12), torch.arange(12) + torch.tensor([0, 5, 100, 311] * 3)
    with torch.no_grad():
        _, at_before, _ = model.qkv(1, hidden, before)
        _, at_after, _ = model.qkv(1, hidden, after)
    torch.testing.assert_close(rerotate_keys(at_before, before, after, model.inv_freq), at_after,
                               rtol=1e-4, atol=1e-4)


def model_and_prompt() -> tuple[LlamaFamilyModel, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return ours(hf_model("LlamaForCausalLM")), torch.randint(0, VOCAB, (48,), generator=generator)


def test_recomputing_everything_is_a_full_prefill() -> None:
    model, tokens = model_and_prompt()
    with torch.no_grad():
        full = prefill(model, tokens)
        garbage = torch.randn_like(full.kv)
        result = blend(model, tokens, garbage, torch.ones(48, dtype=torch.bool), recompute_ratio=1.0,
                       max_deviation=float("inf"))
    assert bool(result.recomputed.all()) and not result.fell_back
    torch.testing.assert_close(result.kv, full.kv)
    torch.testing.assert_close(result.logits, full.logits)


def test_exact_cached_kv_needs_no_recompute() -> None:
    """A cached prefix at its own positions is the true KV: nothing deviates, the answer is the same."""
    model, tokens = model_and_prompt()
    cached = torch.zeros(48, dtype=torch.bool)
    cached[:32] = True
    with torch.no_grad():
        full = prefill(model, tokens)
        result = blend(model, tokens, full.kv, cached, recompute_ratio=0.0)
    assert result.deviation < 1e-5
    assert int(result.recomputed.sum()) == 16  # the 16 uncached tokens only
    torch.testing.assert_close(result.logits, full.logits, rtol=1e-4, atol=1e-4)


def reused_document() -> tuple[LlamaFamilyModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 40-token document computed on its own, reused after a new 24-token prefix, before an 8-token
    question: the model, the prompt, its cached KV (re-rotated) and which tokens have it."""
    generator = torch.Generator().manual_seed(3)
    model = ours(hf_model("LlamaForCausalLM"))
    prefix, document, question = (torch.randint(0, VOCAB, (n,), generator=generator) for n in (24, 40, 8))
    prompt = torch.cat([prefix, document, question])
    with torch.no_grad():
        alone = prefill(model, document)
    cached_kv = torch.zeros(model.num_layers, 2, prompt.numel(), model.num_kv_heads, model.head_dim)
    rows = slice(24, 64)
    cached_kv[:, 1, rows] = alone.kv[:, 1]
    for layer in range(model.num_layers):
        cached_kv[layer, 0, rows] = rerotate_keys(alone.kv[layer, 0], torch.arange(40), torch.arange(24, 64),
                                                  model.inv_freq)
    cached = torch.zeros(prompt.numel(), dtype=torch.bool)
    cached[rows] = True
    return model, prompt, cached_kv, cached


def logit_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_recomputing_the_most_deviating_tokens_beats_reusing_them_as_they_are() -> None:
    model, prompt, cached_kv, cached = reused_document()
    with torch.no_grad():
        full = prefill(model, prompt)
        naive = blend(model, prompt, cached_kv, cached, recompute_ratio=0.0, max_deviation=float("inf"))
        blended = blend(model, prompt, cached_kv, cached, recompute_ratio=0.3, max_deviation=float("inf"))
        everything = blend(model, prompt, cached_kv, cached, recompute_ratio=1.0, max_deviation=float("inf"))
    assert int(blended.recomputed[24:64].sum()) == 12  # 30% of the 40 cached tokens
    assert bool(blended.recomputed[:24].all()) and bool(blended.recomputed[64:].all())
    naive_error, blended_error = logit_error(naive.logits, full.logits), logit_error(blended.logits, full.logits)
    assert naive_error > 0.01  # the context matters: reuse as-is is visibly wrong
    assert blended_error < naive_error
    assert logit_error(everything.logits, full.logits) < 1e-5
    assert naive.deviation > blended.deviation > 0


def test_the_quality_guard_falls_back_to_a_full_prefill() -> None:
    model, prompt, cached_kv, cached = reused_document()
    with torch.no_grad():
        full = prefill(model, prompt)
        guarded = blend(model, prompt, cached_kv, cached, recompute_ratio=0.1, max_deviation=1e-6)
    assert guarded.fell_back and bool(guarded.recomputed.all())
    torch.testing.assert_close(guarded.logits, full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guarded.kv, full.kv, rtol=1e-5, atol=1e-5)


def test_other_families_are_refused_with_the_reason() -> None:
    config = transformers.GPT2Config(architectures=["GPT2LMHeadModel"])
    assert "not GPT2LMHeadModel" in unsupported_reason(config)
    with pytest.raises(ValueError, match="blending supports"):
        LlamaFamilyModel(config, {})


def test_bad_parameters_are_refused() -> None:
    model, tokens = model_and_prompt()
    kv, cached = torch.zeros(4, 2, 48, 2, 16), torch.zeros(48, dtype=torch.bool)
    with pytest.raises(ValueError, match="recompute_ratio"):
        blend(model, tokens, kv, cached, recompute_ratio=1.5)
    with pytest.raises(ValueError, match="check_layer"):
        blend(model, tokens, kv, cached, check_layer=4)
    with pytest.raises(ValueError, match="cover the prompt"):
        blend(model, tokens, kv[:, :, :10], cached)
