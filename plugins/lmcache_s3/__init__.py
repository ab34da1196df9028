"""The ``objectstore`` backend: chunks as objects in any store fsspec reaches (s3://, gs://, az://,
memory://), registered under the neutral name and also as ``s3``, its name before (``LMCACHE_TIERS=s3``
and ``LMCACHE_S3__*`` keep working; ``LMCACHE_REMOTE_URL=s3://...`` keeps selecting the ``s3`` tier).

It needs only fsspec to be listed as available; the scheme's own fsspec implementation (s3fs for
S3, gcsfs, adlfs, ...) is checked when a tier opens its URL, with fsspec's own error text.
Importing this module imports neither fsspec nor s3fs: the backend class is named by a string and
imported when a tier uses it.
"""

from lmcache_core.plugin_api import hookimpl


@hookimpl
def lmcache_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "objectstore",
        "lmcache_s3.backend:ObjectStoreBackend",
        settings="lmcache_s3.settings:S3Settings",
        extra="s3",
        requires=("fsspec",),
        url_schemes=("s3", "s3a", "gs", "gcs", "az", "abfs", "memory"),
        aliases=("s3",),
        description="object stores via fsspec: S3 and S3-compatible (MinIO, Ceph) with s3fs, gs:// with gcsfs, "
        "az:// with adlfs",
        medium="remote",
    )
