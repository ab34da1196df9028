"""The engine's key-level API (lookup_keys / load / save) that the vLLM connector, the CLI and the
Python API share: prefix and per-key modes, chunk validation in one place, ownership of saved
buffers, K/V factors other than 2, the stored position field, and reads that stop at the first gap."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from lmcache_core.backend import BackendContext, Chunk
from lmcache_core.engine import CacheEngine
from lmcache_core.errors import CorruptEntryError
from lmcache_core.keys import ChunkKey, KVLayout
from lmcache_core.serde import POSITION_OFFSET, decode_chunk, encode_chunk, read_header
from lmcache_core.storage import TierStack
from lmcache_core.testing.conformance import make_chunks
from lmcache_cpu.backend import CpuBackend
from lmcache_cpu.settings import CpuSettings

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32")
CHUNK = 16


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[list[CacheEngine]]:
    made: list[CacheEngine] = []
    yield made
    for engine in made:
        engine.close()


def engine(engines: list[CacheEngine], tmp_path: Path, tiers: str = "cpu", layout: KVLayout = LAYOUT) -> CacheEngine:
    environ = {"LMCACHE_PLUGINS__ALLOW": "codecs,cpu,disk", "LMCACHE_TIERS": tiers,
               "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_DISK__PATH": str(tmp_path / "disk")}
    made = CacheEngine.from_env(model_name="m", layout=layout, environ=environ)
    engines.append(made)
    return made


def kv(tokens: int, layout: KVLayout = LAYOUT, seed: int = 0) -> torch.Tensor:
    return torch.randn(layout.chunk_shape(tokens), generator=torch.Generator().manual_seed(seed))


def test_prefix_lookup_stops_at_the_first_gap_and_per_key_lookup_does_not(
    engines: list[CacheEngine], tmp_path: Path
) -> None:
    cache = engine(engines, tmp_path)
    keys = cache.keys(list(range(5 * CHUNK)))
    cache.save([Chunk(keys[i], kv(CHUNK, seed=i), i) for i in (0, 1, 3)])
    lookup = cache.lookup_keys(keys)
    assert (lookup.found, lookup.by_tier, lookup.present) == (2, {"cpu": 2}, None)
    spread = cache.lookup_keys(keys, prefix=False)
    assert spread.present == [True, True, False, True, False] and spread.found == 3
    assert spread.by_tier == {"cpu": 3}


def test_per_key_lookup_and_load_span_tiers(engines: list[CacheEngine], tmp_path: Path) -> None:
    cache = engine(engines, tmp_path, tiers="cpu,disk")
    keys = cache.keys(list(range(5 * CHUNK)))
    cache.save([Chunk(keys[i], kv(CHUNK, seed=i), i) for i in (0, 2, 4)])
    assert cache.flush()
    cache.stack.backends[0].delete([keys[0], keys[4]])  # only on disk now
    spread = cache.lookup_keys(keys, prefix=False)
    assert spread.present == [True, False, True, False, True] and spread.by_tier == {"cpu": 1, "disk": 2}
    loaded = cache.load(keys, prefix=False)
    assert [chunk is not None for chunk in loaded.chunks] == spread.present
    assert loaded.hits_by_tier == {"cpu": 1, "disk": 2}
    assert cache.lookup_keys(keys).found == 1  # prefix mode stops at the gap


def test_load_returns_validated_chunks_and_the_tiers_that_served_them(
    engines: list[CacheEngine], tmp_path: Path
) -> None:
    cache = engine(engines, tmp_path, tiers="cpu,disk")
    keys = cache.keys(list(range(4 * CHUNK)))
    stored = [Chunk(keys[i], kv(CHUNK, seed=i), i) for i in range(4)]
    cache.save(stored)
    assert cache.flush()
    cache.stack.backends[0].delete(keys[2:])  # evicted from memory, still on disk
    loaded = cache.load(keys)
    assert loaded.hits_by_tier == {"cpu": 2, "disk": 2} and loaded.num_chunks == 4
    for chunk, tensor in zip(stored, loaded.chunks, strict=True):
        assert tensor is not None and torch.equal(tensor, chunk.kv)
    assert cache.load(keys).hits_by_tier == {"cpu": 4, "disk": 0}  # the disk hits were promoted


def test_a_chunk_of_the_wrong_shape_is_a_miss_in_both_modes(engines: list[CacheEngine], tmp_path: Path) -> None:
    cache = engine(engines, tmp_path)
    keys = cache.keys(list(range(3 * CHUNK)))
    # Chunk 1 holds half a chunk of tokens: it would shift every later token's KV.
    cache.save([Chunk(keys[0], kv(CHUNK), 0), Chunk(keys[1], kv(CHUNK // 2), 1), Chunk(keys[2], kv(CHUNK), 2)])
    assert len(cache.retrieve_chunks(keys)) == 1  # was 3: the short chunk passed the layout check
    assert cache.load(keys).num_chunks == 1
    spread = cache.load(keys, prefix=False).chunks
    assert [chunk is not None for chunk in spread] == [True, False, True]


def test_a_lower_tier_is_not_read_past_the_first_gap() -> None:
    """get_prefix used to ask every lower tier for every key the upper tiers missed, so a remote tier
    sent chunks that a gap before them made useless."""
    size = make_chunks(1)[0].kv.nbytes
    upper = CpuBackend(CpuSettings(max_size=100 * size), BackendContext("upper", "raw"))
    lower = CpuBackend(CpuSettings(max_size=100 * size), BackendContext("lower", "raw"))
    stack = TierStack([upper, lower])
    try:
        chunks = make_chunks(6)
        upper.put_many([chunks[0]])
        lower.put_many([chunks[1], chunks[3], chunks[4], chunks[5]])  # chunk 2 is nowhere
        assert len(stack.get_prefix([c.key for c in chunks])) == 2
        assert lower.stats()["read_bytes"] == size  # chunk 1 only, not chunks 3..5
    finally:
        stack.close()


class VanishingCpu(CpuBackend):
    """Says it holds every stored key, but its first read misses chunk 1 (evicted in between)."""

    def __init__(self, settings: CpuSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.reads = 0

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        self.reads += 1
        found = super().get_many(keys)
        if self.reads == 1 and len(found) > 1:
            found[1] = None
        return found


def test_a_chunk_that_vanishes_between_contains_and_get_ends_the_prefix_unless_a_lower_tier_has_it() -> None:
    size = make_chunks(1)[0].kv.nbytes
    upper = VanishingCpu(CpuSettings(max_size=100 * size), BackendContext("upper", "raw"))
    lower = CpuBackend(CpuSettings(max_size=100 * size), BackendContext("lower", "raw"))
    stack = TierStack([upper, lower])
    try:
        chunks = make_chunks(4)
        upper.put_many(chunks)
        assert len(stack.get_prefix([c.key for c in chunks])) == 1  # the upper tier is not asked twice
        assert upper.reads == 1
        upper.reads = 0
        lower.put_many(chunks[1:2])
        chunks_read, hits = stack.read([c.key for c in chunks])
        assert len(chunks_read) == 4 and hits == {"upper": 3, "lower": 1}
    finally:
        stack.close()


def test_an_owned_chunk_is_kept_without_a_copy_and_a_borrowed_one_is_copied(
    engines: list[CacheEngine], tmp_path: Path
) -> None:
    cache = engine(engines, tmp_path)
    keys = cache.keys(list(range(3 * CHUNK)))
    owned, borrowed = kv(CHUNK, seed=1), kv(CHUNK, seed=2)
    pages = kv(2 * CHUNK, seed=3)  # a view into a larger buffer cannot be accounted for: copied
    cache.save([Chunk(keys[0], owned, 0, owned=True), Chunk(keys[1], borrowed, 1),
                Chunk(keys[2], pages[:, :, CHUNK:], 2, owned=True)])
    loaded = cache.load(keys).chunks
    assert loaded[0] is not None and loaded[0].data_ptr() == owned.data_ptr()
    assert loaded[1] is not None and loaded[1].data_ptr() != borrowed.data_ptr()
    assert loaded[2] is not None and loaded[2].data_ptr() != pages[:, :, CHUNK:].data_ptr()
    stats = cache.stats()["cpu"]
    assert stats["adopted_bytes"] == owned.nbytes and stats["used_bytes"] == 3 * owned.nbytes
    del owned, loaded
    cache.stack.delete(keys)
    assert cache.stats()["cpu"]["used_bytes"] == 0  # the adopted bytes return to the budget


@pytest.mark.parametrize("tiers", ["cpu", "disk"])
def test_a_layout_with_one_tensor_per_token_stores_and_loads(
    engines: list[CacheEngine], tmp_path: Path, tiers: str
) -> None:
    """MLA keeps one latent per token: chunks are [layers, 1, tokens, 1, latent]."""
    mla = KVLayout(num_layers=2, num_kv_heads=1, head_dim=24, dtype="float32", kv_factor=1)
    assert mla.chunk_shape(CHUNK) == (2, 1, CHUNK, 1, 24)
    cache = engine(engines, tmp_path, tiers=tiers, layout=mla)
    tokens = list(range(2 * CHUNK))
    latent = kv(2 * CHUNK, layout=mla)
    assert cache.store(tokens, latent) == 2 * CHUNK
    retrieved = cache.retrieve(tokens)
    assert retrieved is not None and torch.equal(retrieved, latent)
    with pytest.raises(ValueError, match="kv_factor"):
        KVLayout(2, 1, 24, "float32", kv_factor=3)


def test_the_stored_header_records_the_first_token_position_without_a_new_format_version() -> None:
    chunk = make_chunks(1)[0]
    plain = b"".join(encode_chunk(chunk.key, chunk.kv))
    placed = bytearray(b"".join(encode_chunk(chunk.key, chunk.kv, first_position=4096)))
    assert read_header(plain).first_position is None  # objects without the field (older writers)
    assert read_header(placed).first_position == 4096
    assert decode_chunk(placed, chunk.key).header.first_position == 4096
    # Only the former zero padding differs: readers that predate the field see the same object.
    assert plain[:POSITION_OFFSET] == placed[:POSITION_OFFSET] and plain[96:] == placed[96:]
    struct.pack_into("<I", placed, POSITION_OFFSET, 7)  # damaged position
    with pytest.raises(CorruptEntryError, match="position"):
        read_header(placed)


def test_the_engine_records_positions_in_byte_tiers(engines: list[CacheEngine], tmp_path: Path) -> None:
    cache = engine(engines, tmp_path, tiers="disk")
    tokens = list(range(2 * CHUNK))
    cache.store(tokens, kv(2 * CHUNK))
    disk = cache.stack.backends[0]
    positions = [read_header(Path(disk.root, f"{key}.lmc").read_bytes()).first_position for key in cache.keys(tokens)]
    assert positions == [0, CHUNK]
