"""The ``cpu`` backend: KV chunks in process memory. Registered like any third-party plugin."""

from lmcache_core.plugin_api import hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "cpu",
        "lmcache_cpu.backend:CpuBackend",
        settings="lmcache_cpu.settings:CpuSettings",
        description="process memory, LRU by bytes, prefix-aware eviction",
    )
