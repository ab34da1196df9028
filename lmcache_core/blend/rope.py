"""Rotary position embeddings (RoPE), as Llama-family models apply them, and re-rotation of cached keys.

A key at position ``p`` is ``R(p) k`` where ``R`` rotates each pair of dimensions ``(i, i + d/2)``
by ``p * inv_freq[i]``. Rotations of one plane compose by adding angles, so the key of the same
token at position ``q`` is ``R(q - p)`` applied to the stored key: no need to know the key before
rotation. Values carry no position and are reused as they are.

``inv_freq`` holds one frequency per pair; for models with RoPE scaling (Llama 3's, YaRN, ...) take
it from :func:`inv_freq_for` (transformers' own initialisation, so every scaling type it knows is
right). Scaling types that also scale the cos/sin tables ("attention scaling") multiply every key
once at its original position; a re-rotation keeps that factor, so it uses plain cos/sin.
"""

from __future__ import annotations

from typing import Any

import torch


def inv_freq_for(config: Any) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` of a transformers model config, computed as transformers does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
        base = float(getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` tables ``[tokens, 2 * pairs]`` for ``positions`` (float32)."""
    angles = positions.float()[:, None] * inv_freq[None, :].float()
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[tokens, heads, head_dim]`` by the tables of its tokens (``[tokens, rotary_dim]``).

    Only the first ``rotary_dim`` dimensions rotate (models with a partial rotary factor)."""
    rotary = cos.shape[-1]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    rotated = x[..., :rotary] * cos + _rotate_half(x[..., :rotary]) * sin
    if rotary == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary:]), dim=-1)


def rerotate_keys(keys: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor,
                  inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``[tokens, heads, head_dim]`` computed at ``from_positions``, as they are at ``to_positions``.

    Computed in float32 and returned in the keys' dtype."""
    cos, sin = cos_sin(to_positions.long() - from_positions.long(), inv_freq)
    return apply_rope(keys.float(), cos, sin).to(keys.dtype)
