import json
from typing import Any

from pydantic import Field, field_validator

from lmcache_core.plugin_api import BackendSettings


class S3Settings(BackendSettings):
    url: str = Field(
        "s3://lmcache",
        description="`s3://bucket/prefix` (also `gs://`, `az://`, `memory://` with their fsspec package installed).",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint for MinIO, Ceph, moto, ...; unset = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, "
        "then AWS itself.",
    )
    region: str | None = Field(None, description="S3 region; unset = the AWS credential chain's (AWS_REGION, ...).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="More keyword arguments for the fsspec filesystem, as JSON, e.g. `{\"profile\": \"cache\"}`. "
        "Shown by `lmcache-core info`: keep credentials in the provider's usual variables (AWS_*, ...).",
    )
    timeout: float = Field(
        10.0, gt=0,
        description="Seconds one batch (all its requests together) may take before it fails and becomes a miss.",
    )
    connect_timeout: float = Field(2.0, gt=0, description="Seconds to wait for a connection to the store.")
    max_concurrency: int = Field(32, gt=0, description="Requests in flight at once for one batch.")
    create_bucket: bool = Field(False, description="Create the bucket at start-up when it does not exist.")

    @field_validator("storage_options", mode="before")
    @classmethod
    def _parse_json(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    @field_validator("url")
    @classmethod
    def _has_protocol(cls, url: str) -> str:
        if "://" not in url:
            raise ValueError("expected a URL like s3://bucket/prefix")
        return url
