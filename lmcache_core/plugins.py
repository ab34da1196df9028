"""The one place entry points are read. Built-in and third-party plugins load through this loop.

One broken third-party plugin is logged under its own name and skipped, so it cannot take a
server down; ``plugins.strict`` (``LMCACHE_PLUGINS__STRICT=1``) makes it fatal, for plugin
developers. ``plugins.allow`` / ``plugins.deny`` (entry-point names) choose what loads. These three
come from the same validated settings as everything else (:class:`PluginSettings`), from the
environment or the YAML file's ``plugins:`` section.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from types import ModuleType

import pluggy

from lmcache_core import hookspecs
from lmcache_core.errors import PluginError
from lmcache_core.registry import BackendRegistrar, CodecRegistrar, Registry
from lmcache_core.settings import PluginSettings, load_plugin_settings

log = logging.getLogger(__name__)

# Plugins that are part of lmcache-core itself: loaded first and always, whatever the allow and
# deny lists say (settings default to the raw codec, and every stored object names its codec).
# Declared as entry points like every other plugin; imported by module name when the installed
# metadata predates the entry point (an editable install not reinstalled since).
CORE_PLUGINS = {"builtin_codecs": "lmcache_codecs"}
# Entry-point names of earlier releases, and the plugin that took over each one's job.
RETIRED_ENTRY_POINTS = {"codecs": "builtin_codecs"}


def load_registry(
    environ: Mapping[str, str] | None = None,
    extra_plugins: Iterable[tuple[str, ModuleType | object]] = (),
    *,
    plugin_settings: PluginSettings | None = None,
) -> Registry:
    """Load every plugin of the ``lmcache_core`` group (plus ``extra_plugins``) into a Registry.

    ``plugin_settings`` default to the ``plugins`` section of the settings in ``environ`` (and its
    ``LMCACHE_CONFIG_FILE``), validated by :func:`load_plugin_settings`: an invalid value is a
    :class:`SettingsError` naming the variable, as for any other setting.
    """
    chosen = plugin_settings if plugin_settings is not None else load_plugin_settings(environ)
    allow, deny, strict = set(chosen.allow), set(chosen.deny), chosen.strict
    registry = Registry()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)

    def fail(name: str, error: BaseException) -> None:
        registry.plugins[name] = f"failed: {type(error).__name__}: {error}"
        if strict:
            raise PluginError(f"plugin {name!r} failed to load: {error}") from error
        log.warning("lmcache-core plugin %r skipped: %s: %s", name, type(error).__name__, error)

    core: dict[str, object] = {}
    candidates: list[tuple[str, object]] = []
    for entry_point in entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        name = entry_point.name
        if name in RETIRED_ENTRY_POINTS:
            registry.plugins[name] = f"retired: {RETIRED_ENTRY_POINTS[name]} does its job"
            continue
        if name not in CORE_PLUGINS and ((allow and name not in allow) or name in deny):
            registry.plugins[name] = "disabled by LMCACHE_PLUGINS__ALLOW/DENY"
            continue
        try:
            plugin = entry_point.load()
        except Exception as error:  # a third-party import error must not stop the others
            fail(name, error)
            continue
        if name in CORE_PLUGINS:
            core[name] = plugin
        else:
            candidates.append((name, plugin))
    for name, module in CORE_PLUGINS.items():
        if core.get(name) is None:
            try:
                core[name] = importlib.import_module(module)
            except Exception as error:
                fail(name, error)
    candidates = [*((name, plugin) for name, plugin in core.items() if plugin is not None), *candidates]
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
        # pluggy calls the last registered first; the core's own plugins register their names first
        for impl in sorted(hook.get_hookimpls(), key=lambda impl: impl.plugin_name not in CORE_PLUGINS):
            try:
                impl.function(register=registrar(registry, impl.plugin_name))
            except Exception as error:
                fail(impl.plugin_name, error)
    return registry
