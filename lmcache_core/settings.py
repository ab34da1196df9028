"""Settings: ``LMCACHE_*`` environment variables, an optional YAML file, and defaults.

Precedence: environment > ``LMCACHE_CONFIG_FILE`` (YAML) > defaults. Nested fields use ``__``
(``LMCACHE_CPU__MAX_SIZE=4GiB``). Each backend plugin owns a settings section named after it,
validated by the model it registered. The LMCache variable names people already set in vLLM
containers are accepted too and mapped onto ours (see ``LEGACY_VARIABLES``).

Every validation error names the variable (or YAML key) the operator actually wrote, the value,
and what is allowed. Unknown ``LMCACHE_*`` variables produce a warning naming the closest known one.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_plus, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from lmcache_core.backend import BackendSettings
from lmcache_core.errors import SettingsError
from lmcache_core.registry import Registry

log = logging.getLogger(__name__)

PREFIX = "LMCACHE_"
CONFIG_FILE_VARIABLE = "LMCACHE_CONFIG_FILE"
GIB = 1024**3


def split_list(value: Any) -> Any:
    """Accept ``"cpu,disk"`` as well as a real list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class PluginSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(default_factory=list, description="Entry-point names to load; empty = all.")
    deny: list[str] = Field(default_factory=list, description="Entry-point names never to load.")
    strict: bool = Field(False, description="A plugin that fails to load stops start-up.")

    _split = field_validator("allow", "deny", mode="before")(split_list)


class Settings(BaseSettings):
    """Core settings. Backend sections (``cpu``, ``disk``, ...) are extra fields validated by the
    backend's own model; :meth:`backend` returns them."""

    model_config = SettingsConfigDict(extra="allow", validate_default=True)

    chunk_size: int = Field(256, gt=0, description="Tokens per chunk.")
    tiers: list[str] = Field(
        default_factory=lambda: ["cpu"], description="Storage tiers, fastest first, e.g. `cpu,disk`."
    )
    namespace: str = Field("default", min_length=1, description="Tenant name; part of every key.")
    hash_algorithm: Literal["blake3", "sha256", "xxh3_128"] = Field(
        "blake3", description="Chunk digest: blake3 (default), sha256, or the faster xxh3_128."
    )
    key_secret: SecretStr | None = Field(
        None, description="Optional secret that keys the chunk digests (tenants cannot guess keys)."
    )
    save_unfull_chunk: bool = Field(False, description="Also store the trailing partial chunk.")
    codec: str = Field("raw", description="Payload codec for serializing tiers: raw or fp8.")
    write_queue_size: int = Field(
        256, gt=0, description="Chunks queued per lower tier for background writes; overflow is dropped."
    )
    plugins: PluginSettings = Field(
        default_factory=PluginSettings, description="Which plugins load (allow, deny) and whether a failure is fatal."
    )

    _backends: dict[str, BackendSettings] = PrivateAttr(default_factory=dict)

    _split_tiers = field_validator("tiers", mode="before")(split_list)

    @field_validator("tiers")
    @classmethod
    def _tiers_unique(cls, tiers: list[str]) -> list[str]:
        if not tiers:
            raise ValueError("at least one tier is needed, e.g. cpu")
        if len(set(tiers)) != len(tiers):
            raise ValueError("a tier is listed twice")
        return tiers

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() gathers env + YAML itself, to keep track of where each value came from.
        return (init_settings,)

    def backend(self, name: str) -> BackendSettings:
        return self._backends[name]

    def effective(self) -> dict[str, Any]:
        """Everything in force, secrets redacted (for ``lmcache-core info`` and logs)."""
        data = self.model_dump(mode="json", exclude=set(self.model_extra or {}))
        for name, section in self._backends.items():
            data[name] = section.model_dump(mode="json")  # json mode: SecretStr -> "**********", URLs -> str
        return redact(data)


# --- legacy LMCache names ----------------------------------------------------------------------

LEGACY_VARIABLES = {
    "LMCACHE_LOCAL_CPU": "bool: cpu is a tier",
    "LMCACHE_MAX_LOCAL_CPU_SIZE": "GB: cpu.max_size",
    "LMCACHE_LOCAL_DISK": "path or file:// URL: disk.path, adds the disk tier",
    "LMCACHE_MAX_LOCAL_DISK_SIZE": "GB: disk.max_size (0 turns the disk tier off)",
    "LMCACHE_REMOTE_URL": "URL: adds the backend serving its scheme (redis://, s3://, ...)",
    "LMCACHE_REMOTE_SERDE": "codec of the remote tier (naive = raw)",
    "LMCACHE_SAVE_UNFULL_CHUNK": "bool: save_unfull_chunk",
}
_REMOTE_SERDES = {"naive": "raw", "raw": "raw", "fp8": "fp8"}


def _parse_bool(variable: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{variable}: expected true/false/1/0, got {value!r}")


def _parse_gb(variable: str, value: Any) -> int:
    try:
        gigabytes = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{variable}: expected a number of GB like 5.0, got {value!r}") from None
    if gigabytes < 0:
        raise SettingsError(f"{variable}: expected a non-negative number of GB, got {value!r}")
    return int(gigabytes * GIB)


class _Raw:
    """The merged raw settings and where each value came from (for error messages)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[tuple[str, ...], str] = {}

    def set(self, path: tuple[str, ...], value: Any, origin: str) -> None:
        node = self.data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
        self.origin[path] = origin

    def get(self, path: tuple[str, ...], default: Any = None) -> Any:
        node: Any = self.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def origin_of(self, loc: tuple[Any, ...]) -> str:
        path = tuple(str(part) for part in loc)
        while path:
            if path in self.origin:
                return self.origin[path]
            path = path[:-1]
        return PREFIX + "__".join(str(part).upper() for part in loc if not isinstance(part, int))


def _merge_yaml(raw: _Raw, path: Path) -> None:
    origin = f"{CONFIG_FILE_VARIABLE}={path}"
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise SettingsError(f"{CONFIG_FILE_VARIABLE}: cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"{CONFIG_FILE_VARIABLE}: {path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise SettingsError(f"{CONFIG_FILE_VARIABLE}: {path} must hold a mapping of settings")

    def walk(prefix: tuple[str, ...], node: dict) -> None:
        for key, value in node.items():
            path_ = (*prefix, str(key).lower())
            if isinstance(value, dict):
                walk(path_, value)
            else:
                raw.set(path_, value, f"{origin} (key {'.'.join(path_)})")

    walk((), content)


_LEGACY_FILE_KEYS = {name[len(PREFIX) :].lower() for name in LEGACY_VARIABLES}


def _apply_legacy(raw: _Raw, legacy: dict[str, tuple[Any, str]], registry: Registry) -> None:
    """Map LMCache variable names onto ours. ``legacy`` maps variable name -> (value, origin)."""

    def origin(name: str) -> str:
        return legacy[name][1]

    explicit_tiers = ("tiers",) in raw.origin
    tiers: list[str] = []
    if "LMCACHE_LOCAL_CPU" in legacy:
        if _parse_bool(origin("LMCACHE_LOCAL_CPU"), legacy["LMCACHE_LOCAL_CPU"][0]):
            tiers.append("cpu")
    else:
        tiers.append("cpu")
    if "LMCACHE_MAX_LOCAL_CPU_SIZE" in legacy:
        value, where = legacy["LMCACHE_MAX_LOCAL_CPU_SIZE"]
        raw.set(("cpu", "max_size"), _parse_gb(where, value), where)
    disk_size = None
    if "LMCACHE_MAX_LOCAL_DISK_SIZE" in legacy:
        value, where = legacy["LMCACHE_MAX_LOCAL_DISK_SIZE"]
        disk_size = _parse_gb(where, value)
        if disk_size:
            raw.set(("disk", "max_size"), disk_size, where)
    if "LMCACHE_LOCAL_DISK" in legacy:
        value, where = legacy["LMCACHE_LOCAL_DISK"]
        raw.set(("disk", "path"), str(value), where)  # DiskSettings accepts file:// URLs
        if disk_size == 0:
            log.warning("LMCACHE_MAX_LOCAL_DISK_SIZE is 0: the disk tier stays off, as in LMCache")
        else:
            tiers.append("disk")
    if "LMCACHE_REMOTE_URL" in legacy:
        value, where = legacy["LMCACHE_REMOTE_URL"]
        scheme = urlsplit(str(value)).scheme
        spec = registry.backend_for_scheme(scheme)
        if spec is None:
            schemes = sorted({s for b in registry.backends.values() for s in b.url_schemes})
            raise SettingsError(
                f"{where}: no backend serves URL scheme {scheme!r}; known schemes: {', '.join(schemes) or 'none'}"
                " (install an extra such as lmcache-core[redis] or lmcache-core[s3])"
            )
        raw.set((spec.name, "url"), str(value), where)
        tiers.append(spec.name)
        if "LMCACHE_REMOTE_SERDE" in legacy:
            serde, serde_where = legacy["LMCACHE_REMOTE_SERDE"]
            if str(serde) not in _REMOTE_SERDES:
                raise SettingsError(
                    f"{serde_where}: unsupported serde {serde!r}; allowed: {', '.join(_REMOTE_SERDES)}"
                )
            raw.set((spec.name, "codec"), _REMOTE_SERDES[str(serde)], serde_where)
    if "LMCACHE_SAVE_UNFULL_CHUNK" in legacy:
        value, where = legacy["LMCACHE_SAVE_UNFULL_CHUNK"]
        raw.set(("save_unfull_chunk",), _parse_bool(where, value), where)
    touches_tiers = {"LMCACHE_LOCAL_CPU", "LMCACHE_LOCAL_DISK", "LMCACHE_REMOTE_URL"} & legacy.keys()
    if touches_tiers and not explicit_tiers:
        if not tiers:
            raise SettingsError("LMCACHE_LOCAL_CPU=false leaves no tier: set LMCACHE_LOCAL_DISK or LMCACHE_TIERS")
        raw.set(("tiers",), tiers, " + ".join(sorted(origin(name) for name in touches_tiers)))


def known_variables(registry: Registry) -> set[str]:
    names = {CONFIG_FILE_VARIABLE, *LEGACY_VARIABLES}
    for field_name, info in Settings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.update(f"{PREFIX}{field_name.upper()}__{sub.upper()}" for sub in annotation.model_fields)
        else:
            names.add(f"{PREFIX}{field_name.upper()}")
    for backend in registry.backends:
        try:
            model = registry.settings_model(backend)
        except Exception:  # an unusable settings model is reported when the tier is built
            model = BackendSettings
        names.update(f"{PREFIX}{backend.upper()}__{field.upper()}" for field in model.model_fields)
    return names


def _error_lines(error: ValidationError, raw: _Raw, prefix: tuple[str, ...] = ()) -> list[str]:
    lines = []
    for item in error.errors():
        loc = (*prefix, *item["loc"])
        where = raw.origin_of(loc)
        message = item["msg"]
        if item["type"] == "byte_size":
            message = "expected a size like 4GiB or 512MB"
        elif item["type"] == "extra_forbidden":
            message = "unknown setting"
        value = item.get("input")
        shown = "" if isinstance(value, dict) or item["type"] == "missing" else f", got {redact(value)!r}"
        lines.append(f"{where}: {message}{shown}")
    return lines


def load_settings(
    registry: Registry,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Validate settings from the environment, the YAML file and ``overrides`` (highest precedence).

    Raises :class:`SettingsError` whose message names each offending variable.
    """
    env = dict(os.environ if environ is None else environ)
    raw = _Raw()
    config_file = env.get(CONFIG_FILE_VARIABLE)
    if config_file:
        _merge_yaml(raw, Path(config_file).expanduser())

    known = known_variables(registry)
    legacy: dict[str, tuple[Any, str]] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(PREFIX) or name == CONFIG_FILE_VARIABLE:
            continue
        if name in LEGACY_VARIABLES:
            legacy[name] = (value, name)
            continue
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            log.warning("%s is not an lmcache-core setting and is ignored%s", name, hint)
            continue
        path = tuple(part.lower() for part in name[len(PREFIX) :].split("__"))
        raw.set(path, value, name)
    for key in _LEGACY_FILE_KEYS & raw.data.keys():  # LMCache YAML files use these names in lower case
        legacy.setdefault(PREFIX + key.upper(), (raw.data.pop(key), raw.origin.pop((key,))))
    _apply_legacy(raw, legacy, registry)
    for key, value in overrides.items():
        raw.set((key,), value, key)
    known_sections = [*Settings.model_fields, *registry.backends]
    for key in raw.data:
        if key not in known_sections:
            where = next(origin for path, origin in raw.origin.items() if path[0] == key)
            close = difflib.get_close_matches(key, known_sections, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            log.warning("%s: %r is not an lmcache-core setting and is ignored%s", where, key, hint)

    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings(**raw.data)
        tiers = settings.tiers
    except ValidationError as error:
        problems.extend(_error_lines(error, raw))
        tiers = split_list(raw.get(("tiers",), ["cpu"]))  # still report the tiers' own problems
    backends: dict[str, BackendSettings] = {}
    for tier in tiers if isinstance(tiers, list) else []:
        if tier not in registry.backends:
            problems.append(
                f"{raw.origin_of(('tiers',))}: unknown tier {tier!r}; "
                f"allowed: {', '.join(sorted(registry.backends)) or 'none (no plugin loaded)'}"
            )
            continue
        section = raw.get((tier,)) or {}
        try:
            backends[tier] = registry.settings_model(tier).model_validate(section)
        except ValidationError as error:
            problems.extend(_error_lines(error, raw, (tier,)))
    from lmcache_core.codecs import available_codecs

    codecs = available_codecs()
    if settings is not None and settings.codec not in codecs:
        problems.append(f"{raw.origin_of(('codec',))}: unknown codec {settings.codec!r}; allowed: {', '.join(codecs)}")
    for tier, section in backends.items():
        if section.codec is not None and section.codec not in codecs:
            problems.append(
                f"{raw.origin_of((tier, 'codec'))}: unknown codec {section.codec!r}; allowed: {', '.join(codecs)}"
            )
    if problems or settings is None:
        raise SettingsError("invalid lmcache-core settings:\n  " + "\n  ".join(problems))
    settings._backends = backends
    return settings


# Names of URL query parameters and mapping entries that hold credentials: ``password=``,
# ``aws_secret_access_key=``, ``X-Amz-Signature=``, ``api_key=``, ``session_token=``, a SAS ``sig=``...
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|credential|signature|auth|^sig$", re.IGNORECASE)
REDACTED = "**********"


def is_secret_name(name: str) -> bool:
    """Whether a query parameter or mapping entry called ``name`` is taken to hold a secret."""
    return bool(_SECRET_NAME.search(name))


def redact(value: Any) -> Any:
    """Hide secrets: SecretStr values, credentials inside URLs, and text under secret-like names in
    mappings (``storage_options``, say). What ``lmcache-core info`` and every log line show."""
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isinstance(item, str) and is_secret_name(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def redact_url(url: str) -> str:
    """``url`` with the password of its user info and the values of secret-named query (and
    fragment) parameters replaced by ``***``. Parsed by hand, never with ``urlsplit``: a URL that
    is invalid (a bad port, an unclosed ``[``) must still be shown, redacted, in the error about it."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    rest, hash_sign, fragment = rest.partition("#")
    rest, question_mark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    return (f"{scheme}://{authority}{slash}{path}{question_mark}{_redact_parameters(query)}"
            f"{hash_sign}{_redact_parameters(fragment)}")


def _redact_parameters(text: str) -> str:
    parts = re.split(r"([&;])", text)
    for index, part in enumerate(parts):
        name, equals, _ = part.partition("=")
        if equals and is_secret_name(unquote_plus(name)):
            parts[index] = f"{name}=***"
    return "".join(parts)
