"""Which :class:`PagedLayout` a running vLLM uses, and a self-check for the CPU backend's layouts.

vLLM does not publish the byte layout of its caches as an API; a wrong guess would silently load
another token's KV. So the layout is derived from the attention backend's name and the tensor
rank, and on CPU, where the layout depends on the SIMD kernel vLLM picked (its "ISA": ``vec``,
``vec16``, ``amx``, see :func:`.compat.cpu_attention_isa`), it is derived at
start-up by writing known values with vLLM's own cache-write op and reading them back through
:func:`copy_paged_kv`: the layout documented for the ISA is tried first, then the others. A
connector for which no layout reads the values back stays out of the way (no loads, no saves)
instead of corrupting generations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from lmcache_core.integrations.vllm import compat
from lmcache_core.integrations.vllm.compat import cpu_attention_isa
from lmcache_core.integrations.vllm.paged import PagedLayout, copy_paged_kv

# A child of vLLM's logger, so our lines appear in vLLM's output with its format.
log = logging.getLogger("vllm.lmcache_core.layouts")

# The layout each CPU attention ISA writes (vLLM csrc/cpu/cpu_attn_vec.hpp, cpu_attn_vec16.hpp,
# cpu_attn_amx.hpp; fp8 caches: cpu_attn_fp8.hpp, which keeps the same element order in bytes).
CPU_ISA_LAYOUTS: dict[str, PagedLayout] = {"vec": PagedLayout.CPU, "vec16": PagedLayout.CPU, "amx": PagedLayout.CPU_AMX}
CPU_LAYOUTS = (PagedLayout.CPU, PagedLayout.CPU_AMX)

# vLLM's fp8 cache dtypes and the torch dtype whose bytes they hold (``fp8`` means e4m3).
FP8_CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


# Caches of plain floats (None: the model's dtype).
_FLOAT_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class CPULayoutError(RuntimeError):
    """No known layout reads back what vLLM's CPU cache-write op wrote (or the op cannot run)."""


class CacheWriteUnavailable(CPULayoutError):
    """vLLM's cache-write op refused this ISA / dtype / block size on this machine and build."""


__all__ = ["CPU_ISA_LAYOUTS", "CPU_LAYOUTS", "CPULayoutError", "CacheWriteUnavailable", "cpu_attention_isa",
           "cpu_layout_for", "detect_layout", "layout_reads", "vllm_cpu_cache_write"]


@dataclass
class CacheWrite:
    """One layer of a paged cache written by vLLM, and what it should hold, in the cache's dtype."""

    layer: torch.Tensor  # [blocks, heads, block_size, 2 * head_dim]
    key: torch.Tensor  # [tokens, heads, head_dim]
    value: torch.Tensor
    slots: torch.Tensor


def vllm_cpu_cache_write(
    *, isa: str, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str = "auto"
) -> CacheWrite:
    """Write random K/V into a small paged cache with vLLM's CPU cache-write op for ``isa``.

    ``dtype`` is the model's; fp8 caches hold bytes, so their K/V are drawn from values that fp8
    represents exactly, and the expected bytes are torch's encoding of them (no rounding to agree on).
    Raises :class:`CacheWriteUnavailable` when vLLM cannot write this combination here.
    """
    fp8 = FP8_CACHE_DTYPES.get(kv_cache_dtype)
    if fp8 is None:  # a cache of plain floats: the model's dtype, or the one kv_cache_dtype names
        if kv_cache_dtype not in _FLOAT_CACHE_DTYPES:
            raise CacheWriteUnavailable(f"kv_cache_dtype={kv_cache_dtype!r} is not supported by lmcache-core on CPU "
                                        f"(supported: {', '.join([*_FLOAT_CACHE_DTYPES, *FP8_CACHE_DTYPES])})")
        dtype = _FLOAT_CACHE_DTYPES[kv_cache_dtype] or dtype
    op_cache_dtype = "auto" if fp8 is None else kv_cache_dtype  # the op takes "auto" for float caches
    num_blocks = 3
    num_tokens = block_size + 3  # crosses a block boundary, ends mid-block
    generator = torch.Generator().manual_seed(0)
    shape = (num_tokens, num_kv_heads, head_dim)
    if fp8 is None:
        key, value = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
    else:
        key, value = (_fp8_exact(shape, fp8, generator).to(dtype) for _ in range(2))
    layer = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim, dtype=torch.uint8 if fp8 else dtype)
    key_cache, value_cache = layer.view(num_blocks, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    try:
        compat.cpu_cache_write(key, value, key_cache, value_cache, slots, isa, op_cache_dtype)
    except Exception as error:  # an ISA this build or CPU does not have, an unsupported block size
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CacheWriteUnavailable(f"vLLM cannot write isa={isa} {dtype} kv_cache_dtype={kv_cache_dtype} "
                                    f"block_size={block_size} here: {reason}") from error
    if fp8 is not None:
        key, value = key.to(torch.float32).to(fp8).view(torch.uint8), value.to(torch.float32).to(fp8).view(torch.uint8)
    return CacheWrite(layer, key, value, slots)


def _fp8_exact(shape: tuple[int, ...], fp8: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random normal fp8 values (± (1 + m / 2^bits) * 2^e), exact in fp8, bf16, fp16 and fp32."""
    mantissa_bits = 3 if fp8 is torch.float8_e4m3fn else 2
    mantissa = torch.randint(0, 2**mantissa_bits, shape, generator=generator) / 2**mantissa_bits
    exponent = torch.randint(-3, 4, shape, generator=generator).to(torch.float32)
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return sign * (1 + mantissa) * torch.exp2(exponent)


def layout_reads(layout: PagedLayout, written: CacheWrite) -> bool:
    """True when ``copy_paged_kv`` with ``layout`` reads back exactly what vLLM wrote."""
    num_tokens, heads, head_dim = written.key.shape
    buffer = torch.empty(1, 2, num_tokens, heads, head_dim, dtype=written.layer.dtype)
    try:
        copy_paged_kv([written.layer], buffer, written.slots, layout, "save")
    except (RuntimeError, ValueError):  # the layout cannot even view this block size / head size
        return False
    return torch.equal(buffer[0, 0], written.key) and torch.equal(buffer[0, 1], written.value)


def cpu_layout_for(
    *, isa: str, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str = "auto"
) -> PagedLayout:
    """The layout vLLM's CPU kernel ``isa`` writes, verified with its own cache-write op.

    Raises :class:`CPULayoutError` (with the reason) when the op cannot run or no layout matches.
    """
    written = vllm_cpu_cache_write(isa=isa, dtype=dtype, block_size=block_size, num_kv_heads=num_kv_heads,
                                   head_dim=head_dim, kv_cache_dtype=kv_cache_dtype)
    documented = CPU_ISA_LAYOUTS.get(isa)
    candidates = ([documented] if documented else []) + [layout for layout in CPU_LAYOUTS if layout is not documented]
    for layout in candidates:
        if layout_reads(layout, written):
            if layout is not documented:
                log.warning("vLLM's CPU isa=%s writes the %s layout (expected %s)", isa, layout.value,
                            documented.value if documented else "an unknown one")
            return layout
    raise CPULayoutError(f"no known layout reads back vLLM's CPU KV cache for isa={isa}, {dtype}, "
                         f"kv_cache_dtype={kv_cache_dtype}, block_size={block_size} (please report this line)")


def detect_layout(kv_caches: dict[str, torch.Tensor], vllm_config: Any) -> PagedLayout:
    """The layout of the caches vLLM registered, from the attention backend of the first layer.

    On vLLM's CPU backend this is the ISA's documented layout (:data:`CPU_ISA_LAYOUTS`) before the
    start-up check; :func:`cpu_layout_for` decides.
    """
    name, tensor = next(iter(kv_caches.items()))
    layer = compat.attention_layers(vllm_config).get(name)
    backend_name = compat.attention_backend_name(layer)
    if backend_name.startswith("CPU"):
        return CPU_ISA_LAYOUTS.get(compat.layer_isa(layer) or "", PagedLayout.CPU)
    if "MLA" in backend_name or compat.layer_uses_mla(layer):
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
