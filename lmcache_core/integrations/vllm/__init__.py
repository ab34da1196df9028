"""vLLM integration: the ``LMCacheCoreConnector`` KV connector.

Enable it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"LMCacheCoreConnector","kv_role":"kv_both"}'

The name resolves through vLLM's ``vllm.general_plugins`` entry point, which calls :func:`register`
in every vLLM process. Without the entry point (e.g. running from a source tree), add
``"kv_connector_module_path":"lmcache_core.integrations.vllm"`` to the config instead.

Importing this package is cheap: it imports neither vLLM nor torch until the connector class is
actually asked for.
"""

from __future__ import annotations

import logging
from typing import Any

CONNECTOR_NAME = "LMCacheCoreConnector"
_CONNECTOR_MODULE = "lmcache_core.integrations.vllm.connector"

__all__ = ["CONNECTOR_NAME", "LMCacheCoreConnector", "register"]


def register() -> None:
    """Register ``LMCacheCoreConnector`` with vLLM's connector factory (the general-plugin hook).

    vLLM calls it in its front-end, engine-core and worker processes, possibly more than once, and
    calls it bare: so it is idempotent, imports only the factory, and never raises.
    """
    try:
        from lmcache_core.integrations.vllm.compat import register_connector

        register_connector(CONNECTOR_NAME, _CONNECTOR_MODULE, CONNECTOR_NAME)
    except Exception:  # a broken plugin must not take vLLM down
        logging.getLogger("vllm.lmcache_core").exception("could not register %s with vLLM", CONNECTOR_NAME)


def __getattr__(name: str) -> Any:
    # ``kv_connector_module_path`` does getattr(module, "LMCacheCoreConnector") on this package.
    if name == CONNECTOR_NAME:
        from lmcache_core.integrations.vllm.connector import LMCacheCoreConnector

        return LMCacheCoreConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
