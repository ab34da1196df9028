"""A byte-store backend in four methods. Everything else comes from ``SerializingBackend``.

The base class turns chunks into framed objects (header + payload, see ``lmcache_core.serde``) and
back, verifies them on read, and turns damaged or foreign objects into misses. A backend only
moves named blobs, always in batches (keys arrive in prefix order: a prompt's first chunk first).

This one keeps them in a ``ByteLRU``, the least recently used first. Batches are written and
touched from the last chunk to the first, so a prompt's first chunk is always more recent than
its tail: eviction takes tails before heads, and whatever remains of a prompt is still a prefix.
Everything it imports from lmcache-core comes from ``lmcache_core.plugin_api``, the stable API.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from lmcache_core.plugin_api import BackendContext, Blob, ByteLRU, SerializingBackend
from lmcache_example.settings import ExampleSettings


class ExampleBackend(SerializingBackend):
    settings: ExampleSettings

    def __init__(self, settings: ExampleSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        # A real backend opens its client here (import heavy libraries here, not at module level).
        self._objects: ByteLRU[str, bytes] = ByteLRU()

    def _exists_blobs(self, names: Sequence[str]) -> list[bool]:
        return [name in self._objects for name in names]

    def _read_blobs(self, names: Sequence[str]) -> list[Blob | None]:
        # Immutable bytes decode through a copy, so a caller that modifies the tensor it got
        # cannot change what is stored. Return a fresh bytearray instead to decode without one.
        return list(self._objects.get_many(names))

    def _write_blobs(self, items: Sequence[tuple[str, list[memoryview]]]) -> None:
        for name, parts in reversed(items):
            blob = b"".join(parts)  # stored in one assignment: a reader never sees half an object
            self._objects.add(name, blob, len(blob))
            while len(self._objects) > self.settings.max_entries and self._objects.pop_victim() is not None:
                self.count("evicted")

    def _delete_blobs(self, names: Sequence[str]) -> int:
        return sum(self._objects.remove(name) for name in names)

    def iter_keys(self) -> Iterator[str]:
        return iter(self._objects.keys())

    def stats(self) -> dict[str, float]:
        return {**self.counters, "entries": len(self._objects), "stored_bytes": self._objects.nbytes}

    def close(self) -> None:
        self._objects.clear()
