"""The Triton kernels against their torch references, case by case, under Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (when :mod:`lmcache_kernels` is imported),
so the cases run in a child process started with ``TRITON_INTERPRET=1`` (``python kernel_cases.py``
prints one JSON line: each case's id and its failure, or null), and no other test sees interpreted
kernels. :func:`interpreted_results` starts that process once for both test modules
(``test_kernel_gather.py``, ``test_kernel_scatter.py``), which assert one case each.

Caches are small (2 layers, 6 blocks, 3 heads) so that the interpreter, which runs each program in
Python (milliseconds each), takes a few seconds for all cases.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lmcache_kernels import PagedLayout, addressing, gather_reference, gather_triton, scatter_reference, scatter_triton

LAYOUT_SHAPES = {  # (layout, physical shape, permutation to the layout's logical shape)
    "standard_hnd": ("standard", "B H N 2D", None),
    "standard_nhd": ("standard", "B N H 2D", (0, 2, 1, 3)),  # vLLM kv_cache_layout NHD: [B, N, H, 2D] in memory
    "flash_attn": ("flash_attn", "2 B N H D", None),
    "flashinfer_nhd": ("flashinfer_nhd", "B 2 N H D", None),
    "flashinfer_hnd": ("flashinfer_hnd", "B 2 H N D", None),
    "mla": ("mla", "B N D", None),
    "mla_4d": ("mla", "B 1 N D", None),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8_bytes": torch.uint8}
LAYERS, BLOCKS, HEADS = 2, 6, 3
SMALL_TILE = 64  # elements per program: splits heads and tokens over programs


@dataclass(frozen=True)
class Case:
    shape: str
    dtype: str
    block_size: int
    slots: str
    head_dim: int
    small_tiles: bool

    @property
    def id(self) -> str:
        tiles = "-small_tiles" if self.small_tiles else ""
        return f"{self.shape}-{self.dtype}-N{self.block_size}-D{self.head_dim}-{self.slots}{tiles}"


# Each layout meets every dtype, block size and slot kind, and a head size that is a power of two
# and one that is not (masked lanes); not the full product, which the interpreter would take minutes for.
MIXES = (
    ("bf16", 16, "tokens", 16), ("fp16", 32, "span", 24), ("fp32", 128, "blocks", 16), ("fp8_bytes", 32, "span", 24),
)


def cases() -> list[Case]:
    found = [Case(shape, *mix, small_tiles=False) for shape in LAYOUT_SHAPES for mix in MIXES]
    # Tiles of one token and part of the heads: the grid's token and head axes (same for every layout).
    found += [Case(shape, "bf16", 16, "tokens", 24, small_tiles=True) for shape in ("standard_nhd", "flashinfer_hnd")]
    return found


def make_cache(case: Case, generator: torch.Generator) -> list[torch.Tensor]:
    sizes = {"B": BLOCKS, "N": case.block_size, "H": HEADS, "D": case.head_dim, "2D": 2 * case.head_dim,
             "2": 2, "1": 1}
    _, physical, permutation = LAYOUT_SHAPES[case.shape]
    shape = [sizes[name] for name in physical.split()]
    layers = [random_tensor(shape, case.dtype, generator) for _ in range(LAYERS)]
    return [layer.permute(*permutation) for layer in layers] if permutation else layers


def random_tensor(shape: list[int] | tuple[int, ...], dtype: str, generator: torch.Generator) -> torch.Tensor:
    if dtype == "fp8_bytes":  # an fp8 cache: vLLM keeps it as bytes
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.randn(shape, generator=generator).to(DTYPES[dtype])


def make_slots(case: Case, generator: torch.Generator) -> torch.Tensor:
    """``tokens``: random distinct slots (partial blocks, any order); ``blocks``: whole blocks in random
    order (the references' page path); ``span``: a chunk that starts and ends inside blocks, through a
    random block table."""
    size = case.block_size
    if case.slots == "tokens":
        return torch.randperm(BLOCKS * size, generator=generator)[: 5 if case.small_tiles else 13]
    table = torch.randperm(BLOCKS, generator=generator)
    if case.slots == "blocks":
        return (table[:2, None] * size + torch.arange(size)).flatten()
    positions = torch.arange(size - 3, 2 * size + 5)
    return table[positions // size] * size + positions % size


def run_case(op: str, case: Case) -> str | None:
    """None when the Triton op equals its reference bit for bit, else what differs."""
    generator = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))  # hash() varies per process
    layout = PagedLayout(LAYOUT_SHAPES[case.shape][0])
    cache = make_cache(case, generator)
    slots = make_slots(case, generator)
    heads = 1 if layout is PagedLayout.MLA else HEADS
    shape = (LAYERS, layout.kv_factor, slots.numel(), heads, case.head_dim)
    addressing._TILE_ELEMENTS = SMALL_TILE if case.small_tiles else 4096
    if op == "gather":
        expected = torch.zeros(shape, dtype=cache[0].dtype)
        gather_reference(cache, expected, slots, layout)
        got = random_tensor(shape, case.dtype, generator)  # not zeros: an element left unwritten shows
        gather_triton(cache, got, slots, layout)
        return None if torch.equal(got, expected) else f"buffer differs at {(got != expected).nonzero()[:4].tolist()}"
    buffer = random_tensor(shape, case.dtype, generator)
    expected_cache = [layer.clone() for layer in cache]  # clone keeps the strides (NHD stays NHD)
    scatter_reference(expected_cache, buffer, slots, layout)
    scatter_triton(cache, buffer, slots, layout)
    wrong = [index for index, (a, b) in enumerate(zip(cache, expected_cache, strict=True)) if not torch.equal(a, b)]
    return f"layers {wrong} differ" if wrong else None


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def interpreted_results() -> dict[str, dict[str, str | None]]:
    """``{op: {case id: failure or None}}`` from one interpreted child process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(Path(__file__))], env=env, capture_output=True, text=True,
                            check=False, timeout=300)
    if result.returncode:
        raise RuntimeError(f"the interpreted kernel run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    torch.set_num_threads(1)
    results: dict[str, dict[str, str | None]] = {}
    for op in ("gather", "scatter"):
        results[op] = {}
        for case in cases():
            try:
                results[op][case.id] = run_case(op, case)
            except Exception as error:  # reported per case in the parent
                results[op][case.id] = f"{type(error).__name__}: {error}"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
