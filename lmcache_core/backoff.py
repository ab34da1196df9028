"""Retry backoff: after a failure, skip a peer (a tier, a worker rank) for a while before trying it
again, waiting longer after each consecutive failure. One implementation for the tier stack and
the vLLM lookup client, so both pause and recover the same way."""

from __future__ import annotations

import time
from collections.abc import Callable


class Backoff:
    """Consecutive failures of one thing and until when to skip it: ``start_s`` after the first
    failure, doubling up to ``max_s`` (``start_s == max_s`` gives a constant pause)."""

    def __init__(self, start_s: float, max_s: float, clock: Callable[[], float] | None = None) -> None:
        if not 0 < start_s <= max_s:
            raise ValueError(f"backoff needs 0 < start_s <= max_s, got start_s={start_s}, max_s={max_s}")
        self.start_s = start_s
        self.max_s = max_s
        self.failures = 0
        self.skip_until = 0.0
        self._clock = clock

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.monotonic()  # looked up late: tests patch it

    @property
    def active(self) -> bool:
        """Whether to skip the thing now."""
        return self._now() < self.skip_until

    def failed(self) -> float:
        """Count a failure and start the pause; returns its length in seconds."""
        self.failures += 1
        seconds = min(self.start_s * 2.0 ** min(self.failures - 1, 64), self.max_s)
        self.skip_until = self._now() + seconds
        return seconds

    def succeeded(self) -> bool:
        """Forget the failures; returns whether there were any (the thing has recovered)."""
        recovered = self.failures > 0
        self.failures = 0
        return recovered
