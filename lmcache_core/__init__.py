"""lmcache-core: store LLM KV caches in token chunks across storage tiers, and reuse them.

The public API. Everything not listed in ``__all__`` is internal and may move.
Importing this package imports no storage client (redis, s3fs) and no serving engine (vLLM).
"""

from importlib.metadata import PackageNotFoundError, version

from lmcache_core.backend import BackendContext, BackendSettings, Chunk, SerializingBackend, StorageBackend
from lmcache_core.engine import CacheEngine, LoadResult, Lookup, build_backends
from lmcache_core.errors import (
    BackendUnavailableError,
    CorruptEntryError,
    LMCacheError,
    MissingExtraError,
    PluginError,
    SettingsError,
    UnknownBackendError,
    UnsupportedEntryError,
)
from lmcache_core.hookspecs import PLUGIN_API_VERSION, hookimpl
from lmcache_core.keys import CacheScope, ChunkHasher, ChunkKey, KVLayout, config_digest
from lmcache_core.plugins import load_registry
from lmcache_core.serde import decode_chunk, encode_chunk
from lmcache_core.settings import Settings, load_settings
from lmcache_core.storage import TierStack

try:
    __version__ = version("lmcache-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "PLUGIN_API_VERSION",
    "BackendContext",
    "BackendSettings",
    "BackendUnavailableError",
    "CacheEngine",
    "CacheScope",
    "Chunk",
    "ChunkHasher",
    "ChunkKey",
    "CorruptEntryError",
    "KVLayout",
    "LMCacheError",
    "LoadResult",
    "Lookup",
    "MissingExtraError",
    "PluginError",
    "SerializingBackend",
    "Settings",
    "SettingsError",
    "StorageBackend",
    "TierStack",
    "UnknownBackendError",
    "UnsupportedEntryError",
    "__version__",
    "build_backends",
    "config_digest",
    "decode_chunk",
    "encode_chunk",
    "hookimpl",
    "load_registry",
    "load_settings",
]
