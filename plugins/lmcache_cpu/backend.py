"""KV chunks kept as tensors in a byte-bounded (pinned when CUDA is present) memory pool.

Eviction is LRU by bytes and prefix-aware: within a batch the chunks are touched from last to
first, so a prompt's first chunk is always more recent than its tail and the tail goes first. A
cache that evicted the start of a prefix would keep chunks nobody can reach.

A chunk handed over by its caller (``Chunk.owned``, e.g. the vLLM connector's freshly gathered
buffers) is kept as it is when it owns all of its memory: no second copy (``adopted_bytes``).

Reads hand out views (:func:`~lmcache_core.memory.lend`). An entry whose memory is still held by a
reader or by a lower tier's write queue is never evicted: it would free no memory, only empty the
tier. When nothing evictable is left the new chunk is dropped and counted (``dropped_no_room``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch

from lmcache_core.backend import BackendContext, Chunk, StorageBackend
from lmcache_core.keys import ChunkKey
from lmcache_core.memory import MemoryPool, in_use_elsewhere, lend
from lmcache_cpu.settings import CpuSettings


class CpuBackend(StorageBackend):
    settings: CpuSettings

    def __init__(self, settings: CpuSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.pool = MemoryPool(settings.max_size)
        self._entries: OrderedDict[ChunkKey, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            return next((i for i, key in enumerate(keys) if key not in self._entries), len(keys))

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        with self._lock:
            found = [self._entries.get(key) for key in keys]
            for key, tensor in zip(reversed(keys), reversed(found), strict=True):
                if tensor is not None:
                    self._entries.move_to_end(key)
        self.count("read_bytes", sum(t.nbytes for t in found if t is not None))
        return [None if tensor is None else lend(tensor) for tensor in found]

    def put_many(self, chunks: Sequence[Chunk]) -> None:
        for chunk in reversed(chunks):
            self._put(chunk)

    def _put(self, chunk: Chunk) -> None:
        """One chunk; a method of its own so no local reference to a buffer outlives it (a
        reference the eviction check cannot see would make evicting that buffer free nothing)."""
        with self._lock:
            if chunk.key in self._entries:
                self._entries.move_to_end(chunk.key)
                return
        if chunk.kv.nbytes > self.pool.capacity:
            self.count("dropped_too_large")  # can never fit: evict nothing for it
            return
        adopt = chunk.owned and self.pool.can_adopt(chunk.kv)
        buffer = self._allocate(chunk.kv, adopt)
        if buffer is None:
            self.count("dropped_no_room")
            return
        if adopt:
            self.count("adopted_bytes", buffer.nbytes)
        else:
            buffer.copy_(chunk.kv)
        with self._lock:
            self._entries[chunk.key] = buffer
        self.count("written_bytes", buffer.nbytes)

    def _allocate(self, kv: torch.Tensor, adopt: bool) -> torch.Tensor | None:
        """A buffer for ``kv`` from the pool (``kv`` itself when adopted), evicting least recently
        used entries that nobody else holds."""
        while True:
            buffer = self.pool.adopt(kv) if adopt else self.pool.allocate(tuple(kv.shape), kv.dtype)
            if buffer is not None:
                return buffer
            with self._lock:
                victim = next((key for key, held in self._entries.items() if not in_use_elsewhere(held)), None)
                if victim is None:
                    return None
                del self._entries[victim]
            self.count("evicted")

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            return sum(self._entries.pop(key, None) is not None for key in keys)

    def iter_keys(self) -> Iterator[str]:
        with self._lock:
            names = [str(key) for key in self._entries]
        return iter(names)

    def stats(self) -> dict[str, float]:
        return {**self.counters, "entries": len(self._entries), "used_bytes": self.pool.used,
                "capacity_bytes": self.pool.capacity}

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
