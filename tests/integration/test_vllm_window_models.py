"""Models whose layers attend through a sliding window, in real vLLM with the connector.

Our connector does not declare vLLM's ``SupportsHMA``, so with it vLLM turns its hybrid KV-cache
manager off, with two outcomes (tiny models built offline, ``build_tiny_model``):

- a hybrid model (a tiny text-only Gemma 3, sliding-window and full-attention layers alternating)
  is allocated as full attention, in one KV-cache group: every token keeps its pages, so a prompt
  several windows long is stored and loaded like any other;
- a model whose layers all slide (a tiny Mistral) keeps its ``SlidingWindowSpec``, and vLLM frees
  the pages that fall out of the window: the connector turns caching off with one error line, and
  vLLM runs on as without it.

Four vLLM lifetimes: each model with and without the connector. Greedy outputs must be equal.
"""

from __future__ import annotations

from typing import Any

import pytest
from vllm_support import assert_same_generation, lmcache_totals, needs_vllm, random_prompt, requests_of

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine
from lmcache_core.testing.tiny_model import build_tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.integration, needs_vllm]

WINDOW = 256
CHUNK = 256
PROMPT = random_prompt(60, 1500)  # almost six windows
SHARES_800 = PROMPT[:800] + random_prompt(61, 500)  # its hit ends inside the window of what follows
ROUNDS: list[list[list[int] | str | dict[str, Any]]] = [[PROMPT], [PROMPT], [SHARES_800]]
LMCACHE_ENV = {"LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_CPU__MAX_SIZE": "1GiB"}
CACHING_OFF = "lmcache-core: caching is off:"


def run(model: str, connector: str | None) -> dict[str, Any]:
    spec = EngineSpec(model=model, connector=connector, max_num_batched_tokens=1024, max_model_len=4096,
                      env=LMCACHE_ENV if connector else {})
    return run_engine(spec, Workload(ROUNDS))


@pytest.fixture(scope="module")
def sliding_model() -> str:
    return str(build_tiny_model(architecture="mistral", sliding_window=WINDOW))


@pytest.fixture(scope="module")
def hybrid_model() -> str:
    return str(build_tiny_model(architecture="gemma3", sliding_window=WINDOW))


@pytest.fixture(scope="module")
def sliding_reference(sliding_model: str) -> dict[str, Any]:
    return run(sliding_model, None)


@pytest.fixture(scope="module")
def sliding_with_connector(sliding_model: str) -> dict[str, Any]:
    return run(sliding_model, "lmcache")


@pytest.fixture(scope="module")
def hybrid_reference(hybrid_model: str) -> dict[str, Any]:
    return run(hybrid_model, None)


@pytest.fixture(scope="module")
def hybrid_with_connector(hybrid_model: str) -> dict[str, Any]:
    return run(hybrid_model, "lmcache")


def test_all_sliding_model_runs_with_caching_off_and_says_why_once(
    sliding_with_connector: dict[str, Any], sliding_reference: dict[str, Any]
) -> None:
    lines = [line for line in sliding_with_connector["log"].splitlines() if CACHING_OFF in line]
    assert len(lines) == 1, lines
    assert "SlidingWindowSpec" in lines[0]
    assert [request["num_cached_tokens"] for request in requests_of(sliding_with_connector)] == [0, 0, 0]
    for got, want in zip(requests_of(sliding_with_connector), requests_of(sliding_reference), strict=True):
        assert_same_generation(got, want)


def test_hybrid_model_prompt_longer_than_the_window_hits(
    hybrid_with_connector: dict[str, Any], hybrid_reference: dict[str, Any]
) -> None:
    log = hybrid_with_connector["log"]
    assert CACHING_OFF not in log
    # vLLM's own line: the sliding layers were allocated as full attention (one KV-cache group).
    assert "Hybrid KV cache manager is disabled for this hybrid model" in log
    miss, hit, partial = requests_of(hybrid_with_connector)
    assert miss["num_cached_tokens"] == 0
    assert hit["num_cached_tokens"] == len(PROMPT) // CHUNK * CHUNK == 1280
    assert partial["num_cached_tokens"] == 800 // CHUNK * CHUNK == 768
    assert lmcache_totals(log)["hit_tokens_cpu"] == 1280 + 768
    for got, want in zip(requests_of(hybrid_with_connector), requests_of(hybrid_reference), strict=True):
        assert_same_generation(got, want)
