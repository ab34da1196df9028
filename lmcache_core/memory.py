"""A CPU buffer pool bounded in bytes, shared by the tiers and the engine.

Buffers are pinned (page-locked) when CUDA is present so device copies can run asynchronously.
Accounting follows the real lifetime of the memory: a buffer returns its bytes to the budget when
the last reference to its tensor is dropped, not when a tier evicts it. A chunk being copied into
a KV cache therefore keeps its memory (and its bytes in the budget) until the copy is done:
eviction can never free memory that is in use.

An owner that hands out :func:`lend` views of its buffers can ask :func:`in_use_elsewhere` before
evicting one: evicting a buffer someone still holds frees nothing, it only loses the entry.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch


class MemoryPool:
    def __init__(self, capacity_bytes: int, pin: bool | None = None) -> None:
        self.capacity = int(capacity_bytes)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self.capacity - self._used

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A new uninitialised tensor, or ``None`` when it does not fit in the remaining budget."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            if self._used + nbytes > self.capacity:
                return None
            self._used += nbytes
        try:
            tensor = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        except Exception:
            self._release(nbytes)
            raise
        weakref.finalize(tensor, self._release, nbytes)
        return tensor

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Count ``tensor``, handed over by its owner, against the budget instead of copying it into
        a new buffer: returns ``tensor``, or ``None`` when it does not fit. Its bytes return when
        the last reference to it is dropped, as for :meth:`allocate`. Only a tensor for which
        :meth:`can_adopt` is true qualifies."""
        if not self.can_adopt(tensor):
            raise ValueError("only a whole, contiguous CPU tensor (pinned if the pool pins) can be adopted")
        nbytes = tensor.nbytes
        with self._lock:
            if self._used + nbytes > self.capacity:
                return None
            self._used += nbytes
        weakref.finalize(tensor, self._release, nbytes)
        return tensor

    def can_adopt(self, tensor: torch.Tensor) -> bool:
        """Whether :meth:`adopt` can keep ``tensor`` as it is: a CPU tensor that owns all of its
        memory (not a view into a larger buffer, whose memory the budget could not account for),
        pinned if this pool pins."""
        return (
            tensor.device.type == "cpu"
            and tensor._base is None
            and tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.nbytes
            and (not self.pin or tensor.is_pinned())
        )

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes


def lend(buffer: torch.Tensor) -> torch.Tensor:
    """A view of ``buffer`` to hand out: it keeps the buffer's memory (and its bytes in the pool)
    alive for as long as the caller holds it, and :func:`in_use_elsewhere` sees it."""
    return buffer.view(buffer.shape)


def in_use_elsewhere(buffer: torch.Tensor) -> bool:
    """Whether a view of ``buffer`` (one from :func:`lend`, or any view of that) is still alive.

    Every view holds a reference to its base's tensor implementation, so its use count is above
    one exactly while a view lives; plain Python references to ``buffer`` itself are the owner's.
    """
    return buffer._use_count() > 1
