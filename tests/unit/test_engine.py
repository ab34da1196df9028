"""CacheEngine: store / lookup / retrieve over cpu and disk tiers, restarts, damage and isolation."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lmcache_core.backend import Chunk
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVLayout
from lmcache_core.serde import FORMAT_VERSION

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
CHUNK = 16
BUILTINS = "codecs,cpu,disk"


def make_kv(num_tokens: int, seed: int = 0, layout: KVLayout = LAYOUT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout.chunk_shape(num_tokens), generator=generator).to(getattr(torch, layout.dtype))


def make_tokens(num_tokens: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, 32_000, (num_tokens,), generator=generator).tolist()


def bit_equal(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


EngineFactory = Callable[..., CacheEngine]


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[EngineFactory]:
    """Engines over ``tmp_path/disk`` by default; closed at the end of the test."""
    engines: list[CacheEngine] = []

    def factory(tiers: str = "cpu", *, model_name: str = "model", model_digest: str = "0" * 16,
                layout: KVLayout = LAYOUT, tp_rank: int = 0, tp_world_size: int = 1, **env: str) -> CacheEngine:
        environ = {
            "LMCACHE_PLUGINS__ALLOW": BUILTINS,
            "LMCACHE_TIERS": tiers,
            "LMCACHE_CHUNK_SIZE": str(CHUNK),
            "LMCACHE_DISK__PATH": str(tmp_path / "disk"),
            **env,
        }
        engine = CacheEngine.from_env(model_name=model_name, model_digest=model_digest, layout=layout,
                                      tp_rank=tp_rank, tp_world_size=tp_world_size, environ=environ)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.close()


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("tiers", ["cpu", "disk", "cpu,disk"])
def test_store_lookup_retrieve_round_trip(make_engine: EngineFactory, tiers: str) -> None:
    engine = make_engine(tiers)
    tokens, kv = make_tokens(100), make_kv(100)
    assert engine.lookup(tokens) == 0 and engine.retrieve(tokens) is None
    assert engine.store(tokens, kv) == 96  # the trailing 4 tokens are not a full chunk
    assert engine.flush()
    assert engine.lookup(tokens) == 96
    assert bit_equal(engine.retrieve(tokens), kv[:, :, :96])
    assert engine.store(tokens, kv) == 0  # already stored: nothing rewritten


def test_lower_tier_serves_after_the_upper_tier_lost_everything(make_engine: EngineFactory) -> None:
    engine = make_engine("cpu,disk")
    tokens, kv = make_tokens(64), make_kv(64)
    engine.store(tokens, kv)
    assert engine.flush()
    cpu, disk = engine.stack.backends
    assert disk.contains(engine.keys(tokens)) == 4
    cpu.clear()
    assert engine.lookup(tokens) == 64
    assert bit_equal(engine.retrieve(tokens), kv)
    assert engine.stats()["disk"]["hits"] == 4
    assert cpu.contains(engine.keys(tokens)) == 4  # promoted back


def test_tokens_may_be_a_list_numpy_or_a_tensor(make_engine: EngineFactory) -> None:
    engine = make_engine()
    tokens, kv = make_tokens(48), make_kv(48)
    engine.store(torch.tensor(tokens), kv)
    assert engine.lookup(tokens) == 48
    assert engine.lookup(torch.tensor(tokens).numpy()) == 48
    assert bit_equal(engine.retrieve(torch.tensor(tokens, dtype=torch.int32)), kv)


def test_retrieve_to_a_device(make_engine: EngineFactory) -> None:
    engine = make_engine()
    tokens, kv = make_tokens(32), make_kv(32)
    engine.store(tokens, kv)
    out = engine.retrieve(tokens, device=torch.device("cpu"))
    assert out is not None and out.device.type == "cpu" and bit_equal(out, kv)


# --- partial hits -------------------------------------------------------------------------------


def test_partial_hits(make_engine: EngineFactory) -> None:
    engine = make_engine()
    tokens, kv = make_tokens(100), make_kv(100)
    assert engine.store(tokens[:48], kv[:, :, :48]) == 48
    assert engine.lookup(tokens) == 48
    assert bit_equal(engine.retrieve(tokens), kv[:, :, :48])

    diverging = tokens[:40] + make_tokens(60, seed=7)  # differs inside the third chunk
    assert engine.lookup(diverging) == 32
    assert bit_equal(engine.retrieve(diverging), kv[:, :, :32])

    assert engine.store(tokens, kv) == 48  # only chunks 3..5 are new
    assert engine.lookup(tokens) == 96
    assert engine.lookup(make_tokens(100, seed=3)) == 0


def test_kv_may_cover_only_the_first_tokens(make_engine: EngineFactory) -> None:
    engine = make_engine()
    tokens, kv = make_tokens(100), make_kv(40)
    assert engine.store(tokens, kv) == 32
    assert engine.lookup(tokens) == 32


def test_save_unfull_chunk(make_engine: EngineFactory) -> None:
    engine = make_engine(LMCACHE_SAVE_UNFULL_CHUNK="true")
    tokens, kv = make_tokens(100), make_kv(100)
    assert engine.store(tokens, kv) == 100
    assert engine.lookup(tokens) == 100
    assert bit_equal(engine.retrieve(tokens), kv)
    longer = tokens + make_tokens(10, seed=5)
    assert engine.lookup(longer) == 96  # the stored 4-token tail is not the 14-token tail asked for
    assert bit_equal(engine.retrieve(longer), kv[:, :, :96])


def test_without_save_unfull_chunk_the_tail_is_not_stored(make_engine: EngineFactory) -> None:
    engine = make_engine()
    tokens, kv = make_tokens(20), make_kv(20)
    assert engine.store(tokens, kv) == 16
    assert engine.lookup(tokens) == 16
    assert engine.store(tokens[:10], kv[:, :, :10]) == 0
    assert engine.lookup(tokens[:10]) == 0


# --- restarts -----------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import os, sys
    import torch
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_engine import LAYOUT, make_kv, make_tokens
    from lmcache_core.engine import CacheEngine

    with CacheEngine.from_env(model_name="model", model_digest="0" * 16, layout=LAYOUT) as engine:
        written = engine.store(make_tokens(200, seed=11), make_kv(200, seed=11))
    print(written)
    """
)


def test_disk_cache_survives_a_process_restart_bit_for_bit(make_engine: EngineFactory, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TEST_DIR": str(Path(__file__).parent),
        "LMCACHE_PLUGINS__ALLOW": BUILTINS,
        "LMCACHE_TIERS": "cpu,disk",
        "LMCACHE_CHUNK_SIZE": str(CHUNK),
        "LMCACHE_DISK__PATH": str(tmp_path / "disk"),
        "PYTHONHASHSEED": "123",
    }
    result = subprocess.run([sys.executable, "-c", _WRITER], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "192"

    engine = make_engine("cpu,disk")  # a new process' view: empty cpu tier, the same directory
    tokens, kv = make_tokens(200, seed=11), make_kv(200, seed=11)
    assert engine.stack.backends[1].stats()["entries"] == 12  # the index was rebuilt from the files
    assert engine.lookup(tokens) == 192
    assert bit_equal(engine.retrieve(tokens), kv[:, :, :192])


# --- damaged files ------------------------------------------------------------------------------


def chunk_file(engine: CacheEngine, tokens: list[int], index: int) -> Path:
    disk = engine.stack.backends[-1]
    path = disk.root / f"{engine.keys(tokens)[index]}.lmc"  # type: ignore[attr-defined]
    assert path.is_file()
    return path


def flip_byte(path: Path, offset_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_disk_file_is_a_miss_not_garbage(make_engine: EngineFactory) -> None:
    engine = make_engine("disk")
    tokens, kv = make_tokens(64), make_kv(64)
    engine.store(tokens, kv)
    assert engine.flush()
    flip_byte(chunk_file(engine, tokens, 2))
    out = engine.retrieve(tokens)
    assert bit_equal(out, kv[:, :, :32])  # the hit stops before the damaged chunk
    assert engine.stats()["disk"]["corrupt_entries"] == 1

    flip_byte(chunk_file(engine, tokens, 0), offset_from_end=1)
    assert engine.retrieve(tokens) is None


def test_a_corrupt_chunk_found_on_read_is_no_longer_advertised(make_engine: EngineFactory) -> None:
    """lookup() promises what retrieve() can deliver: a serving engine that plans to load a chunk
    every request and then fails to would redo the work forever."""
    engine = make_engine("disk")
    tokens, kv = make_tokens(64), make_kv(64)
    engine.store(tokens, kv)
    assert engine.flush()
    flip_byte(chunk_file(engine, tokens, 2))
    assert bit_equal(engine.retrieve(tokens), kv[:, :, :32])
    assert engine.lookup(tokens) == 32


def test_a_truncated_file_is_not_advertised_after_a_restart(make_engine: EngineFactory) -> None:
    writer = make_engine("disk")
    tokens, kv = make_tokens(64), make_kv(64)
    writer.store(tokens, kv)
    path = chunk_file(writer, tokens, 1)
    writer.close()
    path.write_bytes(path.read_bytes()[:200])

    restarted = make_engine("disk")
    assert restarted.stack.backends[0].stats()["corrupt_entries"] == 1  # seen when rebuilding the index
    assert restarted.lookup(tokens) == 16
    assert bit_equal(restarted.retrieve(tokens), kv[:, :, :16])


def test_a_newer_version_file_outlives_a_restart_and_is_never_loaded(make_engine: EngineFactory) -> None:
    """Two lmcache-core versions over one disk directory (a rolling upgrade): the older one must
    neither load the newer one's files nor delete them, and serves its own copy once stored."""
    writer = make_engine("disk")
    tokens, kv = make_tokens(64), make_kv(64)
    writer.store(tokens, kv)
    path = chunk_file(writer, tokens, 1)
    writer.close()
    newer = bytearray(path.read_bytes())
    newer[4:6] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    path.write_bytes(bytes(newer))

    restarted = make_engine("disk")
    disk = restarted.stack.backends[0]
    assert disk.stats().get("corrupt_entries", 0) == 0
    assert bit_equal(restarted.retrieve(tokens), kv[:, :, :16])
    assert disk.stats()["unsupported_entries"] == 1
    assert path.read_bytes() == newer
    assert restarted.lookup(tokens) == 16  # no longer advertised past the chunk it cannot read
    assert restarted.store(tokens, kv) == 48  # so it stores its own copy of chunks 1-3
    assert restarted.flush()
    assert bit_equal(restarted.retrieve(tokens), kv)


def test_a_chunk_of_the_wrong_shape_is_a_miss(make_engine: EngineFactory) -> None:
    engine = make_engine()
    tokens, kv = make_tokens(48), make_kv(48)
    engine.store(tokens, kv)
    cpu = engine.stack.backends[0]
    key = engine.keys(tokens)[1]
    cpu.delete([key])
    cpu.put_many([Chunk(key, torch.zeros(2, 2, CHUNK, 2, 4, dtype=torch.bfloat16), 1)])  # head_dim 4, not 8
    assert bit_equal(engine.retrieve(tokens), kv[:, :, :16])


PACKED = dataclasses.replace(LAYOUT, page_layout="cpu", block_size=8)  # 2 pages per 16-token chunk


@pytest.mark.parametrize("tiers", ["cpu", "disk"])
def test_page_packed_chunks_round_trip_whole_pages_only(make_engine: EngineFactory, tiers: str) -> None:
    engine = make_engine(tiers, layout=PACKED, LMCACHE_SAVE_UNFULL_CHUNK="true")
    tokens, kv = make_tokens(40), make_kv(40, layout=PACKED)  # 5 pages: chunks of 16, 16 and 8 tokens
    assert kv.shape == (2, 5, 2, 8, 16)
    assert engine.store(tokens, kv) == 40
    assert engine.flush()
    assert bit_equal(engine.retrieve(tokens), kv)
    assert engine.retrieve(tokens[:32]).shape == (2, 4, 2, 8, 16)


def test_a_token_major_chunk_under_a_page_packed_key_is_a_miss(make_engine: EngineFactory) -> None:
    engine = make_engine(layout=PACKED)
    tokens, kv = make_tokens(32), make_kv(32, layout=PACKED)
    engine.store(tokens, kv)
    cpu = engine.stack.backends[0]
    key = engine.keys(tokens)[1]
    cpu.delete([key])
    cpu.put_many([Chunk(key, make_kv(CHUNK), 1)])  # same element count, token-major shape
    assert bit_equal(engine.retrieve(tokens), kv[:, :2])


# --- input validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kv", "message"),
    [
        (torch.zeros(2, 2, 32, 3, 8, dtype=torch.bfloat16), r"kv must be \[layers, 2, tokens, kv_heads, head_dim\]"),
        (torch.zeros(2, 32, 2, 8, dtype=torch.bfloat16), r"got \(2, 32, 2, 8\)"),
        (torch.zeros(3, 2, 32, 2, 8, dtype=torch.bfloat16), r"\(2, 2, -1, 2, 8\)"),
        (torch.zeros(2, 2, 32, 2, 8, dtype=torch.float16), "dtype torch.float16 does not match the layout's bfloat16"),
    ],
    ids=["heads", "rank", "layers", "dtype"],
)
def test_wrong_layout_or_dtype_is_refused_clearly(make_engine: EngineFactory, kv: torch.Tensor, message: str) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match=message):
        engine.store(make_tokens(32), kv)
    assert engine.lookup(make_tokens(32)) == 0


def test_kv_longer_than_the_tokens_is_refused_clearly(make_engine: EngineFactory) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="token"):
        engine.store(make_tokens(10), make_kv(32))


# --- isolation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        {"LMCACHE_NAMESPACE": "tenant-b"},
        {"model_name": "other-model"},
        {"model_digest": "1" * 16},
        {"tp_rank": 1, "tp_world_size": 2},
        {"LMCACHE_KEY_SECRET": "tenant-secret"},
        {"LMCACHE_HASH_ALGORITHM": "xxh3_128"},
    ],
    ids=lambda other: next(iter(other)),
)
def test_other_models_and_tenants_do_not_see_each_others_chunks(make_engine: EngineFactory, other: dict) -> None:
    owner = make_engine("disk", LMCACHE_NAMESPACE="tenant-a")
    tokens, kv = make_tokens(64), make_kv(64)
    owner.store(tokens, kv)
    assert owner.flush()
    stranger = make_engine("disk", **{"LMCACHE_NAMESPACE": "tenant-a", **other})  # same directory
    assert stranger.lookup(tokens) == 0
    assert stranger.retrieve(tokens) is None
    same_scope = make_engine("disk", LMCACHE_NAMESPACE="tenant-a")
    assert same_scope.lookup(tokens) == 64  # the control: the chunks are there


def test_another_layout_does_not_see_the_chunks(make_engine: EngineFactory) -> None:
    owner = make_engine("disk")
    tokens = make_tokens(32)
    owner.store(tokens, make_kv(32))
    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
    assert make_engine("disk", layout=other).lookup(tokens) == 0


# --- fp8 on the disk tier -----------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["LMCACHE_DISK__CODEC", "LMCACHE_CODEC"])
def test_fp8_codec_on_the_disk_tier(make_engine: EngineFactory, tmp_path: Path, variable: str) -> None:
    tokens, kv = make_tokens(64), make_kv(64)
    lossy = make_engine("disk", **{variable: "fp8", "LMCACHE_DISK__PATH": str(tmp_path / "fp8")})
    exact = make_engine("disk", LMCACHE_DISK__PATH=str(tmp_path / "raw"))
    for engine in (lossy, exact):
        engine.store(tokens, kv)
    out = lossy.retrieve(tokens)
    assert out is not None and out.dtype == kv.dtype and out.shape == kv.shape
    reference = kv.float()
    channel_max = reference.abs().amax(dim=(2, 4), keepdim=True)
    assert ((out.float() - reference).abs() / channel_max).max() <= 2**-4 + 2**-8
    assert not torch.equal(out, kv)
    assert bit_equal(exact.retrieve(tokens), kv)
    fp8_bytes = sum(p.stat().st_size for p in (tmp_path / "fp8").iterdir())
    raw_bytes = sum(p.stat().st_size for p in (tmp_path / "raw").iterdir())
    assert fp8_bytes < 0.6 * raw_bytes
