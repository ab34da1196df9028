"""What a cache that misses costs: TTFT of never-seen prompts with and without lmcache-core, paired.

    python benchmarks/bench_miss_path.py [--pairs 10] [--prompts 6 --prompt-tokens 2000] [--tiers cpu,disk]
    python benchmarks/bench_miss_path.py --baseline-tree /path/to/older/checkout   # also that code's connector

Every run is a fresh vLLM process (tiny Llama, float32, CPU) that serves one warm-up prompt and then
``--prompts`` unique prompts one at a time: nothing can hit, so any difference is the connector's
overhead (lookups, saves, background writes). Runs alternate between the variants, and the order
flips every pair, so drift on the machine (thermal, page cache, other load) falls on both sides.

Reported per variant: TTFT p50 of the unique prompts in each run, and against the no-connector run
of the same pair the relative difference; its median over the pairs and its spread (min..max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmcache_core.integrations.vllm.harness import EngineSpec, Workload, run_engine
from lmcache_core.testing.tiny_model import build_tiny_llama

VOCAB = 8192


def workload(args: argparse.Namespace, pair: int) -> Workload:
    """A warm-up prompt, then unique prompts (new ones in every pair: no disk hits across runs)."""
    rng = np.random.default_rng(1000 + pair)
    prompts = [rng.integers(3, VOCAB, size=args.prompt_tokens).tolist() for _ in range(args.prompts + 1)]
    return Workload(rounds=[[p] for p in prompts], max_tokens=args.max_tokens, logprobs=False)


def spec_for(variant: str, args: argparse.Namespace, model: str, disk: Path) -> EngineSpec:
    common: dict[str, Any] = {"model": model, "max_model_len": args.prompt_tokens + 256, "enable_prefix_caching": True}
    if variant == "none":
        return EngineSpec(**common)
    env = {"LMCACHE_TIERS": args.tiers, "LMCACHE_DISK__PATH": str(disk), "LMCACHE_CHUNK_SIZE": "256"}
    if variant == "baseline":
        tree = Path(args.baseline_tree).resolve()
        env["PYTHONPATH"] = f"{tree}:{tree / 'plugins'}"
    return EngineSpec(**common, connector="lmcache", env=env)


def ttft_p50_ms(result: dict[str, Any]) -> float:
    ttfts = [round_["requests"][0]["ttft_s"] * 1000 for round_ in result["rounds"][1:]]  # without the warm-up
    return statistics.median(ttfts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--tiers", default="cpu,disk")
    parser.add_argument("--baseline-tree", help="a checkout of older lmcache-core code to compare as a third variant")
    parser.add_argument("--out", default="benchmarks/results/miss-path")
    args = parser.parse_args(argv)

    model = str(build_tiny_llama())
    variants = ["none", "lmcache"] + (["baseline"] if args.baseline_tree else [])
    runs: list[dict[str, Any]] = []
    for pair in range(args.pairs):
        order = variants if pair % 2 == 0 else variants[::-1]
        ttft: dict[str, float] = {}
        for variant in order:
            with tempfile.TemporaryDirectory(prefix="lmcache-miss-disk-") as disk:
                result = run_engine(spec_for(variant, args, model, Path(disk)), workload(args, pair), timeout_s=900)
            ttft[variant] = ttft_p50_ms(result)
        runs.append(ttft)
        line = ", ".join(f"{v}={ttft[v]:.0f} ms" for v in variants)
        print(f"[{time.strftime('%H:%M:%S')}] pair {pair + 1}/{args.pairs}: {line}", file=sys.stderr, flush=True)

    lines = [
        f"Miss path: {args.prompts} unique prompts of {args.prompt_tokens} tokens per run, one at a time, "
        f"tiers {args.tiers}, {args.pairs} alternating pairs, {os.cpu_count()} cores.",
        "",
        "| variant | TTFT p50 per run, median (ms) | vs no connector, median of pairs | spread (min..max) |",
        "|---|---|---|---|",
    ]
    for variant in variants:
        medians = statistics.median(run[variant] for run in runs)
        if variant == "none":
            lines.append(f"| {variant} | {medians:.0f} | | |")
            continue
        diffs = [(run[variant] - run["none"]) / run["none"] * 100 for run in runs]
        lines.append(f"| {variant} | {medians:.0f} | {statistics.median(diffs):+.1f}% "
                     f"| {min(diffs):+.1f}% .. {max(diffs):+.1f}% |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
