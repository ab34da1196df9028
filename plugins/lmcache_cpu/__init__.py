"""The ``cpu`` backend: KV chunks in process memory. Registered like any third-party plugin."""

from lmcache_core.plugin_api import LegacyVariable, hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "cpu",
        "lmcache_cpu.backend:CpuBackend",
        settings="lmcache_cpu.settings:CpuSettings",
        description="process memory, LRU by bytes, prefix-aware eviction",
        medium="host",
        legacy=(
            LegacyVariable("LMCACHE_LOCAL_CPU", "bool", tier="switch", default=True, help="bool: cpu is a tier"),
            LegacyVariable("LMCACHE_MAX_LOCAL_CPU_SIZE", "gb", setting="max_size", help="GB: cpu.max_size"),
        ),
    )
