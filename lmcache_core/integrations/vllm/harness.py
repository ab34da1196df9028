"""Run one vLLM engine in a child process on a scripted workload; shared by tests, demo and benchmark.

Not library API: a test and benchmark tool, free to change; the package does not export it.

Each :func:`run_engine` call is one vLLM process lifetime, so "restart vLLM" is just a second call
(the disk tier lives on in its directory) and the caller never imports vLLM itself. The child
writes a JSON result: per request the generated token ids, their log-probabilities, vLLM's count of
cached prompt tokens, and the time to first token; plus vLLM's prefix-cache counters.

TTFT is measured by vLLM (``RequestOutput.metrics.first_token_latency``, stats logging on), falling
back to the wall time of the request's round. Requests in one *round* are submitted together
(one batch); rounds run one after the other.

    python -m lmcache_core.integrations.vllm.harness SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONNECTOR_MODULE = "lmcache_core.integrations.vllm"
# The child prints this once vLLM's engine is up: a run that fails without it failed to start.
STARTED_LINE = "lmcache-harness: engine started"


class EngineStartError(RuntimeError):
    """vLLM exited before its engine was up: no request ran. ``cause``: the first exception line of
    its output, the root cause where the workers' tracebacks end in a generic start-up error."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def first_error(log: str) -> str:
    """The first ``SomethingError: message`` line after the first traceback of a log (else its last
    line), without vLLM's prefix. vLLM warns about optional imports with such lines before it starts."""
    traceback = log.find("Traceback (most recent call last)")
    match = re.search(r"\b([A-Za-z_.]*(?:Error|Exception)): (.*)$", log[max(traceback, 0):], re.MULTILINE)
    if match is not None:
        return f"{match[1]}: {match[2].strip()}"
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


@dataclass
class EngineSpec:
    """One vLLM configuration. ``connector``: None, ``"lmcache"``, or a vLLM connector class name
    (``"OffloadingConnector"``, ``"SimpleCPUOffloadConnector"``)."""

    model: str
    connector: str | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)
    enable_prefix_caching: bool = False
    max_model_len: int = 16384
    max_num_batched_tokens: int = 2048
    num_gpu_blocks_override: int | None = None
    tensor_parallel_size: int = 1
    env: dict[str, str] = field(default_factory=dict)
    use_module_path: bool = True  # False: rely on the vllm.general_plugins entry point
    kv_events_port: int | None = None  # publish vLLM's KV events there (ZMQ) and record what a subscriber gets


@dataclass
class Workload:
    """Rounds of prompts; each round is submitted as one batch. A prompt is a token-id list, a text,
    or a chat's next turn: ``{"after": [round, position], "append": [ids]}`` is that earlier
    request's prompt, then the tokens it generated, then ``append``. ``{"ids": [ids]}`` is a
    token-id list too; either dict may carry the request's ``"kv_transfer_params"``."""

    rounds: list[list[list[int] | str | dict[str, Any]]]
    max_tokens: int = 8
    logprobs: bool = True
    labels: list[list[str]] | None = None
    round_max_tokens: list[int] | None = None  # per round, overrides max_tokens


def run_engine(spec: EngineSpec, workload: Workload, timeout_s: float = 900.0) -> dict[str, Any]:
    """Start vLLM with ``spec`` in a child process, run ``workload``, return its JSON result.

    Raises :class:`EngineStartError` when vLLM exits before its engine is up, RuntimeError when it
    fails later."""
    with tempfile.TemporaryDirectory(prefix="lmcache-harness-") as folder:
        spec_path, result_path = Path(folder, "spec.json"), Path(folder, "result.json")
        spec_path.write_text(json.dumps({"spec": asdict(spec), "workload": asdict(workload)}))
        env = {**os.environ, **spec.env}
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        log_path = Path(folder, "vllm.log")
        with log_path.open("wb") as log_file:
            process = subprocess.run(
                [sys.executable, "-m", __name__, str(spec_path), str(result_path)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s, check=False,
            )
        log = log_path.read_text(errors="replace")
        if process.returncode != 0 or not result_path.exists():
            if STARTED_LINE not in log:
                raise EngineStartError(f"vLLM failed to start (exit {process.returncode}): {first_error(log)}; "
                                       f"last output:\n{log[-6000:]}", first_error(log))
            raise RuntimeError(f"vLLM run failed (exit {process.returncode}); last output:\n{log[-6000:]}")
        result = json.loads(result_path.read_text())
        result["log"] = log
        return result


def _kv_transfer_config(spec: EngineSpec) -> Any:
    if spec.connector is None:
        return None
    from vllm.config import KVTransferConfig

    if spec.connector == "lmcache":
        return KVTransferConfig(
            kv_connector="LMCacheCoreConnector",
            kv_role="kv_both",
            kv_connector_extra_config=spec.extra_config,
            kv_connector_module_path=CONNECTOR_MODULE if spec.use_module_path else None,
        )
    return KVTransferConfig(kv_connector=spec.connector, kv_role="kv_both", kv_connector_extra_config=spec.extra_config)


def _child(spec_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    data = json.loads(Path(spec_path).read_text())
    spec, workload = EngineSpec(**data["spec"]), Workload(**data["workload"])
    started = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if spec.num_gpu_blocks_override:
        kwargs["num_gpu_blocks_override"] = spec.num_gpu_blocks_override
    subscriber = None
    if spec.kv_events_port:
        from vllm.config import KVEventsConfig

        endpoint = f"tcp://127.0.0.1:{spec.kv_events_port}"
        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                    endpoint=endpoint.replace("127.0.0.1", "*"), topic="kv")
        subscriber = _EventSubscriber(endpoint)
    llm = LLM(
        model=spec.model,
        dtype="float32",
        max_model_len=spec.max_model_len,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        tensor_parallel_size=spec.tensor_parallel_size,
        enable_prefix_caching=spec.enable_prefix_caching,
        enforce_eager=True,
        disable_log_stats=False,
        kv_transfer_config=_kv_transfer_config(spec),
        seed=0,
        **kwargs,
    )
    startup_s = time.perf_counter() - started
    print(f"{STARTED_LINE} in {startup_s:.1f} s", flush=True)
    rounds: list[dict[str, Any]] = []
    sent: list[list[Any]] = []  # the prompts as sent, per round
    for index, prompts in enumerate(workload.rounds):
        max_tokens = workload.round_max_tokens[index] if workload.round_max_tokens else workload.max_tokens
        params = [
            SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1 if workload.logprobs else None,
                extra_args={"kv_transfer_params": p["kv_transfer_params"]}
                if isinstance(p, dict) and "kv_transfer_params" in p else None,
            )
            for p in prompts
        ]
        prompts = [_prompt_of(p, sent, rounds) for p in prompts]
        sent.append(prompts)
        inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
        round_started = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        wall = time.perf_counter() - round_started
        requests = []
        for position, output in enumerate(outputs):
            completion = output.outputs[0]
            metrics = output.metrics
            ttft = getattr(metrics, "first_token_latency", 0.0) if metrics is not None else 0.0
            steps = completion.logprobs or []
            tokens = completion.token_ids[: len(steps)]
            logprobs = [step[token].logprob for step, token in zip(steps, tokens, strict=True)]
            requests.append({
                "label": workload.labels[index][position] if workload.labels else f"{index}.{position}",
                "prompt_tokens": len(output.prompt_token_ids or []),
                "token_ids": list(completion.token_ids),
                "logprobs": logprobs,
                "num_cached_tokens": output.num_cached_tokens or 0,
                "ttft_s": ttft or wall,
            })
        rounds.append({"wall_s": wall, "requests": requests})
    metrics = {
        metric.name: metric.value
        for metric in llm.get_metrics()
        if ("prefix_cache" in metric.name or "preemption" in metric.name) and hasattr(metric, "value")
    }
    result = {"startup_s": startup_s, "rounds": rounds, "metrics": metrics}
    if subscriber is not None:
        result["kv_events"] = subscriber.stop()
    Path(result_path).write_text(json.dumps(result))


class _EventSubscriber:
    """A router's view of vLLM's KV-event stream: a ZMQ SUB socket on a thread, decoding every batch."""

    def __init__(self, endpoint: str) -> None:
        import threading

        import zmq

        self.events: list[dict[str, Any]] = []
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"kv")
        self._socket.setsockopt(zmq.RCVTIMEO, 200)
        self._socket.connect(endpoint)
        self._running = True
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while self._running:
            try:
                _topic, _sequence, payload = self._socket.recv_multipart()
            except zmq.Again:
                continue
            for event in decoder.decode(payload).events:
                self.events.append({"type": type(event).__name__, "medium": getattr(event, "medium", None),
                                    "blocks": len(getattr(event, "block_hashes", []) or []),
                                    "tokens": len(getattr(event, "token_ids", []) or [])})

    def stop(self) -> list[dict[str, Any]]:
        time.sleep(1.0)  # the publisher sends from its own thread
        self._running = False
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
        return self.events


def _prompt_of(prompt: list[int] | str | dict[str, Any], sent: list[list[Any]],
               rounds: list[dict[str, Any]]) -> list[int] | str:
    if not isinstance(prompt, dict):
        return prompt
    if "ids" in prompt:
        return list(prompt["ids"])
    return _next_turn(prompt, sent, rounds)


def _next_turn(turn: dict[str, Any], sent: list[list[Any]], rounds: list[dict[str, Any]]) -> list[int]:
    round_, position = turn["after"]
    earlier = sent[round_][position]
    if not isinstance(earlier, list):
        raise ValueError("a next turn must follow a prompt given as token ids")
    return [*earlier, *rounds[round_]["requests"][position]["token_ids"], *turn["append"]]


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
