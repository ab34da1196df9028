"""Which implementation copies: the Triton kernels where they apply, else the torch references.

The kernels run when the cache is on CUDA, Triton is installed (``pip install 'lmcache-core[cuda]'``),
the layout is one they address (:data:`.addressing.TRITON_LAYOUTS`: every layout but the CPU
backend's), the layers share one geometry, and the buffer has the cache's dtype. Everything else,
CPU caches included, goes through the references, which handle any device, layout and stride order.

``LMCACHE_KERNELS=reference`` forces the references everywhere: to rule the kernels out when a
result looks wrong, or to compare speeds. ``auto`` (the default) applies the rule above. The variable
is read at every call, so a test or a benchmark can switch it between calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from lmcache_kernels._triton import HAS_TRITON
from lmcache_kernels.addressing import PagedStrides, paged_strides
from lmcache_kernels.layouts import PagedLayout

KERNELS_VARIABLE = "LMCACHE_KERNELS"
KERNELS_CHOICES = ("auto", "reference")


def kernels_choice() -> str:
    """``LMCACHE_KERNELS``, checked: ``auto`` or ``reference``."""
    value = os.environ.get(KERNELS_VARIABLE, "").strip().lower() or "auto"
    if value not in KERNELS_CHOICES:
        raise ValueError(f"{KERNELS_VARIABLE}: expected one of {', '.join(KERNELS_CHOICES)}, got {value!r}")
    return value


def triton_strides(paged: Sequence[torch.Tensor], buffer: torch.Tensor, layout: PagedLayout) -> PagedStrides | None:
    """The geometry the Triton kernels would copy ``paged`` with, or None when the reference must run."""
    if kernels_choice() == "reference" or not HAS_TRITON or not paged:
        return None
    if not paged[0].is_cuda or buffer.dtype != paged[0].dtype:
        return None
    return paged_strides(paged, layout)
