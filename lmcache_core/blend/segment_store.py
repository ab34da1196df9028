"""Segments' KV in the tiers: stored at positions ``0..n-1``, found by content, placed at any offset.

:meth:`SegmentStore.store` keeps each segment of a computed prompt under its position-independent
key (:meth:`~lmcache_core.keys.ChunkHasher.segment_key`), its keys rotated back to the positions
``0..n-1`` (:func:`.rope.rerotate_keys`), so the stored object does not depend on where the segment
was computed and carries no positions of its own. :meth:`SegmentStore.place` looks a prompt's
segments up and returns their KV rotated to the prompt's positions, with the mask of tokens it
covers: the input of :func:`.blender.blend`. The chunks go through the engine's tiers like any
other (cpu, disk, remote), checked on the way back (:meth:`~lmcache_core.engine.CacheEngine.load_segments`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmcache_core.backend import Chunk
from lmcache_core.blend.rope import rerotate_keys
from lmcache_core.blend.segments import Segment
from lmcache_core.engine import CacheEngine


@dataclass
class Placement:
    """A prompt's cached segment KV at the prompt's positions: the input of :func:`.blender.blend`."""

    kv: torch.Tensor  # [layers, 2, tokens, kv_heads, head_dim]; rows outside ``cached`` are zeros
    cached: torch.Tensor  # bool [tokens]
    hits: list[Segment]


class SegmentStore:
    """Store and place segments through ``engine`` (a token-major scope), for a model whose rotary
    frequencies are ``inv_freq`` (:func:`.rope.inv_freq_for`)."""

    def __init__(self, engine: CacheEngine, inv_freq: torch.Tensor) -> None:
        if engine.scope.layout.page_packed or engine.scope.layout.kv_factor != 2:
            raise ValueError("segments are stored token-major with separate K and V")
        self.engine = engine
        self.inv_freq = inv_freq

    def store(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, kv: torch.Tensor,
              segments: Sequence[Segment], first_position: int = 0) -> int:
        """Store ``segments`` of ``tokens``, whose KV ``kv`` was computed at positions
        ``first_position, first_position + 1, ...``; returns the number of segments written."""
        ids = _ids(tokens)
        if kv.shape[2] < len(ids):
            raise ValueError(f"kv covers {kv.shape[2]} tokens, fewer than the {len(ids)} token ids")
        chunks = []
        for index, segment in enumerate(segments):
            if not 0 <= segment.start < segment.end <= len(ids):
                raise ValueError(f"segment {segment} is outside the {len(ids)} tokens")
            part = kv[:, :, segment.start : segment.end].clone()
            stored_at = torch.arange(first_position + segment.start, first_position + segment.end)
            for layer in range(part.shape[0]):
                part[layer, 0] = rerotate_keys(part[layer, 0], stored_at, torch.arange(len(segment)), self.inv_freq)
            key = self.engine.hasher.segment_key(ids[segment.start : segment.end])
            chunks.append(Chunk(key, part, index, owned=True, first_position=0))
        self.engine.save(chunks)
        return len(chunks)

    def place(self, prompt: Sequence[int] | np.ndarray | torch.Tensor, segments: Sequence[Segment]) -> Placement:
        """The stored KV of ``prompt``'s ``segments`` at their positions in ``prompt`` (misses stay uncached)."""
        ids = _ids(prompt)
        layout = self.engine.scope.layout
        keys = [self.engine.hasher.segment_key(ids[s.start : s.end]) for s in segments]
        loaded = self.engine.load_segments(keys, [len(s) for s in segments])
        kv = torch.zeros(layout.chunk_shape(len(ids)), dtype=getattr(torch, layout.dtype))
        cached = torch.zeros(len(ids), dtype=torch.bool)
        hits = []
        for segment, chunk in zip(segments, loaded.chunks, strict=True):
            if chunk is None:
                continue
            rows = slice(segment.start, segment.end)
            kv[:, 1, rows] = chunk[:, 1]
            for layer in range(chunk.shape[0]):
                kv[layer, 0, rows] = rerotate_keys(chunk[layer, 0], torch.arange(len(segment)),
                                                   torch.arange(segment.start, segment.end), self.inv_freq)
            cached[rows] = True
            hits.append(segment)
        return Placement(kv, cached, hits)


def _ids(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    return np.asarray(tokens, dtype=np.uint32)
