"""Which :class:`PagedLayout` a running vLLM uses, and a self-check for the CPU backend's layout.

vLLM does not publish the byte layout of its caches as an API; a wrong guess would silently load
another token's KV. So the layout is derived from the attention backend's name and the tensor
rank, and on CPU, where the layout depends on the SIMD kernel vLLM picked (its "ISA"), it is
verified at start-up by writing known values with vLLM's own cache-write op and reading them back
through :func:`copy_paged_kv`. A connector whose check fails stays out of the way (no loads, no
saves) instead of corrupting generations.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lmcache_core.integrations.vllm.paged import PagedLayout, copy_paged_kv

log = logging.getLogger(__name__)


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_dim: int, kv_cache_dtype: str = "auto") -> str:
    """The SIMD variant vLLM's CPU attention backend picks for these parameters."""
    from vllm.v1.attention.backends import cpu_attn

    return cpu_attn._get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)


def cpu_layout_matches_vllm(
    *, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int, isa: str | None = None
) -> bool:
    """Write random K/V with vLLM's CPU cache-write op; True when ``copy_paged_kv`` reads them back."""
    import vllm._custom_ops as ops

    isa = isa or cpu_attention_isa(dtype, block_size, head_dim)
    num_blocks = 3
    layer = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = layer.view(num_blocks, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    generator = torch.Generator().manual_seed(0)
    num_tokens = block_size + 3  # crosses a block boundary, ends mid-block
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    try:
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    except Exception as error:  # an ISA this build does not have
        log.warning("cannot probe vLLM's CPU KV layout for isa=%s: %s", isa, error)
        return False
    buffer = torch.empty(1, 2, num_tokens, num_kv_heads, head_dim, dtype=dtype)
    copy_paged_kv([layer], buffer, slots, PagedLayout.CPU, "save")
    return torch.equal(buffer[0, 0], key) and torch.equal(buffer[0, 1], value)


def detect_layout(kv_caches: dict[str, torch.Tensor], vllm_config: Any) -> PagedLayout:
    """The layout of the caches vLLM registered, from the attention backend of the first layer."""
    name, tensor = next(iter(kv_caches.items()))
    layer = vllm_config.compilation_config.static_forward_context.get(name)
    backend = getattr(layer, "attn_backend", None)
    backend_name = backend.get_name() if backend is not None else ""
    if backend_name.startswith("CPU"):
        return PagedLayout.CPU
    if "MLA" in backend_name or getattr(layer, "use_mla", False):
        return PagedLayout.MLA
    if tensor.dim() == 4:
        return PagedLayout.STANDARD  # vLLM >= 0.2x: logical [B, H, N, 2*D] for every standard backend
    if tensor.dim() == 5 and tensor.shape[0] == 2:
        return PagedLayout.FLASH_ATTN
    if tensor.dim() == 5 and tensor.shape[1] == 2:
        import os

        hnd = os.environ.get("VLLM_KV_CACHE_LAYOUT", "").upper() == "HND"
        return PagedLayout.FLASHINFER_HND if hnd else PagedLayout.FLASHINFER_NHD
    if tensor.dim() == 3:
        return PagedLayout.MLA
    raise ValueError(
        f"unsupported KV cache for layer {name}: backend {backend_name or 'unknown'}, shape {tuple(tensor.shape)}"
    )
