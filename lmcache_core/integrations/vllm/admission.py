"""Which chunks of a request the connector stores: admission (``LMCACHE_ADMIT_AFTER``) and per-request overrides.

By default every computed chunk is stored. A busy server with many one-off prompts evicts its hot
prefixes with chunks nobody asks for again; with ``admit_after = N`` a prompt's leading chunks are
stored only once the same prefix has arrived N times (this one included), as a second sighting is the
best cheap predictor of a third. Sightings are counted per chunk prefix (a chained 64-bit hash of the
token ids up to each chunk boundary) in a bounded LRU table of :data:`MAX_TRACKED_PREFIXES` entries,
in the scheduler process; they are not shared between instances and start over at a restart.
Generated tokens have never been seen in a prompt, so with admission on they are not stored.

A request can decide for itself through ``kv_transfer_params``: ``{"lmcache_store": true}`` stores its
chunks at once (e.g. a document a client knows it will ask about again), ``false`` never stores them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

MAX_TRACKED_PREFIXES = 100_000
STORE_PARAM = "lmcache_store"


class Admission:
    """Counts prefix sightings; says how many leading chunks of a prompt may be stored."""

    def __init__(self, chunk_size: int, admit_after: int, capacity: int = MAX_TRACKED_PREFIXES) -> None:
        if admit_after < 1:
            raise ValueError(f"admit_after must be at least 1, got {admit_after}")
        self.chunk_size = chunk_size
        self.admit_after = admit_after
        self._seen: OrderedDict[int, int] = OrderedDict()
        self._capacity = capacity

    @property
    def stores_everything(self) -> bool:
        return self.admit_after == 1

    def sighting(self, prompt: Sequence[int]) -> int | None:
        """Count this arrival of ``prompt``; the number of its leading chunks that may be stored
        (None: no limit, as with ``admit_after = 1``)."""
        if self.stores_everything:
            return None
        admitted, leading = 0, True
        for prefix in self._prefix_hashes(prompt):
            count = self._seen.pop(prefix, 0) + 1
            self._seen[prefix] = count  # most recently seen last
            leading = leading and count >= self.admit_after
            admitted += leading  # a chunk is only useful after its whole prefix
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return admitted

    def _prefix_hashes(self, prompt: Sequence[int]) -> list[int]:
        ids = np.ascontiguousarray(prompt, dtype=np.uint32)
        step = self.chunk_size
        hashes, previous = [], 0
        for start in range(0, len(ids) // step * step, step):
            previous = xxhash.xxh3_64_intdigest(ids[start : start + step].tobytes(), seed=previous)
            hashes.append(previous)
        return hashes


def store_override(kv_transfer_params: dict[str, Any] | None) -> bool | None:
    """The request's own choice (``{"lmcache_store": true|false}``), or None."""
    if not kv_transfer_params or STORE_PARAM not in kv_transfer_params:
        return None
    value = kv_transfer_params[STORE_PARAM]
    if not isinstance(value, bool):
        raise ValueError(f"kv_transfer_params[{STORE_PARAM!r}] must be true or false, got {value!r}")
    return value
