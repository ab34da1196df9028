"""Typed errors. Each one says what went wrong and what to do next."""

from __future__ import annotations


class LMCacheError(Exception):
    """Base class for every error lmcache-core raises on purpose."""


class SettingsError(LMCacheError, ValueError):
    """A setting has a value we cannot use. The message names the variable the operator typed."""


class PluginError(LMCacheError):
    """A plugin could not be loaded or registered something invalid."""


class MissingExtraError(LMCacheError, ImportError):
    """A backend needs an optional dependency; the message names the extra to install."""

    def __init__(self, backend: str, extra: str, module: str) -> None:
        super().__init__(
            f"backend {backend!r} needs the Python module {module!r}: "
            f"install it with `pip install 'lmcache-core[{extra}]'`"
        )
        self.backend = backend
        self.extra = extra
        self.module = module


class UnknownBackendError(LMCacheError, KeyError):
    """A tier names a backend that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class CorruptEntryError(LMCacheError):
    """A stored object is truncated, corrupted, or belongs to another key or layout.

    The engine treats it as a cache miss: it is never loaded into a KV cache.
    """


class UnsupportedEntryError(CorruptEntryError):
    """A stored object in a format version or with a codec that this instance cannot read.

    Also a miss, but not garbage: a newer lmcache-core, or one with another codec plugin, that
    shares the store wrote it, so tiers leave it in place for the readers that understand it.
    """


class ForgedEntryError(CorruptEntryError):
    """With ``LMCACHE_KEY_SECRET`` set: a well-formed object without a valid MAC under that secret.

    Someone who can write the store but does not hold the secret put it there (or an instance
    without the secret, or from before objects carried a MAC). A miss, counted apart from damage.
    """


class BackendUnavailableError(LMCacheError):
    """A backend cannot reach its storage (used for required tiers at start-up)."""
