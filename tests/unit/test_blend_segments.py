"""Segments for blending: separators, content-defined boundaries and position-independent keys."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lmcache_core.blend.segments import Segment, content_defined_segments, split_by_separator
from lmcache_core.keys import CacheScope, ChunkHasher, ChunkKey, KVLayout

SCOPE = CacheScope("tenant", "model", "0" * 16, KVLayout(2, 2, 8, "bfloat16"))


def test_separators_split_and_are_left_out() -> None:
    sep = [7, 7]
    tokens = [1, 2, 3, 7, 7, 4, 5, 7, 7, 7, 6]
    assert split_by_separator(tokens, sep) == [Segment(0, 3), Segment(5, 7), Segment(9, 11)]
    assert split_by_separator(tokens, sep, min_tokens=3) == [Segment(0, 3)]
    assert split_by_separator([1, 2], sep) == [Segment(0, 2)]
    with pytest.raises(ValueError, match="no tokens"):
        split_by_separator(tokens, [])


def test_a_document_gets_the_same_segments_at_any_offset() -> None:
    rng = np.random.default_rng(0)
    document = rng.integers(0, 50_000, 4000)
    alone = [s.start for s in content_defined_segments(document)[1:]]  # its inner boundaries
    for prefix_length in (1, 77, 1000):
        prompt = np.concatenate([rng.integers(0, 50_000, prefix_length), document, rng.integers(0, 50_000, 50)])
        placed = [s.start - prefix_length for s in content_defined_segments(prompt)
                  if prefix_length < s.start < prefix_length + len(document)]
        common = sorted(set(alone) & set(placed))
        assert common and common[0] <= alone[1]  # in step again by the document's second boundary at the latest
        assert [b for b in placed if b >= common[0]] == [b for b in alone if b >= common[0]]


def test_segment_lengths_stay_within_bounds() -> None:
    tokens = np.random.default_rng(1).integers(0, 50_000, 20_000)
    segments = content_defined_segments(tokens, min_tokens=100, max_tokens=400)
    assert segments[0].start == 0 and segments[-1].end == 20_000
    assert all(a.end == b.start for a, b in itertools.pairwise(segments))
    assert all(100 <= len(s) <= 400 for s in segments[:-1])
    assert 20_000 / len(segments) < 400  # content found boundaries, not only the forced ones
    repeated = content_defined_segments(np.full(5000, 3), min_tokens=100, max_tokens=400)
    assert all(len(s) == 400 for s in repeated[:-1])  # no content boundary: forced every max_tokens


def test_segment_keys_ignore_position_and_never_equal_chunk_keys() -> None:
    hasher = ChunkHasher(SCOPE, chunk_size=4)
    tokens = list(range(100, 108))
    key = hasher.segment_key(tokens)
    assert key == hasher.segment_key(np.array(tokens))
    assert key != hasher.segment_key(tokens[:-1])
    assert key.digest not in {k.digest for k in hasher.keys(tokens)}
    assert str(key).startswith(SCOPE.prefix + ":seg:")
    assert ChunkKey.parse(str(key)) == key
    other = ChunkHasher(CacheScope("other", "model", "0" * 16, KVLayout(2, 2, 8, "bfloat16")), chunk_size=4)
    assert other.segment_key(tokens).digest != key.digest
