"""``lmcache-core ps``/``stats``/``ls`` against a running instance, over its control channel (no vLLM).

The instance is real but for vLLM: engines with a cpu tier holding chunks, a lookup server per
worker rank answering control requests from its engine, and the scheduler's control server
fanning requests out over a LookupClient.
"""

from __future__ import annotations

import json
import struct
from multiprocessing.connection import Client

import numpy as np
import pytest
from live_instance import live_instance, runtime_dir  # noqa: F401 (runtime_dir: a fixture)

from lmcache_core.cli import main
from lmcache_core.integrations.vllm.control import running_instances
from lmcache_core.integrations.vllm.lookup import LookupServer, encode_control, socket_path

pytestmark = pytest.mark.usefixtures("runtime_dir")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ps_lists_the_running_instance_and_forgets_it_on_shutdown(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    with live_instance() as instance:
        code, out, _ = run_cli(capsys, "ps")
        assert code == 0
        row = next(line.split() for line in out.splitlines() if line.startswith(instance.id))
        assert row[1:5] == [str(os.getpid()), "live-model", "cpu", "2"]
    code, out, _ = run_cli(capsys, "ps")
    assert code == 0 and instance.id not in out and "no running" in out
    assert running_instances() == []


def test_stats_shows_every_rank_s_live_cpu_tier(capsys: pytest.CaptureFixture[str]) -> None:
    with live_instance(ranks=2, chunks=3) as instance:
        for argv in (["stats"], ["stats", "--instance", instance.id], ["stats", "--instance", instance.id[:6]]):
            code, out, err = run_cli(capsys, *argv)
            assert code == 0, err
            assert f"live instance {instance.id}" in err
            lines = dict(line.split(": ", 1) for line in out.splitlines())
            assert set(lines) == {"rank 0 cpu", "rank 1 cpu"}
            assert all(json.loads(counters)["entries"] == 3 for counters in lines.values())


def test_ls_lists_the_live_cpu_tier_s_chunks(capsys: pytest.CaptureFixture[str]) -> None:
    with live_instance(ranks=2, chunks=3) as instance:
        code, out, err = run_cli(capsys, "ls")
        assert code == 0, err
        assert "live instance" in err
        assert [line.split("\t")[0] for line in out.splitlines()] == ["cpu"] * 6
        assert {line.split("\t")[1] for line in out.splitlines()} == instance.stored[0] | instance.stored[1]


def test_ls_live_honours_the_limit_and_the_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    with live_instance(ranks=1, chunks=5) as instance:
        code, out, _ = run_cli(capsys, "ls", "--limit", "2")
        assert code == 0
        lines = out.splitlines()
        assert len(lines) == 3 and lines[2] == "cpu\t... (--limit 2)"
        assert {line.split("\t")[1] for line in lines[:2]} <= instance.stored[0]

        other = instance.engines[0].settings.model_copy(update={"namespace": "someone-else"})
        instance.engines[0].settings = other  # the worker now lists a namespace its chunks are not in
        code, out, _ = run_cli(capsys, "ls")
        assert code == 0 and out == ""
        code, out, _ = run_cli(capsys, "ls", "--all-namespaces")
        assert {line.split("\t")[1] for line in out.splitlines()} == instance.stored[0]


def test_without_a_running_instance_stats_and_ls_build_fresh_backends(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMCACHE_PLUGINS__ALLOW", "codecs,cpu")
    monkeypatch.setenv("LMCACHE_TIERS", "cpu")
    code, out, err = run_cli(capsys, "stats")
    assert code == 0 and "fresh backends" in err
    assert json.loads(out.removeprefix("cpu: "))["entries"] == 0
    with live_instance():
        code, out, err = run_cli(capsys, "ls", "--fresh")  # asked for, even with an instance running
        assert code == 0 and out == "" and "fresh backends" in err


def test_several_instances_need_a_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with live_instance(ranks=1, chunks=1) as first, live_instance(ranks=1, chunks=2) as second:
        code, _, err = run_cli(capsys, "stats")
        assert code == 2 and first.id in err and second.id in err and "--instance" in err
        code, out, _ = run_cli(capsys, "ls", "--instance", second.id)
        assert code == 0 and len(out.splitlines()) == 2
        code, _, err = run_cli(capsys, "stats", "--instance", "nonexistent")
        assert code == 2 and "not running" in err


def test_a_lookup_connection_also_carries_control_requests() -> None:
    """Lookups keep their wire format; a control request on the same connection is told apart by
    its length (``4k + 1`` bytes), and a worker without a handler answers an error, not a crash."""
    import uuid

    path = socket_path(str(uuid.uuid4()), 0, 0)
    server = LookupServer(path, lambda tokens: (len(tokens), 1))
    try:
        with Client(path, family="AF_UNIX") as connection:
            connection.send_bytes(np.arange(8, dtype="<u4").tobytes())
            assert struct.unpack("<III", connection.recv_bytes()) == (8, 1, 8)
            frame = encode_control({"op": "stats"})
            assert len(frame) % 4 == 1
            connection.send_bytes(frame)
            assert "error" in json.loads(connection.recv_bytes())
            connection.send_bytes(np.arange(4, dtype="<u4").tobytes())
            assert struct.unpack("<III", connection.recv_bytes()) == (4, 1, 4)
    finally:
        server.close()
