"""The tier stack: backends ordered fastest first, with write-through, promotion and fault isolation.

- Writes go to the first tier synchronously and to each lower tier through its own queue and
  background thread. What the queues hold is bounded in bytes, across all lower tiers together
  (``write_queue_max_bytes``), including the host copies made for them; a write over the budget
  (or over ``write_queue_size`` batches in one tier's queue) is dropped and counted: inference
  never waits on a slow tier, and a slow tier never holds more memory than the budget.
- Background writes run between the caller's compute steps (:meth:`TierStack.step_started` /
  :meth:`~TierStack.step_finished`; vLLM's forward passes) unless they have waited too long or the
  queues hold half the budget: see :class:`_StepGate`.
- Reads look in each tier for what the upper tiers missed; a hit in a lower tier is promoted into
  the tiers above it.
- A tier that raises is logged, counted and put on a backoff (1 s doubling to 30 s) during which
  it is skipped; calls on it are misses. A failed write (put, delete) pauses only the tier's
  writes: a full or read-only disk keeps serving what it has. A failed read pauses the whole
  tier (it looks unreachable). The next call after the backoff tries it again, so a restarted
  server is picked up without a restart of ours.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from lmcache_core.backend import Chunk, SerializingBackend, StorageBackend
from lmcache_core.backoff import Backoff
from lmcache_core.keys import ChunkKey
from lmcache_core.load_planner import Rate

log = logging.getLogger(__name__)
T = TypeVar("T")

_BACKOFF_START_S = 1.0
_BACKOFF_MAX_S = 30.0
DEFAULT_WRITE_QUEUE_MAX_BYTES = 1024**3
_WRITE_OPERATIONS = frozenset({"put", "delete"})
# A background write waits at most this long for a gap between compute steps before it runs anyway.
MAX_WRITE_DEFER_S = 5.0
_GATE_POLL_S = 0.05
# A tier's read speed older than this is forgotten, so a tier judged too slow to load from gets
# another chance to show its speed.
_READ_SPEED_MAX_AGE_S = 60.0


class _WriteBudget:
    """Bytes that background writes may hold at once, shared by every lower tier of a stack."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.max_bytes:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class _StepGate:
    """When background writes may run: between the caller's compute steps.

    On a machine with few cores a write thread, and the page-cache writeback it starts, preempts
    the threads of the forward pass; with OpenMP one preempted thread stalls the others at the next
    barrier, so a few milliseconds of writing cost the step as much or more (measured on 2 cores:
    +10% TTFT for never-seen prompts with a disk tier, +3% on tmpfs). Between steps the cores are
    idle. So a write waits for a gap, one chunk at a time, unless it has waited
    ``MAX_WRITE_DEFER_S`` or the queues hold half the byte budget: a busy server with no gaps must
    not drop every write. Deferring, not another thread: the work moves, it does not multiply.
    """

    def __init__(self, budget: _WriteBudget, enabled: bool) -> None:
        self._budget = budget
        self._enabled = enabled
        self._between_steps = threading.Event()
        self._between_steps.set()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def step_started(self) -> None:
        if self._enabled:
            self._between_steps.clear()

    def step_finished(self) -> None:
        self._between_steps.set()

    def between_steps(self, timeout: float) -> bool:
        """Whether the caller is between compute steps now or becomes so within ``timeout`` seconds."""
        return self._between_steps.wait(timeout)

    def wait_for_gap(self, queued_at: float) -> None:
        while not self._between_steps.wait(_GATE_POLL_S):
            if time.monotonic() - queued_at > MAX_WRITE_DEFER_S or 2 * self._budget.used > self._budget.max_bytes:
                return


class _QueuedWrite:
    """One batch on its way to one or more lower tiers; its bytes return to the budget when the
    last of them is done with it (written or dropped), which is also when its tensors can go."""

    def __init__(self, chunks: list[Chunk], nbytes: int, budget: _WriteBudget, tiers: int) -> None:
        self.chunks = chunks
        self.queued_at = time.monotonic()
        self._nbytes = nbytes
        self._budget = budget
        self._pending = tiers
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self.chunks = []
            self._budget.release(self._nbytes)


class _Tier:
    """One backend plus its health state and (for lower tiers) its write queue."""

    def __init__(self, backend: StorageBackend, queue_size: int | None, gate: _StepGate) -> None:
        self.backend = backend
        self._gate = gate
        self.name = backend.name
        self.errors = 0
        self.dropped_writes = 0
        self.reads = Rate(max_age_s=_READ_SPEED_MAX_AGE_S)  # bytes per second read from it, promotion included
        # one pause for each kind of call: a failed write must not stop reads
        self._reads = Backoff(_BACKOFF_START_S, _BACKOFF_MAX_S)
        self._writes = Backoff(_BACKOFF_START_S, _BACKOFF_MAX_S)
        self.queue: queue.Queue[_QueuedWrite | None] | None = None
        self.worker: threading.Thread | None = None
        if queue_size is not None:
            self.queue = queue.Queue(maxsize=queue_size)
            self.worker = threading.Thread(target=self._drain, name=f"lmcache-write-{self.name}", daemon=True)
            self.worker.start()

    @property
    def healthy(self) -> bool:
        """Whether reads are tried (writes may still be paused: see :attr:`accepts_writes`)."""
        return not self._reads.active

    @property
    def accepts_writes(self) -> bool:
        return not self._reads.active and not self._writes.active

    def call(self, operation: str, function: Callable[[], T], default: T) -> T:
        is_write = operation in _WRITE_OPERATIONS
        backoff = self._writes if is_write else self._reads
        if not (self.accepts_writes if is_write else self.healthy):
            return default
        try:
            result = function()
        except Exception as error:
            self.errors += 1
            seconds = backoff.failed()
            log.warning(
                "tier %s: %s failed (%s: %s); skipping its %s for %.0f s", self.name, operation,
                type(error).__name__, error, "writes" if is_write else "calls", seconds,
            )
            return default
        if backoff.succeeded():
            log.info("tier %s is answering again", self.name)
        return result

    def enqueue(self, write: _QueuedWrite) -> None:
        assert self.queue is not None
        try:
            self.queue.put_nowait(write)
        except queue.Full:
            self.dropped_writes += len(write.chunks)
            write.done()

    def _drain(self) -> None:
        assert self.queue is not None
        while True:
            write = self.queue.get()
            try:
                if write is None:
                    return
                self._write(write)
            finally:
                if write is not None:
                    write.done()
                self.queue.task_done()

    def _write(self, write: _QueuedWrite) -> None:
        """A chunk at a time, each in a gap between steps (with the gate off, the batch in one
        call: a remote tier pipelines it). A failed put ends the batch (an error, as when it was
        one call); a tier whose writes are paused drops what is left of it."""
        batches = [[chunk] for chunk in write.chunks] if self._gate.enabled else [write.chunks]
        done = 0
        for batch in batches:
            self._gate.wait_for_gap(write.queued_at)
            if not self.accepts_writes:
                self.dropped_writes += len(write.chunks) - done
                return
            errors = self.errors
            self.call("put", lambda b=batch: self.backend.put_many(b), None)
            if self.errors > errors:
                return
            done += len(batch)

    def close(self) -> None:
        if self.queue is not None and self.worker is not None:
            self.queue.put(None)
            self.worker.join(timeout=10)
        self.call("close", self.backend.close, None)


class TierStack:
    """Batch-first access to all tiers as if they were one store."""

    def __init__(
        self,
        backends: Sequence[StorageBackend],
        write_queue_size: int = 256,
        write_queue_max_bytes: int = DEFAULT_WRITE_QUEUE_MAX_BYTES,
        writes_between_steps: bool = True,
    ) -> None:
        if not backends:
            raise ValueError("a tier stack needs at least one backend")
        self._write_budget = _WriteBudget(write_queue_max_bytes)
        self._gate = _StepGate(self._write_budget, writes_between_steps)
        self._tiers = [
            _Tier(backend, None if index == 0 else write_queue_size, self._gate)
            for index, backend in enumerate(backends)
        ]
        self.hits_by_tier: dict[str, int] = {tier.name: 0 for tier in self._tiers}

    @property
    def backends(self) -> list[StorageBackend]:
        return [tier.backend for tier in self._tiers]

    def step_started(self) -> None:
        """The caller's compute step (a forward pass) begins: background writes wait for its end."""
        self._gate.step_started()

    def step_finished(self) -> None:
        self._gate.step_finished()

    def between_steps(self, timeout: float) -> bool:
        """Whether the caller is between compute steps (always, with ``writes_between_steps`` off),
        waiting up to ``timeout`` seconds: for other background work that must keep off the steps."""
        return self._gate.between_steps(timeout)

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        """Length of the longest prefix of ``keys`` stored across the tiers."""
        return self.contains_by_tier(keys)[0]

    def contains_by_tier(self, keys: Sequence[ChunkKey]) -> tuple[int, dict[str, int]]:
        """Length of the longest prefix of ``keys`` stored across the tiers, and how many of those
        keys each tier answered for (a load reads them from there when each tier holds a prefix).

        Stops at the first key no tier holds, and asks a tier again only once the others have
        found the key where it missed: each question can be a round trip to a remote tier, and
        the scheduler's lookup waits for the answer."""
        found = 0
        by_tier = {tier.name: 0 for tier in self._tiers}
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
                by_tier[tier.name] += matched
                missing_from[index] = found
                if matched:
                    progress = True
                    if found == len(keys):
                        break
        return found, by_tier

    def presence(self, keys: Sequence[ChunkKey]) -> tuple[list[bool], dict[str, int]]:
        """For each key, whether some tier holds it (gaps allowed: for reuse at any position), and
        how many of them each tier answered for (the fastest tier holding each).

        A backend answers "how many leading keys of this list do I hold", so each tier is asked
        once per run of keys it holds, never once per key."""
        present = [False] * len(keys)
        by_tier = {tier.name: 0 for tier in self._tiers}
        for tier in self._tiers:
            missing = [i for i, held in enumerate(present) if not held]
            while missing:
                wanted = [keys[i] for i in missing]
                held = tier.call("contains", lambda t=tier, w=wanted: t.backend.contains(w), 0)
                for i in missing[:held]:
                    present[i] = True
                by_tier[tier.name] += held
                missing = missing[held + 1 :]  # the key after the run is not in this tier
        return present, by_tier

    def first_tier_contains(self, keys: Sequence[ChunkKey]) -> int:
        """Like :meth:`contains`, asking only the first (fastest, local) tier: for write paths,
        which must never wait on a remote tier."""
        first = self._tiers[0]
        return first.call("contains", lambda: first.backend.contains(keys), 0)

    def get_prefix(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor]:
        """KV of the longest retrievable prefix of ``keys`` (stops at the first chunk no tier has)."""
        chunks, _ = self.read(keys, prefix=True)
        return [chunk for chunk in chunks if chunk is not None]

    def read(
        self, keys: Sequence[ChunkKey], *, prefix: bool = True
    ) -> tuple[list[torch.Tensor | None], dict[str, int]]:
        """Read ``keys`` from the fastest tier holding each; hits in lower tiers are promoted.

        ``prefix=True``: the chunks of the longest retrievable prefix (no ``None``), each tier
        asked only for the keys it holds before the first gap (a remote tier is never asked for
        megabytes that a gap makes useless). ``prefix=False``: one entry per key, ``None`` where
        no tier has it. Also returns how many chunks each tier served in this call.
        """
        hits = {tier.name: 0 for tier in self._tiers}
        if prefix:
            return self._read_prefix(keys, hits), hits
        results: list[torch.Tensor | None] = [None] * len(keys)
        for depth in range(len(self._tiers)):
            missing = [i for i, item in enumerate(results) if item is None]
            if not missing:
                break
            self._fetch(depth, keys, missing, results, hits)
        return results, hits

    def _read_prefix(self, keys: Sequence[ChunkKey], hits: dict[str, int]) -> list[torch.Tensor | None]:
        """Like :meth:`contains_by_tier`, but reading: each tier gets only the run of still-missing
        keys it holds from the first gap on, and is asked again only once the gap has moved. A
        tier that could not read a key it said it held (evicted or found corrupt in between) is
        not asked again in this read: the lower tiers may still have that key."""
        results: list[torch.Tensor | None] = [None] * len(keys)
        gap = 0  # the first position without a chunk
        asked_at = [-1] * len(self._tiers)
        done: set[int] = set()
        progress = True
        while progress and gap < len(keys):
            progress = False
            for depth, tier in enumerate(self._tiers):
                if asked_at[depth] == gap or depth in done:
                    continue
                asked_at[depth] = gap
                missing = [i for i in range(gap, len(keys)) if results[i] is None]
                wanted = [keys[i] for i in missing]
                held = tier.call("contains", lambda t=tier, w=wanted: t.backend.contains(w), 0)
                if not held:
                    continue
                self._fetch(depth, keys, missing[:held], results, hits)
                if any(results[i] is None for i in missing[:held]):
                    done.add(depth)
                moved = next((i for i in range(gap, len(keys)) if results[i] is None), len(keys))
                if moved > gap:
                    gap, progress = moved, True
                    if gap == len(keys):
                        break
        return results[:gap]

    def _fetch(
        self, depth: int, keys: Sequence[ChunkKey], positions: list[int], results: list[torch.Tensor | None],
        hits: dict[str, int],
    ) -> None:
        """Get ``positions`` of ``keys`` from tier ``depth`` into ``results``; promote what it had."""
        tier = self._tiers[depth]
        wanted = [keys[i] for i in positions]
        started = time.monotonic()
        fetched: list[torch.Tensor | None] = tier.call("get", lambda: tier.backend.get_many(wanted),
                                                       [None] * len(wanted))
        promoted: list[Chunk] = []
        for i, tensor in zip(positions, fetched, strict=True):
            if tensor is not None:
                results[i] = tensor
                hits[tier.name] += 1
                self.hits_by_tier[tier.name] += 1
                if depth:
                    promoted.append(Chunk(keys[i], tensor, i))
        if promoted:
            self._promote(promoted, upto=depth)
        tier.reads.observe(sum(t.nbytes for t in fetched if t is not None), time.monotonic() - started)

    def read_speeds(self) -> dict[str, float | None]:
        """Each tier's measured read speed in bytes per second (None until it served a read),
        fastest tier first: what a load from it costs, for :class:`~lmcache_core.load_planner.LoadPlanner`."""
        return {tier.name: tier.reads.per_second for tier in self._tiers}

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
        lower = self._tiers[1:]
        if lower:
            nbytes = self._reserve(chunks, lower)
            if nbytes is not None:
                self._enqueue(self._stable_copies(chunks), lower, nbytes)

    @property
    def queued_bytes(self) -> int:
        """Bytes of KV the background writes hold now (at most ``write_queue_max_bytes``)."""
        return self._write_budget.used

    def _reserve(self, chunks: list[Chunk], tiers: Sequence[_Tier]) -> int | None:
        """Reserve the bytes of a background write before any copy is made for it; ``None``
        (and the write dropped and counted in each tier) when the budget has no room."""
        nbytes = sum(chunk.kv.nbytes for chunk in chunks)
        if self._write_budget.reserve(nbytes):
            return nbytes
        for tier in tiers:
            tier.dropped_writes += len(chunks)
        return None

    def _stable_copies(self, chunks: list[Chunk]) -> list[Chunk]:
        """Chunks whose tensors nobody else writes: views of the first tier's own copies where it
        keeps tensors in memory (no second copy; the views also keep it from evicting them while
        queued), the chunks themselves when their caller handed them over (``owned``), otherwise
        fresh host copies. The write budget counts them either way."""
        first = self._tiers[0]
        if not isinstance(first.backend, SerializingBackend):
            held = first.call("get", lambda: first.backend.get_many([c.key for c in chunks]), [])
            if len(held) == len(chunks) and all(tensor is not None for tensor in held):
                return [dataclasses.replace(c, kv=tensor) for c, tensor in zip(chunks, held, strict=True)]
        if all(c.owned and c.kv.device.type == "cpu" for c in chunks):
            return chunks
        return [dataclasses.replace(c, kv=c.kv.to("cpu", copy=True)) for c in chunks]

    def _promote(self, chunks: list[Chunk], upto: int) -> None:
        """Copy chunks found in a lower tier (already host-resident) into the tiers above ``upto``."""
        if not chunks or upto == 0:
            return
        first = self._tiers[0]
        first.call("put", lambda: first.backend.put_many(chunks), None)
        between = self._tiers[1:upto]
        if between:
            nbytes = self._reserve(chunks, between)
            if nbytes is not None:
                self._enqueue(chunks, between, nbytes)

    def _enqueue(self, chunks: list[Chunk], tiers: Sequence[_Tier], nbytes: int) -> None:
        write = _QueuedWrite(chunks, nbytes, self._write_budget, len(tiers))
        for tier in tiers:
            tier.enqueue(write)

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
                "writes_healthy": float(tier.accepts_writes),
            }
        return report

    def close(self) -> None:
        for tier in self._tiers:
            tier.close()
