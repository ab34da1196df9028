"""The ``s3`` backend: chunks as objects in S3 or any object store fsspec reaches (gs://, az://, memory://).

Importing this module imports neither fsspec nor s3fs: the backend class is named by a string and
imported when a tier uses it.
"""

from lmcache_core.plugin_api import hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "s3",
        "lmcache_s3.backend:ObjectStoreBackend",
        settings="lmcache_s3.settings:S3Settings",
        extra="s3",
        requires=("fsspec", "s3fs"),
        url_schemes=("s3", "s3a", "gs", "gcs", "az", "abfs", "memory"),
        description="S3 and S3-compatible stores (MinIO, Ceph) via s3fs; gs://, az:// with gcsfs / adlfs",
    )
