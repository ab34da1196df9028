"""The ``redis`` backend: chunks as values in Redis or Valkey (standalone, Cluster or Sentinel).

Importing this module imports no redis client: the backend class is named by a string and
imported when a tier uses it, so listing backends works without the ``redis`` extra installed.
"""

from lmcache_core.plugin_api import hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "redis",
        "lmcache_redis.backend:RedisBackend",
        settings="lmcache_redis.settings:RedisSettings",
        extra="redis",
        requires=("redis",),
        url_schemes=("redis", "rediss", "unix"),
        description="Redis / Valkey (standalone, Cluster, Sentinel), pipelined batches, shared by instances",
        medium="remote",
    )
