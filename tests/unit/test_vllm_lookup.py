"""The scheduler-to-worker lookup channel (no vLLM needed): answers, min over ranks, and failures."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from lookup_support import answer_of

from lmcache_core.integrations.vllm.lookup import LookupClient, LookupServer, socket_path


@pytest.fixture
def engine_id() -> str:
    return str(uuid.uuid4())


def test_socket_path_is_private_and_per_rank(engine_id: str) -> None:
    first, second = socket_path(engine_id, 0, 0), socket_path(engine_id, 0, 1)
    assert first != second and len(first) < 100
    directory = Path(first).parent
    assert directory.stat().st_mode & 0o777 == 0o700
    assert directory.stat().st_uid == os.getuid()


def test_client_takes_the_smallest_answer_over_ranks(engine_id: str) -> None:
    seen: list[np.ndarray] = []

    def rank_zero(tokens: np.ndarray) -> tuple[int, int]:
        seen.append(tokens.copy())
        return 5, 3

    servers = [LookupServer(socket_path(engine_id, 0, 0), rank_zero),
               LookupServer(socket_path(engine_id, 0, 1), lambda tokens: (4, 4))]
    client = LookupClient([server.path for server in servers])
    try:
        assert answer_of(client, [1, 2, 3, 70000]) == (4, 3, 4)
        assert answer_of(client, list(range(10))) == (4, 3, 4)  # the connection is reused
        assert seen[0].tolist() == [1, 2, 3, 70000]
    finally:
        client.close()
        for server in servers:
            server.close()
    assert not any(os.path.exists(server.path) for server in servers)


def test_a_failing_or_missing_worker_is_a_miss(engine_id: str) -> None:
    def broken(tokens: np.ndarray) -> tuple[int, int]:
        raise RuntimeError("tier exploded")

    server = LookupServer(socket_path(engine_id, 0, 0), broken)
    client = LookupClient([server.path])
    try:
        assert answer_of(client, [1, 2]) == (0, 0, 0)
    finally:
        client.close()
        server.close()
    absent = LookupClient([socket_path(engine_id, 0, 7)])
    assert answer_of(absent, [1, 2]) == (0, 0, 0)
    assert answer_of(absent, [1, 2]) == (0, 0, 0)  # on backoff: no reconnect storm
    assert absent.counters["failed"] == 1
    absent.close()
