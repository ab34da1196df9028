"""Chunk buffers whose memory is already faulted in, for the saves that run inside a step.

A save gathers the step's completed chunks into buffers that the cpu tier then keeps. Fresh memory
costs a page fault per 4 KiB page on its first write, and the kernel zeroes each page: on the 2-core
VMs this project is measured on that runs at ~1 GB/s, several times slower than the copy itself,
and it is paid in ``wait_for_save``, i.e. by the step that vLLM is waiting for. A
:class:`BufferReserve` keeps a few buffers of the chunk shape faulted in ahead of time and refills
itself in a background thread only between compute steps (the caller's gate, e.g.
:meth:`~lmcache_core.engine.CacheEngine.between_steps`), so the faults move off the steps. An empty
reserve hands out fresh memory: a save never waits for the reserve.

Its memory is outside the cpu tier's budget until a buffer is taken (then the tier counts it), so it
is kept small: a step's worth of chunks, at most :data:`MAX_RESERVE_BYTES`.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable

import torch

MAX_RESERVE_BYTES = 256 * 2**20
_PAGE_BYTES = 4096
_WAIT_S = 0.5


class BufferReserve:
    """Buffers of one ``shape`` and ``dtype``, up to ``target`` of them ready at a time.

    ``between_steps(timeout)`` says whether background work may run now (waiting up to ``timeout``).
    ``pin``: page-locked buffers (CUDA hosts), which are allocated touched already."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, *, target: int,
                 between_steps: Callable[[float], bool], pin: bool = False) -> None:
        self.shape, self.dtype, self.pin = tuple(shape), dtype, pin
        nbytes = math.prod(self.shape) * dtype.itemsize
        self.target = max(1, min(target, MAX_RESERVE_BYTES // max(nbytes, 1)))
        self._between_steps = between_steps
        self._ready: deque[torch.Tensor] = deque()
        self._wanted = threading.Event()
        self._wanted.set()
        self._closed = False
        self._thread = threading.Thread(target=self._refill, name="lmcache-buffer-reserve", daemon=True)
        self._thread.start()

    def take(self) -> tuple[torch.Tensor, bool]:
        """A buffer of the reserve's shape (uninitialised contents), and whether it came ready
        (False: fresh memory, the reserve was empty)."""
        try:
            buffer, ready = self._ready.popleft(), True
        except IndexError:
            buffer, ready = self._allocate(), False
        self._wanted.set()
        return buffer, ready

    @property
    def ready(self) -> int:
        return len(self._ready)

    def close(self) -> None:
        self._closed = True
        self._wanted.set()
        self._thread.join(timeout=5)
        self._ready.clear()

    def _allocate(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin)

    def _refill(self) -> None:
        while not self._closed:
            self._wanted.wait()
            if self._closed:
                return
            if len(self._ready) >= self.target:
                self._wanted.clear()
                if len(self._ready) >= self.target:  # a take() between the check and the clear sets it again
                    continue
            if not self._between_steps(_WAIT_S):
                continue
            buffer = self._allocate()
            if not self.pin:  # one write per page faults it in (the kernel zeroes it)
                buffer.view(-1).view(torch.uint8)[::_PAGE_BYTES].zero_()
            self._ready.append(buffer)
