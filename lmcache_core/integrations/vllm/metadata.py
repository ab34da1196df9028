"""What the scheduler half and the worker half of the connector pass each other through vLLM.

- :class:`LMCacheCoreMetadata`: per step, scheduler -> every worker (pickled by vLLM): the loads and
  saves to run and the finished requests whose pages may be released after this step's saves.
- :class:`LMCacheCoreWorkerMeta`: per step, workers -> scheduler (merged over ranks by vLLM): which
  requests' loads ran and where each failed, so that saves depending on a load wait for it.
- :class:`LMCacheCoreStats`: per interval, workers -> vLLM's metrics logger.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

__all__ = ["LMCacheCoreMetadata", "LMCacheCoreStats", "LMCacheCoreWorkerMeta", "Transfer"]


@dataclass
class Transfer:
    """Tokens ``[start, end)`` of one request to move between vLLM's pages and the tiers.

    ``tokens`` are the prompt's ids up to the end of the last chunk involved (the keys are chained
    hashes, so every chunk's key needs all tokens before it); ``block_ids`` are the request's pages.
    ``asynchronous``: a load for a request that waits for it (vLLM's ``WAITING_FOR_REMOTE_KVS``)
    while the batch runs on; the workers report it done through ``get_finished``.
    """

    request_id: str
    tokens: np.ndarray
    block_ids: list[int]
    start: int
    end: int
    asynchronous: bool = False


@dataclass
class LMCacheCoreMetadata(KVConnectorMetadata):
    """What the workers do in one step; pickled from the scheduler to every worker.

    ``released``: finished requests whose pages vLLM kept for our saves (``request_finished``
    returned True); the workers report them through ``get_finished`` once this step's saves are done.
    """

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    step_tokens: int = 0  # tokens this step computes, all requests together (the prefill-speed estimate)


@dataclass
class LMCacheCoreWorkerMeta(KVConnectorWorkerMetadata):
    """What the workers report back after a step: which requests' loads ran, and for those that
    failed, the first token that did not load. vLLM merges the reports of all ranks (``aggregate``),
    so a failure on any rank reaches the scheduler, which alone can hold back the saves that
    depend on it."""

    loaded: set[str] = field(default_factory=set)
    failed_from: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, LMCacheCoreWorkerMeta)
        self.loaded |= other.loaded
        for request_id, token in other.failed_from.items():
            self.failed_from[request_id] = min(token, self.failed_from.get(request_id, token))
        return self


# Stats reported as they are, per tier or per kind: the workers' hits, layer-by-layer counts, the
# scheduler's per-request counts, the tiers' events (see .prometheus).
_COUNTED_PREFIXES = ("hit_tokens_", "layerwise_", "request_", "evicted_", "dropped_writes_", "tier_errors_")


@dataclass
class LMCacheCoreStats(KVConnectorStats):
    """Per-interval counters; summed over workers and steps by vLLM, logged by its stats logger."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = Counter(self.data)
        merged.update(other.data)
        self.data = dict(merged)
        return self

    def reduce(self) -> dict[str, int | float]:
        data = self.data
        report: dict[str, int | float] = {
            "load_tokens": int(data.get("load_tokens", 0)),
            "save_tokens": int(data.get("save_tokens", 0)),
            "failed_load_tokens": int(data.get("failed_load_tokens", 0)),
        }
        for direction in ("load", "save"):
            seconds = data.get(f"{direction}_s", 0.0)
            if seconds:
                report[f"{direction}_GBps"] = round(data.get(f"{direction}_bytes", 0) / seconds / 1e9, 3)
        for name, value in sorted(data.items()):
            if name.startswith(_COUNTED_PREFIXES) or name in ("declined_load_tokens", "fresh_save_buffers"):
                report[name] = int(value)
        return report

    def is_empty(self) -> bool:
        return not any(self.data.values())
