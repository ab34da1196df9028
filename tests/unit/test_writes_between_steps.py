"""Background writes to lower tiers wait for gaps between the caller's compute steps (vLLM's
forward passes), bounded in time and by the byte budget, so they never starve."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import pytest

from lmcache_core import storage
from lmcache_core.backend import BackendContext, Chunk
from lmcache_core.keys import ChunkKey
from lmcache_core.storage import TierStack
from lmcache_core.testing.conformance import make_chunks
from lmcache_cpu.backend import CpuBackend
from lmcache_cpu.settings import CpuSettings

CHUNK_BYTES = make_chunks(1)[0].kv.nbytes


def cpu(name: str) -> CpuBackend:
    return CpuBackend(CpuSettings(max_size=1000 * CHUNK_BYTES), BackendContext(name, "raw"))


def keys_of(chunks: Sequence[Chunk]) -> list[ChunkKey]:
    return [chunk.key for chunk in chunks]


@pytest.fixture
def stacks() -> Iterator[list[TierStack]]:
    created: list[TierStack] = []
    yield created
    for stack in created:
        stack.step_finished()
        stack.close()


def two_tiers(stacks: list[TierStack], **options: object) -> tuple[TierStack, CpuBackend]:
    lower = cpu("lower")
    stack = TierStack([cpu("upper"), lower], **options)  # type: ignore[arg-type]
    stacks.append(stack)
    return stack, lower


def eventually(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


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
    assert eventually(lambda: lower.contains(keys_of(chunks)) == 2, timeout=2.0)


def test_writes_between_steps_off_writes_at_once(stacks: list[TierStack]) -> None:
    stack, lower = two_tiers(stacks, writes_between_steps=False)
    chunks = make_chunks(2)
    stack.step_started()
    stack.put_many(chunks)
    assert eventually(lambda: lower.contains(keys_of(chunks)) == 2, timeout=2.0)
