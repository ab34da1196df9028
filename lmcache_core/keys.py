"""Chunk keys: chained digests over token chunks, scoped by tenant, model and KV layout.

A prompt's token ids are split into chunks of ``chunk_size`` tokens. Chunk ``i``'s digest is
``H(digest[i-1] || tokens[i] as little-endian uint32)``, seeded with a digest of the
:class:`CacheScope`. So one digest identifies a whole prefix *and* the model, layout, rank and
namespace it was computed for: two tenants or two models can never address each other's KV.

The digests are deterministic across processes, machines and restarts (no Python ``hash()``).
``blake3`` (default) is collision-resistant and can be keyed with a namespace secret; ``xxh3_128``
is faster and fine for a single trusted tenant; ``sha256`` needs nothing beyond the stdlib.
Hashing runs once per chunk over the chunk's packed bytes, never once per token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import blake3
import numpy as np
import xxhash

KEY_SCHEMA_VERSION = 1
HashAlgorithm = Literal["blake3", "sha256", "xxh3_128"]
HASH_ALGORITHMS: tuple[str, ...] = ("blake3", "sha256", "xxh3_128")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(text: str) -> str:
    """Make ``text`` safe inside file names, object keys and redis keys."""
    return _UNSAFE.sub("-", text).strip("-") or "none"


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV that a chunk holds: enough to refuse a chunk computed for another model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    # Tensors per token and head: 2 (K and V), or 1 for MLA's single latent. Not part of the
    # keys (:meth:`CacheScope.identity`): an MLA model's digest already differs from any other's,
    # and leaving it out kept existing keys valid when the field was added.
    kv_factor: int = 2
    # How a chunk's tensor orders its elements. "" (the default): token-major (:meth:`chunk_shape`),
    # the portable form. A paged layout's name (``"cpu"``, ``"cpu_amx"``): whole pages of
    # ``block_size`` tokens exactly as vLLM's CPU attention keeps them, so that loads and saves are
    # page copies instead of re-layouts (those pages hold K transposed, or in AMX tiles). Such chunks
    # are only readable by the same page layout: both fields are part of the keys when set.
    page_layout: str = ""
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.kv_factor not in (1, 2):
            raise ValueError(f"kv_factor must be 1 (MLA latent) or 2 (K and V), got {self.kv_factor}")
        if bool(self.page_layout) != (self.block_size > 0):
            raise ValueError("page_layout and block_size go together (a page-packed chunk needs its page size)")

    @property
    def page_packed(self) -> bool:
        return bool(self.page_layout)

    @property
    def token_axis(self) -> int:
        """The dimension of :meth:`chunk_shape` that runs along the tokens: 2 (tokens) or 1 (pages)."""
        return 1 if self.page_packed else 2

    @property
    def token_unit(self) -> int:
        """Tokens per step along :attr:`token_axis`: 1, or a page's ``block_size``."""
        return self.block_size if self.page_packed else 1

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """The chunk tensor layout: [layers, kv_factor (K and V, or MLA's latent), tokens, kv_heads, head_dim];
        page-packed: [layers, pages, kv_heads, block_size, kv_factor * head_dim] (``num_tokens`` whole pages)."""
        if self.page_packed:
            if num_tokens % self.block_size:
                raise ValueError(f"a page-packed chunk holds whole pages of {self.block_size} tokens, not {num_tokens}")
            return (self.num_layers, num_tokens // self.block_size, self.num_kv_heads, self.block_size,
                    self.kv_factor * self.head_dim)
        return (self.num_layers, self.kv_factor, num_tokens, self.num_kv_heads, self.head_dim)

    def tokens_in(self, shape: Sequence[int]) -> int:
        """How many tokens a chunk tensor of ``shape`` holds if it has this layout's shape, else -1."""
        if len(shape) != 5:
            return -1
        tokens = shape[self.token_axis] * self.token_unit
        return tokens if tuple(shape) == self.chunk_shape(tokens) else -1

    @property
    def tag(self) -> str:
        return f"{self.dtype}-l{self.num_layers}h{self.num_kv_heads}d{self.head_dim}"

    @property
    def page_tag(self) -> str:
        """``p<page layout><block size>`` for page-packed chunks, else empty: a field of its own in
        the readable key prefix, after :attr:`tag`."""
        return f"p{_slug(self.page_layout)}{self.block_size}" if self.page_packed else ""


@dataclass(frozen=True)
class CacheScope:
    """Everything besides the tokens that a KV chunk depends on.

    ``model_name`` is a stable name (e.g. the served model name), not a local path;
    ``model_digest`` is a digest of what the model computes with (config, weights, quantization),
    so two different checkpoints published under one name do not share KV.
    ``kv_format`` says how KV values are encoded in ``layout.dtype`` when that dtype alone does not:
    vLLM keeps fp8_e4m3 and fp8_e5m2 caches both as ``uint8``, with per-layer scales. ``"auto"``
    means the dtype says it all. It is part of :meth:`identity` only, not of the readable prefix.
    """

    namespace: str
    model_name: str
    model_digest: str
    layout: KVLayout
    tp_rank: int = 0
    tp_world_size: int = 1
    kv_format: str = "auto"

    def identity(self) -> bytes:
        """Every field, unabridged and unambiguous: what chunk digests are seeded with."""
        import json

        layout = self.layout
        fields = [KEY_SCHEMA_VERSION, self.namespace, self.model_name, self.model_digest, layout.dtype,
                  layout.num_layers, layout.num_kv_heads, layout.head_dim, self.tp_rank, self.tp_world_size,
                  self.kv_format]
        if layout.page_packed:  # only then: keys of token-major chunks stay what they were
            fields += [layout.page_layout, layout.block_size]
        return json.dumps(fields, ensure_ascii=False).encode()

    @property
    def prefix(self) -> str:
        """Human-readable key prefix, safe in paths and object keys."""
        pages = f":{self.layout.page_tag}" if self.layout.page_packed else ""
        return (
            f"v{KEY_SCHEMA_VERSION}:{_slug(self.namespace)}:{_slug(self.model_name)}@{self.model_digest[:12]}"
            f":{self.layout.tag}{pages}:r{self.tp_rank}of{self.tp_world_size}"
        )


def config_digest(config: dict | str | bytes) -> str:
    """A short, stable digest of a model config (sorted JSON for dicts)."""
    import json

    if isinstance(config, dict):
        data = json.dumps(config, sort_keys=True, default=str).encode()
    elif isinstance(config, str):
        data = config.encode()
    else:
        data = config
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, order=True)
class ChunkKey:
    """The storage key of one chunk. ``str(key)`` is what backends store it under."""

    prefix: str
    digest: bytes

    def __str__(self) -> str:
        return f"{self.prefix}:{self.digest.hex()}"

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        """Inverse of ``str(key)``; raises ``ValueError`` on anything else.

        Strict (see :data:`KEY_GRAMMAR`): listing and clearing a shared Redis keyspace or bucket
        rely on it to tell our chunks from other applications' keys such as ``visits:2024:10``.
        """
        match = KEY_GRAMMAR.fullmatch(text)
        if match is None:
            raise ValueError(f"not a chunk key: {text!r}")
        return cls(match["prefix"], bytes.fromhex(match["digest"]))

    @property
    def namespace_label(self) -> str:
        """The namespace as the prefix writes it (made safe for file names, see :func:`namespace_label`)."""
        return self.prefix.split(":", 2)[1]

    def in_namespace(self, namespace: str) -> bool:
        """Whether this key belongs to tenant ``namespace``: what ``ls`` and ``clear`` select by."""
        return self.namespace_label == namespace_label(namespace)

    @property
    def schema_version(self) -> int:
        """The key schema version it was written with (:data:`KEY_SCHEMA_VERSION` today)."""
        return int(self.prefix.split(":", 1)[0][1:])

    @property
    def model_label(self) -> str:
        """``<model name>@<model digest>`` as the prefix writes it."""
        return self.prefix.split(":", 3)[2]


def namespace_label(namespace: str) -> str:
    """How ``namespace`` appears in key prefixes, file names and object keys."""
    return _slug(namespace)


def model_matches(key: ChunkKey, model: str) -> bool:
    """Whether ``key`` is of ``model``: ``NAME`` (any checkpoint) or ``NAME@DIGEST`` (one; the digest
    as ``ls`` shows it, or any prefix of it). Names compare as key prefixes write them."""
    name, _, digest = key.model_label.partition("@")
    wanted_name, _, wanted_digest = model.partition("@")
    return name == _slug(wanted_name) and digest.startswith(wanted_digest)


def select_keys(names: Iterable[str], namespace: str | None) -> Iterator[ChunkKey]:
    """The chunk keys among ``names`` that belong to ``namespace`` (to any namespace if ``None``).
    Names that are not chunk keys (another application's, in a shared store) are skipped."""
    for name in names:
        try:
            key = ChunkKey.parse(name)
        except ValueError:
            continue
        if namespace is None or key.in_namespace(namespace):
            yield key


# The text form of a chunk key, ``CacheScope.prefix + ":" + digest``. Fields are ``:``-separated
# and made of the characters ``_slug`` keeps (plus ``@``, ``+``, ``=`` for compound fields):
#
#   key       = "v" schema ":" namespace ":" model "@" model-id *(":" field) ":" layout
#               *(":" field) ":" rank *(":" field) ":" digest
#   layout    = dtype "-l" layers "h" kv-heads "d" head-dim       e.g. bfloat16-l32h8d128
#               (page-packed chunks add a field after it: "p" page-layout block-size, e.g. pcpu128)
#   rank      = "r" tp-rank "of" tp-world-size                    e.g. r0of2
#   digest    = 32 lower-case hex digits (16 bytes)
#
# The ``*(":" field)`` slots take the fields a later scope may add (a KV format, a weights
# identity) without a new parser; the namespace stays the second field, so ``clear`` keeps
# selecting by it.
_FIELD = r"[A-Za-z0-9._@+=-]+"
_SLUG = r"[A-Za-z0-9._-]+"
KEY_GRAMMAR = re.compile(
    rf"(?P<prefix>v[0-9]+:(?P<namespace>{_SLUG}):{_SLUG}@[A-Za-z0-9._-]*"
    rf"(?::{_FIELD})*?:[a-z0-9_]+-l[0-9]+h[0-9]+d[0-9]+"
    rf"(?::{_FIELD})*?:r[0-9]+of[0-9]+"
    rf"(?::{_FIELD})*?):(?P<digest>[0-9a-f]{{32}})"
)


def _digest_function(algorithm: str, secret: bytes | None) -> Callable[[bytes], bytes]:
    if algorithm == "blake3":
        key = blake3.blake3(secret).digest() if secret else None
        if key:
            return lambda data: blake3.blake3(data, key=key).digest(length=16)
        return lambda data: blake3.blake3(data).digest(length=16)
    if algorithm == "sha256":
        if secret:
            return lambda data: hmac.digest(secret, data, "sha256")[:16]
        return lambda data: hashlib.sha256(data).digest()[:16]
    if algorithm == "xxh3_128":
        seed = int.from_bytes(hashlib.sha256(secret).digest()[:8], "little") if secret else 0
        return lambda data: xxhash.xxh3_128_digest(data, seed=seed)
    raise ValueError(f"unknown hash algorithm {algorithm!r}; choose one of {', '.join(HASH_ALGORITHMS)}")


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as the digests read them: little-endian uint32, on any host."""
    packed = np.ascontiguousarray(tokens, dtype=np.uint32)
    if packed.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts
        packed = packed.byteswap()
    return packed.tobytes()


class ChunkHasher:
    """Turns token ids into chained chunk keys for one :class:`CacheScope`."""

    def __init__(
        self,
        scope: CacheScope,
        chunk_size: int = 256,
        algorithm: str = "blake3",
        secret: bytes | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.scope = scope
        self.chunk_size = chunk_size
        self.algorithm = algorithm
        self._digest = _digest_function(algorithm, secret)
        self._prefix = scope.prefix
        self._seed = self._digest(scope.identity())

    def num_full_chunks(self, num_tokens: int) -> int:
        return num_tokens // self.chunk_size

    def keys(self, tokens: Sequence[int] | np.ndarray, include_partial: bool = False) -> list[ChunkKey]:
        """Keys of the chunks of ``tokens``, in prefix order.

        The trailing partial chunk gets a key only with ``include_partial``; its digest
        covers fewer bytes, so it never collides with the full chunk that later extends it.
        """
        data = memoryview(_token_bytes(tokens))
        step = self.chunk_size * 4
        end = len(data) if include_partial else (len(data) // step) * step
        keys: list[ChunkKey] = []
        previous = self._seed
        for start in range(0, end, step):
            previous = self._digest(previous + data[start : start + step])
            keys.append(ChunkKey(self._prefix, previous))
        return keys

    def segment_key(self, tokens: Sequence[int] | np.ndarray) -> ChunkKey:
        """A position-independent key for a run of tokens (blending, :mod:`lmcache_core.blend`): the
        digest of the scope, a domain tag and the tokens alone, not chained to what precedes them,
        so the same text has the same key wherever it appears. Its readable prefix ends in ``:seg``
        and its digest input is tagged, so it never equals a prefix chunk's key."""
        return ChunkKey(f"{self._prefix}:seg", self._digest(self._seed + b"segment" + _token_bytes(tokens)))

    def chunk_bounds(self, num_tokens: int, include_partial: bool = False) -> list[tuple[int, int]]:
        """[start, end) token offsets matching :meth:`keys`."""
        end = num_tokens if include_partial else (num_tokens // self.chunk_size) * self.chunk_size
        return [(s, min(s + self.chunk_size, end)) for s in range(0, end, self.chunk_size)]
