"""The disk tier's temporary files: a starting process removes only those of dead writers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from lmcache_core.backend import BackendContext
from lmcache_core.testing.conformance import assert_same, make_chunks
from lmcache_disk import backend as disk_module
from lmcache_disk.backend import DiskBackend
from lmcache_disk.settings import DiskSettings


def disk(path: Path, fsync: bool = False) -> DiskBackend:
    return DiskBackend(DiskSettings(path=path, fsync=fsync), BackendContext("disk", "raw"))


def test_a_starting_process_leaves_a_live_writers_temporary_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = disk(tmp_path, fsync=True)
    in_write, resume = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def stalled_fsync(fd: int) -> None:  # fault injection: hold the write between its bytes and its rename
        in_write.set()
        assert resume.wait(timeout=30)
        real_fsync(fd)

    monkeypatch.setattr(disk_module.os, "fsync", stalled_fsync)
    chunks = make_chunks(1)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            writer.put_many(chunks)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert in_write.wait(timeout=30)
        assert list(tmp_path.glob(".*.tmp"))
        starting = disk(tmp_path)  # another instance starts on the same directory meanwhile
    finally:
        resume.set()
        thread.join(timeout=30)
    assert errors == []
    assert_same(writer.get_many([chunks[0].key])[0], chunks[0].kv)
    assert_same(starting.get_many([chunks[0].key])[0], chunks[0].kv)
    assert not list(tmp_path.glob(".*.tmp"))
