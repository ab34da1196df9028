"""What plugins registered: backend specs (import strings, not classes), codecs, and load-time failures.

One Registry is built per process by :func:`lmcache_core.plugins.load_registry`; nothing here is
process-global, so two registries (a test's and the server's) never see each other's codecs.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field

from lmcache_core.codecs import Codec
from lmcache_core.errors import MissingExtraError, PluginError, UnknownBackendError

log = logging.getLogger(__name__)


def import_object(target: str) -> object:
    """Import ``"package.module:Attribute"``."""
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise PluginError(f"{target!r} is not of the form 'module:Attribute'")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str
    settings: str | None
    plugin: str
    extra: str | None = None
    requires: tuple[str, ...] = ()
    url_schemes: tuple[str, ...] = ()
    description: str = ""

    def missing_module(self) -> str | None:
        """The first required module that is not installed, found without importing it."""
        for module in self.requires:
            try:
                if importlib.util.find_spec(module) is None:
                    return module
            except ModuleNotFoundError:  # a parent package of a dotted name is missing
                return module
        return None

    @property
    def status(self) -> str:
        missing = self.missing_module()
        if missing is None:
            return "available"
        hint = f"pip install 'lmcache-core[{self.extra}]'" if self.extra else f"pip install {missing}"
        return f"needs {missing}: {hint}"


@dataclass
class Registry:
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> "loaded" or the error
    codecs: dict[str, Codec] = field(default_factory=dict)  # what encoders use and decoders look up
    codec_plugins: dict[str, str] = field(default_factory=dict)  # codec name -> the plugin that registered it

    def backend(self, name: str) -> BackendSpec:
        try:
            return self.backends[name]
        except KeyError:
            known = ", ".join(sorted(self.backends)) or "none"
            raise UnknownBackendError(f"no plugin registered a backend named {name!r}; known: {known}") from None

    def backend_for_scheme(self, scheme: str) -> BackendSpec | None:
        for spec in self.backends.values():
            if scheme in spec.url_schemes:
                return spec
        return None

    def backend_class(self, name: str) -> type:
        spec = self.backend(name)
        missing = spec.missing_module()
        if missing is not None:
            raise MissingExtraError(name, spec.extra or missing, missing)
        return import_object(spec.target)  # type: ignore[return-value]

    def settings_model(self, name: str) -> type:
        from lmcache_core.backend import BackendSettings

        spec = self.backend(name)
        return import_object(spec.settings) if spec.settings else BackendSettings  # type: ignore[return-value]


class BackendRegistrar:
    """The ``register`` callable handed to one plugin's ``lmcache_register_backends``."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self._plugin = plugin

    def __call__(
        self,
        name: str,
        target: str,
        *,
        settings: str | None = None,
        extra: str | None = None,
        requires: tuple[str, ...] | list[str] = (),
        url_schemes: tuple[str, ...] | list[str] = (),
        description: str = "",
    ) -> None:
        if not name.isidentifier() or name != name.lower():
            raise PluginError(f"plugin {self._plugin!r}: backend name {name!r} must be a lower-case identifier")
        if ":" not in target:
            raise PluginError(f"plugin {self._plugin!r}: target {target!r} must be 'module:Class'")
        existing = self._registry.backends.get(name)
        if existing is not None:
            raise PluginError(
                f"plugin {self._plugin!r} registers backend {name!r}, already registered by {existing.plugin!r}"
            )
        self._registry.backends[name] = BackendSpec(
            name=name,
            target=target,
            settings=settings,
            plugin=self._plugin,
            extra=extra,
            requires=tuple(requires),
            url_schemes=tuple(url_schemes),
            description=description,
        )


class CodecRegistrar:
    """The ``register`` callable handed to one plugin's ``lmcache_register_codecs``."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self._plugin = plugin

    def __call__(self, codec: Codec) -> None:
        if not isinstance(codec, Codec):
            raise PluginError(f"plugin {self._plugin!r}: {codec!r} is not a Codec (name, encode, decode)")
        if len(codec.name.encode()) > 8:
            raise PluginError(f"plugin {self._plugin!r}: codec name {codec.name!r} is longer than 8 bytes")
        existing = self._registry.codec_plugins.get(codec.name)
        if existing is not None:  # objects name their codec: two meanings of one name would misdecode
            raise PluginError(
                f"plugin {self._plugin!r} registers codec {codec.name!r}, already registered by {existing!r}"
            )
        self._registry.codecs[codec.name] = codec
        self._registry.codec_plugins[codec.name] = self._plugin
