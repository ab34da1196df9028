"""Chunk keys: deterministic, chained (one key names a whole prefix), and scoped so that tenants,
models, layouts and ranks can never address each other's KV."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmcache_core.keys import (
    HASH_ALGORITHMS,
    KEY_SCHEMA_VERSION,
    CacheScope,
    ChunkHasher,
    ChunkKey,
    KVLayout,
    config_digest,
)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=4, head_dim=8, dtype="bfloat16")
SCOPE = CacheScope("tenant", "org/model", config_digest({"hidden_size": 64}), LAYOUT)
CHUNK = 4

token_ids = st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=10 * CHUNK)
algorithms = st.sampled_from(HASH_ALGORITHMS)


def hasher(scope: CacheScope = SCOPE, algorithm: str = "blake3", secret: bytes | None = None) -> ChunkHasher:
    return ChunkHasher(scope, chunk_size=CHUNK, algorithm=algorithm, secret=secret)


# --- determinism --------------------------------------------------------------------------------


@given(tokens=token_ids, algorithm=algorithms)
def test_same_tokens_and_scope_give_the_same_keys(tokens: list[int], algorithm: str) -> None:
    assert hasher(algorithm=algorithm).keys(tokens) == hasher(algorithm=algorithm).keys(list(tokens))


_SUBPROCESS_KEYS = """
import json, sys
from lmcache_core.keys import CacheScope, ChunkHasher, KVLayout
spec = json.loads(sys.argv[1])
scope = CacheScope(spec["namespace"], spec["model"], spec["digest"], KVLayout(*spec["layout"]))
out = {}
for algorithm in spec["algorithms"]:
    hasher = ChunkHasher(scope, chunk_size=spec["chunk"], algorithm=algorithm, secret=b"s3cret")
    out[algorithm] = [str(key) for key in hasher.keys(spec["tokens"], include_partial=True)]
print(json.dumps(out))
"""


def test_keys_are_identical_in_a_fresh_process_with_another_hash_seed() -> None:
    tokens = list(range(1000, 1000 + 5 * CHUNK + 3))
    spec = {
        "namespace": SCOPE.namespace,
        "model": SCOPE.model_name,
        "digest": SCOPE.model_digest,
        "layout": dataclasses.astuple(LAYOUT),
        "chunk": CHUNK,
        "algorithms": list(HASH_ALGORITHMS),
        "tokens": tokens,
    }
    other_hash_seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    result = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_KEYS, json.dumps(spec)],
        env={**os.environ, "PYTHONHASHSEED": other_hash_seed},
        capture_output=True,
        text=True,
        check=True,
    )
    here = {
        algorithm: [str(k) for k in hasher(algorithm=algorithm, secret=b"s3cret").keys(tokens, include_partial=True)]
        for algorithm in HASH_ALGORITHMS
    }
    assert json.loads(result.stdout) == here
    assert all(len(keys) == 6 for keys in here.values())


def test_chain_follows_the_documented_definition() -> None:
    """digest[i] = H(digest[i-1] || tokens[i] as little-endian uint32): one key names a whole prefix."""
    import blake3

    scope = CacheScope("default", "m", "0" * 16, KVLayout(1, 1, 1, "float32"))
    keys = ChunkHasher(scope, chunk_size=2).keys([1, 2, 3, 4, 5, 6])
    assert keys[0].prefix == f"v{KEY_SCHEMA_VERSION}:default:m@000000000000:float32-l1h1d1:r0of1"
    for previous, key, chunk in zip(keys[:-1], keys[1:], ([3, 4], [5, 6]), strict=True):
        data = previous.digest + np.array(chunk, dtype="<u4").tobytes()
        assert key.digest == blake3.blake3(data).digest(length=16)


# --- chaining: one key names a whole prefix -----------------------------------------------------


@given(tokens=token_ids, cut=st.integers(0, 10 * CHUNK), algorithm=algorithms)
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(tokens: list[int], cut: int, algorithm: str) -> None:
    h = hasher(algorithm=algorithm)
    full = h.keys(tokens)
    assert h.keys(tokens[:cut]) == full[: min(cut, len(tokens)) // CHUNK]


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=CHUNK, max_size=8 * CHUNK),
    position=st.integers(0, 8 * CHUNK - 1),
    delta=st.integers(1, 2**32 - 1),
    algorithm=algorithms,
)
def test_changing_a_token_changes_its_chunk_and_all_later_keys_only(
    tokens: list[int], position: int, delta: int, algorithm: str
) -> None:
    position %= len(tokens) // CHUNK * CHUNK  # a token inside a full chunk
    changed = list(tokens)
    changed[position] = (changed[position] + delta) % 2**32
    h = hasher(algorithm=algorithm)
    before, after = h.keys(tokens), h.keys(changed)
    chunk = position // CHUNK
    assert before[:chunk] == after[:chunk]
    assert all(b != a for b, a in zip(before[chunk:], after[chunk:], strict=True))


def test_identical_chunks_at_different_positions_get_different_keys() -> None:
    keys = hasher().keys([7] * (4 * CHUNK))
    assert len(set(keys)) == 4


# --- scope isolation ----------------------------------------------------------------------------

_OTHER_SCOPES = {
    "namespace": dataclasses.replace(SCOPE, namespace="other-tenant"),
    "model name": dataclasses.replace(SCOPE, model_name="org/other-model"),
    "model digest": dataclasses.replace(SCOPE, model_digest=config_digest({"hidden_size": 65})),
    "dtype": dataclasses.replace(SCOPE, layout=dataclasses.replace(LAYOUT, dtype="float16")),
    "layers": dataclasses.replace(SCOPE, layout=dataclasses.replace(LAYOUT, num_layers=3)),
    "kv heads": dataclasses.replace(SCOPE, layout=dataclasses.replace(LAYOUT, num_kv_heads=8)),
    "head dim": dataclasses.replace(SCOPE, layout=dataclasses.replace(LAYOUT, head_dim=16)),
    "tp rank": dataclasses.replace(SCOPE, tp_rank=1, tp_world_size=2),
    "tp world size": dataclasses.replace(SCOPE, tp_world_size=2),
    "page-packed": dataclasses.replace(SCOPE, layout=dataclasses.replace(LAYOUT, page_layout="cpu", block_size=2)),
    "other page layout": dataclasses.replace(
        SCOPE, layout=dataclasses.replace(LAYOUT, page_layout="cpu_amx", block_size=2)),
    "other page size": dataclasses.replace(SCOPE, layout=dataclasses.replace(LAYOUT, page_layout="cpu", block_size=4)),
}
_TOKENS = list(range(6 * CHUNK + 1))


def _disjoint(a: list[ChunkKey], b: list[ChunkKey]) -> bool:
    return len(a) == len(b) > 0 and not {k.digest for k in a} & {k.digest for k in b} and not set(a) & set(b)


@pytest.mark.parametrize("what", sorted(_OTHER_SCOPES))
@pytest.mark.parametrize("algorithm", HASH_ALGORITHMS)
def test_every_scope_field_changes_every_key(what: str, algorithm: str) -> None:
    ours = hasher(algorithm=algorithm).keys(_TOKENS, include_partial=True)
    theirs = hasher(_OTHER_SCOPES[what], algorithm=algorithm).keys(_TOKENS, include_partial=True)
    assert _disjoint(ours, theirs)


@pytest.mark.parametrize("algorithm", HASH_ALGORITHMS)
def test_secret_and_algorithm_change_every_key(algorithm: str) -> None:
    plain = hasher(algorithm=algorithm).keys(_TOKENS)
    keyed = hasher(algorithm=algorithm, secret=b"tenant-secret").keys(_TOKENS)
    other_secret = hasher(algorithm=algorithm, secret=b"tenant-secret2").keys(_TOKENS)
    assert _disjoint(plain, keyed) and _disjoint(keyed, other_secret)
    for other in HASH_ALGORITHMS:
        if other != algorithm:
            assert _disjoint(plain, hasher(algorithm=other).keys(_TOKENS))


# Scope text is free-form (tenant names, served model names, revision strings). Two different
# values must never share keys, even when they look alike once made safe for file names or when
# they only differ after the characters shown in the readable key prefix.
_scope_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)


@given(a=_scope_text, b=_scope_text)
@example(a="team a", b="team-a")
@example(a="acme/prod", b="acme-prod")
def test_distinct_namespaces_never_share_keys(a: str, b: str) -> None:
    if a == b:
        return
    keys_a = hasher(dataclasses.replace(SCOPE, namespace=a)).keys(_TOKENS)
    keys_b = hasher(dataclasses.replace(SCOPE, namespace=b)).keys(_TOKENS)
    assert _disjoint(keys_a, keys_b), f"namespaces {a!r} and {b!r} address the same KV"


@given(a=_scope_text, b=_scope_text)
@example(a="meta-llama/Llama-3-8B", b="meta-llama-Llama-3-8B")
def test_distinct_model_names_never_share_keys(a: str, b: str) -> None:
    if a == b:
        return
    keys_a = hasher(dataclasses.replace(SCOPE, model_name=a)).keys(_TOKENS)
    keys_b = hasher(dataclasses.replace(SCOPE, model_name=b)).keys(_TOKENS)
    assert _disjoint(keys_a, keys_b), f"model names {a!r} and {b!r} address the same KV"


@given(a=_scope_text, b=_scope_text)
@example(a="0123456789ab-rev1", b="0123456789ab-rev2")
@example(a="v1.0-config-a", b="v1.0-config-b")
def test_distinct_model_digests_never_share_keys(a: str, b: str) -> None:
    if a == b:
        return
    keys_a = hasher(dataclasses.replace(SCOPE, model_digest=a)).keys(_TOKENS)
    keys_b = hasher(dataclasses.replace(SCOPE, model_digest=b)).keys(_TOKENS)
    assert _disjoint(keys_a, keys_b), f"model digests {a!r} and {b!r} address the same KV"


def test_config_digest_is_stable_and_order_independent() -> None:
    assert config_digest({"a": 1, "b": [1, 2]}) == config_digest({"b": [1, 2], "a": 1})
    assert config_digest({"a": 1}) != config_digest({"a": 2})
    assert config_digest("x") == config_digest(b"x")


# --- partial chunks -----------------------------------------------------------------------------


@given(tokens=token_ids, algorithm=algorithms)
def test_partial_chunk_gets_a_key_only_when_asked(tokens: list[int], algorithm: str) -> None:
    h = hasher(algorithm=algorithm)
    full, with_partial = h.keys(tokens), h.keys(tokens, include_partial=True)
    remainder = len(tokens) % CHUNK
    assert len(full) == len(tokens) // CHUNK
    assert len(with_partial) == len(full) + (1 if remainder else 0)
    assert with_partial[: len(full)] == full
    assert h.chunk_bounds(len(tokens)) == [(i * CHUNK, (i + 1) * CHUNK) for i in range(len(full))]
    bounds = h.chunk_bounds(len(tokens), include_partial=True)
    assert len(bounds) == len(with_partial)
    assert sum(end - start for start, end in bounds) == len(tokens)


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=CHUNK - 1),
    extension=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=2 * CHUNK),
    algorithm=algorithms,
)
def test_partial_chunk_key_differs_from_the_chunk_that_extends_it(
    tokens: list[int], extension: list[int], algorithm: str
) -> None:
    h = hasher(algorithm=algorithm)
    prefix = list(range(2 * CHUNK))
    (partial,) = h.keys(prefix + tokens, include_partial=True)[2:]
    longer = h.keys(prefix + tokens + extension, include_partial=True)[2:]
    assert partial not in longer


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkHasher(SCOPE, chunk_size=0)


def test_unknown_algorithm_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="blake3, sha256, xxh3_128"):
        ChunkHasher(SCOPE, algorithm="md5")


# --- input types --------------------------------------------------------------------------------


@given(tokens=token_ids, algorithm=algorithms)
@settings(deadline=None)
def test_list_numpy_and_torch_inputs_give_the_same_keys(tokens: list[int], algorithm: str) -> None:
    h = hasher(algorithm=algorithm)
    expected = h.keys(tokens, include_partial=True)
    as_int64 = np.array(tokens, dtype=np.int64)
    variants = [
        as_int64,
        np.array(tokens, dtype=np.uint32),
        np.repeat(as_int64, 2)[::2],  # non-contiguous view
        torch.tensor(tokens, dtype=torch.int64),
    ]
    if all(t < 2**31 for t in tokens):
        variants.append(torch.tensor(tokens, dtype=torch.int32))
    for variant in variants:
        assert h.keys(variant, include_partial=True) == expected


# --- key strings --------------------------------------------------------------------------------


@given(tokens=token_ids, namespace=_scope_text, algorithm=algorithms)
def test_key_string_round_trips(tokens: list[int], namespace: str, algorithm: str) -> None:
    scope = dataclasses.replace(SCOPE, namespace=namespace)
    for key in hasher(scope, algorithm=algorithm).keys(tokens, include_partial=True):
        text = str(key)
        assert ChunkKey.parse(text) == key
        assert text.isascii() and "/" not in text and " " not in text  # safe as a file name / object key


_layouts = st.builds(
    KVLayout,
    num_layers=st.integers(1, 200),
    num_kv_heads=st.integers(1, 128),
    head_dim=st.integers(1, 512),
    dtype=st.sampled_from(["bfloat16", "float16", "float32", "uint8", "float8_e4m3fn", "float8_e5m2"]),
) | st.builds(  # page-packed chunks (vLLM's CPU layouts)
    KVLayout,
    num_layers=st.integers(1, 200),
    num_kv_heads=st.integers(1, 128),
    head_dim=st.integers(1, 512),
    dtype=st.sampled_from(["bfloat16", "float32", "uint8"]),
    page_layout=st.sampled_from(["cpu", "cpu_amx"]),
    block_size=st.sampled_from([16, 32, 128]),
)
_scopes = st.builds(
    CacheScope,
    namespace=_scope_text,
    model_name=_scope_text,
    model_digest=st.one_of(st.just("unknown"), st.text("0123456789abcdef", min_size=12, max_size=64)),
    layout=_layouts,
    tp_rank=st.integers(0, 63),
    tp_world_size=st.integers(1, 64),
)


@given(scope=_scopes, tokens=token_ids, algorithm=algorithms)
def test_every_key_parses_back_to_itself(scope: CacheScope, tokens: list[int], algorithm: str) -> None:
    """parse(str(key)) == key for every scope the hasher accepts: the strict grammar never loses one
    of our own keys (``lmcache-core ls`` / ``clear`` would then leave it behind)."""
    for key in hasher(scope, algorithm=algorithm).keys(tokens, include_partial=True):
        assert ChunkKey.parse(str(key)) == key
        assert ChunkKey.parse(str(key)).in_namespace(scope.namespace)


_DIGEST = "0123456789abcdef" * 2
_VALID = f"v1:tenant:org-model@0123456789ab:bfloat16-l2h4d8:r0of1:{_DIGEST}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no-colon",
        "x1:tenant:00ff",
        "v1:tenant:not-hex",
        # other applications' keys in a shared Redis keyspace or bucket (defect 7)
        "visits:2024:10",
        "v9-not-a-chunk",
        "version:1:deadbeef",
        f"visits:2024:{_DIGEST}",
        f"v1:tenant:{_DIGEST}",
        # almost ours: every part of the grammar is checked
        _VALID[:-2],  # digest too short
        _VALID + "00",  # digest too long
        _VALID.upper(),  # str(key) writes lower-case hex
        _VALID.replace("v1:", "v:"),
        _VALID.replace("v1:", "vx:"),
        _VALID.replace(":tenant:", "::"),
        _VALID.replace(":tenant:", ":ten ant:"),
        _VALID.replace("org-model@", "org-model"),
        _VALID.replace(":bfloat16-l2h4d8:", ":bfloat16:"),
        _VALID.replace(":r0of1:", ":rank0:"),
        _VALID.replace(":r0of1:", ":"),
        " " + _VALID,
        _VALID + "\n",
    ],
)
def test_parse_rejects_what_is_not_a_key(text: str) -> None:
    with pytest.raises(ValueError):
        ChunkKey.parse(text)


def test_parse_accepts_fields_a_later_scope_adds() -> None:
    """The scope prefix may gain fields (say the KV format); keys with them still parse, round-trip,
    and keep their namespace, so an upgrade never makes ``clear`` skip (or touch) the wrong keys."""
    for text in (
        _VALID,
        _VALID.replace(":r0of1:", ":r0of1:kv-fp8_e4m3:"),
        _VALID.replace("@0123456789ab:", "@0123456789ab:w-5f2c9d1e:"),
        _VALID.replace("v1:", "v2:"),
    ):
        key = ChunkKey.parse(text)
        assert str(key) == text
        assert key.in_namespace("tenant") and not key.in_namespace("tenant-b")


def test_in_namespace_compares_the_namespace_as_the_prefix_writes_it() -> None:
    key = hasher(dataclasses.replace(SCOPE, namespace="team/a")).keys(_TOKENS)[0]
    assert key.in_namespace("team/a")
    assert not key.in_namespace("team")
    assert not key.in_namespace("a")


# --- vectorized hashing -------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", HASH_ALGORITHMS)
def test_a_million_tokens_hash_in_one_call(algorithm: str) -> None:
    tokens = np.random.default_rng(0).integers(0, 128_000, size=1_000_000, dtype=np.int64)
    h = ChunkHasher(SCOPE, chunk_size=256, algorithm=algorithm)
    keys = h.keys(tokens, include_partial=True)
    assert len(keys) == -(-1_000_000 // 256)
    assert len(set(keys)) == len(keys)
    assert keys[:10] == h.keys(tokens[: 10 * 256])


# --- KV format: what the dtype alone does not say ------------------------------------------------


@pytest.mark.parametrize("algorithm", HASH_ALGORITHMS)
def test_kv_format_changes_every_key_but_not_the_readable_prefix(algorithm: str) -> None:
    """vLLM keeps fp8_e4m3 and fp8_e5m2 caches both as uint8: only kv_format tells them apart."""
    fp8 = dataclasses.replace(SCOPE, layout=dataclasses.replace(LAYOUT, dtype="uint8"))
    e4m3 = hasher(dataclasses.replace(fp8, kv_format="fp8_e4m3"), algorithm=algorithm).keys(_TOKENS)
    e5m2 = hasher(dataclasses.replace(fp8, kv_format="fp8_e5m2"), algorithm=algorithm).keys(_TOKENS)
    assert _disjoint(e4m3, e5m2)
    assert {key.prefix for key in e4m3} == {key.prefix for key in e5m2} == {fp8.prefix}


def test_kv_format_defaults_to_auto() -> None:
    assert SCOPE.kv_format == "auto"
    assert json.loads(SCOPE.identity())[-1] == "auto"


# --- page-packed chunks ------------------------------------------------------------------------


def test_page_packed_chunks_have_their_own_shape_and_readable_prefix() -> None:
    packed = dataclasses.replace(LAYOUT, page_layout="cpu_amx", block_size=32)
    assert packed.chunk_shape(64) == (2, 2, 4, 32, 16)  # [layers, pages, heads, block, 2 * head_dim]
    assert packed.tokens_in((2, 2, 4, 32, 16)) == 64
    assert packed.tokens_in(LAYOUT.chunk_shape(64)) == -1  # a token-major chunk is not one of these
    assert LAYOUT.tokens_in(packed.chunk_shape(64)) == -1
    assert (packed.token_axis, packed.token_unit, LAYOUT.token_axis, LAYOUT.token_unit) == (1, 32, 2, 1)
    assert dataclasses.replace(SCOPE, layout=packed).prefix.endswith(":bfloat16-l2h4d8:pcpu_amx32:r0of1")
    with pytest.raises(ValueError, match="whole pages of 32 tokens"):
        packed.chunk_shape(48)
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(LAYOUT, page_layout="cpu")


def test_token_major_keys_do_not_change_with_the_page_fields() -> None:
    """Chunks stored before page-packing existed keep their keys: the fields join the identity only when set."""
    assert len(json.loads(SCOPE.identity())) == 11
