"""Fault injection for the vLLM fault tests: a ``flaky`` tier that is the ``cpu`` tier, except that
it answers a miss for chunks it holds on its first loads, as a chunk evicted between the
scheduler's lookup and the worker's load would, and can be made slow to load. A real tier cannot
be made to do that on cue.

The tests put this folder on vLLM's PYTHONPATH together with an ``lmcache_core`` entry point, so
vLLM's worker processes load it through the same plugin loop as any backend.
"""

from lmcache_core.hookspecs import hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "flaky",
        "lmcache_flaky.backend:FlakyCpuBackend",
        settings="lmcache_flaky.backend:FlakySettings",
        description="cpu tier that misses chunks on its first loads (fault injection for tests)",
    )
