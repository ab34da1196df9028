"""Load or recompute: a stored prefix is loaded only as far as loading beats recomputing it, by
read speeds the tier stack measures and the prefill speed the caller observes."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from lmcache_core.backend import BackendContext
from lmcache_core.keys import ChunkKey
from lmcache_core.load_planner import LoadPlanner, Rate
from lmcache_core.storage import TierStack
from lmcache_core.testing.conformance import make_chunks
from lmcache_cpu.backend import CpuBackend
from lmcache_cpu.settings import CpuSettings

MB = 1024 * 1024


def planner(prefill_tokens_per_s: float | None = 10_000, into_pages_bytes_per_s: float | None = 4e9) -> LoadPlanner:
    plan = LoadPlanner(chunk_tokens=256, chunk_bytes=MB)
    if prefill_tokens_per_s:
        plan.prefill.observe(prefill_tokens_per_s, 1.0)  # 25.6 ms to recompute a chunk
    if into_pages_bytes_per_s:
        plan.into_pages.observe(into_pages_bytes_per_s, 1.0)
    return plan


def test_before_anything_is_measured_every_stored_chunk_is_loaded() -> None:
    assert planner(prefill_tokens_per_s=None).chunks_worth_loading({"cpu": 2, "disk": 3}, {"disk": 1e3}) == 5


def test_chunks_from_a_tier_slower_than_recomputing_are_not_loaded() -> None:
    plan = planner()
    fast_memory, slow_disk = 10e9, 20 * MB  # 0.1 ms vs 50 ms per 1 MiB chunk
    assert plan.chunks_worth_loading({"cpu": 2, "disk": 3}, {"cpu": fast_memory, "disk": slow_disk}) == 2
    assert plan.chunks_worth_loading({"cpu": 0, "disk": 3}, {"cpu": fast_memory, "disk": slow_disk}) == 0
    fast_disk = 2e9
    assert plan.chunks_worth_loading({"cpu": 2, "disk": 3}, {"cpu": fast_memory, "disk": fast_disk}) == 5


def test_the_copy_into_the_pages_counts_too() -> None:
    slow_copy = planner(into_pages_bytes_per_s=30 * MB)  # 33 ms per chunk: slower than recomputing
    assert slow_copy.chunks_worth_loading({"cpu": 4}, {"cpu": 10e9}) == 0


def test_switched_off_it_loads_everything() -> None:
    plan = planner()
    plan.enabled = False
    assert plan.chunks_worth_loading({"cpu": 2, "disk": 3}, {"cpu": 10e9, "disk": 1.0}) == 5


def test_rates_follow_recent_observations() -> None:
    rate = Rate()
    assert rate.per_second is None
    rate.observe(100, 1.0)
    assert rate.per_second == 100
    for _ in range(30):
        rate.observe(1000, 1.0)
    assert 990 < rate.per_second <= 1000  # type: ignore[operator]
    rate.observe(0, 1.0)  # nothing moved: no information
    rate.observe(10, 0.0)
    assert 990 < rate.per_second <= 1000  # type: ignore[operator]


class SlowCpuBackend(CpuBackend):
    """A tier that takes ``delay_s`` per read: a congested disk or remote store."""

    delay_s = 0.05

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        time.sleep(self.delay_s)
        return super().get_many(keys)


def test_the_stack_measures_each_tiers_read_speed_and_a_slow_tiers_hits_are_declined() -> None:
    size = make_chunks(1)[0].kv.nbytes
    upper = CpuBackend(CpuSettings(max_size=100 * size), BackendContext("cpu", "raw"))
    slow = SlowCpuBackend(CpuSettings(max_size=100 * size), BackendContext("slow", "raw"))
    stack = TierStack([upper, slow])
    try:
        chunks = make_chunks(4)
        upper.put_many(chunks[:2])
        slow.put_many(chunks)
        assert stack.read_speeds() == {"cpu": None, "slow": None}
        assert len(stack.get_prefix([c.key for c in chunks])) == 4
        speeds = stack.read_speeds()
        assert speeds["slow"] is not None and speeds["slow"] < 2 * size / SlowCpuBackend.delay_s
        assert speeds["cpu"] is None or speeds["cpu"] > speeds["slow"]
        plan = LoadPlanner(chunk_tokens=16, chunk_bytes=size)
        plan.prefill.observe(16 * 1000, 1.0)  # 1 ms per chunk to recompute: the slow tier loses
        assert plan.chunks_worth_loading({"cpu": 2, "slow": 2}, speeds) == 2
    finally:
        stack.close()


def test_a_rate_not_observed_for_a_while_is_forgotten(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Once a tier is judged too slow nothing reads it, so nothing would refresh its speed: the old
    measurement expires and the next hit is loaded (and measured) again."""
    from lmcache_core import load_planner

    now = [1000.0]
    monkeypatch.setattr(load_planner.time, "monotonic", lambda: now[0])
    rate = Rate(max_age_s=60)
    rate.observe(10, 1.0)
    now[0] += 59
    assert rate.per_second == 10
    now[0] += 2
    assert rate.per_second is None
    rate.observe(100, 1.0)  # a fresh start, not averaged with the forgotten value
    assert rate.per_second == 100
