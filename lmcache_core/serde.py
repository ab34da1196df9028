"""Framed, self-describing chunk objects: a fixed binary header followed by the codec's payload.

Every object that leaves process memory (disk files, redis values, S3 objects) uses this format,
so any instance can verify what another one wrote. Decoding checks, in order: magic, format
version, header checksum, codec, dtype, shape, the digest of the key the reader asked for, the
payload length and the payload checksum. Any mismatch raises :class:`CorruptEntryError`, which the
engine turns into a cache miss. An object in another format version or with a codec that is not
installed raises its subclass :class:`UnsupportedEntryError`: also a miss, but tiers keep it for the
instances that can read it (a rolling upgrade over a shared store). Nothing here ever unpickles.

The digest and the checksums are unkeyed: they catch damage and misplaced objects, not someone who
can write the store. With ``LMCACHE_KEY_SECRET`` set, writers also put a keyed BLAKE3 MAC over the
header and the payload into the header, and readers given the MAC key (:func:`derive_mac_key`)
accept only objects whose MAC matches: anything else raises :class:`ForgedEntryError`, a miss too.
The MAC then replaces the payload checksum on reads, so the payload is hashed once. Readers without
a secret ignore the MAC (they have nothing to check it with), as do readers from before the MAC
existed: it lives in header space they never read, so the format version is still 1 and old and
new instances keep sharing a store (docs/security.md).

Header layout (little-endian, 128 bytes)::

    magic 4s | version H | header_size H | codec 8s | dtype B | ndim B | flags H
    shape 6I | num_tokens I | chunk_index I | key_digest 16s | payload_len Q | payload_xxh3 Q
    header_crc32 I | first_position I | position_crc32 I | mac 32s (zero without FLAG_MAC)

``flags`` was a zero "reserved" field before the MAC; an object with a flag this version does not
know is unsupported (a later version's meaning, kept for its readers). The CRC covers bytes 0-83,
the MAC covers bytes 0-95 and the payload.

``first_position`` (bytes 88-91) is the token position the chunk's first token was computed at,
plus one; 0 means "not recorded" (objects written before the field existed, or by a caller that did
not say). ``position_crc32`` covers bytes 0-91 when a position is recorded. Bytes 88-95 were zero
padding that readers never looked at, so the format version is still 1: older readers read new
objects and ignore the field, newer readers read old objects as "position not recorded".
"""

from __future__ import annotations

import hmac
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b

import blake3
import torch
import xxhash

from lmcache_core.codecs import BUILTIN_CODECS, Codec, get_codec
from lmcache_core.errors import CorruptEntryError, ForgedEntryError, UnsupportedEntryError
from lmcache_core.keys import ChunkKey

MAGIC = b"LMC1"
FORMAT_VERSION = 1
HEADER_SIZE = 128
MAX_DIMS = 6
_FIELDS = struct.Struct("<4sHH8sBBH6III16sQQ")
_CRC = struct.Struct("<I")
_VERSION = struct.Struct("<H")
POSITION_OFFSET = 88
_POSITION = struct.Struct("<II")  # first_position + 1, crc32 of bytes 0-91
MAC_OFFSET = 96
MAC_SIZE = 32
FLAG_MAC = 0x0001  # the object carries a MAC at MAC_OFFSET
_KNOWN_FLAGS = FLAG_MAC
# Distinct from keys.py's key-hashing key (a plain BLAKE3 hash of the secret): learning one of the
# two derived keys tells nothing about the other.
_MAC_KEY_CONTEXT = "lmcache-core 2026-12-02 chunk object MAC v1"

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.uint8: 6,
    torch.int8: 7,
    torch.float64: 8,
}
_DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


def key_digest(key: ChunkKey | str) -> bytes:
    """16-byte digest of the full key string, stored in the header to catch foreign objects."""
    return blake2b(str(key).encode(), digest_size=16).digest()


def derive_mac_key(secret: bytes | str) -> bytes:
    """The 32-byte key that authenticates objects, derived from ``LMCACHE_KEY_SECRET``."""
    material = secret.encode() if isinstance(secret, str) else secret
    return blake3.blake3(material, derive_key_context=_MAC_KEY_CONTEXT).digest()


def _object_mac(mac_key: bytes, header: memoryview, payload: Sequence[memoryview]) -> bytes:
    """Keyed BLAKE3 over the header up to the MAC field and the payload, streamed (no copy)."""
    hasher = blake3.blake3(key=mac_key)
    hasher.update(header[:MAC_OFFSET])
    for part in payload:
        hasher.update(part)
    return hasher.digest(MAC_SIZE)


@dataclass(frozen=True)
class ChunkHeader:
    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    num_tokens: int
    chunk_index: int
    key_digest: bytes
    payload_len: int
    payload_checksum: int
    mac: bytes | None = None  # None: the writer had no key secret
    first_position: int | None = None  # None: not recorded

    @property
    def total_size(self) -> int:
        return HEADER_SIZE + self.payload_len


@dataclass(frozen=True)
class DecodedChunk:
    tensor: torch.Tensor
    header: ChunkHeader


def encode_chunk(
    key: ChunkKey,
    tensor: torch.Tensor,
    *,
    codec: str | Codec = "raw",
    num_tokens: int | None = None,
    chunk_index: int = 0,
    mac_key: bytes | None = None,
    codecs: Mapping[str, Codec] = BUILTIN_CODECS,
    first_position: int | None = None,
) -> list[memoryview]:
    """Encode ``tensor`` for ``key``: returns [header, payload...] buffers, ready for a vectored write.

    ``codec`` is a codec, or a name looked up in ``codecs`` (a registry's, or the built-in ones).
    ``first_position``: the token position the chunk's first token was computed at, if known.

    With ``mac_key`` (see :func:`derive_mac_key`) the object is authenticated. The payload
    checksum is written either way, so readers without the secret can still verify it.
    The payload buffers may share memory with ``tensor``; do not modify it until they are written.
    """
    if mac_key is not None and len(mac_key) != MAC_SIZE:
        raise ValueError(f"mac_key must be {MAC_SIZE} bytes (use derive_mac_key), got {len(mac_key)}")
    if tensor.dtype not in DTYPE_CODES:
        raise ValueError(f"cannot store dtype {tensor.dtype}; supported: {sorted(map(str, DTYPE_CODES))}")
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"cannot store a tensor with more than {MAX_DIMS} dimensions")
    codec_impl = get_codec(codec, codecs) if isinstance(codec, str) else codec
    payload = codec_impl.encode(tensor.detach().cpu().contiguous())
    checksum = xxhash.xxh3_64()
    payload_len = 0
    for part in payload:
        checksum.update(part)
        payload_len += part.nbytes
    shape = tuple(tensor.shape)
    tokens = num_tokens if num_tokens is not None else (shape[2] if len(shape) > 2 else 0)
    fields = _FIELDS.pack(
        MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        codec_impl.name.encode().ljust(8, b"\0"),
        DTYPE_CODES[tensor.dtype],
        len(shape),
        FLAG_MAC if mac_key is not None else 0,
        *(shape + (0,) * (MAX_DIMS - len(shape))),
        tokens,
        chunk_index,
        key_digest(key),
        payload_len,
        checksum.intdigest(),
    )
    header = bytearray(HEADER_SIZE)
    header[: len(fields)] = fields
    header[len(fields) : len(fields) + _CRC.size] = _CRC.pack(zlib.crc32(fields))
    if first_position is not None:
        if not 0 <= first_position < 2**32 - 1:
            raise ValueError(f"first_position must be in [0, {2**32 - 2}], got {first_position}")
        struct.pack_into("<I", header, POSITION_OFFSET, first_position + 1)
        struct.pack_into("<I", header, POSITION_OFFSET + 4, zlib.crc32(header[: POSITION_OFFSET + 4]))
    if mac_key is not None:
        header[MAC_OFFSET:] = _object_mac(mac_key, memoryview(header), payload)
    return [memoryview(header), *payload]


def encode_to_bytes(key: ChunkKey, tensor: torch.Tensor, **kwargs: object) -> bytes:
    """Encode into one contiguous ``bytes`` object (for clients that need a single value)."""
    return b"".join(encode_chunk(key, tensor, **kwargs))  # type: ignore[arg-type]


def read_header(data: bytes | bytearray | memoryview) -> ChunkHeader:
    """Parse and verify the header at the start of ``data``."""
    view = memoryview(data)
    if view.nbytes < HEADER_SIZE:
        raise CorruptEntryError(f"object is {view.nbytes} bytes, shorter than the {HEADER_SIZE}-byte header")
    fields = view[: _FIELDS.size]
    if bytes(fields[:4]) != MAGIC:
        raise CorruptEntryError("not an lmcache-core object (bad magic)")
    (version,) = _VERSION.unpack_from(view, len(MAGIC))
    if version != FORMAT_VERSION:  # checked first: another version may lay out its header otherwise
        raise UnsupportedEntryError(f"format version {version}; this lmcache-core reads version {FORMAT_VERSION}")
    (crc,) = _CRC.unpack_from(view, _FIELDS.size)
    if zlib.crc32(fields) != crc:
        raise CorruptEntryError("header checksum mismatch")
    (_, _, header_size, codec, dtype_code, ndim, flags, *rest) = _FIELDS.unpack(fields)
    shape_all, (num_tokens, chunk_index, digest, payload_len, checksum) = rest[:MAX_DIMS], rest[MAX_DIMS:]
    if header_size != HEADER_SIZE:
        raise CorruptEntryError(f"header size {header_size} in a version {version} object")
    if flags & ~_KNOWN_FLAGS:
        raise UnsupportedEntryError(f"header flags {flags:#06x}; this lmcache-core knows {_KNOWN_FLAGS:#06x}")
    if dtype_code not in _DTYPES_BY_CODE or ndim > MAX_DIMS:
        raise CorruptEntryError("unknown dtype or rank in header")
    position, position_crc = _POSITION.unpack_from(view, POSITION_OFFSET)
    if (position or position_crc) and zlib.crc32(view[: POSITION_OFFSET + 4]) != position_crc:
        raise CorruptEntryError("header position checksum mismatch")
    return ChunkHeader(
        codec=codec.rstrip(b"\0").decode("ascii", "replace"),
        dtype=_DTYPES_BY_CODE[dtype_code],
        shape=tuple(shape_all[:ndim]),
        num_tokens=num_tokens,
        chunk_index=chunk_index,
        key_digest=digest,
        payload_len=payload_len,
        payload_checksum=checksum,
        mac=bytes(view[MAC_OFFSET:HEADER_SIZE]) if flags & FLAG_MAC else None,
        first_position=position - 1 if position else None,
    )


def decode_chunk(
    data: bytes | bytearray | memoryview,
    expected_key: ChunkKey | str,
    *,
    mac_key: bytes | None = None,
    verify_checksum: bool = True,
    codecs: Mapping[str, Codec] = BUILTIN_CODECS,
) -> DecodedChunk:
    """Decode an object written by :func:`encode_chunk` for ``expected_key``.

    The header names the codec; it is looked up in ``codecs`` (a registry's, or the built-in ones),
    and one that is not there makes the object unsupported here (a miss, left for other readers).

    With ``mac_key`` only objects authenticated under that key decode; the MAC check also covers
    the payload, so the checksum is then not computed. ``verify_checksum=False`` skips the
    checksum (never the MAC). Writable buffers (``bytearray``) are decoded without a copy for the
    raw codec; the returned tensor then shares their memory.
    """
    header = read_header(data)
    if header.key_digest != key_digest(expected_key):
        raise CorruptEntryError("object belongs to another key")
    view = memoryview(data)
    if view.nbytes != header.total_size:
        raise CorruptEntryError(f"object is {view.nbytes} bytes, header says {header.total_size}")
    payload = view[HEADER_SIZE:]
    if mac_key is not None:
        _authenticate(header, view, payload, mac_key)
    elif verify_checksum and xxhash.xxh3_64_intdigest(payload) != header.payload_checksum:
        raise CorruptEntryError("payload checksum mismatch")
    try:
        codec = get_codec(header.codec, codecs)
    except KeyError as exc:
        raise UnsupportedEntryError(f"codec {header.codec!r} is not installed here") from exc
    try:
        tensor = codec.decode(payload, header.dtype, header.shape)
    except (ValueError, RuntimeError) as exc:
        raise CorruptEntryError(f"payload does not decode: {exc}") from exc
    return DecodedChunk(tensor, header)


def _authenticate(header: ChunkHeader, view: memoryview, payload: memoryview, mac_key: bytes) -> None:
    """Raise unless the object's MAC is right. A failure whose payload checksum is wrong too is
    damage (corrupt); one with an intact checksum is a well-formed object that someone without our
    secret wrote (forged)."""
    if header.mac is not None and hmac.compare_digest(header.mac, _object_mac(mac_key, view, [payload])):
        return
    if xxhash.xxh3_64_intdigest(payload) != header.payload_checksum:
        raise CorruptEntryError("payload checksum mismatch")
    why = "it carries no MAC" if header.mac is None else "its MAC does not match"
    raise ForgedEntryError(f"object is not authenticated by this LMCACHE_KEY_SECRET ({why})")


def total_nbytes(buffers: Sequence[memoryview]) -> int:
    return sum(b.nbytes for b in buffers)
