"""The ``example`` backend: framed chunk objects in a dict in process memory.

This module is what the ``lmcache_core`` entry point names. Keep it cheap to import: it only tells
lmcache-core where the backend and its settings live, as strings, so listing backends imports
nothing else. A backend that needs a client library lists it in ``requires`` and names the pip extra
that installs it in ``extra``; ``lmcache-core info`` then reports what to install.
"""

from lmcache_core.plugin_api import hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "example",
        "lmcache_example.backend:ExampleBackend",
        settings="lmcache_example.settings:ExampleSettings",
        description="in-process dict of framed objects (a template for third-party backends)",
    )
