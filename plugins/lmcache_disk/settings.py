from pathlib import Path

from pydantic import ByteSize, Field, field_validator

from lmcache_core.plugin_api import BackendSettings


class DiskSettings(BackendSettings):
    path: Path = Field(Path("~/.cache/lmcache-core/disk"), description="Directory for chunk files.")
    max_size: ByteSize = Field(ByteSize(20 * 1024**3), description="Disk space for chunk files, e.g. 20GiB.")
    fsync: bool = Field(False, description="fsync each file before it becomes visible (survives power loss).")

    @field_validator("path", mode="before")
    @classmethod
    def _strip_file_url(cls, value: object) -> object:
        if isinstance(value, str) and value.startswith("file://"):
            return value[len("file://") :]
        return value
