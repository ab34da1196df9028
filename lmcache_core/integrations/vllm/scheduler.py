"""The connector's scheduler half: lookups, request state, step metadata, load outcomes, delayed frees.

It runs in vLLM's scheduler process, which holds no KV and no tiers: it asks the workers over the
lookup sockets (:mod:`.lookup`) what they hold, and tells them per step what to load and save
(:class:`.metadata.LMCacheCoreMetadata`). The protocol, including why saves that depend on a load
wait for its outcome, is described in :mod:`.connector`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_core.integrations.vllm.admission import Admission, store_override
from lmcache_core.integrations.vllm.control import ControlServer, InstanceInfo
from lmcache_core.integrations.vllm.lookup import MISS, LookupClient, socket_path
from lmcache_core.integrations.vllm.metadata import (
    LMCacheCoreMetadata,
    LMCacheCoreStats,
    LMCacheCoreWorkerMeta,
    Transfer,
)
from lmcache_core.registry import Registry
from lmcache_core.settings import Settings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# A child of vLLM's logger, so our lines appear in vLLM's output with its format.
log = logging.getLogger("vllm.lmcache_core")

# vLLM's hit-source metric per the medium each backend declares at registration.
_SOURCE_OF_MEDIUM = {"host": CacheHitSource.HOST, "disk": CacheHitSource.DISK}
_LOOKUP_REFRESH_S = 1.0


@dataclass
class _Lookup:
    found: int  # chunks every worker holds
    first_tier: int  # of which in the first tier
    loadable: int  # of which worth loading rather than recomputing
    at: float  # when the workers answered
    vllm_cached_tokens: int = 0  # tokens vLLM's own prefix cache had when we answered


@dataclass
class _RequestState:
    request: Request
    saved_chunks: int  # chunks known to be stored (found by the lookup, or saved by us)
    computed_chunks: int = 0  # chunks (prompt, then generated tokens) in the pages once the steps built so far ran
    load_tokens: int = 0  # external tokens to load in the request's next step
    unconfirmed_loads: int = 0  # loads sent to the workers whose outcome has not come back yet
    waiting_for_load: bool = False  # its asynchronous load is under way (vLLM's WAITING_FOR_REMOTE_KVS)
    finished: bool = False  # vLLM finished it and keeps its pages until we release them
    block_ids: list[int] = field(default_factory=list)  # its pages, once finished
    admitted_chunks: int | None = None  # leading chunks it may store (admission); None: all
    load_end: int = 0  # the end of its last load, for counting the tokens a failed load loses

    def savable_chunks(self) -> int:
        """Chunks computed that it may store."""
        if self.admitted_chunks is None:
            return self.computed_chunks
        return min(self.computed_chunks, self.admitted_chunks)


def tier_hit_sources(registry: Registry, tiers: list[str]) -> list[CacheHitSource]:
    """vLLM's hit source for each tier, from the medium its backend declared at registration."""
    return [_SOURCE_OF_MEDIUM.get(registry.backend(tier).medium, CacheHitSource.EXTERNAL_UNSPECIFIED) for tier in tiers]


class LMCacheCoreScheduler:
    """The scheduler-side methods of vLLM's connector API (the facade delegates to them)."""

    def __init__(self, vllm_config: VllmConfig, settings: Settings, registry: Registry, *, supported: bool) -> None:
        transfer_config = vllm_config.kv_transfer_config
        if transfer_config.kv_load_failure_policy == "fail":
            # vLLM reads the policy right after constructing the connector. For a cache, a chunk
            # evicted between lookup and load must cost a recompute, never a failed request.
            transfer_config.kv_load_failure_policy = "recompute"
            log.info("lmcache-core: kv_load_failure_policy set to 'recompute' (a cache miss is never fatal)")
        self._settings = settings
        self._supported = supported
        self._load_enabled = transfer_config.is_kv_consumer
        self._save_enabled = transfer_config.is_kv_producer
        self._save_generated = settings.save_decode_cache
        self._async_loading = settings.enable_async_loading
        self._block_size = vllm_config.cache_config.block_size
        self._chunk_size = settings.chunk_size
        self._admission = Admission(settings.chunk_size, settings.admit_after)
        parallel = vllm_config.parallel_config
        self._lookup_paths = [
            socket_path(str(transfer_config.engine_id), parallel.data_parallel_rank, rank)
            for rank in range(parallel.tensor_parallel_size * parallel.pipeline_parallel_size)
        ]
        deadline_s = settings.lookup_deadline_ms / 1000
        if settings.lookup_timeout_s is not None:  # the connector's own key before LMCACHE_LOOKUP_DEADLINE_MS
            deadline_s = settings.lookup_timeout_s
            log.warning("lmcache-core: lookup_timeout_s is deprecated; it now sets the lookup deadline (%g ms): "
                        "use lookup_deadline_ms or LMCACHE_LOOKUP_DEADLINE_MS", deadline_s * 1000)
        wait_s = min(settings.lookup_wait_ms / 1000, deadline_s)
        self._client = LookupClient(self._lookup_paths, wait_s=wait_s, deadline_s=deadline_s)
        # `lmcache-core ps` / `stats` / `ls` reach this instance's ranks through it
        self._control = ControlServer(self._client, InstanceInfo(
            str(transfer_config.engine_id), parallel.data_parallel_rank, str(vllm_config.model_config.model),
            tuple(settings.tiers))).start()
        self._tier_sources = tier_hit_sources(registry, settings.tiers)
        self._kv_cache_manager: KVCacheManager | None = None
        self._requests: dict[str, _RequestState] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._finishing: set[str] = set()  # finished requests whose pages vLLM keeps for our saves
        # Per request, not per rank (vLLM sums the workers' stats over the ranks): token counts for
        # Prometheus and the stats log come from here (see :mod:`.prometheus`).
        self._stats: Counter[str] = Counter()
        # KV events for cache-aware routers (vLLM's --kv-events-config): a store event per tier for
        # every save, with vLLM's own block hashes (see _store_events).
        events_config = getattr(vllm_config, "kv_events_config", None)
        self._events_enabled = bool(getattr(events_config, "enable_kv_cache_events", False))
        self._events: list[Any] = []
        log.info("lmcache-core connector (scheduler): chunk_size=%d tiers=%s, workers at %s",
                 self._chunk_size, ",".join(settings.tiers), ", ".join(self._lookup_paths))

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        self._kv_cache_manager = kv_cache_manager

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
        if previous is not None and now - previous.at < _LOOKUP_REFRESH_S:
            return previous
        full = len(prompt) // self._chunk_size * self._chunk_size
        answer = self._client.lookup(np.asarray(prompt[:full], dtype=np.uint32)) if full else MISS
        if answer is None:
            return previous
        result = _Lookup(*answer, at=now)
        self._lookups[request.request_id] = result
        return result

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond vLLM's own prefix cache that the workers can load. vLLM may ask several
        times per request: the only state this touches is the lookup cache."""
        if not self._load_enabled or not self._cacheable(request):
            return 0, False
        lookup = self._lookup(request)
        if lookup is None:
            return None, False  # vLLM skips the request this step and asks again in the next one
        lookup.vllm_cached_tokens = num_computed_tokens  # for get_external_cache_hit_sources and the stats
        hit = min(lookup.loadable * self._chunk_size, request.num_prompt_tokens - 1)
        hit -= hit % self._block_size
        external = max(0, hit - num_computed_tokens)
        # Chunks past the first tier come from disk or a remote store: the request waits for
        # them on its own (vLLM's asynchronous load) instead of holding up the whole batch.
        from_lower_tier = hit > lookup.first_tier * self._chunk_size
        return external, bool(external) and self._async_loading and from_lower_tier

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        lookup = self._lookups.get(request.request_id)
        if lookup is None:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        from_first = self._from_first_tier(lookup, num_external_tokens)
        tier_sources = self._tier_sources
        sources = {tier_sources[0]: from_first}
        if num_external_tokens > from_first:
            lower = tier_sources[1] if len(tier_sources) == 2 else CacheHitSource.EXTERNAL_UNSPECIFIED
            sources[lower] = sources.get(lower, 0) + num_external_tokens - from_first
        return {source: count for source, count in sources.items() if count}

    def _from_first_tier(self, lookup: _Lookup, num_external_tokens: int) -> int:
        """Of a request's external tokens, how many its first tier holds (the rest: lower tiers)."""
        cached = lookup.vllm_cached_tokens
        end_first = lookup.first_tier * self._chunk_size
        return max(0, min(cached + num_external_tokens, end_first) - cached)

    def _count_hit(self, lookup: _Lookup | None, num_external_tokens: int) -> None:
        """The request's hit tokens by tier: the first tier's, and the rest to the second tier (or
        ``lower`` when there are more, which the lookup does not tell apart)."""
        tiers = list(self._settings.tiers)
        from_first = self._from_first_tier(lookup, num_external_tokens) if lookup is not None else 0
        if from_first:
            self._stats[f"request_hit_tokens_{tiers[0]}"] += from_first
        if num_external_tokens > from_first:
            lower = tiers[1] if len(tiers) == 2 else "lower"
            self._stats[f"request_hit_tokens_{lower}"] += num_external_tokens - from_first

    def get_kv_connector_stats(self) -> LMCacheCoreStats | None:
        """This process's share of the step's stats: per-request token counts."""
        if not self._stats:
            return None
        stats, self._stats = LMCacheCoreStats(data=dict(self._stats)), Counter()
        return stats

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if not self._cacheable(request):
            return
        lookup = self._lookups.get(request.request_id)
        if num_external_tokens:
            self._count_hit(lookup, num_external_tokens)
        found = lookup.found if lookup is not None else 0
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = _RequestState(
                request, saved_chunks=found, admitted_chunks=self._admitted_chunks(request))
        else:  # resumed after preemption: what we saved before is still stored
            state.saved_chunks = max(state.saved_chunks, found)
        state.computed_chunks = max(state.computed_chunks, state.saved_chunks)
        state.load_tokens = num_external_tokens

    def _admitted_chunks(self, request: Request) -> int | None:
        """How many leading chunks of ``request`` may be stored (None: all): admission counts this
        arrival, and the request's own ``kv_transfer_params`` decide if they say."""
        admitted = self._admission.sighting(request.prompt_token_ids or [])
        try:
            override = store_override(getattr(request, "kv_transfer_params", None))
        except ValueError as error:
            log.warning("lmcache-core: request %s: %s; ignored", request.request_id, error)
            override = None
        if override is not None:
            return None if override else 0
        return admitted

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LMCacheCoreMetadata:
        """Loads of this step, and the saves whose KV is known to be right.

        Chunks computed in a step that loads (or while an earlier load's outcome is unknown, with
        asynchronous scheduling) attend to the loaded pages: if any rank's load fails they are
        garbage. Their saves wait until the workers' report reaches :meth:`update_connector_output`;
        a finished request keeps its pages meanwhile (:meth:`request_finished`).
        """
        meta = LMCacheCoreMetadata(step_tokens=sum(scheduler_output.num_scheduled_tokens.values()))
        for request_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            state = self._requests.get(request_id)
            if state is not None:  # its pages are freed: saves it held are lost, recomputed later
                state.computed_chunks = state.saved_chunks
        scheduled = scheduler_output.num_scheduled_tokens
        for request_id, state in self._requests.items():
            # Allocated but not scheduled: vLLM took our asynchronous load and the request waits
            # for it. (Whether a load is asynchronous is vLLM's decision, seen here: it may
            # override ours, and then the request is scheduled and its load must be synchronous.)
            if state.load_tokens and request_id not in scheduled and not state.finished:
                self._issue_load(meta, state, asynchronous=True)
        for request_id, num_scheduled in scheduled.items():
            state = self._requests.get(request_id)
            if state is None or state.finished:
                continue
            request = state.request
            if state.load_tokens:
                self._issue_load(meta, state, asynchronous=False)
            if self._save_enabled:
                state.computed_chunks = max(state.computed_chunks, self._ready_chunks(request, num_scheduled))
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

    def _issue_load(self, meta: LMCacheCoreMetadata, state: _RequestState, *, asynchronous: bool) -> None:
        """Load the external tokens vLLM allocated pages for (it has counted them computed)."""
        request = state.request
        end = request.num_computed_tokens
        start = end - state.load_tokens
        chunk_end = -(-end // self._chunk_size) * self._chunk_size
        meta.loads.append(Transfer(request.request_id, _tokens(request.prompt_token_ids or [], chunk_end),
                                   self._block_ids(request.request_id), start, end, asynchronous=asynchronous))
        state.load_tokens = 0
        state.load_end = end
        state.unconfirmed_loads += 1
        state.waiting_for_load = asynchronous

    def _ready_chunks(self, request: Request, num_scheduled: int) -> int:
        """Chunks whose KV is in the pages once this step has run and whose token ids are final.

        Prompt tokens count once the step computing them runs. Generated tokens count one step
        later, up to ``num_computed_tokens`` as vLLM set it before this step: their KV was written
        when they were fed back in, and vLLM has accepted them (tokens scheduled in this step may
        be speculative drafts that the verification rejects, and with asynchronous scheduling
        their ids may not be known yet). The answer's last chunk is saved when the request ends
        (:meth:`request_finished`)."""
        prompt_end = min(request.num_computed_tokens + num_scheduled, request.num_prompt_tokens)
        if not self._save_generated:
            return prompt_end // self._chunk_size
        accepted = min(request.num_computed_tokens, len(request.all_token_ids))
        return max(prompt_end, accepted) // self._chunk_size

    def _issue_save(self, meta: LMCacheCoreMetadata, state: _RequestState, block_ids: list[int] | None) -> None:
        """Save the chunks computed but not stored yet, unless a load they depend on is unconfirmed."""
        savable = state.savable_chunks()
        if state.unconfirmed_loads or savable <= state.saved_chunks:
            return
        chunk = self._chunk_size
        request_id = state.request.request_id
        meta.saves.append(Transfer(
            request_id, _tokens(state.request.all_token_ids, savable * chunk),
            block_ids if block_ids is not None else self._block_ids(request_id),
            state.saved_chunks * chunk, savable * chunk,
        ))
        self._stats["request_save_tokens"] += (savable - state.saved_chunks) * chunk
        if self._events_enabled:
            self._store_events(state.request, state.saved_chunks * chunk, savable * chunk)
        state.saved_chunks = savable

    def _store_events(self, request: Request, start: int, end: int) -> None:
        """``BlockStored`` events for tokens ``[start, end)`` of ``request``, one per tier (the
        ``medium``), with vLLM's hashes of the blocks they fill, so a router that matches vLLM's
        block hashes sees that these tiers hold them. Lower tiers are written in the background:
        their event says the write is under way (a write the tier later drops is not reported).
        Only whole blocks that vLLM has hashed (it hashes with prefix caching on) are reported."""
        from vllm.distributed.kv_events import BlockStored
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        hashes = list(getattr(request, "block_hashes", None) or [])
        first, last = -(-start // self._block_size), min(end // self._block_size, len(hashes))
        if last <= first:
            return
        parent = maybe_convert_block_hash(hashes[first - 1]) if first else None
        tokens = list(request.all_token_ids[first * self._block_size : last * self._block_size])
        block_hashes = [maybe_convert_block_hash(value) for value in hashes[first:last]]
        for tier in self._settings.tiers:
            self._events.append(BlockStored(block_hashes=block_hashes, parent_block_hash=parent, token_ids=tokens,
                                            block_size=self._block_size, lora_id=None, medium=tier, lora_name=None))

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

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
            state.waiting_for_load = False
            failed_from = report.failed_from.get(request_id)
            if failed_from is not None:
                self._stats["request_failed_load_tokens"] += max(0, state.load_end - failed_from)
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
        if state.waiting_for_load:
            # Aborted while its asynchronous load runs: vLLM keeps the pages until the workers
            # report the load finished (finished_recving) and then frees them itself; nothing was
            # computed, so there is nothing to save and no release of ours to wait for.
            del self._requests[request.request_id]
            return False, None
        if self._save_enabled and self._save_generated:
            # the tokens computed in its last step, up to the last full chunk of the answer
            state.computed_chunks = max(state.computed_chunks, self._ready_chunks(request, 0))
        if self._save_enabled and (state.unconfirmed_loads or state.savable_chunks() > state.saved_chunks):
            state.finished = True
            state.block_ids = list(block_ids)
            self._finishing.add(request.request_id)
            return True, None
        del self._requests[request.request_id]
        return False, None

    def shutdown(self) -> None:
        self._control.close()
        self._client.close()


def _tokens(tokens: Sequence[int], end: int) -> np.ndarray:
    return np.asarray(tokens[:end], dtype=np.uint32)
