"""Lossy codecs and already-quantized KV: vLLM keeps ``--kv-cache-dtype fp8`` caches as uint8, and
re-quantizing those bytes as if they were numbers corrupts them. A lossy codec must refuse them,
and an engine configured with one over such a layout must store raw bytes instead (saying so once).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lmcache_core.codecs import Fp8Codec, RawCodec, codec_accepts, get_codec
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVLayout

CHUNK = 16
FP8_CACHE = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="uint8")  # how vLLM keeps fp8 caches


def uint8_kv(num_tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, FP8_CACHE.chunk_shape(num_tokens), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.float8_e4m3fn], ids=str)
def test_fp8_codec_refuses_quantized_or_integer_kv(dtype: torch.dtype) -> None:
    kv = uint8_kv(4).view(dtype) if dtype.itemsize == 1 else uint8_kv(4).to(dtype)
    with pytest.raises(ValueError, match=f"{str(dtype).removeprefix('torch.')}"):
        Fp8Codec().encode(kv)


def test_fp8_codec_never_decodes_into_integer_kv() -> None:
    """An fp8 object claiming an integer dtype (written by an older, buggy version) is corrupt."""
    shape = FP8_CACHE.chunk_shape(4)
    payload = memoryview(bytearray(2 * 2 * 2 * 4 + 2 * 2 * 4 * 2 * 8))  # scales + one byte per value
    with pytest.raises(ValueError, match="uint8"):
        Fp8Codec().decode(payload, torch.uint8, shape)


def test_which_codecs_accept_which_dtypes() -> None:
    assert codec_accepts(RawCodec(), torch.uint8) and codec_accepts(RawCodec(), "uint8")
    assert codec_accepts(Fp8Codec(), torch.bfloat16) and codec_accepts(Fp8Codec(), "float32")
    assert not codec_accepts(Fp8Codec(), "uint8") and not codec_accepts(Fp8Codec(), torch.float8_e5m2)

    class Undeclared:  # a third-party codec that does not say whether it is lossless
        name = "mystery"

    assert not codec_accepts(Undeclared(), "uint8")  # assumed lossy: integer KV goes raw
    assert codec_accepts(Undeclared(), "bfloat16")


def engine(tmp_path: Path, layout: KVLayout, **env: str) -> CacheEngine:
    environ = {
        "LMCACHE_PLUGINS__ALLOW": "codecs,cpu,disk",
        "LMCACHE_TIERS": "disk",
        "LMCACHE_CHUNK_SIZE": str(CHUNK),
        "LMCACHE_DISK__PATH": str(tmp_path / "disk"),
        **env,
    }
    return CacheEngine.from_env(model_name="m", model_digest="0" * 16, layout=layout, environ=environ)


@pytest.mark.parametrize("variable", ["LMCACHE_CODEC", "LMCACHE_DISK__CODEC"])
def test_engine_with_fp8_codec_over_uint8_kv_stores_raw_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, variable: str
) -> None:
    tokens, kv = list(range(64)), uint8_kv(64)
    with caplog.at_level(logging.INFO, logger="lmcache_core"):
        cache = engine(tmp_path, FP8_CACHE, **{variable: "fp8"})
    with cache:
        assert cache.store(tokens, kv) == 64
        assert cache.flush()
        out = cache.retrieve(tokens)
        assert out is not None and out.dtype == torch.uint8 and torch.equal(out, kv)  # bit-exact
    lines = [record.getMessage() for record in caplog.records if "codec" in record.getMessage()]
    assert len(lines) == 1, lines
    assert variable in lines[0] and "uint8" in lines[0] and "raw" in lines[0]


def test_engine_keeps_fp8_codec_for_floating_kv(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger="lmcache_core"), engine(tmp_path, layout, LMCACHE_CODEC="fp8") as cache:
        assert [backend.codec for backend in cache.stack.backends] == ["fp8"]
    assert not [record for record in caplog.records if "codec" in record.getMessage()]


def test_get_codec_still_serves_builtins() -> None:
    assert get_codec("fp8").name == "fp8" and get_codec("raw").name == "raw"
