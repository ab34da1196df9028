"""Selective recomputation (CacheBlend): prefill a prompt reusing KV computed elsewhere, correctly enough.

Input: the prompt's tokens, and for some of them KV from the cache, already at the prompt's positions
(:func:`.rope.rerotate_keys`). Every layer up to the check layer runs for all tokens, fresh. At the
check layer the fresh K/V of each cached token is compared with its cached K/V; the
``recompute_ratio`` share of cached tokens that deviate most, every token without cached KV and the
last token go on through the remaining layers, attending over the fused KV (fresh for those, cached
for the others). The result is the last token's logits and the fused KV of every layer.

**Quality guard.** The deviation kept is measured at the check layer over the cached tokens that are
*not* recomputed: ``||KV_fresh - KV_cached|| / ||KV_fresh||`` (Frobenius norms over their keys and
values). Above ``max_deviation`` the blend is not trusted and every token is recomputed through every
layer instead (``fell_back``): the answer is then exactly a full prefill's. The default threshold
(:data:`DEFAULT_MAX_DEVIATION`) is documented with its measurement in ``docs/blending.md``.

A blended KV is an approximation of the prompt's true KV: it must never be stored under the
prompt's exact-prefix keys, nor be handed to later requests as an exact prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmcache_core.blend.llama import LlamaFamilyModel

DEFAULT_MAX_DEVIATION = 0.5


@dataclass
class BlendResult:
    """What a blended prefill produced."""

    logits: torch.Tensor  # the last token's, [vocab]
    kv: torch.Tensor  # fused, [layers, 2, tokens, kv_heads, head_dim]
    recomputed: torch.Tensor  # bool [tokens]: went through every layer fresh
    deviation: float  # of the kept cached KV at the check layer (see the module docstring); 0 if none kept
    fell_back: bool  # the guard tripped: everything was recomputed


def blend(
    model: LlamaFamilyModel,
    tokens: torch.Tensor,
    cached_kv: torch.Tensor,
    cached: torch.Tensor,
    *,
    recompute_ratio: float = 0.15,
    check_layer: int = 1,
    max_deviation: float = DEFAULT_MAX_DEVIATION,
) -> BlendResult:
    """Prefill ``tokens`` (positions 0..n-1) reusing ``cached_kv`` (``[layers, 2, n, kv_heads, dim]``)
    where ``cached`` (bool ``[n]``) is set; the other rows of ``cached_kv`` are ignored."""
    count = tokens.numel()
    if not 0.0 <= recompute_ratio <= 1.0:
        raise ValueError(f"recompute_ratio must be between 0 and 1, got {recompute_ratio}")
    if not 0 <= check_layer < model.num_layers:
        raise ValueError(f"check_layer must be a layer of the model (0..{model.num_layers - 1}), got {check_layer}")
    if cached.shape != (count,) or cached_kv.shape[:3] != (model.num_layers, 2, count):
        raise ValueError("cached and cached_kv must cover the prompt's tokens")
    positions = torch.arange(count)
    hidden = model.embed(tokens)
    kv = torch.empty(model.num_layers, 2, count, model.num_kv_heads, model.head_dim, dtype=model.dtype)
    rows = positions  # the tokens still computed
    deviation, fell_back = 0.0, False
    for layer in range(model.num_layers):
        q, k, v = model.qkv(layer, hidden, positions[rows])
        if layer <= check_layer or fell_back:
            kv[layer, 0, rows], kv[layer, 1, rows] = k, v
        else:
            kv[layer] = cached_kv[layer]
            kv[layer, 0, rows], kv[layer, 1, rows] = k, v
        hidden = model.finish_layer(layer, hidden, q, kv[layer, 0], kv[layer, 1], positions[rows], positions)
        if layer == check_layer and not fell_back:
            selected, deviation = _select(kv[layer], cached_kv[layer], cached, recompute_ratio)
            if deviation > max_deviation:
                fell_back = True  # rows stay all tokens: a full prefill from here on
            else:
                rows = selected
                hidden = hidden[selected]
    recomputed = torch.zeros(count, dtype=torch.bool)
    recomputed[rows] = True
    return BlendResult(model.logits(hidden[-1:])[0], kv, recomputed, deviation, fell_back)


def _select(fresh: torch.Tensor, cached_kv: torch.Tensor, cached: torch.Tensor,
            ratio: float) -> tuple[torch.Tensor, float]:
    """The tokens to recompute after the check layer (sorted), and the deviation of the others."""
    count = cached.numel()
    error = (fresh.float() - cached_kv.float()).pow(2).sum(dim=(0, 2, 3))  # per token, K and V together
    error = torch.where(cached, error, torch.full_like(error, math.inf))  # uncached: always recomputed
    error[-1] = math.inf  # the last token: its logits are the answer
    budget = int((~cached).sum()) + math.ceil(ratio * int(cached.sum()))
    chosen = torch.topk(error, k=min(count, max(budget, 1))).indices
    selected = torch.zeros(count, dtype=torch.bool)
    selected[chosen] = True
    selected |= ~cached
    selected[-1] = True
    kept = ~selected
    if not kept.any():
        return torch.nonzero(selected).flatten(), 0.0
    fresh_norm = fresh.float().pow(2).sum(dim=(0, 2, 3))[kept].sum()
    return torch.nonzero(selected).flatten(), float((error[kept].sum() / fresh_norm.clamp_min(1e-30)).sqrt())


def check_layers_and_ratios(check_layers: Sequence[int], ratios: Sequence[float]) -> tuple[int, float]:
    """LMCache's list settings (``LMCACHE_BLEND_CHECK_LAYERS``, ``LMCACHE_BLEND_RECOMPUTE_RATIOS``) as
    the one check layer and ratio this implementation uses: the first of each."""
    if not check_layers or not ratios:
        raise ValueError("blending needs a check layer and a recompute ratio")
    return int(check_layers[0]), float(ratios[0])
