"""Llama-family forward in plain torch (Llama, Mistral, Qwen2): what blending recomputes with.

One structure covers the three: RMSNorm, grouped-query attention with RoPE (Qwen2 adds biases to
the q/k/v projections), a SiLU-gated MLP, tied or separate output embeddings. The forward is split
at the points blending needs: :meth:`LlamaFamilyModel.qkv` (a layer's projections for some tokens)
and :meth:`LlamaFamilyModel.finish_layer` (their attention over any set of keys and values, and the
MLP), so a caller can run a layer for a subset of the tokens against KV that comes partly from a cache.

Weights come from a transformers state dict (``model.layers.{i}.self_attn.q_proj.weight``, ...):
the same names vLLM loads. Computation runs in the weights' dtype, attention scores in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmcache_core.blend.rope import apply_rope, cos_sin, inv_freq_for

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class _Layer:
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class LlamaFamilyModel:
    """A Llama-family causal LM for prefill: hidden states in, KV and logits out."""

    def __init__(self, config: Any, state_dict: dict[str, torch.Tensor]) -> None:
        unsupported = unsupported_reason(config)
        if unsupported:
            raise ValueError(unsupported)
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.eps = float(config.rms_norm_eps)
        self.sliding_window = _sliding_window(config)
        self.inv_freq, self.rope_scaling = inv_freq_for(config)

        def get(name: str) -> torch.Tensor:
            return state_dict[name]

        self.embed_tokens = get("model.embed_tokens.weight")
        self.final_norm = get("model.norm.weight")
        self.lm_head = state_dict.get("lm_head.weight", self.embed_tokens)
        self.layers = []
        for index in range(self.num_layers):
            prefix = f"model.layers.{index}."
            attention, mlp = prefix + "self_attn.", prefix + "mlp."
            self.layers.append(_Layer(
                input_norm=get(prefix + "input_layernorm.weight"),
                q=get(attention + "q_proj.weight"), k=get(attention + "k_proj.weight"),
                v=get(attention + "v_proj.weight"),
                q_bias=state_dict.get(attention + "q_proj.bias"), k_bias=state_dict.get(attention + "k_proj.bias"),
                v_bias=state_dict.get(attention + "v_proj.bias"),
                o=get(attention + "o_proj.weight"), post_norm=get(prefix + "post_attention_layernorm.weight"),
                gate=get(mlp + "gate_proj.weight"), up=get(mlp + "up_proj.weight"), down=get(mlp + "down_proj.weight"),
            ))
        self.dtype = self.embed_tokens.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[tokens, hidden]`` entering layer 0."""
        return F.embedding(tokens.long(), self.embed_tokens)

    def qkv(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer ``layer``'s queries ``[n, heads, dim]``, keys and values ``[n, kv_heads, dim]`` for the
        tokens whose hidden states are ``hidden`` (at ``positions``); queries and keys rotated."""
        weights = self.layers[layer]
        normed = _rms_norm(hidden, weights.input_norm, self.eps)
        q = F.linear(normed, weights.q, weights.q_bias).unflatten(-1, (self.num_heads, self.head_dim))
        k = F.linear(normed, weights.k, weights.k_bias).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = F.linear(normed, weights.v, weights.v_bias).unflatten(-1, (self.num_kv_heads, self.head_dim))
        cos, sin = cos_sin(positions, self.inv_freq, self.rope_scaling)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish_layer(self, layer: int, hidden: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """The hidden states leaving layer ``layer`` for the tokens of ``hidden``/``queries``: causal
        attention (by position, and within the sliding window) over ``keys``/``values`` of any tokens,
        then the output projection, the residuals and the MLP."""
        weights = self.layers[layer]
        visible = key_positions[None, :] <= query_positions[:, None]
        if self.sliding_window is not None:
            visible &= query_positions[:, None] - key_positions[None, :] < self.sliding_window
        groups = self.num_heads // self.num_kv_heads
        k = keys.repeat_interleave(groups, dim=1).transpose(0, 1).float()
        v = values.repeat_interleave(groups, dim=1).transpose(0, 1).float()
        attended = F.scaled_dot_product_attention(queries.transpose(0, 1).float(), k, v, attn_mask=visible)
        attended = attended.transpose(0, 1).flatten(1).to(hidden.dtype)
        hidden = hidden + F.linear(attended, weights.o)
        normed = _rms_norm(hidden, weights.post_norm, self.eps)
        return hidden + F.linear(F.silu(F.linear(normed, weights.gate)) * F.linear(normed, weights.up), weights.down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(hidden, self.final_norm, self.eps), self.lm_head).float()


@dataclass
class Prefill:
    """A full prefill: the last token's logits and every layer's KV ``[layers, 2, tokens, kv_heads, dim]``."""

    logits: torch.Tensor
    kv: torch.Tensor


def prefill(model: LlamaFamilyModel, tokens: torch.Tensor, first_position: int = 0) -> Prefill:
    """Every token through every layer: the reference that blending approximates."""
    positions = torch.arange(first_position, first_position + tokens.numel())
    hidden = model.embed(tokens)
    kv = torch.empty(model.num_layers, 2, tokens.numel(), model.num_kv_heads, model.head_dim, dtype=model.dtype)
    for layer in range(model.num_layers):
        q, k, v = model.qkv(layer, hidden, positions)
        kv[layer, 0], kv[layer, 1] = k, v
        hidden = model.finish_layer(layer, hidden, q, k, v, positions, positions)
    return Prefill(model.logits(hidden[-1:])[0], kv)


def unsupported_reason(config: Any) -> str | None:
    """Why this module cannot run ``config``'s model, or None."""
    architectures = getattr(config, "architectures", None) or []
    if not any(name in ARCHITECTURES for name in architectures):
        return f"blending supports {', '.join(ARCHITECTURES)}, not {', '.join(architectures) or 'an unnamed model'}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"blending expects a SiLU MLP, the model uses {config.hidden_act}"
    return None


def _sliding_window(config: Any) -> int | None:
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 names the window but may not use it
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
