"""lmcache_kernels: copies between vLLM's paged KV cache and lmcache-core's dense chunk buffers.

One module per op, one name through reference, kernel, wrapper, dispatch, test and benchmark:

=========  ============  ===================  ===================  ==================  ===========
op         module        torch reference      Triton kernel        kernel wrapper      dispatch
=========  ============  ===================  ===================  ==================  ===========
gather     gather.py     gather_reference     _gather_kernel       gather_triton       gather
scatter    scatter.py    scatter_reference    _scatter_kernel      scatter_triton      scatter
=========  ============  ===================  ===================  ==================  ===========

:mod:`.layouts` defines vLLM's paged layouts, :mod:`.addressing` turns the GPU ones into strides for
the kernels, :mod:`.dispatch` picks the kernel or the reference (``LMCACHE_KERNELS=reference`` forces
the reference). Imports without Triton (``pip install 'lmcache-core[cuda]'`` adds it) and without
lmcache-core.
"""

from lmcache_kernels.dispatch import KERNELS_VARIABLE, triton_strides
from lmcache_kernels.gather import gather, gather_reference, gather_triton
from lmcache_kernels.layouts import PagedLayout, token_views
from lmcache_kernels.scatter import scatter, scatter_reference, scatter_triton

__all__ = [
    "KERNELS_VARIABLE",
    "PagedLayout",
    "gather",
    "gather_reference",
    "gather_triton",
    "scatter",
    "scatter_reference",
    "scatter_triton",
    "token_views",
    "triton_strides",
]
