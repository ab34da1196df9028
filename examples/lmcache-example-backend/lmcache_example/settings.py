from pydantic import Field

from lmcache_core.plugin_api import BackendSettings


class ExampleSettings(BackendSettings):
    """Read from ``LMCACHE_EXAMPLE__<FIELD>`` and the ``example:`` section of the YAML file.

    Every field needs a description: the configuration docs are generated from them.
    """

    max_entries: int = Field(100_000, gt=0, description="Chunks kept; the least recently used go first.")
