"""The object-store tier's existence check stops sending HEADs after the first missing key (issue 9,
defect 11): ``contains`` needs only the stored prefix, and each HEAD is a round trip the scheduler's
lookup waits for. Against moto's S3 server on loopback."""

from __future__ import annotations

from typing import Any

import pytest

from lmcache_core.backend import BackendContext
from lmcache_core.testing.conformance import make_chunks
from lmcache_s3.backend import ObjectStoreBackend
from lmcache_s3.settings import S3Settings

pytestmark = pytest.mark.integration


def heads_of(backend: ObjectStoreBackend, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    fs = backend._filesystem()
    original = fs._call_s3
    methods: list[str] = []

    async def recording(method: str, *args: Any, **kwargs: Any) -> Any:
        methods.append(method)
        return await original(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", recording)
    return methods


@pytest.mark.parametrize("concurrency", [1, 4])
def test_no_head_after_the_first_miss(s3_url: str, monkeypatch: pytest.MonkeyPatch, concurrency: int) -> None:
    backend = ObjectStoreBackend(S3Settings(url=s3_url, max_concurrency=concurrency),  # type: ignore[arg-type]
                                 BackendContext("s3", "raw"))
    chunks = make_chunks(16)
    backend.put_many(chunks[:2])
    methods = heads_of(backend, monkeypatch)
    assert backend.contains([chunk.key for chunk in chunks]) == 2
    # Two hits, the miss, and at most the HEADs already in flight when the miss came back.
    assert methods.count("head_object") <= 3 + concurrency - 1
    methods.clear()
    assert backend.contains([chunk.key for chunk in chunks[:2]]) == 2
    assert backend.delete([chunk.key for chunk in chunks]) == 2  # deleting still checks every key
    backend.close()
