"""The ``flaky`` tier: see the package docstring."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from pydantic import Field

from lmcache_core.backend import BackendContext
from lmcache_core.keys import ChunkKey
from lmcache_cpu.backend import CpuBackend
from lmcache_cpu.settings import CpuSettings


class FlakySettings(CpuSettings):
    failing_loads: int = Field(1, description="How many multi-chunk loads miss a chunk they should find.")
    missing_position: int = Field(1, description="Which chunk of such a load (0 = its first) misses.")
    only_rank: int = Field(-1, description="Fail only on this tensor-parallel rank (-1: every rank).")
    load_delay_s: float = Field(0.0, description="Every multi-chunk load first sleeps this long (a slow tier).")


class FlakyCpuBackend(CpuBackend):
    settings: FlakySettings

    def __init__(self, settings: FlakySettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self._failures_left = settings.failing_loads

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        if len(keys) > 1:
            time.sleep(self.settings.load_delay_s)
        found = super().get_many(keys)
        position, rank = self.settings.missing_position, self.settings.only_rank
        on_this_rank = rank < 0 or any(f":r{rank}of" in str(key) for key in keys)
        if self._failures_left > 0 and len(keys) > position and on_this_rank:
            self._failures_left -= 1
            found[position] = None
            self.count("injected_misses")
        return found
