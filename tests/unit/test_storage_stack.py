"""The tier stack (write-through, promotion, fault isolation, bounded queues), the cpu tier's
prefix-aware LRU and the memory pool's accounting."""

from __future__ import annotations

import gc
import logging
import threading
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from lmcache_core import backoff, storage
from lmcache_core.backend import BackendContext, Chunk
from lmcache_core.keys import ChunkKey
from lmcache_core.memory import MemoryPool
from lmcache_core.storage import TierStack
from lmcache_core.testing.conformance import assert_same, make_chunks
from lmcache_core.testing.waiting import eventually
from lmcache_cpu.backend import CpuBackend
from lmcache_cpu.settings import CpuSettings
from lmcache_disk.backend import DiskBackend
from lmcache_disk.settings import DiskSettings

CHUNK_BYTES = make_chunks(1)[0].kv.nbytes  # 4 KiB: the conformance layout, 16 tokens per chunk


def cpu(name: str = "cpu", chunks: int = 1000) -> CpuBackend:
    return CpuBackend(CpuSettings(max_size=chunks * CHUNK_BYTES), BackendContext(name, "raw"))


def keys_of(chunks: Sequence[Chunk]) -> list[ChunkKey]:
    return [chunk.key for chunk in chunks]


@pytest.fixture
def stacks() -> Iterator[list[TierStack]]:
    """Stacks created by a test; closed afterwards so no writer thread outlives it (a step a test
    left open is ended first, so queued writes need not wait out their deferral)."""
    created: list[TierStack] = []
    yield created
    for stack in created:
        stack.step_finished()
        stack.close()


def make_stack(stacks: list[TierStack], *backends, queue_size: int = 256, **options) -> TierStack:  # type: ignore[no-untyped-def]
    stack = TierStack(list(backends), write_queue_size=queue_size, **options)
    stacks.append(stack)
    return stack


# --- write-through, promotion, prefixes across tiers --------------------------------------------


def test_writes_reach_the_first_tier_now_and_lower_tiers_after_flush(stacks: list[TierStack], tmp_path: Path) -> None:
    upper, lower = cpu(), DiskBackend(DiskSettings(path=tmp_path), BackendContext("disk", "raw"))
    stack = make_stack(stacks, upper, lower)
    chunks = make_chunks(4)
    stack.put_many(chunks)
    assert upper.contains(keys_of(chunks)) == 4
    assert stack.flush()
    assert lower.contains(keys_of(chunks)) == 4
    for chunk, stored in zip(chunks, lower.get_many(keys_of(chunks)), strict=True):
        assert_same(stored, chunk.kv)


def test_a_lower_tier_hit_is_promoted_into_every_upper_tier(stacks: list[TierStack], tmp_path: Path) -> None:
    first, second = cpu("first"), cpu("second")
    disk = DiskBackend(DiskSettings(path=tmp_path), BackendContext("disk", "raw"))
    stack = make_stack(stacks, first, second, disk)
    chunks = make_chunks(3)
    disk.put_many(chunks)
    got = stack.get_prefix(keys_of(chunks))
    assert len(got) == 3
    for chunk, tensor in zip(chunks, got, strict=True):
        assert_same(tensor, chunk.kv)
    assert first.contains(keys_of(chunks)) == 3  # the first tier is written synchronously
    assert stack.flush()
    assert second.contains(keys_of(chunks)) == 3
    assert stack.stats()["disk"]["hits"] == 3
    stack.get_prefix(keys_of(chunks))
    assert stack.stats()["first"]["hits"] == 3 and stack.stats()["disk"]["hits"] == 3


def test_a_prefix_split_across_tiers_is_found_and_read(stacks: list[TierStack]) -> None:
    upper, lower = cpu("upper"), cpu("lower")
    stack = make_stack(stacks, upper, lower)
    chunks = make_chunks(7)
    upper.put_many([chunks[0], chunks[1], chunks[4], chunks[6]])
    lower.put_many([chunks[2], chunks[3]])  # chunk 5 is nowhere
    assert stack.contains(keys_of(chunks)) == 5
    got = stack.get_prefix(keys_of(chunks))
    assert len(got) == 5
    for chunk, tensor in zip(chunks[:5], got, strict=True):
        assert_same(tensor, chunk.kv)
    assert stack.contains(keys_of(chunks[:4])) == 4
    assert stack.contains([]) == 0 and stack.get_prefix([]) == []


def test_delete_removes_from_every_tier(stacks: list[TierStack]) -> None:
    upper, lower = cpu("upper"), cpu("lower")
    stack = make_stack(stacks, upper, lower)
    chunks = make_chunks(2)
    stack.put_many(chunks)
    assert stack.flush()
    assert stack.delete(keys_of(chunks)) == 4
    assert stack.contains(keys_of(chunks)) == 0


def test_a_stack_needs_a_tier() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TierStack([])


# --- fault isolation ----------------------------------------------------------------------------


class FlakyBackend(CpuBackend):
    """A cpu tier whose every call raises while ``failing`` is set; counts the calls that reach it."""

    def __init__(self) -> None:
        super().__init__(CpuSettings(max_size=100 * CHUNK_BYTES), BackendContext("flaky", "raw"))
        self.failing = False
        self.failing_writes = False  # a full or read-only disk: writes fail, reads work
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("server went away")

    def contains(self, keys):  # type: ignore[no-untyped-def]
        self._maybe_fail()
        return super().contains(keys)

    def get_many(self, keys):  # type: ignore[no-untyped-def]
        self._maybe_fail()
        return super().get_many(keys)

    def put_many(self, chunks):  # type: ignore[no-untyped-def]
        self._maybe_fail()
        if self.failing_writes:
            raise OSError(28, "No space left on device")
        super().put_many(chunks)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    import time

    fake_time = types.SimpleNamespace(monotonic=fake.monotonic, sleep=time.sleep)
    monkeypatch.setattr(storage, "time", fake_time)
    monkeypatch.setattr(backoff, "time", fake_time)  # the tiers' retry pauses
    return fake


def test_a_failing_tier_is_a_miss_then_backs_off_then_recovers(
    stacks: list[TierStack], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    upper, flaky = cpu("upper"), FlakyBackend()
    stack = make_stack(stacks, upper, flaky)
    chunks = make_chunks(3)
    flaky.put_many(chunks)
    keys = keys_of(chunks)
    flaky.failing, flaky.calls = True, 0

    with caplog.at_level(logging.WARNING):
        assert stack.contains(keys) == 0  # a miss, not an exception
    assert flaky.calls == 1
    assert "tier flaky" in caplog.text and "ConnectionError" in caplog.text
    stats = stack.stats()["flaky"]
    assert stats["errors"] == 1 and stats["healthy"] == 0.0

    assert stack.contains(keys) == 0 and stack.get_prefix(keys) == []
    assert flaky.calls == 1  # skipped during the backoff: no call reached it

    clock.advance(1.01)  # first backoff is 1 s
    assert stack.contains(keys) == 0
    assert flaky.calls == 2 and stack.stats()["flaky"]["errors"] == 2

    clock.advance(1.5)  # the backoff doubled to 2 s
    assert stack.contains(keys) == 0 and flaky.calls == 2

    clock.advance(0.6)
    flaky.failing = False
    assert stack.contains(keys) == 3  # picked up again without a restart
    assert len(stack.get_prefix(keys)) == 3
    assert stack.stats()["flaky"]["healthy"] == 1.0 and stack.stats()["flaky"]["errors"] == 2

    assert upper.contains(keys) == 3  # the read promoted them
    upper.clear()
    flaky.failing = True  # a new failure starts over at the short backoff
    assert stack.contains(keys) == 0
    clock.advance(1.01)
    calls = flaky.calls
    stack.contains(keys)
    assert flaky.calls == calls + 1


def test_writes_to_a_tier_in_backoff_are_dropped_and_counted(stacks: list[TierStack], clock: FakeClock) -> None:
    upper, flaky = cpu("upper"), FlakyBackend()
    stack = make_stack(stacks, upper, flaky)
    flaky.failing = True
    stack.contains(keys_of(make_chunks(1)))  # fails: backoff starts
    chunks = make_chunks(4, seed=9)
    stack.put_many(chunks)
    assert stack.flush()
    assert upper.contains(keys_of(chunks)) == 4  # the healthy tier is unaffected
    assert stack.stats()["flaky"]["dropped_writes"] == 4
    flaky.failing = False
    assert flaky.contains(keys_of(chunks)) == 0


def test_a_failed_write_pauses_only_writes_and_reads_are_still_served(
    stacks: list[TierStack], clock: FakeClock
) -> None:
    upper, flaky = cpu("upper"), FlakyBackend()
    stack = make_stack(stacks, upper, flaky)
    stored = make_chunks(3, seed=1)
    flaky.put_many(stored)
    flaky.failing_writes = True
    new = make_chunks(2, seed=2, namespace="new")
    stack.put_many(new)
    assert stack.flush()
    assert stack.contains(keys_of(stored)) == 3  # the lower tier still answers reads
    assert len(stack.get_prefix(keys_of(stored))) == 3
    stats = stack.stats()["flaky"]
    assert stats["errors"] == 1 and stats["writes_healthy"] == 0.0 and stats["healthy"] == 1.0
    stack.put_many(make_chunks(2, seed=3, namespace="later"))
    assert stack.flush()
    assert stack.stats()["flaky"]["dropped_writes"] == 2  # writes wait out the backoff
    clock.advance(1.01)
    flaky.failing_writes = False
    stack.put_many(new)
    assert stack.flush()
    assert flaky.contains(keys_of(new)) == 2 and stack.stats()["flaky"]["writes_healthy"] == 1.0


def test_a_failing_first_tier_does_not_hide_the_lower_tiers(stacks: list[TierStack], clock: FakeClock) -> None:
    flaky, lower = FlakyBackend(), cpu("lower")
    stack = make_stack(stacks, flaky, lower)
    flaky.failing = True
    chunks = make_chunks(2)
    stack.put_many(chunks)  # the synchronous write fails: swallowed and counted; the write-through still runs
    assert stack.flush()
    assert stack.stats()["flaky"]["errors"] == 2  # the write, then the read of its copies for the lower tier
    assert lower.contains(keys_of(chunks)) == 2
    assert stack.contains(keys_of(chunks)) == 2  # the failing tier is skipped, the lower one answers
    got = stack.get_prefix(keys_of(chunks))
    assert len(got) == 2
    for chunk, tensor in zip(chunks, got, strict=True):
        assert_same(tensor, chunk.kv)


# --- bounded write queues -----------------------------------------------------------------------


class SlowBackend(CpuBackend):
    """A lower tier that blocks inside put_many until released."""

    def __init__(self) -> None:
        super().__init__(CpuSettings(max_size=100 * CHUNK_BYTES), BackendContext("slow", "raw"))
        self.started = threading.Event()
        self.release = threading.Event()

    def put_many(self, chunks):  # type: ignore[no-untyped-def]
        self.started.set()
        self.release.wait(timeout=30)
        super().put_many(chunks)


def test_a_full_write_queue_drops_and_counts_without_blocking(stacks: list[TierStack]) -> None:
    upper, slow = cpu("upper"), SlowBackend()
    stack = make_stack(stacks, upper, slow, queue_size=1)
    first, second, third = (make_chunks(2, seed=seed) for seed in (1, 2, 3))
    try:
        stack.put_many(first)
        assert slow.started.wait(timeout=30)  # the writer is now stuck inside the slow tier
        stack.put_many(second)  # fills the queue
        stack.put_many(third)  # does not fit: dropped, and put_many returns at once
        for chunks in (first, second, third):
            assert upper.contains(keys_of(chunks)) == 2  # the first tier always has everything
        assert stack.stats()["slow"]["dropped_writes"] == 2
    finally:
        slow.release.set()
    assert stack.flush()
    assert slow.contains(keys_of(first)) == 2 and slow.contains(keys_of(second)) == 2
    assert slow.contains(keys_of(third)) == 0


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor memory block alive in this process, each block counted once:
    what the tensors really hold, whatever any pool or queue believes it accounts for."""
    gc.collect()
    blocks: dict[int, int] = {}
    for candidate in gc.get_objects():
        if type(candidate) is torch.Tensor and candidate.device.type == "cpu":
            storage = candidate.untyped_storage()
            blocks[storage.data_ptr()] = max(blocks.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(blocks.values())


def test_a_slow_lower_tier_holds_at_most_the_queue_budget_and_never_empties_the_cpu_tier(
    stacks: list[TierStack],
) -> None:
    upper, slow = cpu("upper", chunks=8), SlowBackend()
    queue_budget = 8 * CHUNK_BYTES
    stack = make_stack(stacks, upper, slow, write_queue_max_bytes=queue_budget)
    baseline = live_tensor_bytes()
    prompts = [make_chunks(2, seed=seed, namespace=f"prompt-{seed}") for seed in range(40)]
    prompt_bytes = sum(chunk.kv.nbytes for chunks in prompts for chunk in chunks)
    try:
        stack.put_many(prompts[0])
        assert slow.started.wait(timeout=30)  # the lower tier is stuck: everything after this queues
        for chunks in prompts[1:]:
            stack.put_many(chunks)
        held = live_tensor_bytes() - baseline - prompt_bytes  # the prompts are the caller's own tensors
        assert held <= upper.pool.capacity + queue_budget
        assert upper.stats()["entries"] >= 2  # the cpu tier keeps serving ...
        assert upper.contains(keys_of(prompts[0])) == 2  # ... including what the queue still holds
        assert stack.stats()["slow"]["dropped_writes"] > 0  # the budget, not memory, gave way
    finally:
        slow.release.set()
    assert stack.flush()


# --- cpu tier: prefix-aware LRU by bytes --------------------------------------------------------


def test_cpu_eviction_takes_the_older_prompts_tail_first() -> None:
    backend = cpu(chunks=6)
    older, newer = make_chunks(4, seed=1, namespace="older"), make_chunks(4, seed=2, namespace="newer")
    backend.put_many(older)
    backend.put_many(newer)
    assert backend.contains(keys_of(newer)) == 4
    assert backend.contains(keys_of(older)) == 2  # head kept, tail gone: what remains is reachable
    assert backend.get_many(keys_of(older))[2:] == [None, None]
    assert backend.stats()["evicted"] == 2
    assert backend.pool.used <= backend.pool.capacity


def test_cpu_reads_refresh_a_whole_prefix() -> None:
    backend = cpu(chunks=8)
    first, second = make_chunks(4, seed=1, namespace="first"), make_chunks(4, seed=2, namespace="second")
    backend.put_many(first)
    backend.put_many(second)
    backend.get_many(keys_of(first))  # the first prompt is now the most recently used
    backend.put_many(make_chunks(2, seed=3, namespace="third"))
    assert backend.contains(keys_of(first)) == 4
    assert backend.contains(keys_of(second)) == 2  # its tail went first


def test_cpu_a_chunk_larger_than_the_tier_is_dropped_without_evicting_anything() -> None:
    backend = cpu(chunks=4)
    kept = make_chunks(3, seed=1)
    backend.put_many(kept)
    huge = make_chunks(1, tokens_per_chunk=16 * 5, seed=2)  # 5 chunks' worth of bytes
    backend.put_many(huge)
    assert backend.counters["dropped_too_large"] == 1
    assert backend.contains(keys_of(huge)) == 0
    assert backend.contains(keys_of(kept)) == 3  # an impossible write must not flush the cache


# --- memory pool --------------------------------------------------------------------------------


def test_pool_allocates_within_its_budget() -> None:
    pool = MemoryPool(1000, pin=False)
    first = pool.allocate((100,), torch.float32)
    assert first is not None and first.shape == (100,) and pool.used == 400 and pool.free == 600
    second = pool.allocate((150,), torch.float32)
    assert second is not None and pool.used == 1000
    assert pool.allocate((1,), torch.uint8) is None  # full: no allocation, no accounting
    assert pool.used == 1000
    del first
    assert pool.used == 600
    assert MemoryPool(10).pin == torch.cuda.is_available()


def test_pool_bytes_return_only_after_the_last_reference_is_gone() -> None:
    pool = MemoryPool(10_000, pin=False)
    tensor = pool.allocate((10, 10), torch.float32)
    assert tensor is not None
    view = tensor[2:4]  # a view keeps the memory alive
    alias = tensor
    del tensor
    assert pool.used == 400
    del alias
    assert pool.used == 400
    view.fill_(1.0)  # the memory is still valid and ours
    del view
    assert pool.used == 0


def test_a_chunk_in_use_elsewhere_is_never_evicted() -> None:
    backend = cpu(chunks=2)
    chunks = make_chunks(3, seed=5)
    backend.put_many(chunks[:1])
    (in_use,) = backend.get_many(keys_of(chunks[:1]))  # being copied into a KV cache, or queued for a lower tier
    backend.put_many(chunks[1:])  # needs room: evicting chunk 0 would free nothing, so chunk 2 goes
    assert backend.contains(keys_of(chunks[:1])) == 1
    assert backend.contains(keys_of(chunks[1:])) == 1 and backend.stats()["evicted"] == 1
    held = backend.get_many(keys_of(chunks[:2]))  # now every entry is in use
    other = make_chunks(1, seed=6, namespace="other")
    backend.put_many(other)
    assert backend.counters["dropped_no_room"] == 1 and backend.contains(keys_of(other)) == 0
    assert backend.contains(keys_of(chunks[:2])) == 2  # a write that cannot be served does not flush the cache
    assert backend.pool.used <= backend.pool.capacity
    assert_same(in_use, chunks[0].kv)
    del in_use, held
    backend.put_many(other)  # released: the least recently used entry can go now
    assert backend.contains(keys_of(other)) == 1 and backend.stats()["evicted"] == 2


def test_deleting_releases_cpu_memory() -> None:
    backend = cpu(chunks=4)
    chunks = make_chunks(4)
    backend.put_many(chunks)
    assert backend.pool.used == 4 * CHUNK_BYTES
    assert backend.delete(keys_of(chunks[2:])) == 2
    assert backend.pool.used == 2 * CHUNK_BYTES
    assert backend.stats()["entries"] == 2

# --- background writes between compute steps ----------------------------------------------------
# They wait for gaps between the caller's steps (vLLM's forward passes), bounded in time and by the
# byte budget, so they never starve.


def two_tiers(stacks: list[TierStack], **options: object) -> tuple[TierStack, CpuBackend]:
    lower = cpu("lower")
    return make_stack(stacks, cpu("upper"), lower, **options), lower


def test_writes_queued_during_a_step_reach_the_lower_tier_after_it(stacks: list[TierStack]) -> None:
    stack, lower = two_tiers(stacks)
    chunks = make_chunks(3)
    stack.step_started()
    stack.put_many(chunks)
    time.sleep(0.3)
    assert lower.contains(keys_of(chunks)) == 0  # still waiting for the step to end
    stack.step_finished()
    assert stack.flush(timeout=5)
    assert lower.contains(keys_of(chunks)) == 3


def test_writes_outside_steps_are_not_held(stacks: list[TierStack]) -> None:
    stack, lower = two_tiers(stacks)
    chunks = make_chunks(2)
    stack.put_many(chunks)
    assert stack.flush(timeout=5)
    assert lower.contains(keys_of(chunks)) == 2


def test_a_write_waits_at_most_the_defer_limit(stacks: list[TierStack], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "MAX_WRITE_DEFER_S", 0.2)
    stack, lower = two_tiers(stacks)
    chunks = make_chunks(2)
    stack.step_started()  # and never finished: a server without gaps
    stack.put_many(chunks)
    assert eventually(lambda: lower.contains(keys_of(chunks)) == 2)


def test_writes_run_during_a_step_once_the_queues_hold_half_the_budget(stacks: list[TierStack]) -> None:
    stack, lower = two_tiers(stacks, write_queue_max_bytes=3 * CHUNK_BYTES)
    chunks = make_chunks(2)  # 2 of 3 chunks' worth of budget: over half
    stack.step_started()
    stack.put_many(chunks)
    assert eventually(lambda: lower.contains(keys_of(chunks)) == 2, within_s=2.0)


def test_writes_between_steps_off_writes_at_once(stacks: list[TierStack]) -> None:
    stack, lower = two_tiers(stacks, writes_between_steps=False)
    chunks = make_chunks(2)
    stack.step_started()
    stack.put_many(chunks)
    assert eventually(lambda: lower.contains(keys_of(chunks)) == 2, within_s=2.0)


class CountingCpuBackend(CpuBackend):
    """Counts put_many calls: batching matters to remote tiers (one pipeline, one round trip)."""

    def __init__(self, name: str) -> None:
        super().__init__(CpuSettings(max_size=1000 * CHUNK_BYTES), BackendContext(name, "raw"))
        self.put_calls = 0

    def put_many(self, chunks):  # type: ignore[no-untyped-def]
        self.put_calls += 1
        super().put_many(chunks)


def test_with_the_gate_off_a_batch_reaches_the_lower_tier_in_one_call(stacks: list[TierStack]) -> None:
    lower = CountingCpuBackend("lower")
    stack = make_stack(stacks, cpu("upper"), lower, writes_between_steps=False)
    stack.put_many(make_chunks(3))
    assert stack.flush()
    assert lower.put_calls == 1 and lower.contains([c.key for c in make_chunks(3)]) == 3

