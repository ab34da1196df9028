"""Load or recompute: how much of a stored prefix is worth loading.

A hit is only a win when moving its KV into the cache pages is faster than computing it again. A
chunk in host memory always is; a chunk on a slow disk or a remote store behind a congested link
may not be, and loading it would make the request slower than a miss. So the engine's caller
records what it observes (how fast the model prefills, how fast loaded bytes reach the pages) and
the tier stack records how fast each tier delivers; :meth:`LoadPlanner.chunks_worth_loading`
compares, per chunk of a prefix, the load time with the recompute time.

Rates are exponential moving averages over completed work, so they follow a machine whose load
changes. Before anything is measured the planner loads everything (a hit is then assumed to pay).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

# Weight of the newest observation: ~10 observations dominate the average.
_SMOOTHING = 0.2


class Rate:
    """Bytes (or tokens) per second, smoothed over observations; thread-safe.

    With ``max_age_s`` a rate not observed for that long is forgotten (None): a tier judged too
    slow is no longer read, so nothing would ever update its rate; forgetting it lets the next
    hit be loaded and measure the tier again (it may have been a cold cache or a passing stall)."""

    def __init__(self, max_age_s: float | None = None) -> None:
        self._per_second: float | None = None
        self._observed_at = 0.0
        self._max_age_s = max_age_s
        self._lock = threading.Lock()

    def observe(self, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds <= 0:
            return
        rate = amount / seconds
        with self._lock:
            previous = self.per_second
            self._per_second = rate if previous is None else (1 - _SMOOTHING) * previous + _SMOOTHING * rate
            self._observed_at = time.monotonic()

    @property
    def per_second(self) -> float | None:
        """None until something was observed, and again once the last observation is too old."""
        if self._max_age_s is not None and time.monotonic() - self._observed_at > self._max_age_s:
            return None
        return self._per_second


class LoadPlanner:
    """Decides how many leading chunks of a stored prefix to load; the rest is recomputed."""

    def __init__(self, chunk_tokens: int, chunk_bytes: int, enabled: bool = True) -> None:
        self.chunk_tokens = chunk_tokens
        self.chunk_bytes = chunk_bytes
        self.enabled = enabled
        self.prefill = Rate()  # tokens per second of forward passes that prefill
        self.into_pages = Rate()  # bytes per second from loaded chunks into the cache pages

    def chunks_worth_loading(self, by_tier: Mapping[str, int], tier_read: Mapping[str, float | None]) -> int:
        """How many leading chunks of a prefix to load. ``by_tier``: how many chunks of the prefix
        each tier serves, fastest tier first (the order a prefix read takes them in);
        ``tier_read``: each tier's measured read speed in bytes per second (None: not measured).

        Chunks come from ever slower tiers along the prefix, so once one chunk costs more to load
        than to recompute, so do all after it: the answer is the count of chunks before it."""
        total = sum(by_tier.values())
        prefill = self.prefill.per_second
        if not self.enabled or prefill is None:
            return total
        recompute_s = self.chunk_tokens / prefill
        into_pages = self.into_pages.per_second
        copy_s = self.chunk_bytes / into_pages if into_pages else 0.0
        worth = 0
        for tier, count in by_tier.items():
            speed = tier_read.get(tier)
            read_s = self.chunk_bytes / speed if speed else 0.0
            if count and read_s + copy_s > recompute_s:
                return worth
            worth += count
        return worth
