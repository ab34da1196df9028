"""The example backend runs the same conformance suite as lmcache-core's own backends."""

from __future__ import annotations

import lmcache_example
import pytest
from lmcache_example.backend import ExampleBackend
from lmcache_example.settings import ExampleSettings

from lmcache_core import BackendContext, load_registry, load_settings
from lmcache_core.testing.conformance import SerializingBackendConformance, make_chunks


class TestExampleBackend(SerializingBackendConformance):
    @pytest.fixture
    def backend(self):
        backend = ExampleBackend(ExampleSettings(), BackendContext("example", "raw"))
        yield backend
        backend.close()


def test_eviction_keeps_the_head_of_a_prompt() -> None:
    backend = ExampleBackend(ExampleSettings(max_entries=3), BackendContext("example", "raw"))
    chunks = make_chunks(5)
    backend.put_many(chunks)
    assert backend.contains([chunk.key for chunk in chunks]) == 3
    assert backend.counters["evicted"] == 2


def test_the_hook_registers_the_backend_and_its_settings() -> None:
    # Loaded by hand here so the test also runs from a checkout; once installed, the entry point
    # does the same (allow-listing only the built-ins keeps the installed copy out of the way).
    registry = load_registry({"LMCACHE_PLUGINS__ALLOW": "codecs,cpu"}, extra_plugins=[("example", lmcache_example)])
    assert registry.backends["example"].status == "available"
    assert registry.backend_class("example") is ExampleBackend
    settings = load_settings(registry, {"LMCACHE_TIERS": "cpu,example", "LMCACHE_EXAMPLE__MAX_ENTRIES": "8"})
    assert settings.backend("example").max_entries == 8
