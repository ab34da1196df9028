"""The one place entry points are read. Built-in and third-party plugins load through this loop.

One broken third-party plugin is logged under its own name and skipped, so it cannot take a
server down; ``LMCACHE_PLUGINS__STRICT=1`` makes it fatal, for plugin developers.
``LMCACHE_PLUGINS__ALLOW`` / ``LMCACHE_PLUGINS__DENY`` (comma-separated entry-point names) choose
what loads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from types import ModuleType

import pluggy

from lmcache_core import hookspecs
from lmcache_core.errors import PluginError
from lmcache_core.registry import BackendRegistrar, CodecRegistrar, Registry

log = logging.getLogger(__name__)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _names(value: str | None) -> set[str]:
    return {item.strip() for item in (value or "").split(",") if item.strip()}


def load_registry(
    environ: Mapping[str, str] | None = None,
    extra_plugins: Iterable[tuple[str, ModuleType | object]] = (),
) -> Registry:
    """Load every plugin of the ``lmcache_core`` group (plus ``extra_plugins``) into a Registry.

    Plugin loading reads its three settings straight from the environment because it has to
    happen before the full settings can be validated (backends own settings sections).
    """
    env = os.environ if environ is None else environ
    strict = _truthy(env.get("LMCACHE_PLUGINS__STRICT"))
    allow, deny = _names(env.get("LMCACHE_PLUGINS__ALLOW")), _names(env.get("LMCACHE_PLUGINS__DENY"))
    registry = Registry()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)

    def fail(name: str, error: BaseException) -> None:
        registry.plugins[name] = f"failed: {type(error).__name__}: {error}"
        if strict:
            raise PluginError(f"plugin {name!r} failed to load: {error}") from error
        log.warning("lmcache-core plugin %r skipped: %s: %s", name, type(error).__name__, error)

    candidates: list[tuple[str, object]] = []
    for entry_point in entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if (allow and entry_point.name not in allow) or entry_point.name in deny:
            registry.plugins[entry_point.name] = "disabled by LMCACHE_PLUGINS__ALLOW/DENY"
            continue
        try:
            candidates.append((entry_point.name, entry_point.load()))
        except Exception as error:  # a third-party import error must not stop the others
            fail(entry_point.name, error)
    candidates.extend(extra_plugins)

    for name, plugin in candidates:
        api = getattr(plugin, "PLUGIN_API_VERSION", hookspecs.PLUGIN_API_VERSION)
        try:
            if api > hookspecs.PLUGIN_API_VERSION:
                raise PluginError(
                    f"written for plugin API {api}, this lmcache-core has {hookspecs.PLUGIN_API_VERSION}; "
                    "upgrade lmcache-core"
                )
            manager.register(plugin, name=name)
            unknown = [caller.name for caller in manager.get_hookcallers(plugin) or [] if not caller.has_spec()]
            if unknown:
                manager.unregister(plugin)
                raise PluginError(f"implements unknown hook(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(sorted(n for n in dir(hookspecs) if n.startswith('lmcache_')))}")
        except Exception as error:
            fail(name, error)
            continue
        registry.plugins[name] = "loaded"

    hooks = (
        (manager.hook.lmcache_register_codecs, CodecRegistrar),
        (manager.hook.lmcache_register_backends, BackendRegistrar),
    )
    for hook, registrar in hooks:
        for impl in hook.get_hookimpls():
            try:
                impl.function(register=registrar(registry, impl.plugin_name))
            except Exception as error:
                fail(impl.plugin_name, error)
    return registry
