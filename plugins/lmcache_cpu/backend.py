"""KV chunks kept as tensors in a byte-bounded (pinned when CUDA is present) memory pool.

Eviction is LRU by bytes and prefix-aware (:class:`~lmcache_core.plugin_api.ByteLRU`): within a
batch the chunks are touched and written from last to first, so a prompt's first chunk is always
more recent than its tail and the tail goes first.

A chunk handed over by its caller (``Chunk.owned``, e.g. the vLLM connector's freshly gathered
buffers) is kept as it is when it owns all of its memory: no second copy (``adopted_bytes``).

Reads hand out views (:func:`~lmcache_core.memory.lend`). An entry whose memory is still held by a
reader or by a lower tier's write queue is never evicted: it would free no memory, only empty the
tier. When nothing evictable is left the new chunk is dropped and counted (``dropped_no_room``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmcache_core.plugin_api import (
    BackendContext,
    ByteLRU,
    Chunk,
    ChunkKey,
    MemoryPool,
    StorageBackend,
    in_use_elsewhere,
    lend,
)
from lmcache_cpu.settings import CpuSettings


class CpuBackend(StorageBackend):
    settings: CpuSettings

    def __init__(self, settings: CpuSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.pool = MemoryPool(settings.max_size)
        self._entries: ByteLRU[ChunkKey, torch.Tensor] = ByteLRU()

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        return self._entries.prefix_length(keys)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        found = self._entries.get_many(keys)
        self.count("read_bytes", sum(t.nbytes for t in found if t is not None))
        return [None if tensor is None else lend(tensor) for tensor in found]

    def put_many(self, chunks: Sequence[Chunk]) -> None:
        for chunk in reversed(chunks):
            self._put(chunk)

    def _put(self, chunk: Chunk) -> None:
        """One chunk; a method of its own so no local reference to a buffer outlives it (a
        reference the eviction check cannot see would make evicting that buffer free nothing)."""
        if self._entries.touch([chunk.key]):
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
        self._entries.add(chunk.key, buffer, buffer.nbytes)
        self.count("written_bytes", buffer.nbytes)

    def _allocate(self, kv: torch.Tensor, adopt: bool) -> torch.Tensor | None:
        """A buffer for ``kv`` from the pool (``kv`` itself when adopted), evicting least recently
        used entries that nobody else holds."""
        while True:
            buffer = self.pool.adopt(kv) if adopt else self.pool.allocate(tuple(kv.shape), kv.dtype)
            if buffer is not None:
                return buffer
            if self._entries.pop_victim(evictable=lambda held: not in_use_elsewhere(held)) is None:
                return None
            self.count("evicted")

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return sum(self._entries.remove(key) for key in keys)

    def iter_keys(self) -> Iterator[str]:
        return iter([str(key) for key in self._entries])

    def stats(self) -> dict[str, float]:
        return {**self.counters, "entries": len(self._entries), "used_bytes": self.pool.used,
                "capacity_bytes": self.pool.capacity}

    def close(self) -> None:
        self._entries.clear()
