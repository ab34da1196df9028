"""KV chunks as objects in an object store, through fsspec (s3fs for S3 and S3-compatible stores).

Layout: ``<bucket>/<prefix>/v1/<namespace>/<model>@<digest>/<layout>/r<rank>of<world>/<hex digest>``,
the chunk key with ``:`` turned into ``/``. Tenants and models are separate prefixes, so lifecycle
rules, listings and bulk deletes can target one namespace or one model. Every object is the
core's framed format, so any instance verifies what another one wrote.

Why it looks the way it does:

- **Concurrent batches.** A batch's requests run together on fsspec's event loop (at most
  ``max_concurrency`` in flight): one GET, PUT or HEAD per chunk, never one sequential round trip
  per chunk. Existence checks are concurrent HEADs of exactly the keys asked for (listing the prefix
  would read every chunk the model ever stored), and stop after the first missing key.
- **One request and one copy per object.** ``s3fs.cat`` HEADs an object before reading it (to
  decide on ranged reads) and returns immutable ``bytes`` that the decoder must copy again; we
  issue a single GET and read the body straight into the buffer the tensor will use. The
  filesystem is opened with ``max_concurrency=1`` (that option only governs splitting *one*
  object into parallel parts) so that generic fsspec calls skip the HEAD too.
- **Bounded time.** Each batch has one deadline (``timeout``) and is cancelled when it passes;
  botocore's retries are off and s3fs retries a transient error once, so an unreachable or paused
  store fails a call within the timeout instead of retrying for minutes. The tier stack skips the
  tier with backoff; the next call after it opens new connections, so a store that comes back is
  used again without a restart.
- The AWS credential chain and its variables (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
  ``AWS_ENDPOINT_URL``, ...) work unchanged: botocore reads them, we pass only what is configured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from lmcache_core.plugin_api import BackendContext, Blob, SerializingBackend, redact_url, select_keys
from lmcache_s3.settings import S3Settings

log = logging.getLogger(__name__)

_WITHOUT_BUCKETS = {"memory", "file", "local"}
_S3_TRANSIENT_ATTEMPTS = 2  # s3fs's own retry loop (default 5, with sleeps up to 15 s)


def _implementation_hint(scheme: str) -> str:
    """What to install for ``scheme``, from fsspec's own registry (whose error text the caller
    shows too): the package of the implementing class, e.g. gcsfs for gs://."""
    from fsspec.registry import known_implementations

    target = known_implementations.get(scheme, {}).get("class", "")
    package = target.partition(".")[0]
    hint = f"pip install '{package}'" if package else "the fsspec implementation of this protocol"
    return f"{hint}; s3:// also comes with lmcache-core[s3]" if package == "s3fs" else hint


class ObjectStoreBackend(SerializingBackend):
    settings: S3Settings
    # one request each, picked in _open() for the kind of filesystem
    _exists_one: Callable[[str], Any]
    _read_one: Callable[[str], Any]
    _write_one: Callable[[str, bytes], Any]

    def __init__(self, settings: S3Settings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.where = redact_url(settings.url)
        self.scheme = urlsplit(settings.url).scheme
        self._fs: Any = None
        self._root = ""
        self._is_async = False
        self._is_s3 = False
        self._open_lock = threading.Lock()

    # --- the filesystem -------------------------------------------------------------------------

    def _filesystem(self) -> Any:
        """The fsspec filesystem, opened on first use so that a store that is down at start-up
        leaves a tier that the stack retries, not a failed constructor."""
        if self._fs is None:
            with self._open_lock:
                if self._fs is None:
                    self._open()
        return self._fs

    def _open(self) -> None:
        import fsspec
        from fsspec.asyn import AsyncFileSystem

        options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if self.scheme in ("s3", "s3a"):
            options.update(self._s3_options())
        options.update(self.settings.storage_options)
        try:
            fs, root = fsspec.url_to_fs(self.settings.url, **options)
        except ImportError as error:  # fsspec knows the scheme, its implementation is not installed
            raise ImportError(f"tier {self.name}: {self.scheme}:// URLs need {_implementation_hint(self.scheme)} "
                              f"({error})") from error
        try:
            from s3fs import S3FileSystem

            self._is_s3 = isinstance(fs, S3FileSystem)
        except ImportError:  # pragma: no cover - gs:// or az:// without s3fs installed
            self._is_s3 = False
        if self._is_s3:
            fs.retries = _S3_TRANSIENT_ATTEMPTS
        self._is_async = isinstance(fs, AsyncFileSystem)
        self._root = root.rstrip("/")
        if self._is_s3:
            self._exists_one, self._read_one = self._head_s3_object, self._read_s3_object
        elif self._is_async:
            self._exists_one, self._read_one = fs._exists, fs._cat_file
        else:
            self._exists_one, self._read_one = fs.exists, fs.cat_file
        self._write_one = fs._pipe_file if self._is_async else fs.pipe_file
        self._fs = fs

    def _s3_options(self) -> dict[str, Any]:
        settings = self.settings
        options: dict[str, Any] = {
            "max_concurrency": 1,  # one GET per object, no HEAD first (see the module docstring)
            "config_kwargs": {
                "connect_timeout": settings.connect_timeout,
                "read_timeout": settings.timeout,
                "max_pool_connections": settings.max_concurrency,
                "retries": {"total_max_attempts": 1},
            },
        }
        if settings.endpoint_url:
            options["endpoint_url"] = settings.endpoint_url
        if settings.region:
            options["client_kwargs"] = {"region_name": settings.region}
        return options

    def _path(self, name: str) -> str:
        return f"{self._root}/{name.replace(':', '/')}"

    # --- running a batch ------------------------------------------------------------------------

    def _run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run one coroutine on fsspec's event loop; cancel it and raise ``TimeoutError`` when it
        outlives the timeout. ``make`` builds the coroutine inside the loop, so a cancelled batch
        never leaves a coroutine that was not awaited."""

        async def start() -> Any:
            return await make()

        future = asyncio.run_coroutine_threadsafe(start(), self._fs.loop)
        try:
            return future.result(timeout=self.settings.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self.where} did not answer within {self.settings.timeout:g} s") from None

    def _map(self, operation: Callable[[Any], Any], arguments: Sequence[Any]) -> list[Any]:
        """``operation(argument)`` for every argument, concurrently for async filesystems; each
        result is a value or the exception it raised."""
        self._filesystem()
        if not arguments:
            return []
        if not self._is_async:  # memory://, file://: local, nothing to overlap
            results = []
            for argument in arguments:
                try:
                    results.append(operation(argument))
                except Exception as error:
                    results.append(error)
            return results
        limit = self.settings.max_concurrency

        async def run_all() -> list[Any]:
            semaphore = asyncio.Semaphore(limit)

            async def one(argument: Any) -> Any:
                async with semaphore:
                    return await operation(argument)

            return await asyncio.gather(*(one(argument) for argument in arguments), return_exceptions=True)

        return self._run(run_all)

    @staticmethod
    def _unless_failed(results: list[Any], missing: Any) -> list[Any]:
        """Missing objects become ``missing``; any other error is raised, so the tier stack marks
        the tier unhealthy instead of serving a flood of slow misses."""
        out = []
        for result in results:
            if isinstance(result, FileNotFoundError):
                out.append(missing)
            elif isinstance(result, BaseException):
                raise result
            else:
                out.append(result)
        return out

    # --- blobs ----------------------------------------------------------------------------------

    def _exists_blobs(self, names: Sequence[str]) -> list[bool]:
        """Whether each name is stored, up to the first one that is not: the names after it are
        reported missing without a HEAD. ``contains`` needs only the stored prefix, and each HEAD
        is a round trip that the scheduler's lookup waits for (those already in flight finish)."""
        self._filesystem()
        paths = [self._path(name) for name in names]
        first_miss = len(paths)

        def noted(index: int, stored: Any) -> Any:
            nonlocal first_miss
            if stored is False:
                first_miss = min(first_miss, index)
            return stored

        def missed(index: int) -> bool:
            nonlocal first_miss
            first_miss = min(first_miss, index)
            return False

        if self._is_async:
            async def head(index: int) -> Any:
                if index > first_miss:
                    return False
                try:
                    return noted(index, await self._exists_one(paths[index]))
                except FileNotFoundError:
                    return missed(index)
        else:
            def head(index: int) -> Any:  # type: ignore[misc]
                if index > first_miss:
                    return False
                return noted(index, self._exists_one(paths[index]))

        return self._unless_failed(self._map(head, range(len(paths))), missing=False)

    def _read_blobs(self, names: Sequence[str]) -> list[Blob | None]:
        self._filesystem()
        return self._unless_failed(self._map(self._read_one, [self._path(name) for name in names]), missing=None)

    def _write_blobs(self, items: Sequence[tuple[str, list[memoryview]]]) -> None:
        self._filesystem()
        # One join per object: the client needs one body (to sign, checksum and maybe resend it).
        objects = [(self._path(name), b"".join(parts)) for name, parts in items]
        self._unless_failed(self._map(lambda item: self._write_one(*item), objects), missing=None)

    def _delete_blobs(self, names: Sequence[str]) -> int:
        fs = self._filesystem()
        paths = [self._path(name) for name in names]
        stored = self._unless_failed(self._map(self._exists_one, paths), missing=False)  # every name, not a prefix
        found = [path for path, hit in zip(paths, stored, strict=True) if hit]
        if found:
            if self._is_async:
                self._run(lambda: fs._rm(found))  # s3fs: one DeleteObjects per 1000 keys
            else:
                fs.rm(found)
        return len(found)

    async def _head_s3_object(self, path: str) -> bool:
        """One HEAD (s3fs's ``_exists`` lists the prefix after a 404, to find directories)."""
        bucket, key, _ = self._fs.split_path(path)
        await self._fs._call_s3("head_object", Bucket=bucket, Key=key)  # 404 -> FileNotFoundError
        return True

    async def _read_s3_object(self, path: str) -> memoryview:
        """GET one object into a writable buffer of its size. ``cat_file`` would join the body's
        blocks into ``bytes`` and the decoder would copy those once more (tensors need writable
        memory); this is one copy, and the tensor uses the buffer."""
        import numpy as np

        fs = self._fs
        bucket, key, _ = fs.split_path(path)
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)  # 404 -> FileNotFoundError
        body = response["Body"]
        try:
            target = memoryview(np.empty(response["ContentLength"], dtype=np.uint8))
            filled = 0
            while filled < target.nbytes:
                received = await body.readinto(target[filled:])
                if not received:
                    break
                filled += received
            await body.readinto(bytearray(1))  # at the end: botocore checks the length and checksum
            return target[:filled]
        finally:
            body.close()

    def iter_keys(self) -> Iterator[str]:
        fs = self._filesystem()
        start = len(self._root) + 1
        names = (fs._strip_protocol(path)[start:].replace("/", ":") for path in fs.find(self._root))
        for key in select_keys(names, None):  # skips objects that are not ours
            yield str(key)

    # --- health ---------------------------------------------------------------------------------

    def check_health(self) -> None:
        fs = self._filesystem()
        if self.scheme in _WITHOUT_BUCKETS:
            return
        bucket = self._root.split("/", 1)[0]
        try:
            if not self._is_async:  # pragma: no cover - the bucketed fsspec stores we know are async
                if self.settings.create_bucket:
                    fs.makedirs(bucket, exist_ok=True)
                fs.info(bucket)
                return
            if self.settings.create_bucket:
                self._run(lambda: fs._makedirs(bucket, exist_ok=True))
            self._run(lambda: fs._info(bucket))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"bucket {bucket!r} of {self.where} does not exist: create it, "
                f"or set LMCACHE_{self.name.upper()}__CREATE_BUCKET=true"
            ) from None

    def close(self) -> None:
        with self._open_lock:
            fs, self._fs = self._fs, None
        creator = getattr(fs, "_s3creator", None)
        if creator is not None and getattr(fs, "_s3", None) is not None:
            try:  # close the aiohttp session now rather than at garbage collection
                fs.close_session(fs.loop, creator)
            except Exception as error:  # pragma: no cover - closing is best effort
                log.debug("tier %s: closing the s3 session failed: %s", self.name, error)
