"""Fault matrix, storage rows: the disk tier driven into real failures through the engine API.

Each case checks that the caller sees a miss (or the right KV) within a bound, never wrong KV,
and that a counter records what happened. Disk full and read-only use a small tmpfs mounted for
the test (we run as root here and in CI); processes are real (``subprocess``), killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVLayout
from lmcache_core.serde import HEADER_SIZE, read_header

pytestmark = pytest.mark.faults

LAYOUT = KVLayout(2, 2, 16, "bfloat16")
TOKENS = 64  # four chunks of 16 tokens, 4 KiB of KV each
BOUND_S = 5.0  # any single call, on a loaded 2-core machine


def prompt(seed: int) -> tuple[list[int], torch.Tensor]:
    tokens = [seed * 1000 + i for i in range(TOKENS)]
    return tokens, torch.randn(LAYOUT.chunk_shape(TOKENS), generator=torch.Generator().manual_seed(seed)).bfloat16()


def disk_engine(path: Path, max_size: str = "10MiB", **environ: str) -> CacheEngine:
    settings = {
        "LMCACHE_TIERS": "disk",
        "LMCACHE_CHUNK_SIZE": "16",
        "LMCACHE_DISK__PATH": str(path),
        "LMCACHE_DISK__MAX_SIZE": max_size,
        **environ,
    }
    return CacheEngine.from_env(model_name="m", layout=LAYOUT, environ=settings)


def timed(call: Callable[[], object]) -> object:
    start = time.monotonic()
    result = call()
    assert time.monotonic() - start < BOUND_S
    return result


def assert_prefix_or_miss(engine: CacheEngine, seed: int) -> int:
    """What the engine returns for prompt ``seed`` is a miss or exactly a prefix of its KV; the
    number of tokens returned."""
    tokens, kv = prompt(seed)
    got = timed(lambda: engine.retrieve(tokens))
    if got is None:
        return 0
    assert isinstance(got, torch.Tensor)
    assert torch.equal(got, kv[:, :, : got.shape[2]]), f"wrong KV for prompt {seed}"
    return got.shape[2]


def chunk_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.lmc"))


def assert_only_whole_files(directory: Path) -> None:
    """Every chunk file has the size its header promises, and no temporary file is left."""
    for path in chunk_files(directory):
        data = path.read_bytes()
        assert len(data) == read_header(data[:HEADER_SIZE]).total_size, f"{path.name} is not whole"
    assert not list(directory.glob(".*.tmp")), "a temporary file was left behind"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs of a given size (``"256k"``); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        directory = tmp_path / f"tmpfs{len(mounted)}"
        directory.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True)
        mounted.append(directory)
        return directory

    yield mount
    for directory in mounted:
        subprocess.run(["umount", "-l", str(directory)], check=True)


# --- disk full ----------------------------------------------------------------------------------


def test_a_full_disk_evicts_and_retries_and_keeps_serving(tmpfs: Callable[[str], Path]) -> None:
    directory = tmpfs("256k")  # about 30 chunk files, far below max_size: the disk fills first
    with disk_engine(directory, max_size="10MiB") as engine:
        for seed in range(40):
            tokens, kv = prompt(seed)
            timed(lambda t=tokens, k=kv: engine.store(t, k))
            assert assert_prefix_or_miss(engine, seed) == TOKENS  # the newest prompt is always there
        stats = engine.stats()["disk"]
        assert stats["evicted"] > 0 and stats["disk_full"] > 0
        assert stats["errors"] == 0 and stats["writes_healthy"] == 1.0
        for seed in range(40):
            assert_prefix_or_miss(engine, seed)
    assert_only_whole_files(directory)


# --- read-only directory ------------------------------------------------------------------------


def test_a_read_only_directory_keeps_serving_reads(tmpfs: Callable[[str], Path]) -> None:
    directory = tmpfs("1m")
    with disk_engine(directory) as engine:
        engine.store(*prompt(1))
    subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
    with disk_engine(directory) as engine:  # starting on a read-only directory does not fail
        assert assert_prefix_or_miss(engine, 1) == TOKENS
        timed(lambda: engine.store(*prompt(2)))  # the write fails: no exception reaches the caller
        stats = engine.stats()["disk"]
        assert stats["write_errors"] >= 1 and stats["writes_healthy"] == 0.0
        assert assert_prefix_or_miss(engine, 1) == TOKENS  # reads go on while writes back off
        assert engine.lookup(prompt(2)[0]) == 0
    assert_only_whole_files(directory)


# --- damaged and foreign files ------------------------------------------------------------------


def truncate(path: Path, engine: CacheEngine) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_a_bit(path: Path, engine: CacheEngine) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 1000] ^= 0x10
    path.write_bytes(data)


def swap_with_next(path: Path, engine: CacheEngine) -> None:
    files = chunk_files(path.parent)
    other = files[(files.index(path) + 1) % len(files)]
    data, other_data = path.read_bytes(), other.read_bytes()
    path.write_bytes(other_data)
    other.write_bytes(data)


def written_for_another_namespace(path: Path, engine: CacheEngine) -> None:
    with disk_engine(path.parent, LMCACHE_NAMESPACE="other") as other:
        other.store(*prompt(1))  # the same tokens, another tenant
    foreign = [p for p in chunk_files(path.parent) if ":other:" in p.name]
    assert foreign
    shutil.copyfile(foreign[0], path)


def written_for_another_model(path: Path, engine: CacheEngine) -> None:
    other = CacheEngine.from_env(
        model_name="another-model",
        layout=LAYOUT,
        environ={"LMCACHE_TIERS": "disk", "LMCACHE_CHUNK_SIZE": "16", "LMCACHE_DISK__PATH": str(path.parent)},
    )
    with other:
        other.store(*prompt(1))
    foreign = [p for p in chunk_files(path.parent) if "another-model" in p.name]
    assert foreign
    shutil.copyfile(foreign[0], path)


@pytest.mark.parametrize(
    "damage", [truncate, flip_a_bit, swap_with_next, written_for_another_namespace, written_for_another_model]
)
@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
def test_a_damaged_or_foreign_file_is_a_miss_and_counted(
    tmp_path: Path, damage: Callable[[Path, CacheEngine], None], restart: bool
) -> None:
    engine = disk_engine(tmp_path)
    tokens, kv = prompt(1)
    engine.store(tokens, kv)
    damaged = tmp_path / f"{engine.keys(tokens)[2]}.lmc"
    damage(damaged, engine)
    if restart:
        engine.close()
        engine = disk_engine(tmp_path)
    with engine:
        returned = assert_prefix_or_miss(engine, 1)
        assert returned <= 2 * 16  # never past the damaged chunk
        assert engine.stats()["disk"]["corrupt_entries"] >= 1
        assert not damaged.exists()  # removed: the next store writes a good one
        engine.store(tokens, kv)
        assert assert_prefix_or_miss(engine, 1) == TOKENS


# --- processes: SIGKILL mid-write, several writers ----------------------------------------------

WORKER = """
import json, os, sys, time
from pathlib import Path
sys.path[:0] = sys.argv[1].split(os.pathsep)
import torch
from test_faults_storage import assert_prefix_or_miss, disk_engine, prompt
role, directory, max_size, first, count, total = sys.argv[2], Path(sys.argv[3]), sys.argv[4], *map(int, sys.argv[5:8])
if role == "stall":  # fault injection: stop inside a write, after the bytes, before the rename
    def stall(fd):
        Path(directory.parent / "stalled").touch()
        time.sleep(600)
    os.fsync = stall
engine = disk_engine(directory, max_size=max_size, LMCACHE_DISK__FSYNC=str(role == "stall"))
for seed in range(first, first + count):
    engine.store(*prompt(seed))
    assert_prefix_or_miss(engine, seed)
for seed in range(total):
    assert_prefix_or_miss(engine, seed)
print(json.dumps(engine.stats()["disk"]))
engine.close()
"""


def start_worker(role: str, directory: Path, max_size: str, first: int, count: int, total: int) -> subprocess.Popen:
    path = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    arguments = [role, str(directory), max_size, str(first), str(count), str(total)]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, path, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in chunk_files(directory)) + sum(
        path.stat().st_size for path in directory.glob(".*.tmp")
    )


def test_several_processes_share_one_directory_and_one_budget(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    max_size = 40 * (4096 + HEADER_SIZE)  # 40 chunks; the three writers store 240
    workers = [start_worker("write", directory, str(max_size), index * 20, 20, 60) for index in range(3)]
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        stats = json.loads(out)
        assert stats["errors"] == 0 and stats["evicted"] > 0
    assert directory_bytes(directory) <= max_size
    assert_only_whole_files(directory)
    with disk_engine(directory, max_size=str(max_size)) as engine:
        assert engine.stats()["disk"]["used_bytes"] == directory_bytes(directory)
        assert sum(assert_prefix_or_miss(engine, seed) for seed in range(60)) > 0


def test_a_writer_killed_mid_write_leaves_nothing_visible_and_its_bytes_are_recounted(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    with disk_engine(directory) as engine:
        engine.store(*prompt(1))
    worker = start_worker("stall", directory, "10MiB", 2, 1, 0)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "stalled").exists():
            assert worker.poll() is None, worker.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert list(directory.glob(".*.tmp"))  # the write is in flight
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=30)
    with disk_engine(directory) as engine:  # the restart
        assert not list(directory.glob(".*.tmp"))  # the dead writer's temporary file is gone
        assert engine.stats()["disk"]["removed_temp_files"] >= 1
        assert engine.stats()["disk"]["used_bytes"] == directory_bytes(directory)
        assert assert_prefix_or_miss(engine, 1) == TOKENS
        assert assert_prefix_or_miss(engine, 2) < TOKENS  # the chunk in flight is a miss
    assert_only_whole_files(directory)
