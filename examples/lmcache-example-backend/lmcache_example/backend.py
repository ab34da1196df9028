"""A byte-store backend in four methods. Everything else comes from ``SerializingBackend``.

The base class turns chunks into framed objects (header + payload, see ``lmcache_core.serde``) and
back, verifies them on read, and turns damaged or foreign objects into misses. A backend only
moves named blobs, always in batches (keys arrive in prefix order: a prompt's first chunk first).

This one keeps them in an ``OrderedDict``, least recently used first. Batches are written and
touched from the last chunk to the first, so a prompt's first chunk is always more recent than
its tail: eviction takes tails before heads, and whatever remains of a prompt is still a prefix.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from lmcache_core import BackendContext, SerializingBackend
from lmcache_core.backend import Blob
from lmcache_example.settings import ExampleSettings


class ExampleBackend(SerializingBackend):
    settings: ExampleSettings

    def __init__(self, settings: ExampleSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        # A real backend opens its client here (import heavy libraries here, not at module level).
        self._objects: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _exists_blobs(self, names: Sequence[str]) -> list[bool]:
        with self._lock:
            return [name in self._objects for name in names]

    def _read_blobs(self, names: Sequence[str]) -> list[Blob | None]:
        with self._lock:
            for name in reversed(names):
                if name in self._objects:
                    self._objects.move_to_end(name)
            # Immutable bytes decode through a copy, so a caller that modifies the tensor it got
            # cannot change what is stored. Return a fresh bytearray instead to decode without one.
            return [self._objects.get(name) for name in names]

    def _write_blobs(self, items: Sequence[tuple[str, list[memoryview]]]) -> None:
        for name, parts in reversed(items):
            blob = b"".join(parts)  # stored in one assignment: a reader never sees half an object
            with self._lock:
                self._objects[name] = blob
                self._objects.move_to_end(name)
                while len(self._objects) > self.settings.max_entries:
                    self._objects.popitem(last=False)
                    self.count("evicted")

    def _delete_blobs(self, names: Sequence[str]) -> int:
        with self._lock:
            return sum(self._objects.pop(name, None) is not None for name in names)

    def iter_keys(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._objects))

    def stats(self) -> dict[str, float]:
        with self._lock:
            entries, stored = len(self._objects), sum(len(blob) for blob in self._objects.values())
        return {**self.counters, "entries": entries, "stored_bytes": stored}

    def close(self) -> None:
        with self._lock:
            self._objects.clear()
