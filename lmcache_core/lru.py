"""Least-recently-used order with sizes in bytes: the one eviction index every tier shares.

Prefix-aware by construction. Keys of a batch arrive in prefix order (a prompt's first chunk
first), and :meth:`ByteLRU.get_many` and :meth:`ByteLRU.touch` mark them recently used from the
last key to the first, so a prompt's first chunk is always more recent than its tail. Writers do
the same by adding a batch last chunk first. Eviction then takes tails before heads, and whatever
remains of a prompt is still a prefix: a cache that evicted the start of a prompt would keep
chunks no lookup can reach.

The index only orders and counts; the capacity belongs to the tier (a memory pool, a directory
budget shared by several processes, a number of entries), which asks :meth:`ByteLRU.pop_victim`
for the next entry to drop until it has room. Every method is atomic (one lock per index).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Entries ``key -> (value, nbytes)``, least recently used first. Thread-safe.

    ``value`` is whatever the tier keeps in memory for an entry (a tensor, bytes, or ``None`` when
    the data lives elsewhere, as files do); ``nbytes`` is what it counts against the budget.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        """The bytes of every entry together."""
        return self._nbytes

    def __iter__(self) -> Iterator[K]:
        """Over a snapshot of the keys (see :meth:`keys`): safe while other threads change the index."""
        return iter(self.keys())

    def keys(self) -> list[K]:
        """A snapshot of the keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def prefix_length(self, keys: Sequence[K]) -> int:
        """How many of ``keys``, from the first, are present (the longest present prefix)."""
        with self._lock:
            return next((i for i, key in enumerate(keys) if key not in self._entries), len(keys))

    def get_many(self, keys: Sequence[K]) -> list[V | None]:
        """The value of each key (``None`` where absent); found keys are touched, last first."""
        with self._lock:
            found = [self._entries.get(key) for key in keys]
            self._touch(keys)
        return [None if entry is None else entry[0] for entry in found]

    def touch(self, keys: Sequence[K]) -> int:
        """Mark the present ``keys`` recently used, the last first (so ``keys[0]`` ends most
        recent); returns how many were present."""
        with self._lock:
            return self._touch(keys)

    def _touch(self, keys: Sequence[K]) -> int:
        touched = 0
        for key in reversed(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
                touched += 1
        return touched

    def add(self, key: K, value: V, nbytes: int) -> None:
        """Insert or replace ``key`` as the most recently used entry."""
        with self._lock:
            self._remove(key)
            self._entries[key] = (value, nbytes)
            self._nbytes += nbytes

    def adopt(self, key: K, value: V, nbytes: int) -> bool:
        """Insert ``key`` as the least recently used entry unless it is present: an entry found in
        storage (written by another process) whose recency is unknown goes first until it is used.
        Returns whether it was added."""
        with self._lock:
            if key in self._entries:
                return False
            self._entries[key] = (value, nbytes)
            self._entries.move_to_end(key, last=False)
            self._nbytes += nbytes
            return True

    def remove(self, key: K) -> bool:
        """Drop ``key``; returns whether it was present."""
        with self._lock:
            return self._remove(key) is not None

    def _remove(self, key: K) -> int | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._nbytes -= entry[1]
        return entry[1]

    def pop_victim(self, evictable: Callable[[V], bool] | None = None) -> tuple[K, int] | None:
        """Remove the least recently used entry that ``evictable`` accepts (any, if ``None``) and
        return its key and size, or ``None`` when there is none.

        The value is dropped here, not returned: a caller that held it would keep its memory
        alive while it allocates the memory the eviction was meant to free.
        """
        with self._lock:
            victim = next(
                (key for key, (value, _) in self._entries.items() if evictable is None or evictable(value)), None
            )
            if victim is None:
                return None
            _, nbytes = self._entries.pop(victim)
            self._nbytes -= nbytes
            return victim, nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
