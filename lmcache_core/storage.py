"""The tier stack: backends ordered fastest first, with write-through, promotion and fault isolation.

- Writes go to the first tier synchronously and to each lower tier through its own bounded queue
  and background thread. A full queue drops the write and counts it: inference never waits on a
  slow tier.
- Reads look in each tier for what the upper tiers missed; a hit in a lower tier is promoted into
  the tiers above it.
- A tier that raises is logged, counted and put on a backoff (1 s doubling to 30 s) during which
  it is skipped; calls on it are misses. The next call after the backoff tries it again, so a
  restarted server is picked up without a restart of ours.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from lmcache_core.backend import Chunk, SerializingBackend, StorageBackend
from lmcache_core.keys import ChunkKey

log = logging.getLogger(__name__)
T = TypeVar("T")

_BACKOFF_START_S = 1.0
_BACKOFF_MAX_S = 30.0


class _Tier:
    """One backend plus its health state and (for lower tiers) its write queue."""

    def __init__(self, backend: StorageBackend, queue_size: int | None) -> None:
        self.backend = backend
        self.name = backend.name
        self.failures = 0
        self.skip_until = 0.0
        self.errors = 0
        self.dropped_writes = 0
        self.queue: queue.Queue[list[Chunk] | None] | None = None
        self.worker: threading.Thread | None = None
        if queue_size is not None:
            self.queue = queue.Queue(maxsize=queue_size)
            self.worker = threading.Thread(target=self._drain, name=f"lmcache-write-{self.name}", daemon=True)
            self.worker.start()

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.skip_until

    def call(self, operation: str, function: Callable[[], T], default: T) -> T:
        if not self.healthy:
            return default
        try:
            result = function()
        except Exception as error:
            self.errors += 1
            self.failures += 1
            backoff = min(_BACKOFF_START_S * 2 ** (self.failures - 1), _BACKOFF_MAX_S)
            self.skip_until = time.monotonic() + backoff
            log.warning(
                "tier %s: %s failed (%s: %s); skipping it for %.0f s", self.name, operation,
                type(error).__name__, error, backoff,
            )
            return default
        if self.failures:
            log.info("tier %s is answering again", self.name)
            self.failures = 0
        return result

    def enqueue(self, chunks: list[Chunk]) -> None:
        assert self.queue is not None
        try:
            self.queue.put_nowait(chunks)
        except queue.Full:
            self.dropped_writes += len(chunks)

    def _drain(self) -> None:
        assert self.queue is not None
        while True:
            chunks = self.queue.get()
            try:
                if chunks is None:
                    return
                if self.healthy:
                    self.call("put", lambda c=chunks: self.backend.put_many(c), None)
                else:
                    self.dropped_writes += len(chunks)
            finally:
                self.queue.task_done()

    def close(self) -> None:
        if self.queue is not None and self.worker is not None:
            self.queue.put(None)
            self.worker.join(timeout=10)
        self.call("close", self.backend.close, None)


class TierStack:
    """Batch-first access to all tiers as if they were one store."""

    def __init__(self, backends: Sequence[StorageBackend], write_queue_size: int = 256) -> None:
        if not backends:
            raise ValueError("a tier stack needs at least one backend")
        self._tiers = [
            _Tier(backend, None if index == 0 else write_queue_size) for index, backend in enumerate(backends)
        ]
        self.hits_by_tier: dict[str, int] = {tier.name: 0 for tier in self._tiers}

    @property
    def backends(self) -> list[StorageBackend]:
        return [tier.backend for tier in self._tiers]

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        """Length of the longest prefix of ``keys`` stored across the tiers.

        Stops at the first key no tier holds, and asks a tier again only once the others have
        found the key where it missed: each question can be a round trip to a remote tier, and
        the scheduler's lookup waits for the answer."""
        found = 0
        missing_from = [-1] * len(self._tiers)  # per tier: the first key it does not hold
        progress = True
        while progress and found < len(keys):
            progress = False
            for index, tier in enumerate(self._tiers):
                if missing_from[index] == found:
                    continue
                remaining = keys[found:]
                matched = tier.call("contains", lambda t=tier, r=remaining: t.backend.contains(r), 0)
                found += matched
                missing_from[index] = found
                if matched:
                    progress = True
                    if found == len(keys):
                        break
        return found

    def first_tier_contains(self, keys: Sequence[ChunkKey]) -> int:
        """Like :meth:`contains`, asking only the first (fastest, local) tier: for write paths,
        which must never wait on a remote tier."""
        first = self._tiers[0]
        return first.call("contains", lambda: first.backend.contains(keys), 0)

    def get_prefix(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor]:
        """KV of the longest retrievable prefix of ``keys`` (stops at the first chunk no tier has)."""
        results: list[torch.Tensor | None] = [None] * len(keys)
        for depth, tier in enumerate(self._tiers):
            missing = [i for i, item in enumerate(results) if item is None]
            if not missing:
                break
            wanted = [keys[i] for i in missing]
            fetched = tier.call("get", lambda t=tier, w=wanted: t.backend.get_many(w), [None] * len(wanted))
            promoted: list[Chunk] = []
            for i, tensor in zip(missing, fetched, strict=True):
                if tensor is not None:
                    results[i] = tensor
                    self.hits_by_tier[tier.name] += 1
                    if depth:
                        promoted.append(Chunk(keys[i], tensor, i))
            if promoted:
                self._write(promoted, upto=depth)
        prefix: list[torch.Tensor] = []
        for item in results:
            if item is None:
                break
            prefix.append(item)
        return prefix

    def put_many(self, chunks: Sequence[Chunk]) -> None:
        """Store in the first tier now and in the lower tiers in the background.

        ``chunks`` may be views of memory the caller reuses (a KV cache on a GPU, say): the
        first tier copies them now, and the lower tiers get copies that nobody else writes.
        """
        chunks = list(chunks)
        if not chunks:
            return
        first = self._tiers[0]
        first.call("put", lambda: first.backend.put_many(chunks), None)
        if len(self._tiers) > 1:
            self._enqueue(self._stable_copies(chunks), self._tiers[1:])

    def _stable_copies(self, chunks: list[Chunk]) -> list[Chunk]:
        """Chunks whose tensors only the stack holds: the first tier's own copies where it keeps
        tensors in memory (no second copy), otherwise fresh host copies."""
        first = self._tiers[0]
        if not isinstance(first.backend, SerializingBackend):
            held = first.call("get", lambda: first.backend.get_many([c.key for c in chunks]), [])
            if len(held) == len(chunks) and all(tensor is not None for tensor in held):
                return [Chunk(c.key, tensor, c.index) for c, tensor in zip(chunks, held, strict=True)]
        return [Chunk(c.key, c.kv.to("cpu", copy=True), c.index) for c in chunks]

    def _write(self, chunks: list[Chunk], upto: int) -> None:
        """Write already host-resident chunks (promotions) into the tiers above ``upto``."""
        if not chunks or upto == 0:
            return
        first = self._tiers[0]
        first.call("put", lambda: first.backend.put_many(chunks), None)
        self._enqueue(chunks, self._tiers[1:upto])

    @staticmethod
    def _enqueue(chunks: list[Chunk], tiers: Sequence[_Tier]) -> None:
        for tier in tiers:
            tier.enqueue(chunks)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return sum(tier.call("delete", lambda t=tier: t.backend.delete(keys), 0) for tier in self._tiers)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the background writes queued so far are done; False on timeout."""
        deadline = time.monotonic() + timeout
        for tier in self._tiers:
            if tier.queue is None:
                continue
            while tier.queue.unfinished_tasks:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
        return True

    def stats(self) -> dict[str, dict[str, float]]:
        report = {}
        for tier in self._tiers:
            backend_stats = tier.call("stats", tier.backend.stats, {})
            report[tier.name] = {
                **backend_stats,
                "hits": self.hits_by_tier[tier.name],
                "errors": tier.errors,
                "dropped_writes": tier.dropped_writes,
                "healthy": float(tier.healthy),
            }
        return report

    def close(self) -> None:
        for tier in self._tiers:
            tier.close()
