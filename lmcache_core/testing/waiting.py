"""Waiting in tests for something a background thread does (a write queue, a refill, a remote store)."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(condition: Callable[[], bool], within_s: float = 5.0, poll_s: float = 0.01) -> bool:
    """Whether ``condition()`` became true within ``within_s`` seconds, asked every ``poll_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return False
