"""``TierStack.contains`` stops at the first chunk no tier holds and asks each tier about a position
at most once (issue 9, defect 11): the scheduler's lookup waits on it, and a remote tier pays a
round trip for every question."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import pytest

from lmcache_core.backend import BackendContext
from lmcache_core.keys import ChunkKey
from lmcache_core.storage import TierStack
from lmcache_core.testing.conformance import make_chunks
from lmcache_cpu.backend import CpuBackend
from lmcache_cpu.settings import CpuSettings


class AskedTier(CpuBackend):
    """A cpu tier that records every key it is asked about (a remote tier would HEAD each)."""

    def __init__(self, name: str) -> None:
        super().__init__(CpuSettings(max_size=64 * make_chunks(1)[0].kv.nbytes), BackendContext(name, "raw"))
        self.asked: Counter[ChunkKey] = Counter()

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        self.asked.update(keys)
        return super().contains(keys)


@pytest.fixture
def tiers() -> Iterator[tuple[AskedTier, AskedTier, TierStack]]:
    upper, lower = AskedTier("upper"), AskedTier("lower")
    stack = TierStack([upper, lower])
    yield upper, lower, stack
    stack.close()


def test_a_tier_is_not_asked_again_where_it_already_missed(tiers: tuple[AskedTier, AskedTier, TierStack]) -> None:
    upper, lower, stack = tiers
    chunks = make_chunks(6)
    upper.put_many(chunks[:2])
    assert stack.contains([chunk.key for chunk in chunks]) == 2
    assert max(lower.asked.values()) == 1  # the lower tier said "no" once; no second round of questions
    assert max(upper.asked.values()) == 1


def test_a_prefix_spread_over_tiers_is_still_found(tiers: tuple[AskedTier, AskedTier, TierStack]) -> None:
    upper, lower, stack = tiers
    chunks = make_chunks(6)
    upper.put_many([chunks[0], chunks[1], chunks[3]])
    lower.put_many([chunks[2]])
    assert stack.contains([chunk.key for chunk in chunks]) == 4
    assert stack.contains([chunk.key for chunk in chunks[:3]]) == 3
