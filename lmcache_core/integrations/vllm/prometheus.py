"""lmcache-core's metrics on vLLM's own ``/metrics``, through vLLM's connector Prometheus hooks.

vLLM builds these in the process that serves ``/metrics`` (``build_prom_metrics``) and hands every
step's connector stats, summed over the scheduler and the worker ranks, to :meth:`observe`. So the
counters follow what is right to sum: token counts come from the scheduler only (one count per
request, whatever the tensor-parallel size), bytes, seconds and tier events from every rank (each
rank moves and stores its own share of the KV heads).

Exported (prometheus_client adds ``_total`` to counters), each with vLLM's labels (``model_name``,
``engine``) and, where it says, ``tier``:

=====================================  ======  ===========================================================
``lmcache_core:hit_tokens``            tier    prompt tokens vLLM took from the tier (a load that then fails
                                               is counted here and in ``failed_load_tokens``)
``lmcache_core:failed_load_tokens``            tokens promised by a lookup, not loaded, recomputed
``lmcache_core:saved_tokens``                  tokens whose chunks were handed to the tiers
``lmcache_core:load_bytes``, ``save_bytes``    KV bytes moved into / out of vLLM's pages (all ranks)
``lmcache_core:load_seconds``, ``save_seconds``  time those copies took: GB/s = rate(bytes) / rate(seconds)
``lmcache_core:evicted_chunks``        tier    chunks a local tier evicted for room (remote stores evict unseen)
``lmcache_core:dropped_writes``        tier    writes dropped (queue full or over its byte budget)
``lmcache_core:tier_errors``           tier    calls on the tier that failed (each became a miss)
=====================================  ======  ===========================================================
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

# stats key (as the halves report it) -> (metric, help, per tier)
_PLAIN = {
    "request_failed_load_tokens": ("failed_load_tokens", "Tokens a lookup promised that were not loaded (recomputed)."),
    "request_save_tokens": ("saved_tokens", "Tokens whose chunks were handed to the tiers."),
    "load_bytes": ("load_bytes", "KV bytes copied into vLLM's pages, all ranks."),
    "save_bytes": ("save_bytes", "KV bytes copied out of vLLM's pages, all ranks."),
    "load_s": ("load_seconds", "Seconds spent copying KV into vLLM's pages, all ranks."),
    "save_s": ("save_seconds", "Seconds spent copying KV out of vLLM's pages and storing it, all ranks."),
}
_PER_TIER = {
    "request_hit_tokens_": ("hit_tokens", "Prompt tokens loaded from the tier instead of computed."),
    "evicted_": ("evicted_chunks", "Chunks the tier evicted to make room (local tiers)."),
    "dropped_writes_": ("dropped_writes", "Writes to the tier dropped (queue full or over its byte budget)."),
    "tier_errors_": ("tier_errors", "Calls on the tier that failed (each became a miss)."),
}
PREFIX = "lmcache_core:"


class LMCacheCorePromMetrics(KVConnectorPromMetrics):
    """Counters registered once per process; :meth:`observe` adds one step's stats."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._plain = {
            key: self._counter_cls(name=PREFIX + name, documentation=text, labelnames=labelnames)
            for key, (name, text) in _PLAIN.items()
        }
        self._per_tier = {
            key: self._counter_cls(name=PREFIX + name, documentation=text, labelnames=[*labelnames, "tier"])
            for key, (name, text) in _PER_TIER.items()
        }
        # Every series exists from the start, at 0: a rate() over a series that appears late misses its start.
        tiers = _configured_tiers(vllm_config)
        for labels in per_engine_labelvalues.values():
            for counter in self._plain.values():
                counter.labels(*labels)
            for counter in self._per_tier.values():
                for tier in tiers:
                    counter.labels(*labels, tier)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues.get(engine_idx, [])
        for key, value in transfer_stats_data.items():
            if not value or not isinstance(value, int | float):
                continue
            counter = self._plain.get(key)
            if counter is not None:
                counter.labels(*labels).inc(value)
                continue
            for prefix, per_tier in self._per_tier.items():
                if key.startswith(prefix):
                    per_tier.labels(*labels, key.removeprefix(prefix)).inc(value)
                    break


def _configured_tiers(vllm_config: Any) -> list[str]:
    """The tiers the workers will run (the same settings, read in this process); none if they cannot
    be read here: the per-tier series then appear with their first count."""
    from lmcache_core.integrations.vllm.connector import load_connector_settings

    extra = getattr(getattr(vllm_config, "kv_transfer_config", None), "kv_connector_extra_config", None) or {}
    try:
        return list(load_connector_settings(dict(extra)).tiers)
    except Exception:  # never fail vLLM's metrics for ours; the workers report the problem
        return []
