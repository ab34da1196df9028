"""The cache engine: store, look up and retrieve KV for token sequences.

This is the API for code that is not vLLM (and what the vLLM connector builds on). KV tensors use
the chunk layout ``[layers, 2 (K, V), tokens, kv_heads, head_dim]`` on any device; chunks are
stored on the CPU.

    engine = CacheEngine.from_env(model_name="my-model", layout=KVLayout(32, 8, 128, "bfloat16"))
    engine.store(tokens, kv)            # kv covers tokens[:kv.shape[2]]
    hit = engine.lookup(tokens)         # number of leading tokens cached
    kv_prefix = engine.retrieve(tokens) # KV for those tokens, or None

Callers that manage chunks themselves (the vLLM connector, the CLI) use the key-level API that the
token-level calls above are built on:

    keys = engine.keys(tokens)
    engine.lookup_keys(keys)            # Lookup(found, by_tier[, present])
    engine.load(keys)                   # LoadResult(chunks, hits_by_tier): validated chunks only
    engine.save(chunks)                 # Chunk(key, kv, index, owned=...) per chunk

``prefix=True`` (the default) means "the longest stored prefix": lookups and loads stop at the first
gap. ``prefix=False`` answers per key and tolerates gaps, for reusing chunks at any position.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmcache_core.backend import BackendContext, Chunk, StorageBackend
from lmcache_core.codecs import BUILTIN_CODECS, Codec, codec_accepts, get_codec
from lmcache_core.errors import BackendUnavailableError
from lmcache_core.keys import CacheScope, ChunkHasher, ChunkKey, KVLayout
from lmcache_core.plugins import load_registry
from lmcache_core.registry import Registry
from lmcache_core.serde import derive_mac_key
from lmcache_core.settings import Settings, load_settings, redact
from lmcache_core.storage import TierStack

log = logging.getLogger(__name__)


def build_backends(settings: Settings, registry: Registry) -> list[StorageBackend]:
    """Instantiate the configured tiers, fastest first.

    An unreachable tier is kept (the stack skips it until it answers) unless its settings say
    ``required``, in which case start-up fails with the tier's URL, secrets redacted. With a key
    secret, every tier gets the object MAC key in its context (byte tiers authenticate with it).
    """
    secret = settings.key_secret.get_secret_value() if settings.key_secret else None
    mac_key = derive_mac_key(secret) if secret else None
    backends: list[StorageBackend] = []
    for name in settings.tiers:
        backend_class = registry.backend_class(name)
        backend_settings = settings.backend(name)
        context = BackendContext(tier_name=name, default_codec=settings.codec, mac_key=mac_key, codecs=registry.codecs)
        backend = backend_class(backend_settings, context)
        try:
            backend.check_health()
        except Exception as error:
            where = redact(backend_settings.model_dump())
            if backend_settings.required:
                backend.close()
                for started in backends:
                    started.close()
                raise BackendUnavailableError(f"required tier {name} ({where}) is unreachable: {error}") from error
            log.warning("tier %s (%s) is unreachable at start (%s); running without it until it answers",
                        name, where, error)
        backends.append(backend)
    return backends


@dataclass(frozen=True)
class Lookup:
    """What :meth:`CacheEngine.lookup_keys` found.

    ``found``: prefix mode, the length of the longest stored prefix of the keys; per-key mode, how
    many keys are stored. ``by_tier``: how many of those each tier answered for (the fastest
    tier holding them, where a load will read them). ``present``: per-key mode only, one flag per key.
    """

    found: int
    by_tier: dict[str, int]
    present: list[bool] | None = None


@dataclass(frozen=True)
class LoadResult:
    """What :meth:`CacheEngine.load` read: validated chunks and which tiers served them.

    Prefix mode: the chunks of the longest loadable prefix (never ``None``). Per-key mode: one
    entry per key, ``None`` for a key that is missing, corrupt or of the wrong shape.
    """

    chunks: list[torch.Tensor | None]
    hits_by_tier: dict[str, int]

    @property
    def num_chunks(self) -> int:
        """Chunks loaded (in prefix mode, the length of the loaded prefix)."""
        return sum(chunk is not None for chunk in self.chunks)


class CacheEngine:
    """Stores, finds and loads KV chunks for one :class:`CacheScope` across the configured tiers."""

    def __init__(self, settings: Settings, registry: Registry, scope: CacheScope) -> None:
        settings = codecs_for_kv(settings, scope.layout.dtype, registry.codecs)
        self.settings = settings
        self.registry = registry
        self.scope = scope
        self.hasher = ChunkHasher(
            scope,
            chunk_size=settings.chunk_size,
            algorithm=settings.hash_algorithm,
            secret=settings.key_secret.get_secret_value().encode() if settings.key_secret else None,
        )
        self.stack = TierStack(
            build_backends(settings, registry),
            write_queue_size=settings.write_queue_size,
            write_queue_max_bytes=settings.write_queue_max_bytes,
            writes_between_steps=settings.writes_between_steps,
        )

    @classmethod
    def from_env(
        cls,
        *,
        model_name: str,
        layout: KVLayout,
        model_digest: str = "unknown",
        tp_rank: int = 0,
        tp_world_size: int = 1,
        environ: Mapping[str, str] | None = None,
        **overrides: object,
    ) -> CacheEngine:
        """Build an engine from ``LMCACHE_*`` settings (``overrides`` win over the environment)."""
        registry = load_registry(environ)
        settings = load_settings(registry, environ, **overrides)
        scope = CacheScope(settings.namespace, model_name, model_digest, layout, tp_rank, tp_world_size)
        return cls(settings, registry, scope)

    @property
    def chunk_size(self) -> int:
        return self.settings.chunk_size

    def keys(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> list[ChunkKey]:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        return self.hasher.keys(tokens, include_partial=self.settings.save_unfull_chunk)

    def store(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, kv: torch.Tensor) -> int:
        """Store the chunks of ``kv`` (covering ``tokens[:kv.shape[2]]``) not stored yet.

        ``kv`` has the scope's :meth:`~lmcache_core.keys.KVLayout.chunk_shape` (page-packed scopes:
        whole pages, and only chunks of whole pages are stored). Returns the number of tokens newly
        written.
        """
        layout = self.scope.layout
        num_tokens = self._check_layout(kv)
        if num_tokens > len(tokens):
            raise ValueError(f"kv covers {num_tokens} tokens but only {len(tokens)} token ids were given")
        keys = self.keys(tokens[:num_tokens])
        bounds = self.hasher.chunk_bounds(num_tokens, include_partial=self.settings.save_unfull_chunk)
        already = self.stack.first_tier_contains(keys)  # never wait on a remote tier to store
        unit = layout.token_unit
        chunks = [Chunk(keys[i], kv.narrow(layout.token_axis, start // unit, (end - start) // unit), i,
                        first_position=start)
                  for i, (start, end) in enumerate(bounds) if i >= already and (end - start) % unit == 0]
        self.save(chunks)  # not owned: the tiers copy, kv stays the caller's
        return sum(layout.tokens_in(chunk.kv.shape) for chunk in chunks)

    def save(self, chunks: Sequence[Chunk]) -> None:
        """Store ``chunks`` in the first tier now and in the lower tiers in the background.

        A chunk with ``owned=True`` hands its tensor over: the caller never writes it again, so a
        tier that keeps tensors in memory may keep it instead of copying it. Otherwise the tiers
        copy and ``kv`` may be a view of memory the caller reuses (a KV cache's pages).
        """
        self.stack.put_many(chunks)

    def read_speeds(self) -> dict[str, float | None]:
        """Each tier's measured read speed in bytes per second (None until measured), fastest
        tier first: for deciding whether a hit is worth loading (:mod:`lmcache_core.load_planner`)."""
        return self.stack.read_speeds()

    def step_started(self) -> None:
        """The caller's compute step (e.g. vLLM's forward pass) begins: background writes to lower
        tiers wait until :meth:`step_finished` (bounded; see :class:`~lmcache_core.storage.TierStack`),
        so they do not compete with it for the cores."""
        self.stack.step_started()

    def step_finished(self) -> None:
        self.stack.step_finished()

    def between_steps(self, timeout: float) -> bool:
        """Whether the caller is between compute steps, waiting up to ``timeout`` seconds (see
        :meth:`step_started`): background work of the caller's own can keep off the steps too."""
        return self.stack.between_steps(timeout)

    def lookup(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> int:
        """How many leading tokens of ``tokens`` have KV stored in some tier."""
        found = self.lookup_keys(self.keys(tokens)).found
        return min(found * self.chunk_size, len(tokens))  # a stored partial chunk ends the prompt

    def lookup_keys(self, keys: Sequence[ChunkKey], *, prefix: bool = True) -> Lookup:
        """Which of ``keys`` are stored: the longest stored prefix (``prefix=True``; stops at the
        first gap, so a remote tier is asked as little as possible), or each key (``prefix=False``)."""
        if prefix:
            found, by_tier = self.stack.contains_by_tier(keys)
            return Lookup(found, by_tier)
        present, by_tier = self.stack.presence(keys)
        return Lookup(sum(present), by_tier, present)

    def load(self, keys: Sequence[ChunkKey], *, prefix: bool = True) -> LoadResult:
        """KV of ``keys``, each chunk checked against the scope's layout (:meth:`valid_chunk`).

        ``prefix=True`` stops at the first chunk that is missing or invalid; ``prefix=False``
        returns one entry per key, ``None`` for those. A chunk that vanished or turned out corrupt
        since a lookup is a miss here, never wrong data.
        """
        chunks, hits = self.stack.read(keys, prefix=prefix)
        checked = self._checked(chunks, len(keys))
        if prefix and None in checked:
            checked = checked[: checked.index(None)]
        return LoadResult(checked, hits)

    def load_segments(self, keys: Sequence[ChunkKey], lengths: Sequence[int]) -> LoadResult:
        """KV of position-independent segments (:meth:`~lmcache_core.keys.ChunkHasher.segment_key`),
        one entry per key, ``None`` where missing or not ``lengths[i]`` tokens of this scope's layout."""
        chunks, hits = self.stack.read(keys, prefix=False)
        return LoadResult(self._checked(chunks, len(keys), lengths), hits)

    def _checked(self, chunks: Sequence[torch.Tensor | None], num_keys: int,
                 lengths: Sequence[int] | None = None) -> list[torch.Tensor | None]:
        """``chunks`` with those that fail :meth:`valid_chunk` (or are missing) as ``None``."""
        return [chunk if chunk is not None and self.valid_chunk(
                    chunk, index, num_keys, tokens=None if lengths is None else lengths[index]) else None
                for index, chunk in enumerate(chunks)]

    def valid_chunk(self, chunk: torch.Tensor, index: int, num_keys: int, tokens: int | None = None) -> bool:
        """Whether ``chunk`` can be chunk ``index`` of ``num_keys`` for this scope: its layout's shape
        and dtype, and a full chunk of tokens (only the last key may be a partial chunk), or exactly
        ``tokens`` tokens when given (a segment). The one place loaded chunks are checked: never load
        KV computed for something else."""
        layout = self.scope.layout
        held = layout.tokens_in(chunk.shape)
        if tokens is not None:
            full = held == tokens > 0
        else:
            full = held == self.chunk_size or (index == num_keys - 1 and 0 < held < self.chunk_size)
        if full and str(chunk.dtype) == f"torch.{layout.dtype}":
            return True
        log.warning("chunk %d with shape %s / %s does not match %s with %d-token chunks; treating it as a miss",
                    index, tuple(chunk.shape), chunk.dtype, layout, self.chunk_size)
        return False

    def retrieve(
        self, tokens: Sequence[int] | np.ndarray | torch.Tensor, device: str | torch.device = "cpu"
    ) -> torch.Tensor | None:
        """KV ``[layers, 2, hit_tokens, kv_heads, head_dim]`` of the longest cached prefix, or None
        (page-packed scopes: in their :meth:`~lmcache_core.keys.KVLayout.chunk_shape`).

        A chunk that vanished or turned out corrupt since :meth:`lookup` shortens the hit; it
        never yields wrong data.
        """
        chunks = self.retrieve_chunks(self.keys(tokens))
        if not chunks:
            return None
        layout = self.scope.layout
        total = sum(layout.tokens_in(chunk.shape) for chunk in chunks)
        out = torch.empty(layout.chunk_shape(total), dtype=chunks[0].dtype, device=device)
        position = 0
        for chunk in chunks:  # straight into the destination: no host-side concatenation
            steps = chunk.shape[layout.token_axis]
            out.narrow(layout.token_axis, position, steps).copy_(chunk, non_blocking=True)
            position += steps
        if out.device.type == "cuda":
            torch.cuda.current_stream(out.device).synchronize()  # the sources may be evicted after return
        return out

    def retrieve_chunks(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor]:
        """KV of the longest retrievable prefix of ``keys``, one tensor per chunk, shapes checked."""
        return [chunk for chunk in self.load(keys).chunks if chunk is not None]

    def _check_layout(self, kv: torch.Tensor) -> int:
        """The number of tokens ``kv`` holds; ``ValueError`` naming the expected shape otherwise."""
        layout = self.scope.layout
        tokens = layout.tokens_in(kv.shape)
        if tokens < 0:
            expected = (f"[layers, pages, kv_heads, {layout.block_size}, {layout.kv_factor} * head_dim] = "
                        f"{layout.chunk_shape(layout.block_size)} per page" if layout.page_packed else
                        f"[layers, {layout.kv_factor}, tokens, kv_heads, head_dim] = {layout.chunk_shape(-1)}")
            raise ValueError(f"kv must be {expected}, got {tuple(kv.shape)}")
        if str(kv.dtype) != f"torch.{layout.dtype}":
            raise ValueError(f"kv dtype {kv.dtype} does not match the layout's {layout.dtype}")
        return tokens

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait for background writes to lower tiers (tests, shutdown)."""
        return self.stack.flush(timeout)

    def stats(self) -> dict[str, dict[str, float]]:
        return self.stack.stats()

    def close(self) -> None:
        self.stack.flush(timeout=10)
        self.stack.close()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def codecs_for_kv(settings: Settings, dtype: str, codecs: Mapping[str, Codec] = BUILTIN_CODECS) -> Settings:
    """``settings`` with every codec that cannot encode ``dtype`` KV replaced by ``raw``.

    A lossy codec over already-quantized KV (vLLM keeps ``--kv-cache-dtype fp8`` caches as uint8)
    would corrupt every chunk, so the operator's choice yields here, with one warning that names
    the variables; the codec itself refuses such KV too, in case a chunk gets past this.
    """
    refused: list[str] = []
    updated = settings
    if not codec_accepts(get_codec(settings.codec, codecs), dtype):
        refused.append(f"LMCACHE_CODEC={settings.codec}")
        updated = settings.model_copy(update={"codec": "raw"})
    backends = {}
    for tier in settings.tiers:
        section = settings.backend(tier)
        if section.codec is not None and not codec_accepts(get_codec(section.codec, codecs), dtype):
            refused.append(f"LMCACHE_{tier.upper()}__CODEC={section.codec}")
            section = section.model_copy(update={"codec": "raw"})
        backends[tier] = section
    if not refused:
        return settings
    updated._backends = backends
    log.warning("%s cannot encode %s KV (already quantized, e.g. vLLM's --kv-cache-dtype fp8); "
                "storing it with the raw codec instead", ", ".join(refused), dtype)
    return updated
