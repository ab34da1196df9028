"""What the lookup-socket tests share: a private socket directory, servers closed after the test,
and asking a client until it answers (vLLM's scheduler asks again each step while an answer is late)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmcache_core.integrations.vllm.lookup import LookupServer


@pytest.fixture
def socket_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh TMPDIR for the socket directory (and no XDG_RUNTIME_DIR), so tests may break it."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its first answer
    return tmp_path


@pytest.fixture
def servers() -> Iterator[list[LookupServer]]:
    """Lookup servers a test starts; closed after it."""
    started: list[LookupServer] = []
    yield started
    for server in started:
        server.close()


def answer_of(client: Any, tokens: Sequence[int] | np.ndarray, within_s: float = 5.0) -> tuple[int, int, int]:
    """Ask again, as vLLM's scheduler does every step, until the client has an answer."""
    give_up = time.monotonic() + within_s
    while time.monotonic() < give_up:
        answer = client.lookup(tokens)
        if answer is not None:
            return answer
        time.sleep(0.01)
    raise AssertionError(f"no answer within {within_s} s")
