"""scatter: the Triton kernel leaves the cache exactly as ``scatter_reference`` does, case by case
(Triton's interpreter on CPU tensors, in a child process: see kernel_cases.py)."""

from __future__ import annotations

import pytest
from kernel_cases import cases, interpreted_results, triton_installed


@pytest.mark.skipif(not triton_installed(), reason="needs Triton: pip install 'lmcache-core[cuda]'")
@pytest.mark.parametrize("case_id", [case.id for case in cases()])
def test_triton_scatter_equals_reference(case_id: str) -> None:
    failure = interpreted_results()["scatter"][case_id]
    assert failure is None, failure
