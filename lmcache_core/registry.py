"""What plugins registered: backend specs (import strings, not classes), codecs, and load-time failures.

One Registry is built per process by :func:`lmcache_core.plugins.load_registry`; nothing here is
process-global, so two registries (a test's and the server's) never see each other's codecs.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Literal

from lmcache_core.codecs import Codec
from lmcache_core.errors import MissingExtraError, PluginError, UnknownBackendError

log = logging.getLogger(__name__)


def import_object(target: str) -> object:
    """Import ``"package.module:Attribute"``."""
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise PluginError(f"{target!r} is not of the form 'module:Attribute'")
    return getattr(importlib.import_module(module_name), attribute)


# Where a backend keeps chunks, fastest first: what vLLM's hit-source metrics report, and the order
# of the tiers that LMCache's variables switch on.
Medium = Literal["host", "disk", "remote"]
MEDIA: tuple[str, ...] = ("host", "disk", "remote")
LEGACY_KINDS = ("bool", "gb", "text")
LEGACY_TIER_EFFECTS = ("", "switch", "adds", "zero_disables")


@dataclass(frozen=True)
class LegacyVariable:
    """An LMCache variable (or the same name, lower case, at the top of the YAML file) that a
    backend accepts and maps onto its own settings. Declared at registration, so the core names
    no backend.

    ``kind``: how the value reads: ``bool`` (true/false/1/0), ``gb`` (LMCache's gigabytes as a
    float, stored as bytes) or ``text``. ``setting``: the field of the backend's settings it sets
    (``None``: it only switches the tier). ``tier``: what it does to the tier list LMCache's
    variables build: ``switch`` (a bool: true puts the tier in, false leaves it out, ``default``
    when unset), ``adds`` (any value puts it in), ``zero_disables`` (a 0 keeps it out).
    """

    name: str
    kind: Literal["bool", "gb", "text"]
    setting: str | None = None
    tier: Literal["", "switch", "adds", "zero_disables"] = ""
    default: bool | None = None
    help: str = ""


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
    medium: Medium = "remote"
    url_setting: str = "url"  # the settings field a URL of one of url_schemes goes to
    aliases: tuple[str, ...] = ()  # more tier names served by this backend, each with its own section
    legacy: tuple[LegacyVariable, ...] = ()

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

    @property
    def aliases(self) -> dict[str, str]:
        """Alias tier name -> the backend's own name."""
        return {name: spec.name for name, spec in self.backends.items() if name != spec.name}

    def legacy_variables(self) -> dict[str, tuple[BackendSpec, LegacyVariable]]:
        """The LMCache names the backends accept, each with the backend that declared it."""
        return {
            variable.name: (spec, variable)
            for name, spec in self.backends.items() if name == spec.name
            for variable in spec.legacy
        }

    def tier_for_scheme(self, scheme: str) -> str | None:
        """The tier name a URL of ``scheme`` selects: the scheme itself where it names a tier
        (``s3://`` -> the ``s3`` alias, whose ``LMCACHE_S3__*`` variables then apply), otherwise
        the name of the backend serving the scheme."""
        spec = self.backend_for_scheme(scheme)
        if spec is None:
            return None
        return scheme if self.backends.get(scheme) is spec else spec.name

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
        medium: Medium = "remote",
        url_setting: str = "url",
        aliases: tuple[str, ...] | list[str] = (),
        legacy: tuple[LegacyVariable, ...] | list[LegacyVariable] = (),
    ) -> None:
        """Register backend ``name``. ``medium`` says where it keeps chunks (``host`` memory,
        local ``disk`` or ``remote``), ``url_schemes`` which ``LMCACHE_REMOTE_URL`` schemes it
        serves (the URL goes to its ``url_setting`` field), ``aliases`` more tier names it answers
        to (old names kept working), ``legacy`` the LMCache variables it accepts."""
        plugin = self._plugin
        for tier_name in (name, *aliases):
            if not tier_name.isidentifier() or tier_name != tier_name.lower():
                raise PluginError(f"plugin {plugin!r}: backend name {tier_name!r} must be a lower-case identifier")
        if ":" not in target:
            raise PluginError(f"plugin {plugin!r}: target {target!r} must be 'module:Class'")
        if medium not in MEDIA:
            raise PluginError(f"plugin {plugin!r}: medium {medium!r} of backend {name!r}; allowed: {', '.join(MEDIA)}")
        for variable in legacy:
            if not isinstance(variable, LegacyVariable) or not variable.name.startswith("LMCACHE_"):
                raise PluginError(f"plugin {plugin!r}: {variable!r} is not a LegacyVariable named LMCACHE_*")
            if variable.kind not in LEGACY_KINDS or variable.tier not in LEGACY_TIER_EFFECTS:
                raise PluginError(f"plugin {plugin!r}: {variable.name}: kind must be one of {LEGACY_KINDS}, "
                                  f"tier one of {LEGACY_TIER_EFFECTS}")
            claimed = self._registry.legacy_variables().get(variable.name)
            if claimed is not None:
                raise PluginError(f"plugin {plugin!r} declares {variable.name}, already declared by "
                                  f"{claimed[0].plugin!r}")
        for tier_name in (name, *aliases):
            existing = self._registry.backends.get(tier_name)
            if existing is not None:
                raise PluginError(
                    f"plugin {plugin!r} registers backend {tier_name!r}, already registered by {existing.plugin!r}"
                )
        spec = BackendSpec(
            name=name,
            target=target,
            settings=settings,
            plugin=plugin,
            extra=extra,
            requires=tuple(requires),
            url_schemes=tuple(url_schemes),
            description=description,
            medium=medium,
            url_setting=url_setting,
            aliases=tuple(aliases),
            legacy=tuple(legacy),
        )
        for tier_name in (name, *aliases):
            self._registry.backends[tier_name] = spec


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
