"""The conformance suite every storage backend runs against itself, ours or a third party's.

Subclass :class:`BackendConformance` (or :class:`SerializingBackendConformance` for backends built
on :class:`~lmcache_core.backend.SerializingBackend`) in a test module and provide a ``backend`` fixture that
yields a fresh, empty backend (against the real storage service)::

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend(self, tmp_path):
            backend = MyBackend(MySettings(...), BackendContext("mine", "raw"))
            yield backend
            backend.close()

A backend that knowingly deviates marks one test at a time, with a reason::

    test_iter_keys_lists_stored = pytest.mark.skip(reason="the service cannot list keys")(
        BackendConformance.test_iter_keys_lists_stored)
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from lmcache_core.backend import Chunk, SerializingBackend, StorageBackend
from lmcache_core.keys import CacheScope, ChunkHasher, ChunkKey, KVLayout
from lmcache_core.serde import FORMAT_VERSION, derive_mac_key, encode_chunk

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")


def make_chunks(
    count: int,
    *,
    tokens_per_chunk: int = 16,
    layout: KVLayout = LAYOUT,
    seed: int = 0,
    namespace: str = "conformance",
) -> list[Chunk]:
    """``count`` chunks of one prompt: chained keys and random KV of ``layout``."""
    generator = torch.Generator().manual_seed(seed)
    scope = CacheScope(namespace, "conformance-model", "0" * 16, layout)
    hasher = ChunkHasher(scope, chunk_size=tokens_per_chunk)
    tokens = torch.randint(0, 50_000, (count * tokens_per_chunk,), generator=generator)
    keys = hasher.keys(tokens.numpy())
    dtype = getattr(torch, layout.dtype)
    return [
        Chunk(key, torch.randn(layout.chunk_shape(tokens_per_chunk), generator=generator).to(dtype), index)
        for index, key in enumerate(keys)
    ]


def assert_same(actual: torch.Tensor | None, expected: torch.Tensor) -> None:
    assert actual is not None, "expected a hit, got a miss"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual.view(torch.uint8), expected.contiguous().view(torch.uint8)), "bytes differ"


class BackendConformance:
    """Behaviour every backend owes the tier stack. Provide a ``backend`` fixture."""

    @pytest.fixture
    def backend(self) -> StorageBackend:  # pragma: no cover - must be overridden
        raise NotImplementedError("subclasses provide a `backend` fixture")

    def settle(self, backend: StorageBackend) -> None:
        """Hook for eventually consistent stores: wait until writes are visible."""

    def test_empty_backend_misses(self, backend: StorageBackend) -> None:
        chunks = make_chunks(3)
        keys = [c.key for c in chunks]
        assert backend.contains(keys) == 0
        assert backend.get_many(keys) == [None, None, None]

    def test_round_trip_is_bit_exact(self, backend: StorageBackend) -> None:
        chunks = make_chunks(4)
        backend.put_many(chunks)
        self.settle(backend)
        assert backend.contains([c.key for c in chunks]) == 4
        for chunk, got in zip(chunks, backend.get_many([c.key for c in chunks]), strict=True):
            assert_same(got, chunk.kv)

    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_dtypes(self, backend: StorageBackend, dtype: str) -> None:
        layout = KVLayout(2, 1, 8, dtype)
        chunks = make_chunks(2, layout=layout, seed=3)
        backend.put_many(chunks)
        self.settle(backend)
        for chunk, got in zip(chunks, backend.get_many([c.key for c in chunks]), strict=True):
            assert_same(got, chunk.kv)

    def test_contains_stops_at_first_gap(self, backend: StorageBackend) -> None:
        chunks = make_chunks(5)
        backend.put_many([chunks[0], chunks[1], chunks[3], chunks[4]])
        self.settle(backend)
        assert backend.contains([c.key for c in chunks]) == 2

    def test_get_many_aligns_misses(self, backend: StorageBackend) -> None:
        chunks = make_chunks(3)
        backend.put_many([chunks[1]])
        self.settle(backend)
        got = backend.get_many([c.key for c in chunks])
        assert got[0] is None and got[2] is None
        assert_same(got[1], chunks[1].kv)

    def test_keys_of_other_namespaces_miss(self, backend: StorageBackend) -> None:
        ours = make_chunks(2, namespace="tenant-a")
        theirs = make_chunks(2, namespace="tenant-b")  # same tokens and KV, other tenant
        backend.put_many(ours)
        self.settle(backend)
        assert backend.contains([c.key for c in theirs]) == 0
        assert backend.get_many([c.key for c in theirs]) == [None, None]

    def test_put_is_idempotent(self, backend: StorageBackend) -> None:
        chunks = make_chunks(2)
        backend.put_many(chunks)
        backend.put_many(chunks)
        self.settle(backend)
        assert_same(backend.get_many([chunks[0].key])[0], chunks[0].kv)

    def test_delete(self, backend: StorageBackend) -> None:
        chunks = make_chunks(3)
        backend.put_many(chunks)
        self.settle(backend)
        assert backend.delete([chunks[1].key]) == 1
        self.settle(backend)
        assert backend.contains([c.key for c in chunks]) == 1
        assert backend.get_many([chunks[1].key]) == [None]
        assert backend.delete([chunks[1].key]) == 0

    def test_large_chunk(self, backend: StorageBackend) -> None:
        layout = KVLayout(4, 8, 128, "bfloat16")  # 4 * 2 * 64 * 8 * 128 * 2 bytes = 1 MiB
        chunks = make_chunks(2, tokens_per_chunk=64, layout=layout, seed=7)
        assert chunks[0].kv.nbytes == 1024 * 1024
        backend.put_many(chunks)
        self.settle(backend)
        for chunk, got in zip(chunks, backend.get_many([c.key for c in chunks]), strict=True):
            assert_same(got, chunk.kv)

    def test_many_chunks_in_one_batch(self, backend: StorageBackend) -> None:
        chunks = make_chunks(64, tokens_per_chunk=4)
        backend.put_many(chunks)
        self.settle(backend)
        assert backend.contains([c.key for c in chunks]) == 64
        assert all(got is not None for got in backend.get_many([c.key for c in chunks]))

    def test_iter_keys_lists_stored(self, backend: StorageBackend) -> None:
        chunks = make_chunks(3)
        backend.put_many(chunks)
        self.settle(backend)
        listed = set(backend.iter_keys())
        assert {str(c.key) for c in chunks} <= listed
        assert all(isinstance(ChunkKey.parse(name), ChunkKey) for name in listed)

    def test_concurrent_puts_and_gets(self, backend: StorageBackend) -> None:
        batches = [make_chunks(4, seed=seed, namespace=f"thread-{seed}") for seed in range(4)]
        errors: list[BaseException] = []

        def work(chunks: list[Chunk]) -> None:
            try:
                for _ in range(3):
                    backend.put_many(chunks)
                    backend.get_many([c.key for c in chunks])
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(batch,)) for batch in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        self.settle(backend)
        for chunks in batches:
            for chunk, got in zip(chunks, backend.get_many([c.key for c in chunks]), strict=True):
                assert_same(got, chunk.kv)



class SerializingBackendConformance(BackendConformance):
    """Extra checks for backends that store bytes: damaged and foreign objects are misses."""

    def test_corrupted_object_is_a_miss(self, backend: SerializingBackend) -> None:
        chunk = make_chunks(1)[0]
        parts = encode_chunk(chunk.key, chunk.kv)
        damaged = bytearray(b"".join(parts))
        damaged[-10] ^= 0xFF
        backend._write_blobs([(str(chunk.key), [memoryview(damaged)])])
        self.settle(backend)
        assert backend.get_many([chunk.key]) == [None]
        assert backend.counters["corrupt_entries"] >= 1

    def test_truncated_object_is_a_miss(self, backend: SerializingBackend) -> None:
        chunk = make_chunks(1)[0]
        whole = b"".join(encode_chunk(chunk.key, chunk.kv))
        backend._write_blobs([(str(chunk.key), [memoryview(whole[: len(whole) // 2])])])
        self.settle(backend)
        assert backend.get_many([chunk.key]) == [None]

    def test_foreign_object_is_a_miss(self, backend: SerializingBackend) -> None:
        mine, other = make_chunks(2)
        # a valid object, but written for another key: must never be served for this one
        backend._write_blobs([(str(mine.key), encode_chunk(other.key, other.kv))])
        self.settle(backend)
        assert backend.get_many([mine.key]) == [None]
        backend._write_blobs([(str(mine.key), [memoryview(b"not ours at all" * 20)])])
        self.settle(backend)
        assert backend.get_many([mine.key]) == [None]

    def test_object_of_a_newer_format_is_a_miss_left_in_place(self, backend: SerializingBackend) -> None:
        """Another lmcache-core version sharing the store wrote it: we cannot read it, and must not
        delete it from under the instances that can."""
        chunk = make_chunks(1)[0]
        newer = bytearray(b"".join(encode_chunk(chunk.key, chunk.kv)))
        newer[4:6] = (FORMAT_VERSION + 1).to_bytes(2, "little")
        backend._write_blobs([(str(chunk.key), [memoryview(newer)])])
        self.settle(backend)
        assert backend.get_many([chunk.key]) == [None]
        assert backend.counters["unsupported_entries"] == 1
        assert backend.counters["corrupt_entries"] == 0
        assert backend._read_blobs([str(chunk.key)]) == [newer]
        # no longer advertised, or an engine would plan to load it on every request ...
        assert backend.contains([chunk.key]) == 0
        # ... until this instance stores its own copy, which it can read
        backend.put_many([chunk])
        self.settle(backend)
        assert backend.contains([chunk.key]) == 1
        assert_same(backend.get_many([chunk.key])[0], chunk.kv)

    def test_forged_object_is_a_miss_under_a_key_secret(self, backend: SerializingBackend) -> None:
        """With LMCACHE_KEY_SECRET the core hands the backend a MAC key in its context; objects
        without a valid MAC (written by someone who can write the store but lacks the secret) are
        misses, removed, and the backend's own writes are authenticated."""
        backend.context = replace(backend.context, mac_key=derive_mac_key("conformance secret"))
        mine, forged = make_chunks(2)
        backend.put_many([mine])
        backend._write_blobs([(str(forged.key), encode_chunk(forged.key, forged.kv))])  # well-formed, no MAC
        self.settle(backend)
        assert_same(backend.get_many([mine.key])[0], mine.kv)
        assert backend.get_many([forged.key]) == [None]
        assert backend.counters["forged_entries"] == 1
        assert backend._read_blobs([str(forged.key)]) == [None]
