"""KV chunks as files: ``<dir>/<key>.lmc``, each a framed object (header + payload).

Writes go to a temporary file in the same directory and are renamed into place, so a reader or a
crash never sees half a chunk. On start the index is rebuilt from the files' headers (skipping
and counting anything that is not ours or is damaged), so a restarted process finds its cache.
Files another process adds to the same directory are picked up on first access. Eviction is LRU
by bytes and prefix-aware like the cpu tier; after a restart the order follows file times.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

from lmcache_core.backend import BackendContext, Blob, SerializingBackend
from lmcache_core.errors import CorruptEntryError, UnsupportedEntryError
from lmcache_core.serde import HEADER_SIZE, read_header
from lmcache_disk.settings import DiskSettings

log = logging.getLogger(__name__)

SUFFIX = ".lmc"


class DiskBackend(SerializingBackend):
    settings: DiskSettings

    def __init__(self, settings: DiskSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.root = Path(settings.path).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: OrderedDict[str, int] = OrderedDict()  # name -> size, least recently used first
        self._used = 0
        self._lock = threading.Lock()
        self._rebuild_index()

    def _path(self, name: str) -> Path:
        return self.root / f"{name}{SUFFIX}"

    def _rebuild_index(self) -> None:
        found: list[tuple[float, int, str, int]] = []
        for entry in os.scandir(self.root):
            if entry.name.endswith(".tmp"):
                Path(entry.path).unlink(missing_ok=True)  # a write that never finished
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
                Path(entry.path).unlink(missing_ok=True)  # or _adopt() would index it again
                continue
            # oldest first; within one time, later chunks of a prompt go first
            found.append((stat.st_mtime, -chunk_index, entry.name[: -len(SUFFIX)], stat.st_size))
        for _, _, name, size in sorted(found):
            self._index[name] = size
            self._used += size
        if found:
            log.info("disk tier: found %d chunks (%d bytes) in %s", len(found), self._used, self.root)

    def _adopt(self, name: str) -> bool:
        """Index a file that another process wrote after our start."""
        try:
            size = self._path(name).stat().st_size
        except OSError:
            return False
        with self._lock:
            if name not in self._index:
                self._index[name] = size
                self._used += size
        return True

    def _exists_blobs(self, names: Sequence[str]) -> list[bool]:
        results = []
        for name in names:
            with self._lock:
                hit = name in self._index
            results.append(hit or self._adopt(name))
        return results

    def _read_blobs(self, names: Sequence[str]) -> list[Blob | None]:
        blobs: list[Blob | None] = []
        for name in reversed(names):
            try:
                with open(self._path(name), "rb", buffering=0) as file:
                    size = os.fstat(file.fileno()).st_size
                    buffer = bytearray(size)
                    read = file.readinto(buffer)
                blobs.append(buffer if read == size else None)
            except FileNotFoundError:
                with self._lock:
                    size = self._index.pop(name, None)
                    if size is not None:
                        self._used -= size
                blobs.append(None)
                continue
            with self._lock:
                if name in self._index:
                    self._index.move_to_end(name)
        blobs.reverse()
        return blobs

    def _write_blobs(self, items: Sequence[tuple[str, list[memoryview]]]) -> None:
        for name, parts in reversed(items):
            size = sum(part.nbytes for part in parts)
            if size > self.settings.max_size:
                self.count("dropped_too_large")
                continue
            self._make_room(size)
            final = self._path(name)
            temporary = self.root / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(temporary, "wb", buffering=0) as file:
                for part in parts:
                    file.write(part)
                if self.settings.fsync:
                    os.fsync(file.fileno())
            os.replace(temporary, final)
            with self._lock:
                previous = self._index.pop(name, 0)
                self._index[name] = size
                self._used += size - previous

    def _make_room(self, size: int) -> None:
        while True:
            with self._lock:
                if self._used + size <= self.settings.max_size or not self._index:
                    return
                victim, victim_size = self._index.popitem(last=False)
                self._used -= victim_size
            self._path(victim).unlink(missing_ok=True)
            self.count("evicted")

    def _delete_blobs(self, names: Sequence[str]) -> int:
        removed = 0
        for name in names:
            with self._lock:
                size = self._index.pop(name, None)
                if size is not None:
                    self._used -= size
            try:
                self._path(name).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def iter_keys(self) -> Iterator[str]:
        with self._lock:
            names = list(self._index)
        return iter(names)

    def stats(self) -> dict[str, float]:
        return {**self.counters, "entries": len(self._index), "used_bytes": self._used,
                "capacity_bytes": int(self.settings.max_size)}
