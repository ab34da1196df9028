from typing import Literal
from urllib.parse import urlsplit

from pydantic import ByteSize, Field, SecretStr, field_validator

from lmcache_core.plugin_api import BackendSettings, split_list

SCHEMES = ("redis", "rediss", "unix")


class RedisSettings(BackendSettings):
    url: str = Field(
        "redis://localhost:6379/0",
        description="`redis://[user:password@]host:port/db`, `rediss://` for TLS, or `unix:///path/redis.sock?db=0`. "
        "In sentinel mode host:port is a sentinel; in cluster mode any node.",
    )
    mode: Literal["standalone", "cluster", "sentinel"] = Field(
        "standalone", description="standalone, cluster (Redis Cluster) or sentinel (master found through Sentinel)."
    )
    username: str | None = Field(None, description="ACL user; overrides a user in the URL.")
    password: SecretStr | None = Field(None, description="Password; overrides one in the URL. Never logged.")
    sentinel_master: str = Field("mymaster", description="Sentinel mode: the monitored master's name.")
    sentinels: list[str] = Field(
        default_factory=list, description="Sentinel mode: more sentinels as `host:port`, comma-separated."
    )
    timeout: float = Field(
        2.0, gt=0, description="Seconds a socket read or write may block before the call fails (and becomes a miss)."
    )
    connect_timeout: float = Field(1.0, gt=0, description="Seconds to wait for a TCP/TLS connection.")
    max_connections: int = Field(32, gt=0, description="Connection pool size (per node in cluster mode).")
    ttl: int = Field(
        7 * 24 * 3600, ge=0,
        description="Seconds until a stored chunk expires (7 days by default, so a shared Redis does not keep "
        "every chunk forever); 0 = never.",
    )
    max_value_size: ByteSize = Field(
        ByteSize(512 * 1024**2),
        description="Largest value to store; bigger chunks are refused, logged and counted. Redis refuses values "
        "over its `proto-max-bulk-len` (512MB by default).",
    )

    _split_sentinels = field_validator("sentinels", mode="before")(split_list)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in SCHEMES:
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got scheme {scheme!r}")
        return url
