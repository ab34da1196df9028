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
5. Saves that depend on a load wait for its outcome. Chunks computed in the step that loads a
   request's hit attend to the loaded pages; if any rank's load failed they are garbage, and a
   stored chunk is never overwritten. So the workers report each step's loads back
   (``build_connector_worker_meta``, merged over ranks by vLLM) and the scheduler issues those
   saves only after ``update_connector_output`` has confirmed the load, or rolls back to the first
   failed chunk so that vLLM's recomputed chunks are the ones saved. A request that finishes in
   the meantime keeps its pages (``request_finished`` returns True) until the workers have saved
   them and report it through ``get_finished``.

Settings are lmcache-core's ``LMCACHE_*`` variables; ``kv_connector_extra_config`` entries override
them (same names, lower case: ``{"chunk_size": 256, "tiers": "cpu,disk"}``).

Not supported (the connector then stays out of the way, it never fails a request): hybrid models
with several KV-cache groups, context parallelism, multimodal prompts, prompt embeddings, LoRA
requests and requests with a ``cache_salt`` (their KV depends on more than the token ids), and
vLLM CPU kernels whose cache layout fails the start-up probe (see :mod:`.layouts`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_core.backend import Chunk
from lmcache_core.engine import CacheEngine
from lmcache_core.errors import SettingsError
from lmcache_core.integrations.vllm.layouts import (
    CPU_LAYOUTS,
    cpu_attention_isa,
    cpu_layout_for,
    detect_layout,
)
from lmcache_core.integrations.vllm.lookup import LookupClient, LookupServer, socket_path
from lmcache_core.integrations.vllm.paged import PagedLayout, copy_paged_kv, slots_for
from lmcache_core.keys import CacheScope, KVLayout, config_digest
from lmcache_core.model_identity import weights_identity
from lmcache_core.plugins import load_registry
from lmcache_core.settings import Settings, load_settings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# A child of vLLM's logger, so our lines appear in vLLM's output with its format.
log = logging.getLogger("vllm.lmcache_core")

# kv_connector_extra_config keys that are the connector's own, not lmcache-core settings.
_CONNECTOR_KEYS = {"model_name", "lookup_timeout_s"}
_TIER_SOURCES = {"cpu": CacheHitSource.HOST, "disk": CacheHitSource.DISK}
_STATS_LOG_INTERVAL_S = 30.0


def load_connector_settings(extra_config: dict[str, Any]) -> Settings:
    """lmcache-core settings from the environment, overridden by ``kv_connector_extra_config``."""
    overrides = {key: value for key, value in extra_config.items() if key not in _CONNECTOR_KEYS}
    return load_settings(load_registry(), **overrides)


@dataclass
class Transfer:
    """Tokens ``[start, end)`` of one request to move between vLLM's pages and the tiers.

    ``tokens`` are the prompt's ids up to the end of the last chunk involved (the keys are chained
    hashes, so every chunk's key needs all tokens before it); ``block_ids`` are the request's pages.
    """

    request_id: str
    tokens: np.ndarray
    block_ids: list[int]
    start: int
    end: int


@dataclass
class LMCacheCoreMetadata(KVConnectorMetadata):
    """What the workers do in one step; pickled from the scheduler to every worker.

    ``released``: finished requests whose pages vLLM kept for our saves (``request_finished``
    returned True); the workers report them through ``get_finished`` once this step's saves are done.
    """

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    released: list[str] = field(default_factory=list)


@dataclass
class LMCacheCoreWorkerMeta(KVConnectorWorkerMetadata):
    """What the workers report back after a step: which requests' loads ran, and for those that
    failed, the first token that did not load. vLLM merges the reports of all ranks (``aggregate``),
    so a failure on any rank reaches the scheduler, which alone can hold back the saves that
    depend on it."""

    loaded: set[str] = field(default_factory=set)
    failed_from: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, LMCacheCoreWorkerMeta)
        self.loaded |= other.loaded
        for request_id, token in other.failed_from.items():
            self.failed_from[request_id] = min(token, self.failed_from.get(request_id, token))
        return self


@dataclass
class LMCacheCoreStats(KVConnectorStats):
    """Per-interval counters; summed over workers and steps by vLLM, logged by its stats logger."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = Counter(self.data)
        merged.update(other.data)
        self.data = dict(merged)
        return self

    def reduce(self) -> dict[str, int | float]:
        data = self.data
        report: dict[str, int | float] = {
            "load_tokens": int(data.get("load_tokens", 0)),
            "save_tokens": int(data.get("save_tokens", 0)),
            "failed_load_tokens": int(data.get("failed_load_tokens", 0)),
        }
        for direction in ("load", "save"):
            seconds = data.get(f"{direction}_s", 0.0)
            if seconds:
                report[f"{direction}_GBps"] = round(data.get(f"{direction}_bytes", 0) / seconds / 1e9, 3)
        for name, value in sorted(data.items()):
            if name.startswith("hit_tokens_"):
                report[name] = int(value)
        return report

    def is_empty(self) -> bool:
        return not any(self.data.values())


def _model_identity(vllm_config: VllmConfig, revision_override: str | None = None) -> tuple[str, str]:
    """A stable model name (not a local path: a restart from another folder must still hit) and a
    digest of what the model computes with: its config, its weights (:mod:`lmcache_core.model_identity`,
    or the operator's ``LMCACHE_MODEL_REVISION``), the dtype it runs in and any online quantization.
    Two checkpoints published under one name, or a fine-tune in a folder of the same name, must not
    share KV."""
    model_config = vllm_config.model_config
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    name = str(extra.get("model_name") or model_config.model).rstrip("/")
    if name.startswith("/") or name.startswith("."):
        name = name.rsplit("/", 1)[-1]
    config = {
        key: value
        for key, value in model_config.hf_config.to_dict().items()
        if not key.startswith("_") and key != "transformers_version"
    }
    config["revision"] = model_config.revision
    config["dtype"] = str(model_config.dtype)
    config["quantization"] = model_config.quantization
    config["weights"] = weights_identity(
        str(model_config.model), revision=model_config.revision,
        cache_dir=vllm_config.load_config.download_dir, override=revision_override,
    )
    if config["weights"] is None:
        log.warning("lmcache-core cannot identify the weights of %s (neither a folder of weight files nor a hub "
                    "snapshot): keys cover its name, config and revision only; set LMCACHE_MODEL_REVISION and "
                    "change it whenever the weights change", model_config.model)
    return name, config_digest(config)


def unsupported_reason(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """Why this vLLM configuration cannot be cached correctly (the connector then stays out of
    the way), or None."""
    groups = len(kv_cache_config.kv_cache_groups)
    if groups != 1:
        return f"the model has {groups} KV-cache groups (sliding-window or hybrid); one is supported"
    parallel = vllm_config.parallel_config
    for setting in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        size = getattr(parallel, setting, 1)
        if size > 1:  # tokens are spread over ranks: our slot arithmetic assumes each rank holds all
            return f"{setting}={size}: context parallelism is not supported yet"
    return None


def _kv_format(vllm_config: VllmConfig) -> str:
    """How vLLM encodes KV values beyond their dtype: ``--kv-cache-dtype`` (fp8_e4m3 and fp8_e5m2
    caches are both uint8), the layers it leaves unquantized, and the per-layer K/V scales that
    quantized caches are written with. ``"auto"`` when the cache keeps the model's dtype."""
    cache_config = vllm_config.cache_config
    cache_dtype = str(cache_config.cache_dtype)
    skipped = sorted(getattr(cache_config, "kv_cache_dtype_skip_layers", None) or [])
    if cache_dtype == "auto" and not skipped:
        return "auto"
    parts = [cache_dtype]
    if skipped:
        parts.append("skip=" + ",".join(skipped))
    layers = vllm_config.compilation_config.static_forward_context
    scales = sorted(
        (name, float(layer._k_scale_float), float(layer._v_scale_float))
        for name, layer in layers.items()
        if hasattr(layer, "_k_scale_float") and hasattr(layer, "_v_scale_float")
    )
    if scales:
        parts.append("scales=" + config_digest(json.dumps(scales)))
    return ";".join(parts)


def _cache_scope(vllm_config: VllmConfig, settings: Settings, layout: KVLayout, rank: int, world: int) -> CacheScope:
    """Everything this worker's KV depends on besides the token ids (see :class:`CacheScope`)."""
    model_name, model_digest = _model_identity(vllm_config, settings.model_revision)
    kv_format = _kv_format(vllm_config)
    return CacheScope(settings.namespace, model_name, model_digest, layout, rank, world, kv_format=kv_format)


class LMCacheCoreConnector(KVConnectorBase_V1):
    """Stores and reuses prompt-prefix KV in lmcache-core tiers (memory, disk, remote)."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._settings = load_connector_settings(extra)
        self._load_enabled = self._kv_transfer_config.is_kv_consumer
        self._save_enabled = self._kv_transfer_config.is_kv_producer
        self._block_size = vllm_config.cache_config.block_size
        self._chunk_size = self._settings.chunk_size
        parallel = vllm_config.parallel_config
        self._lookup_paths = [
            socket_path(str(self._kv_transfer_config.engine_id), parallel.data_parallel_rank, rank)
            for rank in range(parallel.tensor_parallel_size * parallel.pipeline_parallel_size)
        ]
        reason = unsupported_reason(vllm_config, kv_cache_config)
        self._supported = reason is None
        if reason is not None and role == KVConnectorRole.SCHEDULER:  # one line, not one per process
            log.error("lmcache-core: caching is off: %s", reason)
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(extra)
        else:
            self._init_worker()

    # ------------------------------------------------------------------------------------------
    # Scheduler side
    # ------------------------------------------------------------------------------------------

    def _init_scheduler(self, extra: dict[str, Any]) -> None:
        if self._kv_transfer_config.kv_load_failure_policy == "fail":
            # vLLM reads the policy right after constructing this object. For a cache, a chunk
            # evicted between lookup and load must cost a recompute, never a failed request.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
            log.info("lmcache-core: kv_load_failure_policy set to 'recompute' (a cache miss is never fatal)")
        deadline_s = self._settings.lookup_deadline_ms / 1000
        if "lookup_timeout_s" in extra:  # the connector's own key before LMCACHE_LOOKUP_DEADLINE_MS
            deadline_s = _legacy_lookup_timeout(extra["lookup_timeout_s"])
        wait_s = min(self._settings.lookup_wait_ms / 1000, deadline_s)
        self._client = LookupClient(self._lookup_paths, wait_s=wait_s, deadline_s=deadline_s)
        self._requests: dict[str, _RequestState] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._finishing: set[str] = set()  # finished requests whose pages vLLM keeps for our saves
        log.info("lmcache-core connector (scheduler): chunk_size=%d tiers=%s, workers at %s",
                 self._chunk_size, ",".join(self._settings.tiers), ", ".join(self._lookup_paths))

    def _cacheable(self, request: Request) -> bool:
        return (
            self._supported
            and not getattr(request, "mm_features", None)
            and getattr(request, "lora_request", None) is None
            and getattr(request, "cache_salt", None) is None
            # embedding inputs: vLLM fills prompt_token_ids with placeholders, so keys would collide
            and getattr(request, "prompt_embeds", None) is None
        )

    def _lookup(self, request: Request) -> _Lookup | None:
        """Ask the workers (at most once per second per request: the scheduler re-asks every step
        while a request waits for pages). ``None`` while the first answer is late (the client
        bounds that by its deadline); a late re-ask keeps the previous answer meanwhile, so only a
        request's first lookup ever holds it back."""
        prompt = request.prompt_token_ids or []
        previous = self._lookups.get(request.request_id)
        now = time.monotonic()
        if previous is not None and now - previous.at < 1.0:
            return previous
        full = len(prompt) // self._chunk_size * self._chunk_size
        answer = self._client.lookup(np.asarray(prompt[:full], dtype=np.uint32)) if full else (0, 0)
        if answer is None:
            return previous
        result = _Lookup(*answer, at=now)
        self._lookups[request.request_id] = result
        return result

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._load_enabled or not self._cacheable(request):
            return 0, False
        lookup = self._lookup(request)
        if lookup is None:
            return None, False  # vLLM skips the request this step and asks again in the next one
        lookup.local = num_computed_tokens
        hit = min(lookup.found * self._chunk_size, request.num_prompt_tokens - 1)
        hit -= hit % self._block_size
        return max(0, hit - num_computed_tokens), False

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        lookup = self._lookups.get(request.request_id)
        if lookup is None:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        end_first = lookup.first_tier * self._chunk_size
        from_first = max(0, min(lookup.local + num_external_tokens, end_first) - lookup.local)
        tiers = self._settings.tiers
        sources = {_TIER_SOURCES.get(tiers[0], CacheHitSource.EXTERNAL_UNSPECIFIED): from_first}
        if num_external_tokens > from_first:
            lower = _TIER_SOURCES.get(tiers[1], CacheHitSource.EXTERNAL_UNSPECIFIED) if len(tiers) == 2 else (
                CacheHitSource.EXTERNAL_UNSPECIFIED
            )
            sources[lower] = sources.get(lower, 0) + num_external_tokens - from_first
        return {source: count for source, count in sources.items() if count}

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if not self._cacheable(request):
            return
        lookup = self._lookups.get(request.request_id)
        found = lookup.found if lookup is not None else 0
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = _RequestState(request, saved_chunks=found)
        else:  # resumed after preemption: what we saved before is still stored
            state.saved_chunks = max(state.saved_chunks, found)
        state.computed_chunks = max(state.computed_chunks, state.saved_chunks)
        state.load_tokens = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Loads of this step, and the saves whose KV is known to be right.

        Chunks computed in a step that loads (or while an earlier load's outcome is unknown, with
        asynchronous scheduling) attend to the loaded pages: if any rank's load fails they are
        garbage. Their saves wait until the workers' report reaches :meth:`update_connector_output`;
        a finished request keeps its pages meanwhile (:meth:`request_finished`).
        """
        meta = LMCacheCoreMetadata()
        chunk = self._chunk_size
        for request_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            state = self._requests.get(request_id)
            if state is not None:  # its pages are freed: saves it held are lost, recomputed later
                state.computed_chunks = state.saved_chunks
        for request_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self._requests.get(request_id)
            if state is None or state.finished:
                continue
            request = state.request
            prompt = request.prompt_token_ids or []
            if state.load_tokens:
                end = request.num_computed_tokens
                start = end - state.load_tokens
                chunk_end = -(-end // chunk) * chunk
                meta.loads.append(Transfer(request_id, _tokens(prompt, chunk_end), self._block_ids(request_id),
                                           start, end))
                state.load_tokens = 0
                state.unconfirmed_loads += 1
            if self._save_enabled:
                ready = min(request.num_computed_tokens + num_scheduled, len(prompt)) // chunk
                state.computed_chunks = max(state.computed_chunks, ready)
                self._issue_save(meta, state, None)
        for request_id in list(self._finishing):
            state = self._requests[request_id]
            if state.unconfirmed_loads:
                continue  # the outcome of its last load is still on its way
            self._issue_save(meta, state, state.block_ids)
            meta.released.append(request_id)
            self._finishing.discard(request_id)
            del self._requests[request_id]
        return meta

    def _issue_save(self, meta: LMCacheCoreMetadata, state: _RequestState, block_ids: list[int] | None) -> None:
        """Save the chunks computed but not stored yet, unless a load they depend on is unconfirmed."""
        if state.unconfirmed_loads or state.computed_chunks <= state.saved_chunks:
            return
        chunk = self._chunk_size
        request_id = state.request.request_id
        prompt = state.request.prompt_token_ids or []
        meta.saves.append(Transfer(
            request_id, _tokens(prompt, state.computed_chunks * chunk),
            block_ids if block_ids is not None else self._block_ids(request_id),
            state.saved_chunks * chunk, state.computed_chunks * chunk,
        ))
        state.saved_chunks = state.computed_chunks

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """The workers' report of a step's loads: confirm them, or roll back to the first failure so
        that the chunks vLLM recomputes are saved (and none computed over unfilled pages is)."""
        report = connector_output.kv_connector_worker_meta
        if not isinstance(report, LMCacheCoreWorkerMeta):
            return
        for request_id in report.loaded:
            state = self._requests.get(request_id)
            if state is None:
                continue
            state.unconfirmed_loads = max(0, state.unconfirmed_loads - 1)
            failed_from = report.failed_from.get(request_id)
            if failed_from is not None:
                first_bad_chunk = failed_from // self._chunk_size
                state.saved_chunks = min(state.saved_chunks, first_bad_chunk)
                state.computed_chunks = min(state.computed_chunks, first_bad_chunk)

    def _block_ids(self, request_id: str) -> list[int]:
        assert self._kv_cache_manager is not None, "vLLM binds its KV-cache manager before scheduling"
        return list(self._kv_cache_manager.get_block_ids(request_id)[0])

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the pages (True) while saves wait on a load's outcome; otherwise every save has
        already copied its pages (saves complete within their step) and vLLM may free them now."""
        self._lookups.pop(request.request_id, None)
        state = self._requests.get(request.request_id)
        if state is None:
            return False, None
        if self._save_enabled and (state.unconfirmed_loads or state.computed_chunks > state.saved_chunks):
            state.finished = True
            state.block_ids = list(block_ids)
            self._finishing.add(request.request_id)
            return True, None
        del self._requests[request.request_id]
        return False, None

    # ------------------------------------------------------------------------------------------
    # Worker side
    # ------------------------------------------------------------------------------------------

    def _init_worker(self) -> None:
        self._engine: CacheEngine | None = None
        self._server: LookupServer | None = None
        self._layers: list[torch.Tensor] = []
        self._layout: PagedLayout | None = None
        self._failed_blocks: set[int] = set()
        self._load_report = LMCacheCoreWorkerMeta()  # this step's loads, for the scheduler
        self._released: set[str] = set()  # finished requests whose saves are done
        self._stats: Counter[str] = Counter()
        self._totals: Counter[str] = Counter()
        self._last_log = time.monotonic()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not self._supported or not kv_caches:
            return
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        parallel = self._vllm_config.parallel_config
        rank = get_pp_group().rank_in_group * parallel.tensor_parallel_size + get_tensor_model_parallel_rank()
        world = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        try:
            self._start_caching(kv_caches, rank, world)
        except Exception as error:  # never fail vLLM's start: run without the cache, and say so
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            log.debug("lmcache-core start-up failure", exc_info=True)
            log.error("lmcache-core: KV caching is OFF (no loads, no saves; generations are unaffected): %s", error)
        # Served even when caching is off: the scheduler then hears "0 chunks" instead of warning
        # that it cannot reach this worker.
        path = socket_path(str(self._kv_transfer_config.engine_id), parallel.data_parallel_rank, rank)
        self._server = LookupServer(path, self._serve_lookup)
        if self._engine is not None and self._layout is not None:
            log.info("lmcache-core connector (worker %d/%d): layout=%s, %d layers, scope %s, tiers=%s, lookups on %s",
                     rank, world, self._layout.value, len(self._layers), self._engine.scope.prefix,
                     ",".join(self._settings.tiers), path)

    def _start_caching(self, kv_caches: dict[str, torch.Tensor], rank: int, world: int) -> None:
        """Check the cache layout and open the tiers; raises with the reason when caching cannot work."""
        layout = detect_layout(kv_caches, self._vllm_config)
        spec = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec
        num_kv_heads, head_dim, dtype = spec.num_kv_heads, spec.head_size, spec.dtype
        if layout is PagedLayout.MLA:
            num_kv_heads = 1
            head_dim = next(iter(kv_caches.values())).shape[-1]
        if layout in CPU_LAYOUTS:
            first_name, first = next(iter(kv_caches.items()))
            attention = self._vllm_config.compilation_config.static_forward_context.get(first_name)
            model_dtype = self._vllm_config.model_config.dtype
            kv_cache_dtype = self._vllm_config.cache_config.cache_dtype
            isa = getattr(attention, "isa", None) or cpu_attention_isa(model_dtype, first.shape[2], head_dim,
                                                                        kv_cache_dtype)
            layout = cpu_layout_for(isa=isa, dtype=model_dtype, block_size=first.shape[2], num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, kv_cache_dtype=kv_cache_dtype)
        kv_layout = KVLayout(len(kv_caches), num_kv_heads, head_dim, str(dtype).removeprefix("torch."))
        scope = _cache_scope(self._vllm_config, self._settings, kv_layout, rank, world)
        self._engine = CacheEngine(self._settings, load_registry(), scope)
        self._layers = list(kv_caches.values())
        self._layout = layout
        self._chunk_shape = (len(self._layers), layout.kv_factor, self._chunk_size, num_kv_heads, head_dim)
        self._dtype = dtype

    def _serve_lookup(self, tokens: np.ndarray) -> tuple[int, int]:
        """Runs on the lookup server's thread: (chunks in any tier, chunks in the first tier)."""
        if self._engine is None:  # caching is off
            return 0, 0
        keys = self._engine.hasher.keys(tokens)
        found = self._engine.stack.contains(keys)
        first_tier = self._engine.stack.first_tier_contains(keys[:found]) if found else 0
        return found, first_tier

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheCoreMetadata)
        if not meta.loads:
            return
        self._load_report.loaded.update(transfer.request_id for transfer in meta.loads)
        if self._engine is None:
            for transfer in meta.loads:  # never promised by a lookup; be safe anyway
                self._fail(transfer, transfer.start)
            return
        started = time.perf_counter()
        chunk = self._chunk_size
        pieces: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        hits_before = dict(self._engine.stack.hits_by_tier)
        for transfer in meta.loads:
            first = transfer.start // chunk
            keys = self._engine.hasher.keys(transfer.tokens)[first:]
            chunks = self._valid_prefix(self._engine.stack.get_prefix(keys))
            loaded_end = min(transfer.end, (first + len(chunks)) * chunk)
            if loaded_end < transfer.end:
                self._fail(transfer, loaded_end)
            if loaded_end <= transfer.start:
                continue
            kv = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
            offset = first * chunk
            pieces.append(kv[:, :, transfer.start - offset : loaded_end - offset])
            slots.append(slots_for(transfer.block_ids, self._block_size, transfer.start, loaded_end))
        if pieces:
            buffer = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
            assert self._layout is not None
            copy_paged_kv(self._layers, buffer, torch.cat(slots), self._layout, "load")
            self._stats["load_tokens"] += buffer.shape[2]
            self._stats["load_bytes"] += buffer.nbytes
        for tier, hits in self._engine.stack.hits_by_tier.items():
            if hits > hits_before.get(tier, 0):
                self._stats[f"hit_tokens_{tier}"] += (hits - hits_before.get(tier, 0)) * chunk
        self._stats["load_s"] += time.perf_counter() - started

    def _valid_prefix(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Chunks up to the first one with an unexpected shape or dtype (never load foreign KV)."""
        for index, kv in enumerate(chunks):
            if tuple(kv.shape) != self._chunk_shape or kv.dtype != self._dtype:
                log.warning("lmcache-core: chunk of shape %s %s, expected %s %s; treating it as a miss",
                            tuple(kv.shape), kv.dtype, self._chunk_shape, self._dtype)
                return chunks[:index]
        return chunks

    def _fail(self, transfer: Transfer, from_token: int) -> None:
        """Report the pages of tokens ``[from_token, end)`` as not loaded: vLLM recomputes them."""
        first_block = from_token // self._block_size
        last_block = (transfer.end - 1) // self._block_size
        self._failed_blocks.update(transfer.block_ids[first_block : last_block + 1])
        self._stats["failed_load_tokens"] += transfer.end - from_token
        failed = self._load_report.failed_from
        failed[transfer.request_id] = min(from_token, failed.get(transfer.request_id, from_token))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete in ``start_load_kv`` (a host-memory copy on CPU); nothing to wait for."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Saving happens once per step in ``wait_for_save``, for all layers in one copy."""

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheCoreMetadata)
        if meta.saves and self._engine is not None:
            self._save(meta.saves)
        # Saves copy the pages synchronously: the released requests' pages may be freed now.
        self._released.update(meta.released)
        self._maybe_log()

    def _save(self, saves: list[Transfer]) -> None:
        assert self._engine is not None and self._layout is not None
        started = time.perf_counter()
        chunk = self._chunk_size
        slots = torch.cat([slots_for(t.block_ids, self._block_size, t.start, t.end) for t in saves])
        buffer = torch.empty((*self._chunk_shape[:2], len(slots), *self._chunk_shape[3:]), dtype=self._dtype)
        copy_paged_kv(self._layers, buffer, slots, self._layout, "save")
        chunks: list[Chunk] = []
        position = 0
        for transfer in saves:
            keys = self._engine.hasher.keys(transfer.tokens[: transfer.end])  # later chunks: not needed
            for index in range(transfer.start // chunk, transfer.end // chunk):
                chunks.append(Chunk(keys[index], buffer[:, :, position : position + chunk], index))
                position += chunk
        self._engine.stack.put_many(chunks)
        self._stats["save_tokens"] += buffer.shape[2]
        self._stats["save_bytes"] += buffer.nbytes
        self._stats["save_s"] += time.perf_counter() - started

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose pages vLLM kept for our saves (``request_finished`` returned True) and
        whose saves are done."""
        released, self._released = self._released, set()
        return released or None, None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report, self._load_report = self._load_report, LMCacheCoreWorkerMeta()
        return report if report.loaded else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._role == KVConnectorRole.SCHEDULER or not self._stats:  # vLLM asks both roles
            return None
        stats = LMCacheCoreStats(data=dict(self._stats))
        self._totals.update(self._stats)
        self._stats.clear()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LMCacheCoreStats(data=dict(data or {}))

    def _maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < _STATS_LOG_INTERVAL_S:
            return
        self._last_log = now
        totals = self._totals + self._stats
        if totals:
            log.info("lmcache-core totals: %s", LMCacheCoreStats(data=dict(totals)).reduce())

    def shutdown(self) -> None:
        if self._role == KVConnectorRole.SCHEDULER:
            self._client.close()
            return
        if self._server is not None:
            self._server.close()
        if self._engine is not None:
            self._maybe_log(force=True)
            self._engine.close()  # waits for the background writes to disk/remote tiers
            self._engine = None


@dataclass
class _Lookup:
    found: int  # chunks every worker holds
    first_tier: int  # of which in the first tier
    at: float  # when the workers answered
    local: int = 0  # tokens vLLM's own prefix cache had when we answered


@dataclass
class _RequestState:
    request: Request
    saved_chunks: int  # prompt chunks known to be stored (found by the lookup, or saved by us)
    computed_chunks: int = 0  # prompt chunks in the pages once the steps built so far have run
    load_tokens: int = 0  # external tokens to load in the request's next step
    unconfirmed_loads: int = 0  # loads sent to the workers whose outcome has not come back yet
    finished: bool = False  # vLLM finished it and keeps its pages until we release them
    block_ids: list[int] = field(default_factory=list)  # its pages, once finished


def _legacy_lookup_timeout(value: Any) -> float:
    """``kv_connector_extra_config["lookup_timeout_s"]``, now the lookup deadline in seconds."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 < seconds <= 60:
        raise SettingsError(f"kv_connector_extra_config lookup_timeout_s: expected seconds in (0, 60], got {value!r} "
                            "(deprecated: use lookup_deadline_ms or LMCACHE_LOOKUP_DEADLINE_MS)")
    log.warning("lmcache-core: kv_connector_extra_config lookup_timeout_s is deprecated; it now sets the lookup "
                "deadline (%g ms): use lookup_deadline_ms or LMCACHE_LOOKUP_DEADLINE_MS", seconds * 1000)
    return seconds


def _tokens(prompt: list[int], end: int) -> np.ndarray:
    return np.asarray(prompt[:end], dtype=np.uint32)
