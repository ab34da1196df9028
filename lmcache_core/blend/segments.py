"""Segments of a prompt whose KV can be reused wherever they appear, and how they are found.

A segment is a run of tokens ``[start, end)``. Its key depends on its tokens and the cache scope
only (:meth:`~lmcache_core.keys.ChunkHasher.segment_key`), not on what precedes it, so the same
document hits at any offset; its KV is stored with the positions it was computed at and re-rotated
when reused (:mod:`.rope`). Two ways to find segments:

- **explicit**: a separator (``LMCACHE_BLEND_SPECIAL_STR``, ``" # # "`` as in LMCache) between
  segments, matched on the token ids of the string tokenized on its own
  (:func:`split_by_separator`); the separators themselves are not part of any segment.
- **content-defined** (:func:`content_defined_segments`): a boundary wherever a hash of the last
  ``window`` token ids has its low ``bits`` bits zero, at least ``min_tokens`` and at most
  ``max_tokens`` after the previous one. A boundary depends only on the tokens just before it, so a
  document placed anywhere yields the same segments from its first boundary on, without markup.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def split_by_separator(tokens: Sequence[int] | np.ndarray, separator: Sequence[int],
                       min_tokens: int = 1) -> list[Segment]:
    """The runs of ``tokens`` between occurrences of ``separator`` (and before the first / after the
    last), of at least ``min_tokens`` tokens."""
    ids = np.asarray(tokens, dtype=np.int64)
    sep = np.asarray(separator, dtype=np.int64)
    if sep.size == 0:
        raise ValueError("the separator has no tokens")
    starts = _occurrences(ids, sep)
    segments, begin = [], 0
    for found in starts:
        if found < begin:  # overlaps the previous separator
            continue
        segments.append(Segment(begin, int(found)))
        begin = int(found) + sep.size
    segments.append(Segment(begin, ids.size))
    return [segment for segment in segments if len(segment) >= min_tokens]


def content_defined_segments(tokens: Sequence[int] | np.ndarray, *, window: int = 16, bits: int = 7,
                             min_tokens: int = 64, max_tokens: int = 1024) -> list[Segment]:
    """Segments between content-defined boundaries (see the module docstring); the first segment
    starts at 0 and the last ends at the end of ``tokens``. Expected length: ``2 ** bits`` tokens
    beyond ``min_tokens``."""
    if not 0 < min_tokens <= max_tokens or window <= 0 or not 0 < bits < 32:
        raise ValueError("need 0 < min_tokens <= max_tokens, window > 0 and 0 < bits < 32")
    ids = np.asarray(tokens, dtype=np.uint64)
    candidates = np.nonzero(_window_hashes(ids, window) & np.uint64((1 << bits) - 1) == 0)[0] + 1
    boundaries, last = [], 0
    for candidate in candidates.tolist():
        while candidate - last > max_tokens:
            last += max_tokens
            boundaries.append(last)
        if candidate - last >= min_tokens and candidate >= window:
            boundaries.append(candidate)
            last = candidate
    while ids.size - last > max_tokens:
        last += max_tokens
        boundaries.append(last)
    edges = [0, *boundaries, int(ids.size)]
    return [Segment(a, b) for a, b in itertools.pairwise(edges) if b > a]


def _occurrences(ids: np.ndarray, sep: np.ndarray) -> list[int]:
    if ids.size < sep.size:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(ids, sep.size)
    return np.nonzero((windows == sep).all(axis=1))[0].tolist()


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every bit of a token id over the word (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _window_hashes(ids: np.ndarray, window: int) -> np.ndarray:
    """For each position ``i``, a hash of tokens ``i - window + 1 .. i`` (fewer at the start)."""
    with np.errstate(over="ignore"):
        sums = np.cumsum(_mix(ids), dtype=np.uint64)
        shifted = np.concatenate([np.zeros(window, dtype=np.uint64), sums[:-window]]) if ids.size > window else \
            np.zeros(ids.size, dtype=np.uint64)
        return _mix(sums - shifted[: ids.size])
