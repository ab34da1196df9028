"""Input rows of the fault matrix: fuzzing the framed-object decoder (docs/security.md).

Whatever bytes a store hands back, :func:`decode_chunk` either returns exactly the tensor that was
encoded for that key or raises :class:`CorruptEntryError` (or a subclass): never another exception,
never other data. Random damage (bit flips, truncation, extension, random header fields, random
bytes, objects for other keys) is caught without a secret too. A deliberate forgery, which
recomputes the unkeyed checksums, can only be caught with ``LMCACHE_KEY_SECRET``: with the MAC key
every modified object and every object authenticated under another secret is refused.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_core.errors import CorruptEntryError, ForgedEntryError
from lmcache_core.keys import CacheScope, ChunkHasher, ChunkKey, KVLayout
from lmcache_core.serde import HEADER_SIZE, MAGIC, decode_chunk, derive_mac_key, encode_to_bytes

pytestmark = pytest.mark.faults

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
HASHER = ChunkHasher(CacheScope("fuzz", "model", "0" * 16, LAYOUT), chunk_size=4)
KEY = HASHER.keys(list(range(4)))[0]
MAC_KEY = derive_mac_key("fuzz-secret")
FIELDS = struct.Struct("<4sHH8sBBH6III16sQQ")  # the documented version-1 header layout
_FIELD_CODES = ["4s", "H", "H", "8s", "B", "B", "H", *"IIIIII", "I", "I", "16s", "Q", "Q"]
REPO = Path(__file__).resolve().parents[2]

KV = (torch.randn((2, 2, 4, 2, 8), generator=torch.Generator().manual_seed(7)) * 3).bfloat16()
ORIGINALS = {  # (codec, authenticated) -> encoded object
    (codec, authenticated): encode_to_bytes(KEY, KV, codec=codec, chunk_index=3,
                                            mac_key=MAC_KEY if authenticated else None)
    for codec in ("raw", "fp8") for authenticated in (False, True)
}
EXPECTED = {variant: decode_chunk(data, KEY).tensor for variant, data in ORIGINALS.items()}
VARIANTS = sorted(ORIGINALS)

fuzz = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def decode_or_none(data: bytes, key: ChunkKey | str = KEY, mac_key: bytes | None = None) -> torch.Tensor | None:
    """The decoded tensor, or None for the typed error. Any other exception fails the test."""
    try:
        return decode_chunk(data, key, mac_key=mac_key).tensor
    except CorruptEntryError:
        return None


def check_modified(variant: tuple[str, bool], modified: bytes) -> None:
    """The rule for a modified object: never other data; with the secret, only the unmodified
    authenticated object is accepted."""
    unchanged = modified == ORIGINALS[variant]
    _, authenticated = variant
    plain = decode_or_none(modified)
    if unchanged:
        assert plain is not None
    if plain is not None:
        assert same_bits(plain, EXPECTED[variant]), "damage decoded into other data"
    with_secret = decode_or_none(modified, mac_key=MAC_KEY)
    if authenticated and unchanged:
        assert with_secret is not None and same_bits(with_secret, EXPECTED[variant])
    else:
        assert with_secret is None, "an unauthenticated or modified object passed the MAC check"


def reseal(header: bytearray) -> bytearray:
    """Recompute the header CRC, as a forger (not random damage) would."""
    header[FIELDS.size : FIELDS.size + 4] = struct.pack("<I", zlib.crc32(header[: FIELDS.size]))
    return header


@fuzz
@given(variant=st.sampled_from(VARIANTS), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)),
                                                          min_size=1, max_size=8))
def test_bit_flips(variant: tuple[str, bool], flips: list[tuple[int, int]]) -> None:
    data = bytearray(ORIGINALS[variant])
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    check_modified(variant, bytes(data))


@fuzz
@given(variant=st.sampled_from(VARIANTS), length=st.integers(0, 10**6))
def test_truncations_never_decode(variant: tuple[str, bool], length: int) -> None:
    data = ORIGINALS[variant]
    truncated = data[: length % len(data)]
    assert decode_or_none(truncated) is None
    assert decode_or_none(truncated, mac_key=MAC_KEY) is None


@fuzz
@given(variant=st.sampled_from(VARIANTS), tail=st.binary(min_size=1, max_size=512))
def test_extensions_never_decode(variant: tuple[str, bool], tail: bytes) -> None:
    extended = ORIGINALS[variant] + tail
    assert decode_or_none(extended) is None
    assert decode_or_none(extended, mac_key=MAC_KEY) is None


@fuzz
@given(
    variant=st.sampled_from(VARIANTS),
    start=st.integers(0, 10**6),
    replacement=st.binary(min_size=1, max_size=64),
)
def test_spliced_random_bytes(variant: tuple[str, bool], start: int, replacement: bytes) -> None:
    data = bytearray(ORIGINALS[variant])
    start %= len(data)
    data[start : start + len(replacement)] = replacement[: len(data) - start]
    check_modified(variant, bytes(data))


@fuzz
@given(
    variant=st.sampled_from(VARIANTS),
    field=st.integers(0, 17),  # FIELDS unpacks into 18 values
    entropy=st.binary(min_size=32, max_size=32),
    resealed=st.booleans(),
)
def test_header_field_replaced_by_a_random_value(
    variant: tuple[str, bool], field: int, entropy: bytes, resealed: bool
) -> None:
    """Random values in any header field. Unresealed, the CRC catches it; resealed, it is a
    forgery: without the secret it must still only ever raise the typed error (wrong data is
    then possible by design, e.g. another dtype of the same size, and the engine's layout check
    is what stops it); with the secret it is refused."""
    data = ORIGINALS[variant]
    values = list(FIELDS.unpack_from(data))
    assert len(values) == 18
    old = values[field]
    if isinstance(old, bytes):
        values[field] = entropy[: len(old)]
    else:
        size = struct.calcsize("<" + _FIELD_CODES[field])
        values[field] = int.from_bytes(entropy[:size], "little")
    header = bytearray(data[:HEADER_SIZE])
    header[: FIELDS.size] = FIELDS.pack(*values)
    if resealed:
        reseal(header)
    modified = bytes(header) + data[HEADER_SIZE:]
    _, authenticated = variant
    if not resealed:
        check_modified(variant, modified)
        return
    decode_or_none(modified)  # no crash other than the typed error
    if authenticated and modified != data:
        assert decode_or_none(modified, mac_key=MAC_KEY) is None


@fuzz
@given(data=st.binary(max_size=3 * HEADER_SIZE), prefix=st.sampled_from([b"", MAGIC, MAGIC + b"\x01\x00"]))
def test_random_bytes_never_decode(data: bytes, prefix: bytes) -> None:
    assert decode_or_none(prefix + data) is None
    assert decode_or_none(prefix + data, mac_key=MAC_KEY) is None


@fuzz
@given(variant=st.sampled_from(VARIANTS), payload=st.data())
def test_valid_header_over_a_random_payload_never_decodes(variant: tuple[str, bool], payload: st.DataObject) -> None:
    data = ORIGINALS[variant]
    random_payload = payload.draw(st.binary(min_size=len(data) - HEADER_SIZE, max_size=len(data) - HEADER_SIZE))
    modified = data[:HEADER_SIZE] + random_payload
    check_modified(variant, modified)
    if modified != data:
        assert decode_or_none(modified) is None  # the checksum alone catches a random payload


@fuzz
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
    authenticated=st.booleans(),
)
def test_objects_for_other_keys_never_decode(tokens: list[int], authenticated: bool) -> None:
    other = HASHER.keys(tokens)[0]
    if other == KEY:
        return
    mac_key = MAC_KEY if authenticated else None
    data = encode_to_bytes(other, KV, mac_key=mac_key)  # valid, even authenticated, but for another key
    assert decode_or_none(data) is None
    assert decode_or_none(data, mac_key=MAC_KEY) is None
    assert decode_or_none(data, key=other, mac_key=mac_key) is not None


@fuzz
@given(secret=st.binary(min_size=1, max_size=64), codec=st.sampled_from(["raw", "fp8"]))
def test_objects_under_another_secret_are_forged(secret: bytes, codec: str) -> None:
    if derive_mac_key(secret) == MAC_KEY:
        return
    data = encode_to_bytes(KEY, KV, codec=codec, mac_key=derive_mac_key(secret))
    with pytest.raises(ForgedEntryError):
        decode_chunk(data, KEY, mac_key=MAC_KEY)


ATHERIS_RUNS = 30_000  # about 10 s here; fixed runs and seed, so a failure reproduces


@pytest.mark.skipif(sys.platform != "linux", reason="atheris (libFuzzer) is installed on Linux only (test extra)")
def test_coverage_guided_fuzzing_finds_nothing(tmp_path: Path) -> None:
    """A bounded atheris run of tests/fuzz/fuzz_decoder.py (see its docstring for what it checks)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fuzz" / "fuzz_decoder.py"), str(tmp_path / "corpus"),
         f"-runs={ATHERIS_RUNS}", "-seed=1", "-max_len=2048", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Done {ATHERIS_RUNS} runs" in result.stderr
