"""Framed chunk objects: bit-exact raw round trips, a bounded fp8 codec, and no way for a damaged,
truncated or foreign object to decode into wrong data."""

from __future__ import annotations

import struct
import zlib

import blake3
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_core.backend import BackendContext
from lmcache_core.errors import CorruptEntryError, ForgedEntryError, UnsupportedEntryError
from lmcache_core.keys import CacheScope, ChunkHasher, KVLayout
from lmcache_core.serde import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAC_SIZE,
    MAGIC,
    decode_chunk,
    derive_mac_key,
    encode_chunk,
    encode_to_bytes,
    read_header,
)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
KEYS = ChunkHasher(CacheScope("serde", "model", "0" * 16, LAYOUT), chunk_size=4).keys(list(range(12)))
KEY, OTHER_KEY = KEYS[0], KEYS[1]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]

# The header is little-endian: magic 4s | version H | header_size H | codec 8s | ...; its CRC32 over
# the fields follows them. Tests that forge headers locate both from the documented layout.
_FIELDS_SIZE = struct.calcsize("<4sHH8sBBH6III16sQQ")
_CODEC_OFFSET = 8


def random_kv(shape: tuple[int, ...] = (2, 2, 4, 2, 8), dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 3).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    def as_bytes(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def reseal(header: bytearray) -> bytearray:
    """Recompute the header checksum after editing header fields, as a forger would."""
    header[_FIELDS_SIZE : _FIELDS_SIZE + 4] = struct.pack("<I", zlib.crc32(header[:_FIELDS_SIZE]))
    return header


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_raw_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    kv = random_kv(dtype=dtype)
    decoded = decode_chunk(encode_to_bytes(KEY, kv), KEY)
    assert same_bits(decoded.tensor, kv)
    assert decoded.header.codec == "raw" and decoded.header.dtype == dtype


def test_raw_keeps_nan_inf_and_negative_zero_bits() -> None:
    kv = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40], dtype=torch.float32)
    assert same_bits(decode_chunk(encode_to_bytes(KEY, kv), KEY).tensor, kv)


@settings(deadline=None, max_examples=60)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=6).map(tuple),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
def test_raw_round_trip_any_shape(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
    kv = random_kv(shape, dtype, seed)
    decoded = decode_chunk(encode_to_bytes(KEY, kv), KEY)
    assert same_bits(decoded.tensor, kv)


def test_non_contiguous_input_is_encoded_by_value() -> None:
    kv = random_kv((2, 2, 8, 2, 8))[:, :, ::2]
    assert not kv.is_contiguous()
    assert same_bits(decode_chunk(encode_to_bytes(KEY, kv), KEY).tensor, kv.contiguous())


def test_header_fields_round_trip() -> None:
    kv = random_kv((2, 2, 4, 2, 8))
    data = encode_to_bytes(KEY, kv, chunk_index=7, num_tokens=3)
    header = read_header(data)
    assert (header.chunk_index, header.num_tokens) == (7, 3)
    assert header.shape == (2, 2, 4, 2, 8) and header.dtype == torch.bfloat16
    assert header.total_size == len(data) == HEADER_SIZE + kv.nbytes
    assert decode_chunk(data, KEY).header == header
    assert read_header(encode_to_bytes(KEY, kv)).num_tokens == 4  # defaults to the tokens dimension


def test_encode_returns_buffers_for_a_vectored_write() -> None:
    kv = random_kv()
    parts = encode_chunk(KEY, kv)
    assert all(isinstance(part, memoryview) for part in parts)
    assert parts[0].nbytes == HEADER_SIZE and b"".join(parts) == encode_to_bytes(KEY, kv)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [(torch.zeros(4, dtype=torch.int64), "dtype"), (torch.zeros((1,) * 7), "dimensions")],
)
def test_unsupported_tensors_are_refused_when_encoding(tensor: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_chunk(KEY, tensor)


# --- input buffers ------------------------------------------------------------------------------


def test_readonly_bytes_decode_through_a_copy() -> None:
    kv = random_kv()
    data = encode_to_bytes(KEY, kv)
    assert isinstance(data, bytes)
    for readonly in (data, memoryview(data)):
        tensor = decode_chunk(readonly, KEY).tensor
        assert same_bits(tensor, kv)
        tensor.zero_()  # the copy is ours to modify; the stored bytes are untouched
        assert same_bits(decode_chunk(data, KEY).tensor, kv)


def test_writable_buffers_decode_without_a_copy() -> None:
    kv = random_kv()
    buffer = bytearray(encode_to_bytes(KEY, kv))
    tensor = decode_chunk(buffer, KEY).tensor
    assert same_bits(tensor, kv)
    buffer[HEADER_SIZE] ^= 0xFF  # the tensor is a view of the buffer
    assert not same_bits(tensor, kv)


# --- fp8 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fp8_error_is_within_e4m3_bound_per_channel(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    # channels with very different magnitudes: a per-tensor scale would fail this
    magnitude = 10.0 ** torch.randint(-3, 4, (3, 2, 1, 4, 1), generator=generator)
    kv = (torch.randn((3, 2, 16, 4, 32), generator=generator) * magnitude).to(dtype)
    decoded = decode_chunk(encode_to_bytes(KEY, kv, codec="fp8"), KEY)
    assert decoded.header.codec == "fp8"
    out, ref = decoded.tensor, kv.float()
    assert out.dtype == dtype and out.shape == kv.shape
    error = (out.float() - ref).abs()
    amax = ref.abs().amax(dim=(2, 4), keepdim=True)
    scale = amax / 448.0
    # e4m3 keeps 3 mantissa bits: rounding costs at most 2^-4 of the value (normal range) or half
    # the 2^-9 subnormal step (times the channel scale); the output dtype rounds once more.
    output_rounding = torch.finfo(dtype).eps / 2
    bound = (2.0**-4 + output_rounding * 1.07) * ref.abs() + scale * 2.0**-10
    assert torch.all(error <= bound * 1.0001), float((error / bound).max())
    per_channel = (error.amax(dim=(2, 4), keepdim=True) / amax).max()
    assert per_channel <= 2.0**-4 + output_rounding * 1.07
    assert not torch.equal(out, kv)  # lossy: this really went through fp8


def test_fp8_halves_bf16_payloads() -> None:
    kv = random_kv((4, 2, 256, 8, 128), torch.bfloat16)
    raw, fp8 = encode_to_bytes(KEY, kv), encode_to_bytes(KEY, kv, codec="fp8")
    raw_payload, fp8_payload = len(raw) - HEADER_SIZE, len(fp8) - HEADER_SIZE
    assert fp8_payload == kv.numel() + 4 * 2 * 8 * 4  # one byte per value + a float32 scale per channel
    assert 0.49 < fp8_payload / raw_payload < 0.51


def test_fp8_zero_channel_stays_zero() -> None:
    kv = random_kv((2, 2, 4, 2, 8))
    kv[1, 0, :, 1] = 0
    out = decode_chunk(encode_to_bytes(KEY, kv, codec="fp8"), KEY).tensor
    assert torch.all(out[1, 0, :, 1] == 0) and torch.isfinite(out.float()).all()


def test_fp8_refuses_a_tensor_that_is_not_in_chunk_layout() -> None:
    with pytest.raises(ValueError, match="layers, 2, tokens"):
        encode_chunk(KEY, torch.zeros(4, 4), codec="fp8")


# --- damaged and foreign objects ----------------------------------------------------------------

_ENCODED = {
    "raw": encode_to_bytes(KEY, random_kv(seed=5), chunk_index=2),
    "fp8": encode_to_bytes(KEY, random_kv(seed=5), codec="fp8", chunk_index=2),
}
_DECODED = {codec: decode_chunk(data, KEY).tensor for codec, data in _ENCODED.items()}


def _never_wrong(data: bytes | bytearray, codec: str) -> None:
    """Decoding either fails with the typed error or yields exactly the original chunk."""
    try:
        decoded = decode_chunk(bytes(data), KEY)
    except CorruptEntryError:
        return
    assert same_bits(decoded.tensor, _DECODED[codec])


_slow_ok = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_slow_ok
@given(codec=st.sampled_from(sorted(_ENCODED)), position=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_any_single_byte_corruption_never_decodes_into_wrong_data(codec: str, position: int, flip: int) -> None:
    damaged = bytearray(_ENCODED[codec])
    damaged[position % len(damaged)] ^= flip
    _never_wrong(damaged, codec)


@_slow_ok
@given(codec=st.sampled_from(sorted(_ENCODED)), length=st.integers(0, 10**6))
def test_truncation_never_decodes(codec: str, length: int) -> None:
    data = _ENCODED[codec]
    with pytest.raises(CorruptEntryError):
        decode_chunk(data[: length % len(data)], KEY)


@_slow_ok
@given(codec=st.sampled_from(sorted(_ENCODED)), tail=st.binary(min_size=1, max_size=300))
def test_extension_never_decodes(codec: str, tail: bytes) -> None:
    with pytest.raises(CorruptEntryError):
        decode_chunk(_ENCODED[codec] + tail, KEY)


@_slow_ok
@given(data=st.binary(max_size=2 * HEADER_SIZE), prefix_magic=st.booleans())
def test_arbitrary_bytes_never_decode(data: bytes, prefix_magic: bool) -> None:
    with pytest.raises(CorruptEntryError):
        decode_chunk((MAGIC + data) if prefix_magic else data, KEY)


@pytest.mark.parametrize("codec", sorted(_ENCODED))
def test_each_byte_of_header_and_payload_is_protected(codec: str) -> None:
    """Exhaustive over positions: flipping any byte that carries meaning is detected."""
    data = _ENCODED[codec]
    meaningful = [*range(_FIELDS_SIZE + 4), *range(HEADER_SIZE, len(data))]
    for position in meaningful:
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(CorruptEntryError):
            decode_chunk(damaged, KEY)


def test_object_for_another_key_is_refused() -> None:
    data = _ENCODED["raw"]
    with pytest.raises(CorruptEntryError, match="another key"):
        decode_chunk(data, OTHER_KEY)
    with pytest.raises(CorruptEntryError, match="another key"):
        decode_chunk(data, str(OTHER_KEY))
    assert same_bits(decode_chunk(data, str(KEY)).tensor, _DECODED["raw"])  # the key string works too


def test_codec_not_installed_here_is_an_unsupported_entry() -> None:
    header = bytearray(_ENCODED["raw"][:HEADER_SIZE])
    header[_CODEC_OFFSET : _CODEC_OFFSET + 8] = b"zstd9".ljust(8, b"\0")
    forged = bytes(reseal(header)) + _ENCODED["raw"][HEADER_SIZE:]
    assert read_header(forged).codec == "zstd9"  # the header itself is well-formed
    with pytest.raises(UnsupportedEntryError, match="zstd9"):
        decode_chunk(forged, KEY)


def test_other_format_version_is_an_unsupported_entry_whatever_its_header_holds() -> None:
    """A newer version may lay its header out differently, so nothing after the version field is
    checked: not even the header checksum, which sits where version 1 puts it."""
    header = bytearray(_ENCODED["raw"][:HEADER_SIZE])
    header[4:6] = struct.pack("<H", FORMAT_VERSION + 1)
    header[40:] = bytes(range(HEADER_SIZE - 40))
    with pytest.raises(UnsupportedEntryError, match=f"version {FORMAT_VERSION + 1}"):
        decode_chunk(bytes(header) + _ENCODED["raw"][HEADER_SIZE:], KEY)


def test_damaged_objects_are_corrupt_not_unsupported() -> None:
    """Only another version, or a codec named under an intact header checksum, makes an object
    unsupported (kept for other readers); damage anywhere but the version field stays a corrupt
    entry, which tiers delete."""
    data = _ENCODED["raw"]
    for position in [0, *range(6, _FIELDS_SIZE + 4), HEADER_SIZE, len(data) - 1]:
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(CorruptEntryError) as raised:
            decode_chunk(damaged, KEY)
        assert not isinstance(raised.value, UnsupportedEntryError), position


def test_checksum_can_be_skipped_only_on_request() -> None:
    damaged = bytearray(_ENCODED["raw"])
    damaged[-1] ^= 0x01
    with pytest.raises(CorruptEntryError, match="checksum"):
        decode_chunk(damaged, KEY)
    assert decode_chunk(damaged, KEY, verify_checksum=False).tensor.shape == _DECODED["raw"].shape


# --- authenticated objects (LMCACHE_KEY_SECRET) -------------------------------------------------

MAC_KEY = derive_mac_key("serde-test-secret")
_FLAGS_OFFSET = struct.calcsize("<4sHH8sBB")  # the former reserved field
_CHUNK_INDEX_OFFSET = struct.calcsize("<4sHH8sBBH6II")
_ENCODED_PLAIN = encode_to_bytes(KEY, random_kv())


def test_authenticated_round_trip_is_bit_exact_and_carries_its_mac() -> None:
    kv = random_kv()
    data = encode_to_bytes(KEY, kv, mac_key=MAC_KEY)
    header = read_header(data)
    assert header.mac is not None and len(header.mac) == MAC_SIZE and any(header.mac)
    assert read_header(_ENCODED["raw"]).mac is None
    assert same_bits(decode_chunk(data, KEY, mac_key=MAC_KEY).tensor, kv)


def test_readers_without_a_secret_still_verify_and_read_authenticated_objects() -> None:
    """The MAC lives in header space that version-1 readers never read: same format version, and
    the payload checksum is still written for readers that cannot check the MAC."""
    kv = random_kv()
    data = encode_to_bytes(KEY, kv, mac_key=MAC_KEY)
    assert struct.unpack_from("<H", data, 4)[0] == FORMAT_VERSION == 1
    assert data[:_FLAGS_OFFSET] == _ENCODED_PLAIN[:_FLAGS_OFFSET]
    assert same_bits(decode_chunk(data, KEY).tensor, kv)
    damaged = bytearray(data)
    damaged[-1] ^= 0x01
    with pytest.raises(CorruptEntryError, match="checksum"):
        decode_chunk(damaged, KEY)


def test_unauthenticated_object_is_forged_when_a_secret_is_set() -> None:
    with pytest.raises(ForgedEntryError, match="no MAC"):
        decode_chunk(_ENCODED_PLAIN, KEY, mac_key=MAC_KEY)


def test_object_authenticated_under_another_secret_is_forged() -> None:
    data = encode_to_bytes(KEY, random_kv(), mac_key=derive_mac_key("another tenant's secret"))
    with pytest.raises(ForgedEntryError, match="MAC does not match"):
        decode_chunk(data, KEY, mac_key=MAC_KEY)


def test_forged_mac_over_edited_header_fields_is_refused() -> None:
    """Someone without the secret edits a field and fixes the CRC, as for unkeyed objects."""
    kv = random_kv()
    data = bytearray(encode_to_bytes(KEY, kv, mac_key=MAC_KEY, chunk_index=1))
    data[_CHUNK_INDEX_OFFSET : _CHUNK_INDEX_OFFSET + 4] = struct.pack("<I", 0)  # claim to be the first chunk
    forged = bytes(reseal(data[:HEADER_SIZE])) + bytes(data[HEADER_SIZE:])
    read_header(forged)  # well-formed
    with pytest.raises(ForgedEntryError):
        decode_chunk(forged, KEY, mac_key=MAC_KEY)


def test_damage_under_a_secret_is_corrupt_not_forged() -> None:
    """A flipped payload bit also breaks the checksum: counted as damage, not as an attack."""
    damaged = bytearray(encode_to_bytes(KEY, random_kv(), mac_key=MAC_KEY))
    damaged[HEADER_SIZE + 3] ^= 0x10
    with pytest.raises(CorruptEntryError, match="checksum") as raised:
        decode_chunk(damaged, KEY, mac_key=MAC_KEY)
    assert not isinstance(raised.value, ForgedEntryError)


def test_every_byte_of_an_authenticated_object_is_protected() -> None:
    """With a secret even the zero padding and the MAC itself are covered: no byte can change."""
    data = encode_to_bytes(KEY, random_kv(), codec="fp8", mac_key=MAC_KEY)
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x80
        with pytest.raises(CorruptEntryError):
            decode_chunk(damaged, KEY, mac_key=MAC_KEY)


def test_the_mac_is_checked_even_when_the_checksum_is_skipped() -> None:
    with pytest.raises(ForgedEntryError):
        decode_chunk(_ENCODED_PLAIN, KEY, mac_key=MAC_KEY, verify_checksum=False)


def test_unknown_header_flags_are_an_unsupported_entry() -> None:
    header = bytearray(_ENCODED_PLAIN[:HEADER_SIZE])
    header[_FLAGS_OFFSET : _FLAGS_OFFSET + 2] = struct.pack("<H", 0x0002)
    with pytest.raises(UnsupportedEntryError, match="flags"):
        decode_chunk(bytes(reseal(header)) + _ENCODED_PLAIN[HEADER_SIZE:], KEY)


def test_mac_key_is_its_own_derivation_of_the_secret() -> None:
    """Neither the secret nor the key-hashing key (keys.py: a plain BLAKE3 hash of the secret)."""
    secret = b"serde-test-secret"
    assert derive_mac_key(secret) == MAC_KEY and len(MAC_KEY) == 32
    assert MAC_KEY not in (secret, blake3.blake3(secret).digest())
    assert derive_mac_key(b"another") != MAC_KEY
    with pytest.raises(ValueError, match="32 bytes"):
        encode_chunk(KEY, random_kv(), mac_key=b"too short")


def test_backend_context_never_shows_the_mac_key() -> None:
    context = BackendContext("disk", "raw", mac_key=MAC_KEY)
    assert MAC_KEY.hex() not in repr(context) and repr(MAC_KEY) not in repr(context)
