"""Fault matrix of the control channel: dead ranks and instances, bad requests, stale records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from live_instance import live_instance, runtime_dir  # noqa: F401 (runtime_dir: a fixture)

from lmcache_core.cli import main
from lmcache_core.errors import LMCacheError
from lmcache_core.integrations.vllm.control import ControlServer, EngineControl, InstanceInfo, ask, running_instances
from lmcache_core.integrations.vllm.lookup import LookupClient, LookupServer, private_runtime_dir, socket_path

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("runtime_dir")]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_dead_rank_is_reported_and_the_others_still_answer(capsys: pytest.CaptureFixture[str]) -> None:
    with live_instance(ranks=2, chunks=2, missing_ranks=(1,)) as instance:
        code, out, err = run_cli(capsys, "stats")
        assert code == 1, "a partial answer must not look complete"
        assert out.startswith("rank 0 cpu: ") and "rank 1" not in out
        assert "rank 1 of instance" in err and "cannot connect" in err
        code, out, _ = run_cli(capsys, "ls")
        assert code == 1 and {line.split("\t")[1] for line in out.splitlines()} == instance.stored[0]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_record_of_a_crashed_instance_is_ignored_and_removed(capsys: pytest.CaptureFixture[str]) -> None:
    directory = private_runtime_dir()
    assert directory is not None
    (directory / "instances").mkdir(mode=0o700, exist_ok=True)
    record = directory / "instances" / "deadbeef0000-dp0.json"
    record.write_text(json.dumps({"id": "deadbeef0000-dp0", "pid": _dead_pid(), "model": "m", "tiers": ["cpu"],
                                  "socket": str(directory / "deadbeef0000-dp0.control.sock"), "ranks": 1}))
    (directory / "instances" / "garbage.json").write_text("{not json")

    assert running_instances() == []
    assert not record.exists()
    code, out, _ = run_cli(capsys, "ps")
    assert code == 0 and "no running" in out  # the unreadable record is logged and skipped, never a crash


def test_an_instance_that_stopped_answering_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with live_instance(ranks=1) as instance:
        address = instance.control.address
        assert address is not None
        instance.control._listener.close()  # type: ignore[union-attr]  # the socket dies, the record stays
        if os.path.exists(address):
            os.unlink(address)
        code, out, err = run_cli(capsys, "stats")
    assert code == 2 and out == ""
    assert f"instance {instance.id}" in err and "does not answer on its control socket" in err


def test_bad_control_requests_get_an_error_and_the_channel_stays_up() -> None:
    with live_instance(ranks=1, chunks=1) as instance:
        [record] = running_instances()
        for limit in (-1, "all", True):  # checked by the worker
            assert "limit: expected a whole number" in ask(record, {"op": "keys", "limit": limit})["ranks"][0]["error"]
        for request in ({"op": "shutdown"}, {"no": "op"}):  # refused by the scheduler, before any rank
            with pytest.raises(LMCacheError, match="unknown control operation"):
                ask(record, request)
        assert ask(record, {"op": "stats"})["ranks"][0]["stats"]["cpu"]["entries"] == 1
        assert instance.client.lookup([1, 2, 3]) in (None, (0, 0, 0))  # lookups unaffected


def test_a_rank_with_caching_off_says_so() -> None:
    assert "caching is off" in EngineControl(None)({"op": "stats"})["error"]


def test_records_and_sockets_are_private() -> None:
    with live_instance(ranks=1) as instance:
        directory = private_runtime_dir()
        assert directory is not None
        record = directory / "instances" / f"{instance.id}.json"
        assert record.stat().st_mode & 0o777 == 0o600
        assert Path(instance.control.address or "").stat().st_mode & 0o777 == 0o600


def test_a_stuck_rank_times_out_and_never_delays_lookups() -> None:
    """A rank whose control answer hangs (a slow remote listing, say) is reported after the rank
    timeout; meanwhile lookups on the same worker sockets are answered as usual."""
    release = threading.Event()
    in_control = threading.Event()

    def stuck(request: dict) -> dict:
        in_control.set()
        release.wait(10)
        return {"stats": {}}

    with live_instance(ranks=1, chunks=2) as instance:
        engine_id = str(uuid.uuid4())
        paths = [socket_path(engine_id, 0, rank) for rank in range(2)]
        servers = [LookupServer(paths[0], lambda tokens: (2, 2), control=EngineControl(instance.engines[0])),
                   LookupServer(paths[1], lambda tokens: (1, 1), control=stuck)]
        client = LookupClient(paths, wait_s=1.0)
        control = ControlServer(client, InstanceInfo(engine_id, 0, "m", ("cpu",)), rank_timeout_s=1.5).start()
        try:
            record = next(i for i in running_instances() if i.id == control.info.instance_id)
            answers: list[dict] = []
            asking = threading.Thread(target=lambda: answers.append(ask(record, {"op": "stats"})))
            asking.start()
            assert in_control.wait(5)
            assert client.lookup([5, 6, 7, 8]) == (1, 1, 1), "a lookup waited for a control request"
            asking.join(10)
            [stats] = answers
            assert stats["ranks"][0]["stats"]["cpu"]["entries"] == 2
            assert "no answer" in stats["ranks"][1]["error"]
        finally:
            release.set()
            control.close()
            client.close()
            for server in servers:
                server.close()
