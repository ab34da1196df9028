"""``LMCacheCoreConnector``: vLLM's KV-connector (v1) API on top of lmcache-core's tier stack.

How a request flows through it:

1. **Scheduler process**, ``get_num_new_matched_tokens``: sends the prompt's token ids to every
   model worker over a unix socket (:mod:`.lookup`); each worker hashes them with its own chunk
   hasher and answers how many leading chunks its tiers hold. The smallest answer, capped at the
   prompt length minus one token (vLLM must compute at least one) and rounded down to vLLM's block
   size, minus what vLLM's own prefix cache already has, is what vLLM may skip.
2. ``update_state_after_alloc`` / ``build_connector_meta``: once vLLM has allocated pages, the
   scheduler puts into the step's metadata, per request, a *load* (tokens and page ids of the hit)
   and/or a *save* (the chunks that this step completes, from the prompt only).
3. **Worker process**, ``start_load_kv`` (before the forward pass): fetches the chunks from the
   tiers (a chunk found on disk is promoted to memory) and scatters them into vLLM's pages with
   :func:`.paged.copy_paged_kv`. A chunk that vanished since the lookup is *not* an error: its pages
   are reported through ``get_block_ids_with_load_errors`` and vLLM recomputes them (the connector
   switches vLLM's ``kv_load_failure_policy`` to ``recompute`` for that).
4. ``wait_for_save`` (after the forward pass): gathers the completed chunks from the pages in one
   copy and hands them to the tier stack, which writes the first tier (memory) at once and the
   lower tiers (disk, remote) on background threads, so a slow tier never stalls inference.

   With ``LMCACHE_USE_LAYERWISE`` the copies of steps 3 and 4 move one layer at a time in vLLM's
   per-layer hooks, ``wait_for_layer_load`` and ``save_kv_layer`` (:mod:`.layerwise`); what loads
   and what fails is still decided in ``start_load_kv``, and the chunks still reach the tiers in
   ``wait_for_save``.
5. Saves that depend on a load wait for its outcome. Chunks computed in the step that loads a
   request's hit attend to the loaded pages; if any rank's load failed they are garbage, and a
   stored chunk is never overwritten. So the workers report each step's loads back
   (``build_connector_worker_meta``, merged over ranks by vLLM) and the scheduler issues those
   saves only after ``update_connector_output`` has confirmed the load, or rolls back to the first
   failed chunk so that vLLM's recomputed chunks are the ones saved. A request that finishes in
   the meantime keeps its pages (``request_finished`` returns True) until the workers have saved
   them and report it through ``get_finished``.

Code layout (as vLLM's NixlConnector): :class:`LMCacheCoreConnector` is the facade vLLM instantiates
once per role; it delegates each scheduler-side method to ``self.connector_scheduler``
(:class:`.scheduler.LMCacheCoreScheduler`, steps 1, 2 and 5) and each worker-side method to
``self.connector_worker`` (:class:`.worker.LMCacheCoreWorker`, steps 3 and 4). What they pass each
other is in :mod:`.metadata`; every vLLM internal they rely on is in :mod:`.compat`, which also
checks the vLLM version at start-up.

Settings are lmcache-core's ``LMCACHE_*`` variables; ``kv_connector_extra_config`` entries override
them (same names, lower case: ``{"chunk_size": 256, "tiers": "cpu,disk", "model_name": "llama-8b"}``).
Each process loads the plugin registry once and validates the settings against it; the worker builds
its tiers from that same registry.

Not supported (the connector then stays out of the way, it never fails a request): hybrid models
with several KV-cache groups, context parallelism, multimodal prompts, prompt embeddings, LoRA
requests and requests with a ``cache_salt`` (their KV depends on more than the token ids), and
vLLM CPU kernels whose cache layout fails the start-up probe (see :mod:`.layouts`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_core.integrations.vllm import compat
from lmcache_core.integrations.vllm.metadata import (
    LMCacheCoreMetadata,
    LMCacheCoreStats,
    LMCacheCoreWorkerMeta,
    Transfer,
)
from lmcache_core.integrations.vllm.scheduler import LMCacheCoreScheduler
from lmcache_core.integrations.vllm.worker import LMCacheCoreWorker
from lmcache_core.plugins import load_registry
from lmcache_core.registry import Registry
from lmcache_core.settings import Settings, load_settings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "KVConnectorRole",
    "LMCacheCoreConnector",
    "LMCacheCoreMetadata",
    "LMCacheCoreScheduler",
    "LMCacheCoreStats",
    "LMCacheCoreWorker",
    "LMCacheCoreWorkerMeta",
    "Transfer",
    "load_connector_settings",
    "unsupported_reason",
]

# A child of vLLM's logger, so our lines appear in vLLM's output with its format.
log = logging.getLogger("vllm.lmcache_core")


def load_connector_settings(extra_config: dict[str, Any], registry: Registry | None = None) -> Settings:
    """lmcache-core settings from the environment, overridden by ``kv_connector_extra_config``
    (``model_name`` and the deprecated ``lookup_timeout_s`` included: they are settings too)."""
    return load_settings(registry if registry is not None else load_registry(), **extra_config)


def unsupported_reason(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """Why this vLLM configuration cannot be cached correctly (the connector then stays out of
    the way), or None."""
    groups = len(kv_cache_config.kv_cache_groups)
    if groups != 1:
        return f"the model has {groups} KV-cache groups (sliding-window or hybrid); one is supported"
    # Our connector does not declare SupportsHMA, so vLLM allocates hybrid models (full + sliding
    # layers) as full attention: every token keeps its pages, and they cache like any model. A
    # model whose layers are all local (sliding window, chunked local attention) keeps its own
    # spec, and vLLM frees the pages that fall out of the window: chunks would be read from and
    # written to freed pages.
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    if not isinstance(spec, FullAttentionSpec):
        return f"the model's KV cache is {type(spec).__name__} (pages outside the window are freed); " \
               "only full attention is supported"
    parallel = vllm_config.parallel_config
    for setting in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        size = getattr(parallel, setting, 1)
        if size > 1:  # tokens are spread over ranks: our slot arithmetic assumes each rank holds all
            return f"{setting}={size}: context parallelism is not supported yet"
    return None


class LMCacheCoreConnector(KVConnectorBase_V1):
    """Stores and reuses prompt-prefix KV in lmcache-core tiers (memory, disk, remote).

    The facade vLLM instantiates: scheduler-side calls go to ``connector_scheduler``, worker-side
    calls to ``connector_worker`` (the other one is None in each process)."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        registry = load_registry()
        settings = load_connector_settings(dict(self._kv_transfer_config.kv_connector_extra_config or {}), registry)
        reason = compat.version_problem(allow_untested=settings.allow_untested_vllm) or unsupported_reason(
            vllm_config, kv_cache_config
        )
        if reason is not None and role == KVConnectorRole.SCHEDULER:  # one line, not one per process
            log.error("lmcache-core: caching is off: %s", reason)
        supported = reason is None
        self.connector_scheduler: LMCacheCoreScheduler | None = None
        self.connector_worker: LMCacheCoreWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = LMCacheCoreScheduler(vllm_config, settings, registry, supported=supported)
        else:
            self.connector_worker = LMCacheCoreWorker(vllm_config, kv_cache_config, settings, registry,
                                                      supported=supported)

    def _scheduler(self) -> LMCacheCoreScheduler:
        assert self.connector_scheduler is not None, "a scheduler-side call in a worker process"
        return self.connector_scheduler

    def _worker(self) -> LMCacheCoreWorker:
        assert self.connector_worker is not None, "a worker-side call in the scheduler process"
        return self.connector_worker

    # Scheduler side ---------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._scheduler().bind_kv_cache_manager(kv_cache_manager)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler().get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        return self._scheduler().get_external_cache_hit_sources(request, num_external_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler().update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler().request_finished(request, block_ids)

    # Worker side ------------------------------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._worker().bind_connector_metadata(connector_metadata)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._worker().clear_connector_metadata()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker().start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer by layer (``LMCACHE_USE_LAYERWISE``): the layer's loaded pages are made ready here.
        Otherwise loads complete in ``start_load_kv`` and this does nothing."""
        self._worker().wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Layer by layer (``LMCACHE_USE_LAYERWISE``): the layer's part of the step's saves starts
        here (from the pages registered under ``layer_name``, which ``kv_layer`` is). Otherwise
        saving happens once per step in ``wait_for_save``, for all layers in one pass."""
        self._worker().save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        self._worker().wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker().get_finished(finished_req_ids)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker().build_connector_worker_meta()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker().get_block_ids_with_load_errors()

    def take_events(self) -> Iterable[KVCacheEvent]:
        """Store events of the tiers for vLLM's KV-event stream (scheduler side; see the scheduler)."""
        if self.connector_scheduler is None:
            return ()
        return self.connector_scheduler.take_events()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        # vLLM asks both roles and sums what they return: per-request token counts come from the
        # scheduler, bytes and seconds (per rank, summed rightly) from the workers.
        if self.connector_worker is not None:
            return self.connector_worker.get_kv_connector_stats()
        return self._scheduler().get_kv_connector_stats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        """lmcache-core's metrics on vLLM's ``/metrics`` (see :mod:`.prometheus`)."""
        from lmcache_core.integrations.vllm.prometheus import LMCacheCorePromMetrics

        return LMCacheCorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer by layer, the per-layer hooks must run between CUDA-graph pieces (a full graph
        would replay without them): vLLM then switches a full-graph mode to piecewise."""
        return load_connector_settings(dict(extra_config or {})).use_layerwise

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LMCacheCoreStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self.connector_scheduler is not None:
            self.connector_scheduler.shutdown()
        if self.connector_worker is not None:
            self.connector_worker.shutdown()
