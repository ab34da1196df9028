"""The object-store backend against a real S3 API (moto's server on loopback, through s3fs), and
through fsspec's memory filesystem: the conformance suite, endpoint and credential handling,
concurrency, request counts, buckets and missing packages."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from services import MotoServer

from lmcache_core.backend import BackendContext
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVLayout
from lmcache_core.testing.conformance import SerializingBackendConformance, assert_same, make_chunks
from lmcache_s3.backend import ObjectStoreBackend
from lmcache_s3.settings import S3Settings

pytestmark = pytest.mark.integration


def make_backend(url: str, **settings: object) -> ObjectStoreBackend:
    return ObjectStoreBackend(S3Settings(url=url, **settings), BackendContext("s3", "raw"))  # type: ignore[arg-type]


class TestS3Conformance(SerializingBackendConformance):
    @pytest.fixture
    def backend(self, s3_url: str):
        backend = make_backend(s3_url)
        backend.check_health()
        yield backend
        backend.close()


class TestMemoryFilesystemConformance(SerializingBackendConformance):
    """Any fsspec filesystem works; memory:// needs no service (and is shared only in-process)."""

    @pytest.fixture
    def backend(self):
        backend = make_backend(f"memory://lmcache-{uuid.uuid4().hex[:8]}/cache")
        yield backend
        backend.clear()
        backend.close()


class _CallRecorder:
    """Wraps s3fs's ``_call_s3`` to record the S3 operations a batch makes and how many overlap."""

    def __init__(self, backend: ObjectStoreBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        fs = backend._filesystem()
        original = fs._call_s3
        self.methods: list[str] = []
        self.in_flight = 0
        self.peak = 0

        async def recording(method, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.methods.append(method)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(0.01)  # let the other requests of the batch start
                return await original(method, *args, **kwargs)
            finally:
                self.in_flight -= 1

        monkeypatch.setattr(fs, "_call_s3", recording)

    def reset(self) -> None:
        self.methods.clear()
        self.peak = 0


def test_batches_run_concurrently_with_one_request_per_chunk(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend(s3_url, max_concurrency=8)
    chunks = make_chunks(16)
    keys = [c.key for c in chunks]
    calls = _CallRecorder(backend, monkeypatch)
    for operation, method in ((lambda: backend.put_many(chunks), "put_object"),
                              (lambda: backend.contains(keys), "head_object"),
                              (lambda: backend.get_many(keys), "get_object")):
        calls.reset()
        operation()
        assert calls.methods == [method] * 16  # no HEAD before a GET, no listing for an existence check
        assert calls.peak == 8  # concurrent, bounded by max_concurrency
    backend.close()


def test_objects_arrive_in_writable_memory(s3_url: str) -> None:
    """One GET per object, read straight into the buffer the tensor uses: no copy in the decoder."""
    backend = make_backend(s3_url)
    chunks = make_chunks(2)
    backend.put_many(chunks)
    blobs = backend._read_blobs([str(c.key) for c in chunks])
    assert all(isinstance(blob, memoryview) and not blob.readonly for blob in blobs)
    backend.close()


def test_objects_are_laid_out_by_namespace_and_model(s3_url: str) -> None:
    backend = make_backend(s3_url)
    chunks = make_chunks(2, namespace="tenant-a")
    backend.put_many(chunks)
    fs = backend._filesystem()
    bucket_prefix = s3_url.removeprefix("s3://")
    stored = sorted(fs.find(bucket_prefix))
    expected = sorted(f"{bucket_prefix}/{str(c.key).replace(':', '/')}" for c in chunks)
    assert stored == expected
    assert all(f"{bucket_prefix}/v1/tenant-a/conformance-model@" in path for path in stored)
    backend.close()


def test_endpoint_from_settings(moto_server: MotoServer, aws_env: dict[str, str]) -> None:
    bucket = f"lmcache-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    backend = make_backend(f"s3://{bucket}/x", endpoint_url=moto_server.endpoint_url, region="us-east-1")
    backend.check_health()
    chunks = make_chunks(2)
    backend.put_many(chunks)
    assert_same(backend.get_many([chunks[1].key])[0], chunks[1].kv)
    backend.close()


def test_missing_bucket_is_reported_or_created(s3_url: str) -> None:
    url = f"s3://lmcache-new-{uuid.uuid4().hex[:8]}/cache"
    backend = make_backend(url)
    with pytest.raises(FileNotFoundError, match="LMCACHE_S3__CREATE_BUCKET=true"):
        backend.check_health()
    backend.close()
    creating = make_backend(url, create_bucket=True)
    creating.check_health()
    chunks = make_chunks(1)
    creating.put_many(chunks)
    assert creating.contains([chunks[0].key]) == 1
    creating.close()


@pytest.mark.parametrize(("url", "package"), [("gs://bucket/x", "gcsfs"), ("az://container/x", "adlfs")])
def test_other_stores_name_the_package_to_install(url: str, package: str) -> None:
    pytest.importorskip("fsspec")
    try:
        __import__(package)
    except ImportError:
        pass
    else:
        pytest.skip(f"{package} is installed")
    backend = make_backend(url)
    with pytest.raises(ImportError, match=f"pip install '{package}'"):
        backend.check_health()


def test_storage_options_accept_json() -> None:
    settings = S3Settings(url="s3://b/p", storage_options='{"profile": "cache", "anon": false}')
    assert settings.storage_options == {"profile": "cache", "anon": False}


def test_engine_round_trip_through_remote_url(s3_url: str) -> None:
    """LMCACHE_REMOTE_URL=s3://... selects this backend; the endpoint comes from AWS_ENDPOINT_URL."""
    layout = KVLayout(2, 2, 16, "bfloat16")
    environ = {"LMCACHE_LOCAL_CPU": "false", "LMCACHE_REMOTE_URL": s3_url, "LMCACHE_CHUNK_SIZE": "16",
               "LMCACHE_S3__REQUIRED": "true"}
    engine = CacheEngine.from_env(model_name="m", layout=layout, environ=environ)
    assert engine.settings.tiers == ["s3"]
    tokens = list(range(48))
    kv = torch.randn(layout.chunk_shape(48)).to(torch.bfloat16)
    assert engine.store(tokens, kv) == 48
    engine.flush()
    assert engine.lookup(tokens) == 48
    retrieved = engine.retrieve(tokens)
    assert retrieved is not None and torch.equal(retrieved, kv)
    engine.close()
