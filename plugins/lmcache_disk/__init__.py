"""The ``disk`` backend: one framed file per chunk in a local directory."""

from lmcache_core.plugin_api import LegacyVariable, hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "disk",
        "lmcache_disk.backend:DiskBackend",
        settings="lmcache_disk.settings:DiskSettings",
        url_schemes=("file",),
        url_setting="path",  # DiskSettings accepts file:// URLs
        description="local files, atomic writes, one byte budget per directory shared by processes",
        medium="disk",
        legacy=(
            LegacyVariable("LMCACHE_LOCAL_DISK", "text", setting="path", tier="adds",
                           help="path or file:// URL: disk.path, adds the disk tier"),
            LegacyVariable("LMCACHE_MAX_LOCAL_DISK_SIZE", "gb", setting="max_size", tier="zero_disables",
                           help="GB: disk.max_size (0 turns the disk tier off)"),
        ),
    )
