"""BufferReserve: save buffers faulted in between steps, handed out without waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from lmcache_core.buffer_reserve import MAX_RESERVE_BYTES, BufferReserve
from lmcache_core.testing.waiting import eventually


def gate() -> tuple[threading.Event, Callable[[float], bool]]:
    """A step gate like the tier stack's: set between steps."""
    between = threading.Event()
    return between, between.wait


def test_refills_only_between_steps_and_hands_out_ready_buffers() -> None:
    between, between_steps = gate()
    reserve = BufferReserve((2, 3, 4), torch.float32, target=3, between_steps=between_steps)
    try:
        time.sleep(0.1)
        assert reserve.ready == 0  # a step is running: nothing touched
        buffer, ready = reserve.take()  # never waits: fresh memory
        assert not ready and buffer.shape == (2, 3, 4) and buffer.dtype == torch.float32
        between.set()
        assert eventually(lambda: reserve.ready == 3)
        taken = [reserve.take() for _ in range(3)]
        assert all(ready for _, ready in taken)
        assert len({buffer.data_ptr() for buffer, _ in taken}) == 3  # distinct memory each
        assert eventually(lambda: reserve.ready == 3)  # and refilled again
    finally:
        reserve.close()


def test_a_buffer_taken_is_the_callers_alone() -> None:
    """The cpu tier adopts save buffers as they are: each must own all of its memory."""
    reserve = BufferReserve((8, 16), torch.bfloat16, target=2, between_steps=lambda timeout: True)
    try:
        assert eventually(lambda: reserve.ready == 2)
        buffer, ready = reserve.take()
        assert ready and buffer._base is None and buffer.is_contiguous()
        assert buffer.untyped_storage().nbytes() == buffer.nbytes
    finally:
        reserve.close()


def test_the_reserve_stays_small() -> None:
    chunk = (MAX_RESERVE_BYTES // 4 // 4,)  # a quarter of the cap, in float32
    reserve = BufferReserve(chunk, torch.float32, target=100, between_steps=lambda timeout: False)
    try:
        assert reserve.target == 4
    finally:
        reserve.close()
