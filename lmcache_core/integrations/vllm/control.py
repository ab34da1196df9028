"""The control channel of a running vLLM instance: ``lmcache-core ps``, and ``stats``/``ls`` live.

A cpu tier lives in a worker's memory, so ``lmcache-core stats`` in a fresh process would always
see it empty. Instead each running instance has one control socket, owned by its scheduler side
(:class:`ControlServer`), which answers ``info`` itself and fans ``stats`` and ``keys`` out to its
worker ranks over their lookup sockets (see ``lookup.py``: control requests travel on connections
of their own, so lookups never wait for them), then returns every rank's answer. Each worker
answers from its engine (:class:`EngineControl`).

Discovery: the scheduler writes an *instance record* (JSON: id, pid, model, tiers, socket) into
the private per-user runtime directory that holds the lookup sockets, and removes it on shutdown;
:func:`running_instances` skips and deletes records whose process is gone (a crashed instance).
Every message is JSON (never pickle); only this user's processes can connect (0700 directory,
0600 socket, peer uid checked on abstract sockets).

The hooks the connector calls, one line each::

    ControlServer(lookup_client, InstanceInfo(engine_id, dp_rank, model, tiers)).start()  # scheduler
    LookupServer(path, lookup, control=EngineControl(engine))                              # worker
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcache_core.errors import LMCacheError
from lmcache_core.integrations.vllm.lookup import (
    LookupClient,
    accept_this_users_connections,
    encode_control,
    engine_tag,
    is_abstract,
    peer_is_this_user,
    private_runtime_dir,
    socket_address,
)
from lmcache_core.keys import select_keys

if TYPE_CHECKING:
    from lmcache_core.engine import CacheEngine

log = logging.getLogger(__name__)

RANK_OPERATIONS = ("stats", "keys")  # answered by each worker rank; "info" by the scheduler itself
_RECORDS = "instances"


@dataclass(frozen=True)
class InstanceInfo:
    """What ``lmcache-core ps`` shows about a running instance (one scheduler: one per DP rank)."""

    engine_id: str
    data_parallel_rank: int
    model: str
    tiers: tuple[str, ...]

    @property
    def instance_id(self) -> str:
        return f"{engine_tag(self.engine_id)}-dp{self.data_parallel_rank}"  # as its lookup sockets' names


@dataclass(frozen=True)
class Instance:
    """An instance record, as read back by the CLI."""

    id: str
    pid: int
    model: str
    tiers: list[str]
    socket: str
    ranks: int
    started: float = field(default=0.0)


class EngineControl:
    """A worker's answers to control requests, from its engine (``None``: caching is off)."""

    def __init__(self, engine: CacheEngine | None) -> None:
        self._engine = engine

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        engine = self._engine
        if engine is None:
            return {"error": "KV caching is off on this rank (its log says why)"}
        operation = request.get("op")
        if operation == "stats":
            return {"stats": engine.stats()}
        if operation == "keys":
            return self._keys(engine, request)
        raise ValueError(f"unknown control operation {operation!r}; expected one of {', '.join(RANK_OPERATIONS)}")

    @staticmethod
    def _keys(engine: CacheEngine, request: dict[str, Any]) -> dict[str, Any]:
        limit = request.get("limit", 0)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"limit: expected a whole number >= 0, got {limit!r}")
        namespace = None if request.get("all_namespaces") else engine.settings.namespace
        tiers: dict[str, dict[str, Any]] = {}
        for backend in engine.stack.backends:
            try:
                selected = select_keys(backend.iter_keys(), namespace)
                names = [str(key) for key in (islice(selected, limit + 1) if limit else selected)]
            except Exception as error:  # NotImplementedError: the backend cannot list; others: it is down
                tiers[backend.name] = {"error": str(error) or type(error).__name__}
                continue
            truncated = bool(limit) and len(names) > limit
            tiers[backend.name] = {"keys": names[:limit] if limit else names, "truncated": truncated}
        return {"namespace": namespace, "tiers": tiers}


class ControlServer:
    """The scheduler's control socket: answers ``info``, fans ``stats``/``keys`` out to the ranks.

    Like the lookup server it never raises for its socket: without one, ``ps`` does not list the
    instance and the CLI falls back to fresh backends; vLLM is unaffected."""

    def __init__(self, client: LookupClient, info: InstanceInfo, rank_timeout_s: float = 10.0) -> None:
        self.info = info
        self._client = client
        self._rank_timeout_s = rank_timeout_s
        self._closed = threading.Event()
        self._listener: Listener | None = None
        self._record: Path | None = None
        self.address: str | None = None

    def start(self) -> ControlServer:
        directory = private_runtime_dir()
        if directory is None:
            log.warning("lmcache-core: no private runtime directory; `lmcache-core ps` will not list this instance")
            return self
        address = socket_address(f"{self.info.instance_id}.control.sock")
        try:
            if not is_abstract(address) and os.path.exists(address):  # left by a crashed scheduler
                os.unlink(address)
            self._listener = Listener(address, family="AF_UNIX")
            if not is_abstract(address):
                os.chmod(address, 0o600)
            self.address = address
            self._record = _write_record(directory, self._record_fields(address))
        except OSError as error:
            log.error("lmcache-core: cannot serve the control socket %r (%s); `lmcache-core ps` will not list this "
                      "instance", address, error)
            self.close()
            return self
        threading.Thread(target=self._accept, name="lmcache-control", daemon=True).start()
        return self

    def _record_fields(self, address: str) -> dict[str, Any]:
        return {"id": self.info.instance_id, "pid": os.getpid(), "model": self.info.model,
                "tiers": list(self.info.tiers), "socket": address, "ranks": len(self._client.paths),
                "started": time.time()}

    def _accept(self) -> None:
        assert self._listener is not None
        accept_this_users_connections(self._listener, self._closed, self._answer_bytes, "control connection")

    def _answer_bytes(self, request: bytes) -> bytes:
        try:
            answer = self.answer(json.loads(request))
        except Exception as error:
            answer = {"error": f"{type(error).__name__}: {error}"}
        return json.dumps(answer, default=str).encode()

    def answer(self, request: Any) -> dict[str, Any]:
        """The answer to one control request: the instance's ``info``, or every rank's answer."""
        if not isinstance(request, dict):
            raise ValueError("a control request is a JSON object")
        operation = request.get("op")
        if operation == "info":
            return {"instance": self._record_fields(self.address or "")}
        if operation not in RANK_OPERATIONS:
            raise ValueError(f"unknown control operation {operation!r}; expected info, {', '.join(RANK_OPERATIONS)}")
        return {"ranks": self._client.ask_control(request, self._rank_timeout_s)}

    def close(self) -> None:
        self._closed.set()
        if self._record is not None:
            with contextlib.suppress(FileNotFoundError):
                self._record.unlink()
            self._record = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.address and not is_abstract(self.address) and os.path.exists(self.address):
            os.unlink(self.address)


def _write_record(directory: Path, fields: dict[str, Any]) -> Path:
    records = directory / _RECORDS
    records.mkdir(mode=0o700, exist_ok=True)
    path = records / f"{fields['id']}.json"
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(fields, file)
    os.replace(temporary, path)  # a reader never sees half a record
    return path


_RECORD_FIELDS = tuple(Instance.__dataclass_fields__)  # a newer version's extra fields are ignored


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's: a reused pid, not our instance
        return False
    return True


def running_instances() -> list[Instance]:
    """The instances whose scheduler is running, by id; records of dead processes are deleted."""
    directory = private_runtime_dir()
    if directory is None or not (directory / _RECORDS).is_dir():
        return []
    found = []
    for path in sorted((directory / _RECORDS).glob("*.json")):
        try:
            fields = json.loads(path.read_text())
            instance = Instance(**{name: fields[name] for name in _RECORD_FIELDS if name in fields})
        except (OSError, ValueError, TypeError) as error:
            log.warning("lmcache-core: skipping unreadable instance record %s (%s)", path, error)
            continue
        if not _alive(instance.pid):
            with contextlib.suppress(OSError):
                path.unlink()
                if not is_abstract(instance.socket):
                    os.unlink(instance.socket)
            continue
        found.append(instance)
    return found


def select_instance(instance_id: str | None) -> Instance | None:
    """The instance ``instance_id`` names (a unique prefix will do); without one, the only running
    instance, or None when none runs. Raises with the running ids when the choice is unclear."""
    instances = running_instances()
    ids = ", ".join(instance.id for instance in instances) or "none"
    if instance_id is None:
        if len(instances) > 1:
            raise LMCacheError(f"several instances are running ({ids}): choose one with --instance ID, "
                               "or --fresh for the configured tiers")
        return instances[0] if instances else None
    matches = [instance for instance in instances if instance.id.startswith(instance_id)]
    if len(matches) != 1:
        raise LMCacheError(f"--instance {instance_id}: {'ambiguous' if matches else 'not running'} "
                           f"(running: {ids}; see `lmcache-core ps`)")
    return matches[0]


def ask(instance: Instance, request: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
    """Send one control request to ``instance``'s scheduler; its JSON answer. Raises LMCacheError."""
    try:
        connection = Client(instance.socket, family="AF_UNIX")
    except OSError as error:
        raise LMCacheError(f"instance {instance.id} (pid {instance.pid}) does not answer on its control socket: "
                           f"{error}") from error
    with connection:
        if not peer_is_this_user(connection):
            raise LMCacheError(f"instance {instance.id}: its control socket belongs to another user")
        try:
            connection.send_bytes(encode_control(request))
            if not connection.poll(timeout_s):
                raise LMCacheError(f"instance {instance.id}: no answer within {timeout_s:g} s")
            answer = json.loads(connection.recv_bytes())
        except (OSError, EOFError, ValueError) as error:
            raise LMCacheError(f"instance {instance.id}: bad answer on its control socket ({error})") from error
    if not isinstance(answer, dict):
        raise LMCacheError(f"instance {instance.id}: bad answer on its control socket (not a JSON object)")
    if "error" in answer:
        raise LMCacheError(f"instance {instance.id}: {answer['error']}")
    return answer


__all__ = ["ControlServer", "EngineControl", "Instance", "InstanceInfo", "ask", "running_instances",
           "select_instance"]
