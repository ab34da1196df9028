"""The storage-backend contract. Small and batch-first: every call takes many chunks.

Keys in a batch are in prefix order (chunk 0 of a prompt first). Backends never raise on a
missing or unreadable entry: they report a miss. The tier stack catches anything else a backend
raises and turns it into a miss too, so a broken tier degrades to recompute.

Two base classes:

- :class:`StorageBackend` for tiers that hold tensors in process memory (``cpu``).
- :class:`SerializingBackend` for tiers that hold bytes (disk, redis, object stores). Subclasses
  implement four blob operations; framing, verification (and, with a key secret, authentication)
  and the corrupt-entry counters live here, so an object written by one backend or instance is
  verified the same way by every other, and no backend needs to know about the secret.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

from lmcache_core.codecs import BUILTIN_CODECS, Codec
from lmcache_core.errors import CorruptEntryError, ForgedEntryError, UnsupportedEntryError
from lmcache_core.keys import ChunkKey, select_keys
from lmcache_core.serde import decode_chunk, encode_chunk

log = logging.getLogger(__name__)

_UNREADABLE_REMEMBERED = 4096  # names of unsupported entries a tier stops advertising

Blob = bytes | bytearray | memoryview


class BackendSettings(BaseModel):
    """Settings every backend has; plugins subclass this for their own fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a timeout of inf or nan is a typo

    codec: str | None = Field(None, description="Payload codec of this tier (byte stores); default LMCACHE_CODEC.")
    required: bool = Field(False, description="Fail start-up when this tier is unreachable, instead of skipping it.")


@dataclass(frozen=True)
class Chunk:
    """One chunk to store: its key, its KV tensor [layers, kv_factor, tokens, kv_heads, head_dim] and
    its position in the prompt (0 for the first chunk), which prefix-aware eviction uses.

    ``owned``: the caller hands ``kv`` over and never writes it again, so a tier that keeps tensors
    may keep this one instead of copying it. ``first_position``: the token position the chunk's
    first token was computed at, recorded in the stored header (None: not recorded).
    """

    key: ChunkKey
    kv: torch.Tensor
    index: int = 0
    owned: bool = False
    first_position: int | None = None


@dataclass(frozen=True)
class BackendContext:
    """What the core hands every backend besides its own settings."""

    tier_name: str
    default_codec: str
    # From LMCACHE_KEY_SECRET (serde.derive_mac_key): byte tiers authenticate objects with it. Never
    # shown in a repr, so a logged context cannot leak it.
    mac_key: bytes | None = field(default=None, repr=False)
    # The codecs the registry knows, by name: what byte tiers encode with and decode by (an object
    # names its codec). The built-in ones when a backend is built by hand.
    codecs: Mapping[str, Codec] = field(default_factory=lambda: BUILTIN_CODECS, repr=False)


class StorageBackend(ABC):
    def __init__(self, settings: BackendSettings, context: BackendContext) -> None:
        self.settings = settings
        self.context = context
        self.name = context.tier_name
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()

    def count(self, name: str, amount: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += amount

    @abstractmethod
    def contains(self, keys: Sequence[ChunkKey]) -> int:
        """How many of ``keys``, from the first, are stored (the longest stored prefix)."""

    @abstractmethod
    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        """The stored KV for each key, ``None`` for a miss. Returned tensors are read-only."""

    @abstractmethod
    def put_many(self, chunks: Sequence[Chunk]) -> None:
        """Store ``chunks``; a chunk that does not fit may be dropped (and counted)."""

    @abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove ``keys``; returns how many were stored."""

    def iter_keys(self) -> Iterator[str]:
        """Every stored chunk key as a string, of every namespace (for ``lmcache-core ls``).

        A backend whose storage other applications share (a Redis keyspace, a bucket) lists only
        names that :meth:`ChunkKey.parse` accepts (``clear`` checks again before deleting)."""
        raise NotImplementedError(f"backend {self.name!r} cannot list its keys")

    def clear(self, namespace: str | None = None) -> int:
        """Remove the chunks of ``namespace`` (of every namespace if ``None``) that this backend
        can list; returns how many. Names that are not chunk keys are never touched."""
        return self.delete(list(select_keys(self.iter_keys(), namespace)))

    def check_health(self) -> None:
        """Raise if the storage cannot be reached. Called once at start-up."""

    def stats(self) -> dict[str, float]:
        return dict(self.counters)

    def close(self) -> None:
        """Release connections and threads."""


class SerializingBackend(StorageBackend):
    """Base for tiers that store framed bytes. Implement the four ``_*_blobs`` methods."""

    def __init__(self, settings: BackendSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self._unreadable: OrderedDict[str, None] = OrderedDict()  # see _remember_unreadable
        self._unreadable_lock = threading.Lock()
        self._warned_unsupported = False

    @property
    def codec(self) -> str:
        return self.settings.codec or self.context.default_codec

    @abstractmethod
    def _exists_blobs(self, names: Sequence[str]) -> list[bool]:
        """Whether each name is stored. One round trip for the batch where the storage allows."""

    @abstractmethod
    def _read_blobs(self, names: Sequence[str]) -> list[Blob | None]:
        """The bytes of each name, ``None`` where missing. Prefer writable ``bytearray``s: they
        decode without a copy."""

    @abstractmethod
    def _write_blobs(self, items: Sequence[tuple[str, list[memoryview]]]) -> int | None:
        """Store each name's buffers, concatenated, atomically (a reader never sees half an object).

        Returns the bytes stored, or ``None`` for all of them; a backend that refuses some items
        (over a size limit, say) returns less."""

    @abstractmethod
    def _delete_blobs(self, names: Sequence[str]) -> int:
        """Remove names; returns how many existed."""

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        names = [str(key) for key in keys]
        found = self._exists_blobs(names)
        unreadable = self._unreadable
        return next((i for i, hit in enumerate(found) if not hit or names[i] in unreadable), len(found))

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        blobs = self._read_blobs([str(key) for key in keys])
        results: list[torch.Tensor | None] = []
        for key, blob in zip(keys, blobs, strict=True):
            if blob is None:
                results.append(None)
                continue
            try:
                results.append(decode_chunk(blob, key, mac_key=self.context.mac_key, codecs=self.context.codecs).tensor)
                self.count("read_bytes", len(blob))
            except UnsupportedEntryError as error:
                self.count("unsupported_entries")
                self._remember_unreadable(str(key))
                if not self._warned_unsupported:  # in a rolling upgrade this is every lookup
                    self._warned_unsupported = True
                    log.warning(
                        "tier %s: entry %s is a miss here (%s); it is left in place for the instances that "
                        "can read it. Further ones are only counted (unsupported_entries).",
                        self.name, key, error,
                    )
                results.append(None)
            except CorruptEntryError as error:  # damaged, foreign or forged: ours to replace
                self.count("forged_entries" if isinstance(error, ForgedEntryError) else "corrupt_entries")
                log.warning("tier %s: entry %s is unusable (%s); deleting it", self.name, key, error)
                try:
                    self._delete_blobs([str(key)])
                except Exception as delete_error:  # the miss stands either way
                    log.warning("tier %s: could not delete %s (%s)", self.name, key, delete_error)
                results.append(None)
        return results

    def put_many(self, chunks: Sequence[Chunk]) -> None:
        """Frame (and checksum) the whole batch, then write it: the writes then go out back to back.
        Checksumming each chunk just before writing it measured slower against Redis
        (docs/backends-remote.md), most likely because the server idles between values."""
        mac_key, codecs = self.context.mac_key, self.context.codecs
        items = [
            (str(chunk.key), encode_chunk(chunk.key, chunk.kv, codec=self.codec, chunk_index=chunk.index,
                                          mac_key=mac_key, codecs=codecs, first_position=chunk.first_position))
            for chunk in chunks
        ]
        stored = self._write_blobs(items)
        if stored is None:
            stored = sum(part.nbytes for _, parts in items for part in parts)
        self.count("written_bytes", stored)
        if self._unreadable:
            with self._unreadable_lock:
                for name, _ in items:
                    self._unreadable.pop(name, None)

    def _remember_unreadable(self, name: str) -> None:
        """Stop advertising an entry we cannot read (until we overwrite it with one we can):
        otherwise a serving engine would plan to load it on every request, fail, and never store
        its own copy because the name is taken."""
        with self._unreadable_lock:
            self._unreadable[name] = None
            self._unreadable.move_to_end(name)
            while len(self._unreadable) > _UNREADABLE_REMEMBERED:
                self._unreadable.popitem(last=False)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return self._delete_blobs([str(key) for key in keys])
