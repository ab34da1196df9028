"""KV chunks as Redis values: ``SET <chunk key> <framed object>``, one pipeline per batch.

The key string already holds the namespace, model and layout, so tenants and models never share a
key; the framed object is verified on read like every serializing tier's.

Why it looks the way it does:

- **One round trip per batch.** EXISTS, GET and DEL go through a non-transactional pipeline; SET
  batches are written to one pooled connection and their replies read afterwards, which is what a
  pipeline does, except that each value is sent as its header and payload buffers
  (``socket.sendall`` per buffer) instead of being joined into one bytes object first: a chunk is
  never copied on its way out. The base class frames the whole batch before this starts, so the
  values go out back to back: checksumming each one just before sending it measured slower
  (docs/backends-remote.md), most likely because the server drains its socket and idles between
  values.
- **No copy on the way in either.** redis-py's pure-Python reply parser copies a bulk reply
  several times and hands back immutable ``bytes``, which the decoder would have to copy once more
  because ``torch.frombuffer`` needs writable memory. :func:`_writable_bulk_parser` reads large
  bulk replies straight from the socket into one writable buffer that becomes the tensor. It
  subclasses two redis-py internals; if they ever change shape we fall back to the stock parser
  (one more copy, same results).
- **Bounded time.** Socket and connect timeouts come from the settings, and redis-py's own retry
  loop (10 retries with backoff by default) is cut to one immediate retry on a broken connection,
  so a dead server fails a call within about ``timeout`` seconds. The tier stack then skips the
  tier with backoff and tries again later; the pool reconnects by itself when the server is back.
- **Full is not broken.** A Redis at ``maxmemory`` with a ``noeviction`` policy answers SETs with
  OOM errors but still serves reads: those chunks are dropped and counted (``dropped_full``), and
  the batch succeeds, so the tier stack does not back off from a store that can still hit.
- Cluster and Sentinel use redis-py's own clients. The cluster path sends one plain pipeline per
  node (see :meth:`RedisBackend._per_node` for why not redis-py's cluster pipeline) and uses the
  stock parser (one copy more per value each way).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from lmcache_core.plugin_api import BackendContext, Blob, SerializingBackend, redact_url, select_keys
from lmcache_redis.settings import RedisSettings

log = logging.getLogger(__name__)

_DIRECT_READ_MIN = 64 * 1024  # bulk replies at least this large are read straight into their own buffer
_SMALL_PART = 16 * 1024  # buffers smaller than this are coalesced before sendall


@functools.cache
def _writable_bulk_parser() -> type | None:
    """A RESP2 parser that returns large bulk replies as writable memoryviews, read with ``recv_into``.

    Stock redis-py (without hiredis) reads a 1 MiB reply through ``recv`` -> ``BytesIO.write`` ->
    ``BytesIO.read`` -> ``bytes[:-2]``: four copies into fresh memory, then the decoder copies
    once more. Here the socket writes into the buffer that the tensor will use. Returns ``None``
    when the redis-py internals it extends are not there.
    """
    try:
        import numpy as np
        from redis._parsers.resp2 import _RESP2Parser
        from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR, SocketBuffer
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.utils import SENTINEL
    except ImportError:  # pragma: no cover - a redis-py that reorganised its parsers
        return None
    if not all(hasattr(SocketBuffer, name) for name in ("read", "purge", "rewind")):  # pragma: no cover
        return None

    class _DirectBuffer(SocketBuffer):  # type: ignore[misc]
        def read(self, length: int, timeout: Any = SENTINEL) -> Any:
            if length < _DIRECT_READ_MIN or timeout is not SENTINEL:  # custom timeouts: pub/sub only
                return super().read(length, timeout)
            # np.empty: no memset; the socket fills it. +2 for the trailing \r\n.
            target = memoryview(np.empty(length + 2, dtype=np.uint8))
            filled = self._buffer.readinto(target)  # what an earlier recv already buffered
            while filled < length + 2:
                received = self._sock.recv_into(target[filled:])
                if not received:
                    raise RedisConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
                filled += received
            return target[:length]

    class WritableBulkParser(_RESP2Parser):  # type: ignore[misc]
        def on_connect(self, connection: Any) -> None:
            super().on_connect(connection)
            self._buffer.close()
            self._buffer = _DirectBuffer(self._sock, self.socket_read_size, connection.socket_timeout)

    return WritableBulkParser


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without user and password, plus those (redis-py lets URL credentials win over
    keyword arguments; we want the explicit settings to win)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    netloc = parts.netloc.rpartition("@")[2]
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return bare, user, password


def _get_connection(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        return pool.get_connection("SET")


class RedisBackend(SerializingBackend):
    settings: RedisSettings

    def __init__(self, settings: RedisSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.where = redact_url(settings.url)
        self._client_instance: Any = None
        self._client_lock = threading.Lock()
        self._warned_too_large = False
        self._warned_full = False
        self._refresh_slots = False  # cluster mode: a node failed; refresh the slot map first

    # --- connection -----------------------------------------------------------------------------

    def _client(self) -> Any:
        """The redis-py client, created on first use: a cluster or sentinel client talks to the
        servers when it is built, and an unreachable server must not fail our constructor."""
        client = self._client_instance
        if client is None:
            with self._client_lock:
                if self._client_instance is None:
                    self._client_instance = self._connect()
                client = self._client_instance
        return client

    def _connect(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        settings = self.settings
        url, url_user, url_password = _split_credentials(settings.url)
        username = settings.username or url_user
        password = settings.password.get_secret_value() if settings.password else url_password
        bounded: dict[str, Any] = {
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.connect_timeout,
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        }
        common: dict[str, Any] = {**bounded, "username": username, "password": password,
                                  "max_connections": settings.max_connections}
        parser = _writable_bulk_parser() if "protocol=" not in urlsplit(url).query else None
        if parser is not None and settings.mode != "cluster":  # the cluster client filters parser_class out
            # RESP2: every Redis and Valkey speaks it, and it is the protocol our parser extends.
            common.update(parser_class=parser, protocol=2)

        if settings.mode == "cluster":
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(url, **common)
        if settings.mode == "sentinel":
            from redis.sentinel import Sentinel

            parts = urlsplit(url)
            sentinels = [(parts.hostname or "localhost", parts.port or 26379)]
            for address in settings.sentinels:
                host, _, port = address.rpartition(":")
                sentinels.append((host, int(port)))
            db = int(parts.path.strip("/") or 0)
            tls = {"ssl": True} if parts.scheme == "rediss" else {}
            sentinel = Sentinel(sentinels, sentinel_kwargs={**bounded, **tls}, **common, **tls)
            return sentinel.master_for(settings.sentinel_master, db=db)
        return redis.Redis.from_url(url, **common)

    def check_health(self) -> None:
        try:
            self._client().ping()
        except Exception as error:
            raise ConnectionError(f"redis at {self.where} does not answer: {error}") from error

    def close(self) -> None:
        with self._client_lock:
            client, self._client_instance = self._client_instance, None
        if client is not None:
            client.close()

    # --- blobs ----------------------------------------------------------------------------------

    def _pipelined(self, command: str, names: Sequence[str]) -> list[Any]:
        """One reply per name, in order; error replies come back as exception objects."""
        if not names:
            return []
        if self.settings.mode == "cluster":
            return self._per_node([(command, name) for name in names])
        pipeline = self._client().pipeline(transaction=False)
        for name in names:
            pipeline.execute_command(command, name)
        return pipeline.execute(raise_on_error=False)

    @staticmethod
    def _no_errors(replies: list[Any]) -> list[Any]:
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    def _per_node(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Cluster mode: the replies to ``commands`` (each ``(command, key, *arguments)``) in order,
        error replies as exception objects, sent as one plain pipeline per node.

        redis-py's cluster pipeline answers a node that times out by retrying each of that node's
        commands on its own, each with its own timeout: one hung node held a batch for about one
        timeout per key on it (20 s for 16 chunks). Here a node that does not answer fails the
        batch within about one timeout, and the next call first refreshes the slot map (a replica
        may have taken over). A redirection (MOVED / ASK: slots moved) sends the batch through the
        cluster pipeline, which follows it and refreshes the slot map.
        """
        from redis.exceptions import AskError

        client = self._client()
        if self._refresh_slots:
            self._refresh_slots = False
            client.nodes_manager.initialize()
        replies: list[Any] = [None] * len(commands)
        try:
            by_node: dict[str, tuple[Any, list[int]]] = {}
            for position, command in enumerate(commands):
                node = client.get_node_from_key(command[1])
                by_node.setdefault(node.name, (node, []))[1].append(position)
            for node, positions in by_node.values():
                pipeline = client.get_redis_connection(node).pipeline(transaction=False)
                for position in positions:
                    pipeline.execute_command(*commands[position])
                for position, reply in zip(positions, pipeline.execute(raise_on_error=False), strict=True):
                    replies[position] = reply
        except Exception:
            self._refresh_slots = True
            raise
        if any(isinstance(reply, AskError) for reply in replies):  # MovedError is an AskError
            pipeline = client.pipeline(transaction=False)
            for command in commands:
                pipeline.execute_command(*command)
            return pipeline.execute(raise_on_error=False)
        return replies

    def _exists_blobs(self, names: Sequence[str]) -> list[bool]:
        return [bool(found) for found in self._no_errors(self._pipelined("EXISTS", names))]

    def _read_blobs(self, names: Sequence[str]) -> list[Blob | None]:
        """The values; a name that holds another type of value (someone else's hash or list)
        is a miss that is counted and no longer advertised, not an error: failing the batch
        would put the whole tier into backoff. The next store of that chunk overwrites it."""
        blobs: list[Blob | None] = []
        for name, reply in zip(names, self._pipelined("GET", names), strict=True):
            if isinstance(reply, BaseException) and "WRONGTYPE" in str(reply):
                self.count("corrupt_entries")
                self._remember_unreadable(name)
                log.warning("tier %s: %s holds another type of value, not one of our chunks; a miss",
                            self.name, name)
                blobs.append(None)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                blobs.append(reply)
        return blobs

    def _delete_blobs(self, names: Sequence[str]) -> int:
        return sum(self._no_errors(self._pipelined("DEL", names)))

    def _write_blobs(self, items: Sequence[tuple[str, list[memoryview]]]) -> int:
        if not items:
            return 0
        if self.settings.mode != "cluster":
            return self._set_scattered(items)
        expiry = ("EX", self.settings.ttl) if self.settings.ttl else ()
        commands, sizes = [], []
        for name, parts, size in self._within_limit(items):
            commands.append(("SET", name, b"".join(parts), *expiry))
            sizes.append(size)
        return self._accepted_bytes(self._per_node(commands), sizes)

    def _within_limit(
        self, items: Iterable[tuple[str, list[memoryview]]]
    ) -> Iterator[tuple[str, list[memoryview], int]]:
        """The items whose value fits ``max_value_size``, with their sizes; refusals are counted
        and the first one is logged with what to do about it."""
        limit = int(self.settings.max_value_size)
        for name, parts in items:
            size = sum(part.nbytes for part in parts)
            if size <= limit:
                yield name, parts, size
                continue
            self.count("dropped_too_large")
            if not self._warned_too_large:
                self._warned_too_large = True
                log.warning(
                    "tier %s: chunk %s is %d bytes, over LMCACHE_%s__MAX_VALUE_SIZE (%d); it is not stored. "
                    "Use a smaller LMCACHE_CHUNK_SIZE or raise the limit (and Redis' proto-max-bulk-len). "
                    "Further refusals are only counted (dropped_too_large).",
                    self.name, name, size, self.name.upper(), limit,
                )

    def _accepted_bytes(self, replies: Sequence[Any], sizes: Sequence[int]) -> int:
        """Bytes of the SETs that Redis accepted, given each SET's reply (an exception for an error
        reply) and value size.

        An OOM reply means Redis is full under a ``noeviction`` policy: the chunk is not stored,
        which is counted (``dropped_full``) and logged once, and the batch does not fail, because
        a full cache still serves reads: failing would put the whole tier into the stack's backoff.
        Any other error reply fails the batch."""
        from redis.exceptions import OutOfMemoryError

        accepted = refused = 0
        for reply, size in zip(replies, sizes, strict=True):
            if isinstance(reply, OutOfMemoryError):
                refused += 1
            elif isinstance(reply, BaseException):
                raise reply
            else:
                accepted += size
        if refused:
            self.count("dropped_full", refused)
            if not self._warned_full:
                self._warned_full = True
                log.warning(
                    "tier %s: redis at %s is full (%d chunks refused: maxmemory reached, noeviction policy); "
                    "stored chunks are still read. Give Redis an eviction policy (maxmemory-policy allkeys-lru), "
                    "more maxmemory or LMCACHE_%s__TTL. Further refusals are only counted (dropped_full).",
                    self.name, self.where, refused, self.name.upper(),
                )
        return accepted

    def _set_scattered(self, items: Iterable[tuple[str, list[memoryview]]]) -> int:
        """SET every item over one connection in one round trip, sending each value's buffers as
        they are (no join). Equivalent to a non-transactional pipeline of SETs. Returns the bytes
        that Redis accepted as values."""
        from redis.exceptions import ResponseError

        ttl = self.settings.ttl
        expiry = b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ttl)), ttl) if ttl else b""
        argc = 5 if ttl else 3
        sizes: list[int] = []  # of the SETs sent, in order

        def pieces() -> Iterator[Blob]:
            pending = bytearray()
            for name, parts, size in self._within_limit(items):
                key = name.encode()
                pending += b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (argc, len(key), key, size)
                for part in parts:
                    if part.nbytes < _SMALL_PART:
                        pending += part
                    else:
                        yield pending  # sent before the generator resumes: safe to start a new one
                        pending = bytearray()
                        yield part
                pending += b"\r\n" + expiry
                sizes.append(size)
            if pending:
                yield pending

        pool = self._client().connection_pool
        connection = _get_connection(pool)
        replies: list[Any] = []
        try:
            connection.send_packed_command(pieces(), check_health=False)
            for _ in sizes:
                try:
                    replies.append(connection.read_response())
                except ResponseError as error:  # an error reply, read whole: the next reply follows
                    replies.append(error)
            return self._accepted_bytes(replies, sizes)
        except BaseException:
            connection.disconnect()  # replies may be left unread: never reuse this connection
            raise
        finally:
            pool.release(connection)

    def iter_keys(self) -> Iterator[str]:
        raws = self._client().scan_iter(match="v[0-9]*:*:*@*:*:r*of*:*", count=1000)  # select_keys decides
        names = (raw.decode() if isinstance(raw, bytes | bytearray) else str(raw) for raw in raws)
        for key in select_keys(names, None):  # skips someone else's keys in a shared keyspace
            yield str(key)
