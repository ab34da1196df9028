"""The connector's worker half: layout check, cache engine, loads and saves, lookup server, stats.

It runs in each vLLM model worker, which owns the KV pages and the tiers. It goes through the
engine's key-level API only (:meth:`~lmcache_core.engine.CacheEngine.lookup_keys`, ``load``,
``save``), which checks every loaded chunk against the layout; vLLM internals it needs come from
:mod:`.compat`. The protocol is described in :mod:`.connector`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmcache_core.backend import Chunk
from lmcache_core.buffer_reserve import BufferReserve
from lmcache_core.codecs import codec_accepts
from lmcache_core.engine import CacheEngine, LoadResult
from lmcache_core.integrations.vllm import compat
from lmcache_core.integrations.vllm.control import EngineControl
from lmcache_core.integrations.vllm.layerwise import LayerwiseCopies
from lmcache_core.integrations.vllm.layouts import CPU_LAYOUTS, cpu_layout_for, detect_layout
from lmcache_core.integrations.vllm.lookup import LookupAnswer, LookupServer, socket_path
from lmcache_core.integrations.vllm.metadata import (
    LMCacheCoreMetadata,
    LMCacheCoreStats,
    LMCacheCoreWorkerMeta,
    Transfer,
)
from lmcache_core.integrations.vllm.paged import PagedLayout, Piece, copy_piece, slots_for
from lmcache_core.keys import CacheScope, KVLayout, config_digest
from lmcache_core.load_planner import LoadPlanner
from lmcache_core.model_identity import weights_identity
from lmcache_core.registry import Registry
from lmcache_core.settings import Settings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    from vllm.v1.kv_cache_interface import KVCacheConfig

# A child of vLLM's logger, so our lines appear in vLLM's output with its format.
log = logging.getLogger("vllm.lmcache_core")

_STATS_LOG_INTERVAL_S = 30.0
_TIER_EVENTS_INTERVAL_S = 1.0


class LMCacheCoreWorker:
    """The worker-side methods of vLLM's connector API (the facade delegates to them).

    The step's metadata is bound here as on vLLM's connector (``bind_connector_metadata``), so the
    worker half can run on its own in tests."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: Settings,
                 registry: Registry, *, supported: bool) -> None:
        self._vllm_config = vllm_config
        self._kv_cache_config = kv_cache_config
        self._kv_transfer_config = vllm_config.kv_transfer_config
        self._settings = settings
        self._registry = registry  # the one the settings were validated against
        self._supported = supported
        self._block_size = vllm_config.cache_config.block_size
        self._chunk_size = settings.chunk_size
        self._init_state()

    def _init_state(self) -> None:
        self._engine: CacheEngine | None = None
        self._server: LookupServer | None = None
        self._layers: list[torch.Tensor] = []
        self._layout: PagedLayout | None = None
        self._connector_metadata: LMCacheCoreMetadata | None = None
        self._planner: LoadPlanner | None = None
        self._reserve: BufferReserve | None = None  # save buffers faulted in between steps
        self._loader: ThreadPoolExecutor | None = None  # reads for asynchronous loads, one at a time
        self._reading: dict[str, tuple[Transfer, Future[LoadResult]]] = {}  # asynchronous loads under way
        self._step_started = 0.0  # when vLLM bound this step's metadata: the forward pass follows
        self._step_load_s = 0.0  # of the step's time, spent loading (and, layer by layer, saving)
        self._layerwise: LayerwiseCopies | None = None  # LMCACHE_USE_LAYERWISE
        self._layerwise_saves: list[Chunk] | None = None  # the step's chunks being filled layer by layer
        self._layerwise_load_bytes = 0  # loaded layer by layer this step
        self._failed_blocks: set[int] = set()
        self._load_report = LMCacheCoreWorkerMeta()  # this step's loads, for the scheduler
        self._released: set[str] = set()  # finished requests whose saves are done
        self._stats: Counter[str] = Counter()
        self._totals: Counter[str] = Counter()
        self._last_log = time.monotonic()
        self._tier_events_at = 0.0
        self._tier_events_seen: dict[tuple[str, str], int] = {}

    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        assert isinstance(metadata, LMCacheCoreMetadata)
        self._connector_metadata = metadata
        self._step_started, self._step_load_s = time.perf_counter(), 0.0
        # vLLM binds the metadata right before the forward pass and calls wait_for_save right after
        # it (start_load_kv may come after the forward): the step's bounds for background writes.
        if self._engine is not None:
            self._engine.step_started()

    def clear_connector_metadata(self) -> None:
        self._connector_metadata = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not self._supported or not kv_caches:
            return
        parallel = self._vllm_config.parallel_config
        rank, world = compat.worker_rank(parallel)
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
        self._server = LookupServer(path, self._serve_lookup, control=EngineControl(self._engine))
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
            attention = compat.attention_layers(self._vllm_config).get(first_name)
            model_dtype = self._vllm_config.model_config.dtype
            kv_cache_dtype = self._vllm_config.cache_config.cache_dtype
            isa = compat.layer_isa(attention) or compat.cpu_attention_isa(model_dtype, first.shape[2], head_dim,
                                                                           kv_cache_dtype)
            layout = cpu_layout_for(isa=isa, dtype=model_dtype, block_size=first.shape[2], num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, kv_cache_dtype=kv_cache_dtype)
        block_size = next(iter(kv_caches.values())).shape[2] if layout in CPU_LAYOUTS else 0
        packed = block_size > 0 and self._chunk_size % block_size == 0 and not self._lossy_codec(dtype)
        kv_layout = KVLayout(len(kv_caches), num_kv_heads, head_dim, str(dtype).removeprefix("torch."),
                             kv_factor=layout.kv_factor, page_layout=layout.value if packed else "",
                             block_size=block_size if packed else 0)
        scope = _cache_scope(self._vllm_config, self._settings, kv_layout, rank, world)
        self._engine = CacheEngine(self._settings, self._registry, scope)
        chunk_bytes = math.prod(kv_layout.chunk_shape(self._chunk_size)) * dtype.itemsize
        self._planner = LoadPlanner(self._chunk_size, chunk_bytes, enabled=self._settings.skip_slow_loads)
        self._layers = list(kv_caches.values())
        self._layout = layout
        self._start_reserve(self._vllm_config.scheduler_config.max_num_batched_tokens)
        if self._settings.use_layerwise:
            self._layerwise = LayerwiseCopies(list(kv_caches), self._layers, layout)

    def _start_reserve(self, step_tokens: int) -> None:
        """Save buffers for the chunks one step of ``step_tokens`` can complete, faulted in between steps."""
        assert self._engine is not None
        layout = self._engine.scope.layout
        self._reserve = BufferReserve(layout.chunk_shape(self._chunk_size), getattr(torch, layout.dtype),
                                      target=step_tokens // self._chunk_size + 1,
                                      between_steps=self._engine.between_steps, pin=self._layers[0].is_cuda)

    def _lossy_codec(self, dtype: torch.dtype) -> bool:
        """Whether some tier would store this KV through a lossy codec (fp8), which quantizes
        token-major chunks per layer and head: page-packed chunks are then not an option."""
        for tier in self._settings.tiers:
            name = getattr(self._settings.backend(tier), "codec", None) or self._settings.codec
            codec = self._registry.codecs.get(name)
            if codec is None or (getattr(codec, "lossy", True) and codec_accepts(codec, dtype)):
                return True
        return False

    def _serve_lookup(self, tokens: np.ndarray) -> LookupAnswer:
        """Runs on the lookup server's thread: chunks in any tier, of which the first tier serves,
        and of which loading beats recomputing (:class:`~lmcache_core.load_planner.LoadPlanner`)."""
        if self._engine is None or self._planner is None:  # caching is off
            return LookupAnswer(0, 0, 0)
        lookup = self._engine.lookup_keys(self._engine.keys(tokens))
        loadable = self._planner.chunks_worth_loading(lookup.by_tier, self._engine.read_speeds())
        if loadable < lookup.found:
            self._stats["declined_load_tokens"] += (lookup.found - loadable) * self._chunk_size
        # by_tier lists the fastest tier first
        return LookupAnswer(lookup.found, next(iter(lookup.by_tier.values()), 0), loadable)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Synchronous loads complete here, before the forward pass reads the pages; layer by layer
        (``LMCACHE_USE_LAYERWISE``) they start here and each layer completes in
        :meth:`wait_for_layer_load`, but what loads and what fails is decided here either way.
        Asynchronous loads only start: a background thread reads the chunks (from disk or a remote
        tier, into the first tier) and :meth:`get_finished` copies them into the pages in a later step."""
        meta = self._connector_metadata
        if meta is None or not meta.loads:
            return
        for transfer in meta.loads:
            if transfer.asynchronous:
                self._reading[transfer.request_id] = (transfer, self._read_in_background(transfer))
        synchronous = [transfer for transfer in meta.loads if not transfer.asynchronous]
        if synchronous:
            self._load_report.loaded.update(transfer.request_id for transfer in synchronous)
            self._place([(transfer, self._read(transfer)) for transfer in synchronous], layerwise=True)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """vLLM's hook before attention layer ``layer_name`` runs: its loaded pages must be ready."""
        if self._layerwise is None:
            return
        started = time.perf_counter()
        self._layerwise.wait_for_layer(layer_name)
        self._step_load_s += time.perf_counter() - started

    def _read(self, transfer: Transfer) -> LoadResult:
        """The chunks from the transfer's first one on, as far as they are stored and valid."""
        if self._engine is None:  # caching is off: never promised by a lookup; be safe anyway
            return LoadResult([], {})
        first = transfer.start // self._chunk_size
        return self._engine.load(self._engine.keys(transfer.tokens)[first:])

    def _read_in_background(self, transfer: Transfer) -> Future[LoadResult]:
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-load")
        return self._loader.submit(self._read, transfer)

    def _place(self, reads: list[tuple[Transfer, LoadResult]], layerwise: bool = False) -> None:
        """Copy what was read into the pages, each chunk straight from the tier's tensor (no
        concatenation: one copy per byte); report what was not read as failed. ``layerwise``
        (and ``LMCACHE_USE_LAYERWISE`` on): only start the copies; vLLM's per-layer hooks and
        :meth:`wait_for_save` complete them."""
        started = time.perf_counter()
        pieces = self._pieces(reads)
        moved_tokens = sum(piece.slots.numel() for piece in pieces)
        moved_bytes = sum(piece.nbytes for piece in pieces)
        if moved_tokens:
            self._stats["load_tokens"] += moved_tokens
            self._stats["load_bytes"] += moved_bytes
        if layerwise and self._layerwise is not None:
            self._layerwise_load_bytes += moved_bytes
            self._stats["load_s"] += time.perf_counter() - started  # the copies' share: when the step ends
            self._layerwise.start_loads(pieces)
        else:
            assert self._layout is not None
            copy_started = time.perf_counter()
            for piece in pieces:
                copy_piece(self._layers, piece, self._layout, "load")
            if moved_tokens and self._planner is not None:
                self._planner.into_pages.observe(moved_bytes, time.perf_counter() - copy_started)
            self._stats["load_s"] += time.perf_counter() - started
        self._step_load_s += time.perf_counter() - started

    def _pieces(self, reads: list[tuple[Transfer, LoadResult]]) -> list[Piece]:
        """What was read, as pieces (chunk or the loaded part of one, slots of its tokens); the tokens
        that were not read are reported as failed, so vLLM recomputes them."""
        chunk = self._chunk_size
        assert self._engine is not None
        packed = self._engine.scope.layout.page_packed
        pieces: list[Piece] = []
        for transfer, loaded in reads:
            first = transfer.start // chunk
            for tier, hits in loaded.hits_by_tier.items():
                if hits:
                    self._stats[f"hit_tokens_{tier}"] += hits * chunk
            chunks = [kv for kv in loaded.chunks if kv is not None]  # prefix mode: no gaps
            loaded_end = min(transfer.end, (first + len(chunks)) * chunk)
            if loaded_end < transfer.end:
                self._fail(transfer, loaded_end)
            for index, kv in enumerate(chunks, start=first):
                begin, end = max(transfer.start, index * chunk), min(loaded_end, (index + 1) * chunk)
                if begin >= end:
                    continue
                slots = slots_for(transfer.block_ids, self._block_size, begin, end)
                offset = begin - index * chunk
                if packed:  # whole pages: the copy picks the tokens
                    block_size = self._block_size
                    pages = tuple(transfer.block_ids[begin // block_size : (end - 1) // block_size + 1])
                    pieces.append(Piece(kv, slots, first=offset, pages=pages))
                elif end - begin == kv.shape[2]:
                    pieces.append(Piece(kv, slots))
                else:
                    pieces.append(Piece(kv[:, :, offset : offset + end - begin].contiguous(), slots))
        return pieces

    def _fail(self, transfer: Transfer, from_token: int) -> None:
        """Report the pages of tokens ``[from_token, end)`` as not loaded: vLLM recomputes them."""
        first_block = from_token // self._block_size
        last_block = (transfer.end - 1) // self._block_size
        self._failed_blocks.update(transfer.block_ids[first_block : last_block + 1])
        self._stats["failed_load_tokens"] += transfer.end - from_token
        failed = self._load_report.failed_from
        failed[transfer.request_id] = min(from_token, failed.get(transfer.request_id, from_token))

    def save_kv_layer(self, layer_name: str) -> None:
        """vLLM's hook after attention layer ``layer_name`` has written this step's KV: layer by
        layer, gather it into the step's chunk buffers (the first call of a step allocates them)."""
        if self._layerwise is None:
            return
        meta = self._connector_metadata
        if meta is None or not meta.saves or self._engine is None:
            return
        started = time.perf_counter()
        if self._layerwise_saves is None:
            self._start_layerwise_saves(meta.saves)
        self._layerwise.save_layer(layer_name)
        self._step_load_s += time.perf_counter() - started

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if meta is None:
            return
        if self._planner is not None and meta.step_tokens >= self._chunk_size:  # a prefill, not a decode step
            computing_s = time.perf_counter() - self._step_started - self._step_load_s
            self._planner.prefill.observe(meta.step_tokens, computing_s)
        if self._layerwise is not None:
            self._finish_layerwise(meta)
        elif meta.saves and self._engine is not None:
            self._save(meta.saves)
        if self._engine is not None:
            self._engine.step_finished()
        # Saves copy the pages synchronously: the released requests' pages may be freed now.
        self._released.update(meta.released)
        self._maybe_log()

    def _save_buffers(self, saves: list[Transfer], pin: bool = False) -> list[tuple[Chunk, Piece]]:
        """A buffer of its own for each chunk the step completes (pinned host memory with ``pin``),
        as the chunk the engine will get, with the piece to gather it from."""
        assert self._engine is not None
        chunk = self._chunk_size
        layout = self._engine.scope.layout
        dtype = getattr(torch, layout.dtype)
        first = 0 if layout.page_packed else None
        planned: list[tuple[Chunk, Piece]] = []
        for transfer in saves:
            keys = self._engine.keys(transfer.tokens[: transfer.end])  # later chunks: not needed
            for index in range(transfer.start // chunk, transfer.end // chunk):
                start = index * chunk
                buffer = self._save_buffer(layout.chunk_shape(chunk), dtype, pin)
                slots = slots_for(transfer.block_ids, self._block_size, start, start + chunk)
                pages = (tuple(transfer.block_ids[start // self._block_size : (start + chunk) // self._block_size])
                         if layout.page_packed else None)
                planned.append((Chunk(keys[index], buffer, index, owned=True, first_position=start),
                                Piece(buffer, slots, first, pages)))
        return planned

    def _save_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """From the reserve when it has one (faulted in already), else fresh memory."""
        reserve = self._reserve
        if reserve is not None and reserve.shape == shape and reserve.dtype == dtype and (reserve.pin or not pin):
            buffer, ready = reserve.take()
            if not ready:
                self._stats["fresh_save_buffers"] += 1
            return buffer
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    def _save(self, saves: list[Transfer]) -> None:
        """Gather each completed chunk from the pages into a buffer of its own and hand the buffers
        over to the engine (``owned``): the cpu tier keeps them as they are, without a second copy."""
        assert self._layout is not None
        started = time.perf_counter()
        planned = self._save_buffers(saves)
        for _, piece in planned:
            copy_piece(self._layers, piece, self._layout, "save")
        self._hand_over([chunk for chunk, _ in planned], time.perf_counter() - started)

    def _hand_over(self, chunks: list[Chunk], copy_s: float) -> None:
        assert self._engine is not None
        started = time.perf_counter()
        self._engine.save(chunks)
        self._stats["save_tokens"] += len(chunks) * self._chunk_size
        self._stats["save_bytes"] += sum(c.kv.nbytes for c in chunks)
        self._stats["save_s"] += copy_s + time.perf_counter() - started

    def _start_layerwise_saves(self, saves: list[Transfer]) -> None:
        """The step's chunk buffers, filled layer by layer: pinned when the cache is on a GPU, so
        that each layer's device-to-host copy is asynchronous and the cpu tier adopts the buffer
        into its (pinned) pool as it is."""
        assert self._layerwise is not None
        planned = self._save_buffers(saves, pin=self._layerwise.on_cuda)
        self._layerwise.start_saves([piece for _, piece in planned])
        self._layerwise_saves = [chunk for chunk, _ in planned]

    def _finish_layerwise(self, meta: LMCacheCoreMetadata) -> None:
        """The end of a layer-by-layer step: copy the layers vLLM called no hook for, wait for the
        copies still running, and hand the filled chunks to the engine."""
        assert self._layerwise is not None
        if self._layerwise_saves is None and meta.saves and self._engine is not None:
            self._start_layerwise_saves(meta.saves)  # no save hook came this step
        self._layerwise.finish()
        load_s, save_s, hooked, late = self._layerwise.reset_counters()
        if self._layerwise_load_bytes:
            self._stats["load_s"] += load_s
            if self._planner is not None:
                self._planner.into_pages.observe(self._layerwise_load_bytes, load_s)
            self._layerwise_load_bytes = 0
        if hooked or late:
            self._stats["layerwise_layers"] += hooked
            self._stats["layerwise_late_layers"] += late
        chunks, self._layerwise_saves = self._layerwise_saves, None
        if chunks:
            self._hand_over(chunks, save_s)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose pages vLLM kept for our saves (``request_finished`` returned True) and
        whose saves are done; requests whose asynchronous loads are done (the chunks read meanwhile
        are copied into the pages now, after this step's forward pass, which does not touch the
        pages of a request waiting for its KV)."""
        released, self._released = self._released, set()
        return released or None, self._finish_background_reads() or None

    def _finish_background_reads(self) -> set[str]:
        done = [request_id for request_id, (_, read) in self._reading.items() if read.done()]
        reads = []
        for request_id in done:
            transfer, read = self._reading.pop(request_id)
            try:
                loaded = read.result()
            except Exception:  # a tier error the stack did not absorb: recompute, never fail vLLM
                log.exception("lmcache-core: an asynchronous load failed; its tokens are recomputed")
                loaded = LoadResult([], {})
            reads.append((transfer, loaded))
        if reads:
            self._load_report.loaded.update(done)
            self._place(reads)
        return set(done)

    def build_connector_worker_meta(self) -> LMCacheCoreWorkerMeta | None:
        report, self._load_report = self._load_report, LMCacheCoreWorkerMeta()
        return report if report.loaded else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def get_kv_connector_stats(self) -> LMCacheCoreStats | None:
        self._count_tier_events()
        if not self._stats:
            return None
        stats = LMCacheCoreStats(data=dict(self._stats))
        self._totals.update(self._stats)
        self._stats.clear()
        return stats

    def _count_tier_events(self) -> None:
        """Evictions, dropped writes and errors of each tier since the last look (at most once a
        second: the tiers' counters are read under their locks), as stats for Prometheus."""
        now = time.monotonic()
        if self._engine is None or now - self._tier_events_at < _TIER_EVENTS_INTERVAL_S:
            return
        self._tier_events_at = now
        for tier, counters in self._engine.stats().items():
            for name, stat in (("evicted", "evicted"), ("dropped_writes", "dropped_writes"), ("errors", "tier_errors")):
                value = int(counters.get(name, 0))
                seen = self._tier_events_seen.get((tier, name), 0)
                if value > seen:
                    self._stats[f"{stat}_{tier}"] += value - seen
                self._tier_events_seen[(tier, name)] = value

    def _maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < _STATS_LOG_INTERVAL_S:
            return
        self._last_log = now
        totals = self._totals + self._stats
        if totals:
            log.info("lmcache-core totals: %s", LMCacheCoreStats(data=dict(totals)).reduce())

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
        if self._reserve is not None:
            self._reserve.close()
        if self._engine is not None:
            self._maybe_log(force=True)
            self._engine.close()  # waits for the background writes to disk/remote tiers
            self._engine = None


def _model_identity(vllm_config: VllmConfig, settings: Settings) -> tuple[str, str]:
    """A stable model name (``LMCACHE_MODEL_NAME``, else vLLM's model, never a local path: a restart
    from another folder must still hit) and a digest of what the model computes with: its config,
    its weights (:mod:`lmcache_core.model_identity`, or the operator's ``LMCACHE_MODEL_REVISION``),
    the dtype it runs in and any online quantization. Two checkpoints published under one name, or a
    fine-tune in a folder of the same name, must not share KV."""
    model_config = vllm_config.model_config
    name = str(settings.model_name or model_config.model).rstrip("/")
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
        cache_dir=vllm_config.load_config.download_dir, override=settings.model_revision,
    )
    if config["weights"] is None:
        log.warning("lmcache-core cannot identify the weights of %s (neither a folder of weight files nor a hub "
                    "snapshot): keys cover its name, config and revision only; set LMCACHE_MODEL_REVISION and "
                    "change it whenever the weights change", model_config.model)
    return name, config_digest(config)


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
    scales = sorted(
        (name, *scale)
        for name, layer in compat.attention_layers(vllm_config).items()
        if (scale := compat.kv_scales(layer)) is not None
    )
    if scales:
        parts.append("scales=" + config_digest(json.dumps(scales)))
    return ";".join(parts)


def _cache_scope(vllm_config: VllmConfig, settings: Settings, layout: KVLayout, rank: int, world: int) -> CacheScope:
    """Everything this worker's KV depends on besides the token ids (see :class:`CacheScope`)."""
    model_name, model_digest = _model_identity(vllm_config, settings)
    kv_format = _kv_format(vllm_config)
    return CacheScope(settings.namespace, model_name, model_digest, layout, rank, world, kv_format=kv_format)
