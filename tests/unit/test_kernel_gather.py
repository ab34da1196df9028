"""gather: the Triton kernel equals ``gather_reference`` bit for bit, case by case (Triton's interpreter
on CPU tensors, in a child process: see kernel_cases.py); and the package works without Triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kernel_cases import cases, interpreted_results, triton_installed


@pytest.mark.skipif(not triton_installed(), reason="needs Triton: pip install 'lmcache-core[cuda]'")
@pytest.mark.parametrize("case_id", [case.id for case in cases()])
def test_triton_gather_equals_reference(case_id: str) -> None:
    failure = interpreted_results()["gather"][case_id]
    assert failure is None, failure


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as where it is not installed
import torch
import lmcache_kernels as kernels
from lmcache_kernels._triton import HAS_TRITON
assert not HAS_TRITON
cache = [torch.randn(4, 2, 16, 32) for _ in range(2)]
slots = torch.tensor([3, 17, 40])
buffer = torch.empty(2, 2, 3, 2, 16)
kernels.gather(cache, buffer, slots, kernels.PagedLayout.STANDARD)
kernels.scatter(cache, buffer * 2, slots, kernels.PagedLayout.STANDARD)
assert torch.equal(cache[1][1, :, 1, 16:], 2 * buffer[1, 1, 1])  # slot 17: block 1, offset 1, V
"""


def test_imports_and_copies_without_triton() -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
