"""The ``disk`` backend: one framed file per chunk in a local directory."""

from lmcache_core.plugin_api import hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "disk",
        "lmcache_disk.backend:DiskBackend",
        settings="lmcache_disk.settings:DiskSettings",
        url_schemes=("file",),
        description="local files, atomic writes, one byte budget per directory shared by processes",
    )
