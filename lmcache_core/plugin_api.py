"""The public plugin API: everything a storage-backend author needs, from one module.

This module is the contract between lmcache-core and its backends, ours and third parties'.
lmcache-core's own plugins (``plugins/lmcache_cpu``, ``lmcache_disk``, ``lmcache_redis``,
``lmcache_s3``) and ``examples/lmcache-example-backend`` import nothing else from lmcache-core
(besides the top-level ``lmcache_core`` package), and a test holds them to it: copying any of
them is a valid start for a new backend. Everything else under ``lmcache_core`` is internal and
may move between releases.

Stability. Every name in ``__all__`` keeps its meaning for a given :data:`PLUGIN_API_VERSION`.
Adding a name or an optional argument does not change the version; removing or changing one
does, and the plugin loader refuses a plugin module that declares a newer ``PLUGIN_API_VERSION``
than this core's, with a message naming it. Since version 1:

- Registration: :data:`hookimpl` marks a plugin module's ``lmcache_register_backends(register)``
  (see ``lmcache_core.hookspecs`` for the hook's arguments); :data:`PLUGIN_API_VERSION`.
- Backends: :class:`StorageBackend` (tiers holding tensors in process memory) and
  :class:`SerializingBackend` (byte stores: implement four ``_*_blobs`` methods, the base class
  frames, verifies and authenticates objects and turns damaged ones into misses), their
  :class:`BackendSettings` base (a pydantic model read from ``LMCACHE_<NAME>__<FIELD>``),
  :class:`BackendContext`, :data:`Blob`, :class:`Chunk`, :class:`ChunkKey`.
- Shared mechanisms, so no backend re-implements them: :class:`ByteLRU` (prefix-aware
  least-recently-used order by bytes), :func:`select_keys` (the chunk keys among the names a shared
  store lists), :func:`redact_url` (a URL fit for a log line), :func:`split_list` (comma-separated
  settings), :func:`read_header` / :data:`HEADER_SIZE` (a stored object's header, to index a
  store without reading payloads), :class:`MemoryPool` with :func:`lend` /
  :func:`in_use_elsewhere` (a byte-bounded, pinned-when-possible tensor pool).
- Errors a backend raises or catches: :class:`BackendUnavailableError` (raise from
  ``check_health``), :class:`MissingExtraError`, :class:`SettingsError`,
  :class:`CorruptEntryError` and its subclasses :class:`UnsupportedEntryError` (another format
  version's object: leave it in place) and :class:`ForgedEntryError`; all derive from
  :class:`LMCacheError`.
- Registration details: :class:`LegacyVariable` (an LMCache variable name a backend maps onto its
  settings, declared in ``register(..., legacy=...)``); for codec plugins the :class:`Codec`
  protocol and :data:`BUILTIN_CODECS` (``raw`` and ``fp8``, which lmcache-core always registers).
- The conformance suite: ``lmcache_core.testing.conformance`` (``BackendConformance``,
  ``SerializingBackendConformance``, ``make_chunks``). Subclass the suite in your tests with a
  ``backend`` fixture. It is not re-exported here because it imports pytest, which a serving
  process does not need; its names follow the same version.
"""

from __future__ import annotations

from lmcache_core.backend import BackendContext, BackendSettings, Blob, Chunk, SerializingBackend, StorageBackend
from lmcache_core.codecs import BUILTIN_CODECS, Codec
from lmcache_core.errors import (
    BackendUnavailableError,
    CorruptEntryError,
    ForgedEntryError,
    LMCacheError,
    MissingExtraError,
    SettingsError,
    UnsupportedEntryError,
)
from lmcache_core.hookspecs import PLUGIN_API_VERSION, hookimpl
from lmcache_core.keys import ChunkKey, select_keys
from lmcache_core.lru import ByteLRU
from lmcache_core.memory import MemoryPool, in_use_elsewhere, lend
from lmcache_core.registry import LegacyVariable
from lmcache_core.serde import HEADER_SIZE, read_header
from lmcache_core.settings import redact_url, split_list

__all__ = [
    "BUILTIN_CODECS",
    "HEADER_SIZE",
    "PLUGIN_API_VERSION",
    "BackendContext",
    "BackendSettings",
    "BackendUnavailableError",
    "Blob",
    "ByteLRU",
    "Chunk",
    "ChunkKey",
    "Codec",
    "CorruptEntryError",
    "ForgedEntryError",
    "LMCacheError",
    "LegacyVariable",
    "MemoryPool",
    "MissingExtraError",
    "SerializingBackend",
    "SettingsError",
    "StorageBackend",
    "UnsupportedEntryError",
    "hookimpl",
    "in_use_elsewhere",
    "lend",
    "read_header",
    "redact_url",
    "select_keys",
    "split_list",
]
