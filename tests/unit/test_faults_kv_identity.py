"""Fault matrix, KV identity: objects in a shared store that were written for other KV bytes (another
fp8 format, or by a version whose fp8 codec re-quantized uint8 caches) are misses, never loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lmcache_core.codecs import Fp8Codec
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import CacheScope, KVLayout
from lmcache_core.plugins import load_registry
from lmcache_core.serde import encode_chunk
from lmcache_core.settings import load_settings

pytestmark = pytest.mark.faults

CHUNK = 16
FP8_CACHE = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="uint8")
TOKENS = list(range(2 * CHUNK))


def disk_engine(tmp_path: Path, kv_format: str, **env: str) -> CacheEngine:
    environ = {"LMCACHE_PLUGINS__ALLOW": "codecs,cpu,disk", "LMCACHE_TIERS": "disk",
               "LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_DISK__PATH": str(tmp_path / "shared"), **env}
    registry = load_registry(environ)
    scope = CacheScope("default", "m", "0" * 16, FP8_CACHE, kv_format=kv_format)
    return CacheEngine(load_settings(registry, environ), registry, scope)


def uint8_kv(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, FP8_CACHE.chunk_shape(2 * CHUNK), generator=generator, dtype=torch.uint8)


def test_kv_of_another_fp8_format_in_a_shared_directory_is_a_miss(tmp_path: Path) -> None:
    with disk_engine(tmp_path, "fp8_e5m2") as writer, disk_engine(tmp_path, "fp8_e4m3") as reader:
        writer.store(TOKENS, uint8_kv(1))
        assert writer.flush() and writer.lookup(TOKENS) == 2 * CHUNK
        assert reader.lookup(TOKENS) == 0 and reader.retrieve(TOKENS) is None
        assert reader.stats()["disk"]["hits"] == 0


@dataclasses.dataclass
class RequantizingFp8:
    """What the fp8 codec did before it refused integer KV: quantize the bytes as numbers."""

    name: str = "fp8"

    def encode(self, tensor: torch.Tensor) -> list[memoryview]:
        return Fp8Codec().encode(tensor.float())

    def decode(self, payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


def test_an_fp8_object_claiming_uint8_kv_is_a_counted_miss(tmp_path: Path) -> None:
    with disk_engine(tmp_path, "fp8_e4m3") as engine:
        (key,) = engine.keys(TOKENS[:CHUNK])
        planted = encode_chunk(key, uint8_kv(2)[:, :, :CHUNK], codec=RequantizingFp8())  # type: ignore[arg-type]
        disk = engine.stack.backends[0]
        disk._write_blobs([(str(key), planted)])
        assert engine.retrieve(TOKENS) is None
        assert disk.counters["corrupt_entries"] == 1
        assert engine.lookup(TOKENS) == 0  # deleted as unusable: the next store writes a good copy
