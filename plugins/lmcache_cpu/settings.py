from pydantic import ByteSize, Field

from lmcache_core.plugin_api import BackendSettings


class CpuSettings(BackendSettings):
    max_size: ByteSize = Field(ByteSize(5 * 1024**3), description="Memory for KV chunks, e.g. 5GiB.")
