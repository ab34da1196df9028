"""Stand-ins for vLLM objects that the connector reads at construction, for tests without an engine."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def one_full_attention_group() -> SimpleNamespace:
    """A ``KVCacheConfig`` with one full-attention group: what the connector supports."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec  # imported late: vLLM may be absent

    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32)
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)])
