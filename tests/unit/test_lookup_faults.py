"""Fault matrix of the scheduler's lookup path (issue 9, defects 10 and 11), with real sockets.

Real :class:`LookupServer` threads answer for each tensor-parallel rank; faults are injected in the
worker's lookup function (it sleeps, as a slow remote tier would, or waits on a barrier) and in the
file system (a socket directory owned by another user, a ``TMPDIR`` too long for a unix socket
path). Time bounds are correctness bounds ("the scheduler thread is never held by a slow tier"),
generous next to the settings they check, never speed claims.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
from multiprocessing.connection import Client, Listener
from pathlib import Path

import numpy as np
import pytest
from lookup_support import answer_of

from lmcache_core.integrations.vllm.lookup import LookupClient, LookupServer, socket_path

pytestmark = pytest.mark.faults

TOKENS = [1, 2, 3, 70000]
OTHER_USER = 65534  # nobody


@pytest.fixture
def engine_id() -> str:
    return str(uuid.uuid4())


def serve(paths_and_functions: list[tuple[str, object]]) -> list[LookupServer]:
    return [LookupServer(path, function) for path, function in paths_and_functions]  # type: ignore[arg-type]


# --- defect 11: a slow worker must not hold vLLM's scheduler thread ------------------------------


def test_all_ranks_are_asked_at_once(engine_id: str, servers: list[LookupServer]) -> None:
    """Each rank answers only once the other one has the request too (a barrier): asked one after
    another, the first rank's barrier breaks and the lookup is a miss."""
    barrier = threading.Barrier(2, timeout=1.0)

    def rank(found: int, first_tier: int):  # type: ignore[no-untyped-def]
        def lookup(tokens: np.ndarray) -> tuple[int, int]:
            barrier.wait()
            return found, first_tier

        return lookup

    servers += serve([(socket_path(engine_id, 0, 0), rank(5, 3)), (socket_path(engine_id, 0, 1), rank(4, 4))])
    client = LookupClient([server.path for server in servers])
    try:
        assert answer_of(client, TOKENS) == (4, 3, 4)
    finally:
        client.close()


def test_a_slow_rank_answers_later_without_blocking_the_caller(engine_id: str, servers: list[LookupServer]) -> None:
    def slow(tokens: np.ndarray) -> tuple[int, int]:
        time.sleep(1.2)  # a remote tier taking its time
        return 3, 1

    servers += serve([(socket_path(engine_id, 0, 0), lambda tokens: (4, 2)), (socket_path(engine_id, 0, 1), slow)])
    client = LookupClient([server.path for server in servers])  # default wait 20 ms, deadline 2 s
    try:
        started = time.monotonic()
        first = client.lookup(TOKENS)
        returned_after = time.monotonic() - started
        assert first is None  # "not ready yet": vLLM skips the request this step and asks again
        assert returned_after < 1.0
        assert answer_of(client, TOKENS) == (3, 1, 3)  # a later call picks up the answer
    finally:
        client.close()


def test_past_the_deadline_a_lookup_is_a_miss(engine_id: str, servers: list[LookupServer]) -> None:
    def stuck(tokens: np.ndarray) -> tuple[int, int]:
        time.sleep(3.0)  # longer than the default 2 s deadline
        return 3, 1

    servers += serve([(socket_path(engine_id, 0, 0), stuck)])
    client = LookupClient([servers[0].path])
    try:
        started = time.monotonic()
        assert client.lookup(TOKENS) is None
        assert answer_of(client, TOKENS) == (0, 0, 0)
        assert time.monotonic() - started < 2.9  # the miss came at the deadline, not with the late answer
        assert client.counters["expired"] == 1
    finally:
        client.close()


def test_a_dead_rank_is_a_miss(engine_id: str, servers: list[LookupServer]) -> None:
    servers += serve([(socket_path(engine_id, 0, 0), lambda tokens: (4, 2))])
    client = LookupClient([servers[0].path, socket_path(engine_id, 0, 1)])  # rank 1 never started
    try:
        started = time.monotonic()
        assert answer_of(client, TOKENS) == (0, 0, 0)
        assert time.monotonic() - started < 1.0  # a refused connection is not waited for
        assert client.counters["failed"] >= 1
    finally:
        client.close()


# --- defect 10: the socket's location must never stop vLLM from starting ------------------------


def test_socket_directory_owned_by_another_user_is_not_used(
    engine_id: str, socket_base: Path, servers: list[LookupServer]
) -> None:
    planted = socket_base / f"lmcache-core-{os.getuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, OTHER_USER, OTHER_USER)
    path = socket_path(engine_id, 0, 0)
    assert not path.startswith(str(planted))
    servers += serve([(path, lambda tokens: (4, 2))])
    client = LookupClient([path])
    try:
        assert answer_of(client, TOKENS) == (4, 2, 4)
    finally:
        client.close()


def test_socket_directory_that_is_not_private_is_not_used(engine_id: str, socket_base: Path) -> None:
    planted = socket_base / f"lmcache-core-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    assert not socket_path(engine_id, 0, 0).startswith(str(planted))


def test_tmpdir_too_long_for_a_unix_socket(engine_id: str, socket_base: Path, monkeypatch: pytest.MonkeyPatch,
                                           servers: list[LookupServer]) -> None:
    long_tmpdir = socket_base / ("t" * 100)
    long_tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_tmpdir))
    paths = [socket_path(engine_id, 0, rank) for rank in range(2)]
    assert paths == [socket_path(engine_id, 0, rank) for rank in range(2)]  # scheduler and workers agree
    servers += serve([(paths[0], lambda tokens: (4, 2)), (paths[1], lambda tokens: (5, 1))])
    client = LookupClient(paths)
    try:
        assert answer_of(client, TOKENS) == (4, 1, 4)
    finally:
        client.close()


def as_other_user(action) -> int:  # type: ignore[no-untyped-def]
    """Run ``action`` in a forked child as uid 65534; its exit status (we run the tests as root)."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        status = 2
        try:
            os.setgid(OTHER_USER)
            os.setuid(OTHER_USER)
            status = action()
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def abstract_path(engine_id: str, socket_base: Path) -> str:
    planted = socket_base / f"lmcache-core-{os.getuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, OTHER_USER, OTHER_USER)
    path = socket_path(engine_id, 0, 0)
    assert path.startswith("\0")  # no directory left to protect it: the peer's uid must be checked
    return path


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_ask_a_worker(abstract_path: str, servers: list[LookupServer]) -> None:
    servers += serve([(abstract_path, lambda tokens: (4, 2))])

    def ask() -> int:
        try:
            connection = Client(abstract_path, family="AF_UNIX")
            connection.send_bytes(np.asarray(TOKENS, dtype="<u4").tobytes())
            return 1 if connection.poll(2.0) and connection.recv_bytes() else 0
        except (OSError, EOFError):
            return 0

    assert as_other_user(ask) == 0  # refused: no answer (1 would mean it was answered)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_a_socket_squatted_by_another_user_is_not_believed(abstract_path: str) -> None:
    ready_read, ready_write = os.pipe()
    stop_read, stop_write = os.pipe()

    def squat() -> int:
        listener = Listener(abstract_path, family="AF_UNIX")
        os.write(ready_write, b"1")
        threading.Thread(target=lambda: serve_forged(listener), daemon=True).start()
        os.read(stop_read, 1)
        return 0

    def serve_forged(listener: Listener) -> None:
        while True:
            connection = listener.accept()
            while True:
                connection.recv_bytes()
                connection.send_bytes(struct.pack("<II", 99, 99))  # "everything is cached"

    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.setgid(OTHER_USER)
        os.setuid(OTHER_USER)
        os._exit(squat())
    try:
        assert os.read(ready_read, 1) == b"1"
        client = LookupClient([abstract_path])
        try:
            assert answer_of(client, TOKENS) == (0, 0, 0)
            assert client.counters["failed"] == 1
        finally:
            client.close()
    finally:
        os.write(stop_write, b"1")
        os.waitpid(child, 0)
