"""Our local backends run the same conformance suite a third-party backend would."""

from __future__ import annotations

import pytest

from lmcache_core.backend import BackendContext
from lmcache_core.testing.conformance import BackendConformance, SerializingBackendConformance
from lmcache_cpu.backend import CpuBackend
from lmcache_cpu.settings import CpuSettings
from lmcache_disk.backend import DiskBackend
from lmcache_disk.settings import DiskSettings


class TestCpuBackend(BackendConformance):
    @pytest.fixture
    def backend(self):
        backend = CpuBackend(CpuSettings(max_size="256MiB"), BackendContext("cpu", "raw"))
        yield backend
        backend.close()


class TestDiskBackend(SerializingBackendConformance):
    @pytest.fixture
    def backend(self, tmp_path):
        backend = DiskBackend(DiskSettings(path=tmp_path), BackendContext("disk", "raw"))
        yield backend
        backend.close()
