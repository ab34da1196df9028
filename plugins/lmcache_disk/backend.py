"""KV chunks as files: ``<dir>/<key>.lmc``, each a framed object (header + payload).

One directory, one budget. Several processes (instances, TP ranks) may use one directory, and
``max_size`` bounds the directory, not each process. The bytes in it are counted in a small file
there (``.lmcache-usage``), changed only under an exclusive ``flock`` of that file, and so is every
rename into place and every eviction: each process sees the others' writes and evictions exactly,
without rescanning the directory on each write (free space from ``statvfs`` would not do: the disk
may hold other data, and it says nothing about our share of it). Bytes are reserved before a file
is written. A process killed between reserving and renaming leaves the count high; each start
recounts the directory under the lock, and so does a writer that finds nothing left to evict.

Writes go to a temporary file named after the writer's host, pid and final size, written fully
(a short write is an error), optionally fsynced, then renamed into place: a reader or a crash never
sees half a chunk. A failed write removes its temporary file and raises, so the tier stack pauses
this tier's writes while it keeps serving reads. A full disk (ENOSPC, EDQUOT) is answered by
evicting and retrying once. A start removes only the temporary files of dead processes of this
host (and any older than an hour, which no live write is).

On start the index is rebuilt from the files' headers (skipping and counting anything that is
damaged), so a restarted process finds its cache; files other processes add are picked up on
first access. Eviction is LRU by bytes and prefix-aware like the cpu tier (``ByteLRU``), by each process's own
view of recency (so across processes it is approximately LRU); after a restart the order follows
file times.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from hashlib import blake2b
from pathlib import Path

from lmcache_core.plugin_api import (
    HEADER_SIZE,
    BackendContext,
    Blob,
    ByteLRU,
    CorruptEntryError,
    SerializingBackend,
    UnsupportedEntryError,
    read_header,
)
from lmcache_disk.settings import DiskSettings

log = logging.getLogger(__name__)

SUFFIX = ".lmc"
TEMPORARY_SUFFIX = ".tmp"
USAGE_FILE = ".lmcache-usage"
_HOST = blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()  # no dots: names split on them
_ABANDONED_AFTER_S = 3600.0  # a temporary file this old belongs to no live write
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_COUNTER = struct.Struct("<q")


def _temporary_name(name: str, size: int) -> str:
    return f".{name}.{_HOST}.{os.getpid()}.{threading.get_ident()}.{size}{TEMPORARY_SUFFIX}"


def _temporary_size(filename: str) -> int:
    """The final size a temporary file was reserved for (what it counts in the budget)."""
    try:
        return int(filename[: -len(TEMPORARY_SUFFIX)].rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return 0


def _is_abandoned(entry: os.DirEntry[str], now: float) -> bool:
    """A temporary file whose writer is gone: a dead process of this host, or too old to be live."""
    try:
        age = now - entry.stat().st_mtime
    except OSError:
        return False
    parts = entry.name[: -len(TEMPORARY_SUFFIX)].rsplit(".", 4)  # .name, host, pid, thread, size
    if age > _ABANDONED_AFTER_S or len(parts) != 5 or parts[1] != _HOST:
        return age > _ABANDONED_AFTER_S  # another host's (or an older version's): only age tells
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


class DirectoryUsage:
    """The bytes a directory's chunk and temporary files take, shared by every process using it:
    a counter in a file of the directory, read and changed only under an exclusive lock of it."""

    def __init__(self, root: Path) -> None:
        self._fd = os.open(root / USAGE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self._threads = threading.Lock()  # flock excludes processes, not threads sharing the descriptor

    @contextmanager
    def locked(self) -> Iterator[DirectoryUsage]:
        with self._threads:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    @property
    def bytes(self) -> int:
        data = os.pread(self._fd, _COUNTER.size, 0)
        return _COUNTER.unpack(data)[0] if len(data) == _COUNTER.size else 0

    def set(self, value: int) -> None:
        """Only under :meth:`locked`."""
        os.pwrite(self._fd, _COUNTER.pack(max(value, 0)), 0)

    def add(self, delta: int) -> None:
        """Only under :meth:`locked`."""
        self.set(self.bytes + delta)

    def close(self) -> None:
        os.close(self._fd)


class DiskBackend(SerializingBackend):
    settings: DiskSettings

    def __init__(self, settings: DiskSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.root = Path(settings.path).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: ByteLRU[str, None] = ByteLRU()  # names and sizes; the data is in the files
        self.usage: DirectoryUsage | None = None
        try:
            self.usage = DirectoryUsage(self.root)
        except OSError as error:
            log.warning("disk tier: %s is not writable (%s); serving the chunks already there", self.root, error)
        self._rebuild_index()

    def _path(self, name: str) -> Path:
        return self.root / f"{name}{SUFFIX}"

    # --- start-up ---------------------------------------------------------------------------------

    def _rebuild_index(self) -> None:
        found: list[tuple[float, int, str, int]] = []
        now = time.time()
        for entry in os.scandir(self.root):
            if entry.name.endswith(TEMPORARY_SUFFIX):
                if _is_abandoned(entry, now) and self._unlink(Path(entry.path)):
                    self.count("removed_temp_files")
                continue
            if not entry.name.endswith(SUFFIX):
                continue
            try:
                stat = entry.stat()
                with open(entry.path, "rb") as file:
                    header = read_header(file.read(HEADER_SIZE))
                if stat.st_size != header.total_size:
                    raise CorruptEntryError("file size does not match its header")
                chunk_index = header.chunk_index
            except OSError as error:
                log.warning("disk tier: cannot read %s (%s); skipping it", entry.name, error)
                continue
            except UnsupportedEntryError:
                chunk_index = 0  # another version's file: kept, and indexed so the byte budget covers it
            except CorruptEntryError as error:
                self.count("corrupt_entries")
                log.warning("disk tier: removing %s (%s)", entry.name, error)
                self._unlink(Path(entry.path))  # or _exists_blobs() would find it again
                continue
            # oldest first; within one time, later chunks of a prompt go first
            found.append((stat.st_mtime, -chunk_index, entry.name[: -len(SUFFIX)], stat.st_size))
        for _, _, name, size in sorted(found):
            self._index.add(name, None, size)
        if self.usage is not None:
            with self.usage.locked():
                self._recount()
        if found:
            log.info("disk tier: found %d chunks (%d bytes) in %s", len(found), sum(f[3] for f in found), self.root)

    def _recount(self) -> None:
        """Set the shared byte count from the directory itself (under the lock): chunk files at
        their size, live temporary files at the size they reserved."""
        total = 0
        for entry in os.scandir(self.root):
            try:
                if entry.name.endswith(SUFFIX):
                    total += entry.stat().st_size
                elif entry.name.endswith(TEMPORARY_SUFFIX):
                    total += _temporary_size(entry.name)
            except OSError:
                continue  # gone meanwhile
        assert self.usage is not None
        self.usage.set(total)

    def _unlink(self, path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as error:
            log.warning("disk tier: cannot remove %s (%s)", path.name, error)
            return False
        return True

    # --- reads ------------------------------------------------------------------------------------

    def _forget(self, name: str) -> None:
        self._index.remove(name)

    def _exists_blobs(self, names: Sequence[str]) -> list[bool]:
        """Asks the directory, not the index: another process may have added or evicted a file."""
        results = []
        for name in names:
            try:
                size = self._path(name).stat().st_size
            except OSError:
                self._forget(name)
                results.append(False)
                continue
            self._index.adopt(name, None, size)  # another process's file: first to go until it is read
            results.append(True)
        return results

    def _read_blobs(self, names: Sequence[str]) -> list[Blob | None]:
        blobs: list[Blob | None] = []
        for name in reversed(names):
            try:
                with open(self._path(name), "rb", buffering=0) as file:
                    size = os.fstat(file.fileno()).st_size
                    buffer = bytearray(size)
                    read = file.readinto(buffer)
            except FileNotFoundError:
                self._forget(name)
                blobs.append(None)
                continue
            except OSError as error:  # one unreadable file is a miss, not a broken tier
                self.count("read_errors")
                log.warning("disk tier: cannot read %s (%s); a miss", name, error)
                blobs.append(None)
                continue
            blobs.append(buffer if read == size else None)
            self._index.add(name, None, size)  # in reverse order: the batch's first chunk ends most recent
        blobs.reverse()
        return blobs

    # --- writes -----------------------------------------------------------------------------------

    def _write_blobs(self, items: Sequence[tuple[str, list[memoryview]]]) -> int:
        if self.usage is None:
            self.count("write_errors")
            raise OSError(errno.EROFS, f"disk tier directory {self.root} is not writable")
        stored = 0
        for name, parts in reversed(items):
            size = sum(part.nbytes for part in parts)
            if size > self.settings.max_size:
                self.count("dropped_too_large")
            elif self._write_file(name, parts, size):
                stored += size
        return stored

    def _write_file(self, name: str, parts: list[memoryview], size: int) -> bool:
        """Write one file fully and rename it into place, or leave no trace (and raise)."""
        temporary = self.root / _temporary_name(name, size)
        if not self._reserve(size, temporary):
            self.count("dropped_no_room")
            return False
        committed = False
        try:
            try:
                self._write_temporary(temporary, parts, size)
            except OSError as error:
                if error.errno not in _DISK_FULL:
                    raise
                self.count("disk_full")
                os.truncate(temporary, 0)  # keeps its name, and so its reservation, for a recount
                if not self._evict(size):
                    raise
                self._write_temporary(temporary, parts, size)
            self._commit(temporary, name, size)
            committed = True
        finally:
            if not committed:
                self.count("write_errors")
                with self._usage().locked() as usage:  # one step for a recount: file and bytes go together
                    temporary.unlink(missing_ok=True)
                    usage.add(-size)
        return True

    def _write_temporary(self, temporary: Path, parts: list[memoryview], size: int) -> None:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for part in parts:
                view = part.cast("B")
                while view:
                    written = os.write(fd, view)
                    if written <= 0:
                        raise OSError(errno.EIO, f"disk tier: a write to {temporary.name} stored nothing")
                    view = view[written:]
            if os.fstat(fd).st_size != size:
                raise OSError(errno.EIO, f"disk tier: {temporary.name} is not {size} bytes")
            if self.settings.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _commit(self, temporary: Path, name: str, size: int) -> None:
        final = self._path(name)
        with self._usage().locked() as usage:
            try:
                replaced = final.stat().st_size
            except FileNotFoundError:
                replaced = 0
            os.replace(temporary, final)
            if replaced:
                usage.add(-replaced)
        self._index.add(name, None, size)

    def _usage(self) -> DirectoryUsage:
        assert self.usage is not None, "only writes use the usage counter, and they check it is there"
        return self.usage

    def _reserve(self, size: int, temporary: Path) -> bool:
        """Count ``size`` bytes in the directory's budget, evicting to make room, and create the
        (empty) temporary file that names the reservation, in one step under the lock: another
        process recounting the directory in between would otherwise drop the reservation and
        overfill the budget. False when even an empty directory (as far as this process may
        evict) has no room."""
        with self._usage().locked() as usage:
            recounted = False
            while usage.bytes + size > self.settings.max_size:
                if self._evict_one(usage) is None:
                    if recounted:
                        return False
                    self._rescan()
                    self._recount()
                    recounted = True
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            usage.add(size)
        return True

    def _evict(self, size: int) -> bool:
        """Free at least ``size`` bytes for a write the disk refused; False when nothing is left."""
        freed = 0
        with self._usage().locked() as usage:
            while freed < size:
                evicted = self._evict_one(usage)
                if evicted is None:
                    self._rescan()
                    evicted = self._evict_one(usage)
                    if evicted is None:
                        return freed > 0
                freed += evicted
        return True

    def _evict_one(self, usage: DirectoryUsage) -> int | None:
        """Remove the least recently used file (under the lock); its size (0 if another process
        removed it first), or None when the index is empty."""
        popped = self._index.pop_victim()
        if popped is None:
            return None
        victim, _ = popped
        path = self._path(victim)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        usage.add(-size)
        self.count("evicted")
        return size

    def _rescan(self) -> None:
        """Index the chunk files other processes wrote, oldest first, so they can be evicted too."""
        found = []
        for entry in os.scandir(self.root):
            if entry.name.endswith(SUFFIX):
                try:
                    stat = entry.stat()
                except OSError:
                    continue
                found.append((stat.st_mtime, entry.name[: -len(SUFFIX)], stat.st_size))
        for _, name, size in sorted(found, reverse=True):  # newest adopted first: the oldest ends first to go
            self._index.adopt(name, None, size)

    def _delete_blobs(self, names: Sequence[str]) -> int:
        removed = 0
        for name in names:
            self._forget(name)
            if self.usage is None:
                removed += self._unlink(self._path(name))
                continue
            with self.usage.locked() as usage:
                path = self._path(name)
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                usage.add(-size)
                removed += 1
        return removed

    def iter_keys(self) -> Iterator[str]:
        return iter(self._index.keys())

    def stats(self) -> dict[str, float]:
        entries, indexed = len(self._index), self._index.nbytes
        used = self.usage.bytes if self.usage is not None else indexed
        return {**self.counters, "entries": entries, "used_bytes": used, "capacity_bytes": int(self.settings.max_size)}

    def close(self) -> None:
        if self.usage is not None:
            self.usage.close()
            self.usage = None
