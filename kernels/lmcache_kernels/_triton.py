"""Triton when it is installed; without it, kernels stay plain functions that nothing launches.

``pip install 'lmcache-core[cuda]'`` adds Triton; :mod:`.dispatch` only picks a kernel when this
module found it, so the package imports and copies (through the torch references) without it.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when :mod:`.gather` and
:mod:`.scatter` are imported: set ``TRITON_INTERPRET=1`` before the first import and the kernels run
on CPU tensors through Triton's interpreter. That is how the tests check them without a GPU, in a
child process so that no other test sees interpreted kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

HAS_TRITON = triton is not None


def jit(kernel: Callable[..., Any]) -> Any:
    """``triton.jit`` when Triton is installed, else the plain function (never launched)."""
    return kernel if triton is None else triton.jit(kernel)


def next_power_of_2(value: int) -> int:
    """Triton block shapes are powers of two: the smallest one that holds ``value``."""
    return 1 << max(value - 1, 0).bit_length()


__all__ = ["HAS_TRITON", "jit", "next_power_of_2", "tl", "triton"]
