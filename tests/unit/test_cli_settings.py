"""The CLI and start-up paths that print or log settings: secrets never show, and a bad setting
ends the command with exit status 2 and one clear line, never a traceback."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from lmcache_core.cli import main
from lmcache_core.engine import build_backends
from lmcache_core.errors import BackendUnavailableError
from lmcache_core.plugins import load_registry
from lmcache_core.settings import load_settings

SECRET = "hunter2"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_env(**extra: str) -> dict[str, str]:
    pytest.importorskip("redis", reason="the redis extra is not installed")
    url = f"redis://127.0.0.1:{closed_port()}/0?password={SECRET}"
    return {"LMCACHE_TIERS": "cpu,redis", "LMCACHE_REDIS__URL": url, "LMCACHE_CPU__MAX_SIZE": "64MiB", **extra}


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_info_shows_no_password_from_a_url_query(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], json_flag: list[str]
) -> None:
    for name, value in redis_env().items():
        monkeypatch.setenv(name, value)
    assert main(["info", *json_flag]) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1" in out  # the URL is shown ...
    assert SECRET not in out  # ... without its password


def test_a_failing_start_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    env = redis_env()
    registry = load_registry(env)
    with caplog.at_level(logging.DEBUG):
        backends = build_backends(load_settings(registry, env), registry)
    for backend in backends:
        backend.close()
    assert "unreachable" in caplog.text
    assert SECRET not in caplog.text

    env = redis_env(LMCACHE_REDIS__REQUIRED="true")
    with pytest.raises(BackendUnavailableError) as failure:
        build_backends(load_settings(registry, env), registry)
    assert "unreachable" in str(failure.value) and SECRET not in str(failure.value)
