"""Settings: ``LMCACHE_*`` environment variables, an optional YAML file, and defaults.

Precedence: environment > ``LMCACHE_CONFIG_FILE`` (YAML) > defaults. Nested fields use ``__``
(``LMCACHE_CPU__MAX_SIZE=4GiB``). Each backend plugin owns a settings section named after it,
validated by the model it registered. The LMCache variable names people already set in vLLM
containers are accepted too and mapped onto ours: the core's in ``LEGACY_VARIABLES``, each
backend's declared at its registration (``legacy_variables``); a mapped value keeps the rank of
where it was set, so the environment wins over the file whichever names each uses. The
``plugins`` section is read first on its own (:func:`load_plugin_settings`), to choose the
plugins whose backends own the other sections.

Every validation error names the variable (or YAML key) the operator actually wrote, the value,
and what is allowed. Unknown ``LMCACHE_*`` variables produce a warning naming the closest known one.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path, PurePath
from types import UnionType
from typing import Any, Literal, NamedTuple, NoReturn, Union, get_args, get_origin
from urllib.parse import unquote_plus

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from lmcache_core.backend import BackendSettings
from lmcache_core.errors import SettingsError
from lmcache_core.registry import MEDIA, LegacyVariable, Registry

log = logging.getLogger(__name__)

PREFIX = "LMCACHE_"
CONFIG_FILE_VARIABLE = "LMCACHE_CONFIG_FILE"
# LMCACHE_* variables that are not settings: the file the settings come from, and the copy kernels'
# switch, which lmcache_kernels reads itself (lmcache_kernels.dispatch.KERNELS_VARIABLE; named here,
# not imported, so that loading settings never imports Triton).
NOT_SETTINGS = frozenset({CONFIG_FILE_VARIABLE, "LMCACHE_KERNELS"})
GIB = 1024**3


def split_list(value: Any) -> Any:
    """Accept ``"cpu,disk"`` as well as a real list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class PluginSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    allow: list[str] = Field(default_factory=list, description="Entry-point names to load; empty = all.")
    deny: list[str] = Field(default_factory=list, description="Entry-point names never to load.")
    strict: bool = Field(False, description="A plugin that fails to load stops start-up.")

    _split = field_validator("allow", "deny", mode="before")(split_list)


class Settings(BaseSettings):
    """Core settings. Backend sections (``cpu``, ``disk``, ...) are extra fields validated by the
    backend's own model; :meth:`backend` returns them."""

    model_config = SettingsConfigDict(extra="allow", validate_default=True, allow_inf_nan=False)

    chunk_size: int = Field(256, gt=0, description="Tokens per chunk.")
    tiers: list[str] = Field(
        default_factory=lambda: ["cpu"], description="Storage tiers, fastest first, e.g. `cpu,disk`."
    )
    namespace: str = Field(
        "default", min_length=1,
        description="Tenant name; part of every key. `lmcache-core ls` and `clear` touch only this namespace's chunks.",
    )
    hash_algorithm: Literal["blake3", "sha256", "xxh3_128"] = Field(
        "blake3", description="Chunk digest: blake3 (default), sha256, or the faster xxh3_128."
    )
    key_secret: SecretStr | None = Field(
        None, description="Optional secret that keys the chunk digests (tenants cannot guess keys)."
    )
    save_unfull_chunk: bool = Field(False, description="Also store the trailing partial chunk.")
    model_revision: str | None = Field(
        None,
        description="Identity of the model's weights (a release tag, a commit), used in every key instead of "
        "the fingerprint of the weight files. Instances that share a cache must set the same value; change it "
        "whenever the weights change.",
    )
    codec: str = Field("raw", description="Payload codec for serializing tiers: raw or fp8.")
    write_queue_size: int = Field(
        256, gt=0, description="Batches queued per lower tier for background writes; overflow is dropped."
    )
    write_queue_max_bytes: ByteSize = Field(
        ByteSize(1024**3),
        gt=0,
        description="KV bytes that background writes to all lower tiers may hold at once, copies included, on top "
        "of the cpu tier's max_size; writes beyond it are dropped and counted (dropped_writes).",
    )
    writes_between_steps: bool = Field(
        True,
        description="vLLM: background writes to lower tiers wait for gaps between forward passes (at most 5 s, or "
        "until the queues hold half of write_queue_max_bytes), so they do not slow the forward pass on machines "
        "with few cores; false writes at once.",
    )
    skip_slow_loads: bool = Field(
        True,
        description="vLLM: load a stored prefix only as far as loading it is faster than recomputing it, by the "
        "tiers' read speeds and the prefill speed measured while serving (a slow disk or remote tier can lose to "
        "the GPU); false always loads. Declined tokens show as declined_load_tokens in the stats.",
    )
    lookup_wait_ms: int = Field(
        20, ge=0, le=1000,
        description="vLLM: how long the scheduler waits for the workers' lookup answer per call; a later answer "
        "skips the request for a step and is picked up next step.",
    )
    lookup_deadline_ms: int = Field(
        2000, gt=0, le=60000,
        description="vLLM: a lookup answer later than this counts as a miss (recompute), so a slow tier never holds "
        "a request back longer.",
    )
    # LMCache's names, with LMCache's meaning; those for features this release does not have yet are accepted
    # (one name, one setting: the variables are LMCACHE_SAVE_DECODE_CACHE, LMCACHE_BLEND_MIN_TOKENS...)
    # so that a container configured for LMCache starts; switching one on logs that it has no effect yet.
    save_decode_cache: bool = Field(
        True, description="vLLM: also store the KV of generated tokens, so the next turn of a chat, which sends the "
        "answer back in its prompt, hits through the end of that answer (up to its last full chunk). LMCache's "
        "variable of the same name; on by default here.",
    )
    use_layerwise: bool = Field(
        False, description="vLLM: load and save layer by layer, pipelined with the forward pass, as LMCache's "
        "variable of the same name: on a GPU each layer's copies run on a side CUDA stream and a layer waits only "
        "for its own KV; on CPU each layer is copied when vLLM reaches it. Asynchronous loads stay whole-request. "
        "Under CUDA graphs vLLM then uses piecewise graphs.",
    )
    enable_async_loading: bool = Field(
        True, description="vLLM: a request whose hit is partly in a lower tier (disk, remote) waits for its KV "
        "while the other requests keep running, instead of the whole batch waiting for the read. LMCache's "
        "variable of the same name; on by default here.",
    )
    admit_after: int = Field(
        1, ge=1,
        description="vLLM: store a prompt's leading chunks only once the same prefix has arrived this many "
        "times (counted in the scheduler, last 100,000 prefixes); 1 stores everything. A request's "
        "kv_transfer_params {\"lmcache_store\": true|false} overrides it. With admission on, generated "
        "tokens are not stored.",
    )
    enable_blending: bool = Field(
        False, description="Reuse KV at any position (CacheBlend), as LMCache's variable of the same name. Accepted; "
        "takes effect in a later release.",
    )
    blend_special_str: str = Field(
        " # # ", min_length=1,
        description="Blending: separator between reusable segments, matched on token ids. Accepted; takes effect "
        "with enable_blending in a later release.",
    )
    blend_recompute_ratios: list[float] = Field(
        default_factory=lambda: [0.15],
        description="Blending: share of tokens recomputed, each between 0 and 1. Accepted; takes effect with "
        "enable_blending in a later release.",
    )
    blend_check_layers: list[int] = Field(
        default_factory=lambda: [1],
        description="Blending: layer(s) where token deviation is measured. Accepted; takes effect with "
        "enable_blending in a later release.",
    )
    blend_min_tokens: int = Field(
        256, gt=0,
        description="Blending: shortest segment worth reusing, in tokens. Accepted; takes effect with "
        "enable_blending in a later release.",
    )
    lookup_timeout_s: float | None = Field(
        None,
        description="vLLM, deprecated: the lookup deadline in seconds, in (0, 60]; use lookup_deadline_ms. Kept "
        "because it was a `kv_connector_extra_config` entry of the connector; it wins over lookup_deadline_ms.",
    )
    model_name: str | None = Field(
        None,
        description="vLLM: the model name in every key, instead of vLLM's model (a local folder counts by its "
        "last path component). Instances that share a cache must use the same name. Also read from "
        "`kv_connector_extra_config` as `model_name`.",
    )
    allow_untested_vllm: bool = Field(
        False,
        description="vLLM: cache even with a vLLM version outside the range this release was tested with (the "
        "connector relies on vLLM internals; see docs/vllm.md, \"Testing a new vLLM release\").",
    )
    plugins: PluginSettings = Field(
        default_factory=PluginSettings, description="Which plugins load (allow, deny) and whether a failure is fatal."
    )

    _backends: dict[str, BackendSettings] = PrivateAttr(default_factory=dict)

    _split_tiers = field_validator("tiers", "blend_recompute_ratios", "blend_check_layers", mode="before")(split_list)

    @field_validator("blend_recompute_ratios")
    @classmethod
    def _ratios_are_shares(cls, ratios: list[float]) -> list[float]:
        if any(not 0 <= ratio <= 1 for ratio in ratios):
            raise ValueError("expected shares between 0 and 1, e.g. 0.15")
        return ratios

    @field_validator("blend_check_layers")
    @classmethod
    def _layers_are_indices(cls, layers: list[int]) -> list[int]:
        if any(layer < 0 for layer in layers):
            raise ValueError("expected layer indices (0 or more), e.g. 1")
        return layers

    @field_validator("model_revision")
    @classmethod
    def _revision_is_one_word(cls, revision: str | None) -> str | None:
        if not revision:  # an empty variable means unset
            return None
        if any(character.isspace() for character in revision):  # "v2" and "v2\n" would never share KV
            raise ValueError("expected a tag or commit without spaces, e.g. v2 or 3f2a9c1")
        return revision

    @field_validator("lookup_timeout_s", mode="before")
    @classmethod
    def _timeout_in_range(cls, value: Any) -> float | None:
        if value is None or value == "":
            return None
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not 0 < seconds <= 60:
            raise PydanticCustomError(
                "lookup_timeout", "expected seconds in (0, 60], a number (deprecated: use lookup_deadline_ms or "
                "LMCACHE_LOOKUP_DEADLINE_MS)",
            )
        return seconds

    @field_validator("model_name")
    @classmethod
    def _model_name_is_set(cls, name: str | None) -> str | None:
        if name is None or not name.strip():  # an empty variable means unset
            return None
        if name != name.strip() or "\n" in name:  # "m" and "m\n" would never share KV
            raise ValueError("expected a name without leading/trailing spaces or line breaks")
        return name

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


# Settings above that are accepted with LMCache's meaning but do nothing yet.
NOT_YET_IMPLEMENTED = ("enable_blending",)


# --- legacy LMCache names ----------------------------------------------------------------------

# The LMCache names that are about no particular backend. Names whose LMCache meaning is a core
# field of the same name (LMCACHE_SAVE_DECODE_CACHE, LMCACHE_BLEND_*, ...) need no mapping: they
# are fields of Settings. Each backend declares its own LMCache names at registration
# (``Registry.legacy_variables``), e.g. LMCACHE_LOCAL_CPU or LMCACHE_MAX_LOCAL_DISK_SIZE.
LEGACY_VARIABLES = {
    "LMCACHE_REMOTE_URL": "URL: adds the tier whose backend declares its scheme (see each backend above)",
    "LMCACHE_REMOTE_SERDE": "codec of the remote tier (naive = raw)",
    "LMCACHE_SAVE_UNFULL_CHUNK": "bool: save_unfull_chunk",
}
_REMOTE_SERDES = {"naive": "raw", "raw": "raw", "fp8": "fp8"}


def legacy_variables(registry: Registry) -> dict[str, str]:
    """Every LMCache name accepted, the core's and the backends', with what it maps onto."""
    names = dict(LEGACY_VARIABLES)
    for name, (spec, variable) in registry.legacy_variables().items():
        names[name] = variable.help or f"{variable.kind}: {spec.name}.{variable.setting or '(tier)'}"
    return names


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
    allowed = "expected a finite, non-negative number of GB like 5.0"
    if isinstance(value, bool):
        raise SettingsError(f"{variable}: {allowed}, got {value!r}")
    try:
        gigabytes = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{variable}: {allowed}, got {value!r}") from None
    if not math.isfinite(gigabytes) or gigabytes < 0:  # float() reads "inf", "nan" and "1e400" (= inf)
        raise SettingsError(f"{variable}: {allowed}, got {value!r}")
    return int(gigabytes * GIB)


def _parse_text(variable: str, value: Any, allowed: str) -> str:
    text = "" if value is None else str(value)
    if not text.strip():
        raise SettingsError(f"{variable}: expected {allowed}, got {text!r}")
    return text


# Where a value came from decides which one wins: a value replaces another only if its rank is at
# least as high. The environment beats the file whichever names each uses; in one place, the
# new-style name (which says exactly what it sets) beats the LMCache name mapped onto it.
FILE_LEGACY, FILE, ENV_LEGACY, ENV, OVERRIDE = range(5)


class _Raw:
    """The merged raw settings, where each value came from (for error messages) and its rank."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[tuple[str, ...], str] = {}
        self.rank: dict[tuple[str, ...], int] = {}

    def set(self, path: tuple[str, ...], value: Any, origin: str, rank: int) -> None:
        if not self.takes(path, rank):
            return
        node = self.data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
        self.origin[path] = origin
        self.rank[path] = rank

    def takes(self, path: tuple[str, ...], rank: int) -> bool:
        """Whether a value of ``rank`` at ``path`` would take effect."""
        return self.rank.get(path, -1) <= rank

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


class _Legacy(NamedTuple):
    value: Any
    origin: str  # the variable, or the file and key
    rank: int  # ENV_LEGACY or FILE_LEGACY


def _merge_yaml(raw: _Raw, legacy: dict[str, _Legacy], path: Path, legacy_names: Collection[str] = ()) -> None:
    """Add the file's settings to ``raw``, and its LMCache names (top level) to ``legacy``."""
    legacy_keys = {name[len(PREFIX) :].lower() for name in legacy_names}
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
            where = f"{origin} (key {'.'.join(path_)})"
            if not prefix and path_[0] in legacy_keys:  # LMCache YAML files use these names
                legacy[PREFIX + path_[0].upper()] = _Legacy(value, where, FILE_LEGACY)
            elif isinstance(value, dict):
                walk(path_, value)
            else:
                raw.set(path_, value, where, FILE)

    walk((), content)


def _legacy_parser(variable: LegacyVariable) -> Callable[[str, Any], Any]:
    if variable.kind == "bool":
        return _parse_bool
    if variable.kind == "gb":
        return _parse_gb
    return lambda name, value: _parse_text(name, value, f"a non-empty value ({variable.help or variable.setting})")


def _apply_legacy(raw: _Raw, legacy: dict[str, _Legacy], registry: Registry) -> list[str]:
    """Map LMCache's names onto ours, each at its rank. Every value is validated, whether or not
    it takes effect (a typo in a variable that does nothing today bites on the next change).
    What a backend's names mean is declared by its registration (:class:`LegacyVariable`); the
    tiers they switch on are ordered by medium (host, disk, remote), as in LMCache.
    Returns the problems found."""
    problems: list[str] = []

    def parsed(name: str, parse: Callable[[str, Any], Any]) -> Any:
        """The parsed value of variable ``name`` (``None`` if unset or invalid: then a problem)."""
        if name not in legacy:
            return None
        try:
            return parse(legacy[name].origin, legacy[name].value)
        except SettingsError as error:
            problems.append(str(error))
            return None

    def put(path: tuple[str, ...], value: Any, name: str) -> None:
        raw.set(path, value, legacy[name].origin, legacy[name].rank)

    remote_url = parsed("LMCACHE_REMOTE_URL", lambda v, x: _parse_text(v, x, "a URL like redis://host:6379"))
    serde = parsed("LMCACHE_REMOTE_SERDE", _parse_serde)
    save_unfull = parsed("LMCACHE_SAVE_UNFULL_CHUNK", _parse_bool)

    tiers: list[str] = []
    switches = {"LMCACHE_REMOTE_URL"}  # the names that make LMCache's variables choose the tiers
    specs = [spec for name, spec in registry.backends.items() if name == spec.name]
    for spec in sorted(specs, key=lambda spec: MEDIA.index(spec.medium)):
        wanted, switched_off, zeroed_by = False, False, None
        for variable in spec.legacy:
            value = parsed(variable.name, _legacy_parser(variable))
            if variable.tier in ("switch", "adds"):
                switches.add(variable.name)
            if variable.tier == "switch":
                state = variable.default if value is None else value
                wanted, switched_off = wanted or bool(state), switched_off or state is False
            elif variable.tier == "adds" and value is not None:
                wanted = True
            if variable.tier == "zero_disables" and value == 0:
                zeroed_by = variable.name
            elif value is not None and variable.setting is not None:
                put((spec.name, variable.setting), value, variable.name)
        if wanted and not switched_off:
            if zeroed_by is None:
                tiers.append(spec.name)
            else:
                log.warning("%s is 0: the %s tier stays off, as in LMCache", legacy[zeroed_by].origin, spec.name)

    if remote_url is not None:
        where = legacy["LMCACHE_REMOTE_URL"].origin
        scheme = remote_url.partition("://")[0] if "://" in remote_url else ""
        tier = registry.tier_for_scheme(scheme)
        if tier is None:
            schemes = sorted({s for b in registry.backends.values() for s in b.url_schemes})
            problems.append(
                f"{where}: no backend serves URL scheme {scheme!r}; known schemes: {', '.join(schemes) or 'none'}"
                " (install an extra such as lmcache-core[redis] or lmcache-core[s3])"
            )
        elif tier in tiers:
            problems.append(f"{where}: selects the {tier} tier, which another LMCache variable already sets up")
        else:
            put((tier, registry.backend(tier).url_setting), remote_url, "LMCACHE_REMOTE_URL")
            tiers.append(tier)
            if serde is not None:
                put((tier, "codec"), serde, "LMCACHE_REMOTE_SERDE")
    elif serde is not None:
        log.warning("%s has no effect without LMCACHE_REMOTE_URL", legacy["LMCACHE_REMOTE_SERDE"].origin)
    if save_unfull is not None:
        put(("save_unfull_chunk",), save_unfull, "LMCACHE_SAVE_UNFULL_CHUNK")

    touches_tiers = sorted(switches & legacy.keys())
    if touches_tiers and not problems:
        rank = max(legacy[name].rank for name in touches_tiers)
        if raw.takes(("tiers",), rank):  # not overridden by LMCACHE_TIERS at a higher rank
            if not tiers:
                settings_ = ", ".join(f"{name}={legacy[name].value}" for name in touches_tiers)
                problems.append(f"{settings_} leaves no tier: set LMCACHE_TIERS or an LMCache variable that adds one")
            else:
                raw.set(("tiers",), tiers, " + ".join(legacy[name].origin for name in touches_tiers), rank)
    return problems


def _parse_serde(variable: str, value: Any) -> str:
    if str(value) not in _REMOTE_SERDES:
        raise SettingsError(f"{variable}: unsupported serde {value!r}; allowed: {', '.join(_REMOTE_SERDES)}")
    return _REMOTE_SERDES[str(value)]


def known_variables(registry: Registry) -> set[str]:
    names = {*NOT_SETTINGS, *legacy_variables(registry)}
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


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        arguments = [argument for argument in get_args(annotation) if argument is not type(None)]
        if len(arguments) == 1:
            return arguments[0]
    return annotation


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> FieldInfo | None:
    """The field a validation error's location points at (through nested sections)."""
    field = model.model_fields.get(str(loc[0])) if loc else None
    nested = _without_none(field.annotation) if field else None
    if len(loc) > 1 and isinstance(nested, type) and issubclass(nested, BaseModel):
        return _field_at(nested, loc[1:])
    return field


def allowed_values(field: FieldInfo) -> str:
    """What a field accepts, in an operator's words (for error messages)."""
    annotation = _without_none(field.annotation)
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, get_args(annotation)))
    bounds = "".join(
        f" {symbol} {getattr(item, name)}"
        for item in field.metadata
        for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(item, name, None) is not None
    )
    if annotation is bool:
        return "true or false (also 1/0, yes/no, on/off)"
    if isinstance(annotation, type) and issubclass(annotation, ByteSize):
        return "a size like 4GiB or 512MB"
    if annotation is int:
        return f"an integer{bounds}"
    if annotation is float:
        return f"a finite number{bounds}"
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "a path"
    if annotation is dict or get_origin(annotation) is dict:
        return 'a JSON object like {"name": "value"}'
    if annotation is list or get_origin(annotation) is list:
        return "a comma-separated list"
    return "a non-empty value"


def _drop_blank(
    model: type[BaseModel], section: dict[str, Any], loc: tuple[str, ...], raw: _Raw, problems: list[str]
) -> dict[str, Any]:
    """``section`` without blank text values. An empty variable means "unset" for a setting that
    may be unset (default ``None``) and "empty" for lists and mappings; for anything else it is a
    mistake, reported (``LMCACHE_DISK__PATH=`` would otherwise mean the working directory)."""
    kept = dict(section)
    for name, value in section.items():
        field = model.model_fields.get(name)
        if field is None:
            continue
        annotation = _without_none(field.annotation)
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            kept[name] = _drop_blank(annotation, value, (*loc, name), raw, problems)
        elif not isinstance(value, str) or value.strip():
            continue
        elif field.default is None and field.default_factory is None:
            del kept[name]
        elif not (annotation in (list, dict) or get_origin(annotation) in (list, dict)):
            problems.append(f"{raw.origin_of((*loc, name))}: expected {allowed_values(field)}, got {value!r}"
                            " (unset it for the default)")
            del kept[name]
    return kept


_VAGUE_ERRORS = {"bool_parsing", "bool_type", "value_error", "dict_type", "json_invalid", "json_type"}


def _error_lines(
    error: ValidationError, raw: _Raw, model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> list[str]:
    lines = []
    for item in error.errors():
        loc = (*prefix, *item["loc"])
        where = raw.origin_of(loc)
        message = item["msg"]
        if item["type"] in ("byte_size", "byte_size_unit"):
            message = "expected a size like 4GiB or 512MB"
        elif item["type"] == "extra_forbidden":
            message = "unknown setting"
        elif item["type"] in _VAGUE_ERRORS and (field := _field_at(model, item["loc"])) is not None:
            message = f"{message}; expected {allowed_values(field)}"
        value = item.get("input")
        shown = "" if isinstance(value, dict) or item["type"] == "missing" else f", got {redact(value)!r}"
        lines.append(f"{where}: {message}{shown}")
    return lines


def _read_sources(env: Mapping[str, str], accepts: Callable[[str], bool]) -> tuple[_Raw, dict[str, _Legacy]]:
    """The YAML file's settings and those of the ``LMCACHE_*`` variables that ``accepts``, merged."""
    raw = _Raw()
    legacy: dict[str, _Legacy] = {}
    config_file = env.get(CONFIG_FILE_VARIABLE)
    if config_file:
        _merge_yaml(raw, legacy, Path(config_file).expanduser())
    for name, value in sorted(env.items()):
        if name.startswith(PREFIX) and name not in NOT_SETTINGS and accepts(name):
            raw.set(tuple(part.lower() for part in name[len(PREFIX) :].split("__")), value, name, ENV)
    return raw, legacy


def _raise_problems(problems: list[str]) -> NoReturn:
    if len(problems) == 1:  # one line: what the CLI prints and a log shows
        raise SettingsError(f"invalid lmcache-core settings: {problems[0]}")
    raise SettingsError("invalid lmcache-core settings:\n  " + "\n  ".join(problems))


def load_plugin_settings(environ: Mapping[str, str] | None = None) -> PluginSettings:
    """The ``plugins`` section alone, from the same sources and by the same rules as
    :func:`load_settings` (which validates it again, with everything else).

    Plugins must load before the rest can be validated (backends own settings sections), so this
    part is read first; the loader obeys exactly what validation accepted.
    """
    env = dict(os.environ if environ is None else environ)
    raw, _ = _read_sources(env, lambda name: name.startswith(f"{PREFIX}PLUGINS__"))
    section = raw.get(("plugins",))
    problems: list[str] = []
    if section is not None and not isinstance(section, dict):
        problems.append(f"{raw.origin_of(('plugins',))}: expected a mapping with allow, deny, strict")
        section = {}
    plugin_settings = None
    try:
        plugin_settings = PluginSettings.model_validate(
            _drop_blank(PluginSettings, section or {}, ("plugins",), raw, problems)
        )
    except ValidationError as error:
        problems.extend(_error_lines(error, raw, PluginSettings, ("plugins",)))
    if problems or plugin_settings is None:
        _raise_problems(problems)
    return plugin_settings


def load_settings(
    registry: Registry,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Validate settings from the environment, the YAML file and ``overrides`` (highest precedence).

    Raises :class:`SettingsError` whose message names each offending variable and what it allows.
    """
    env = dict(os.environ if environ is None else environ)
    raw = _Raw()
    legacy: dict[str, _Legacy] = {}
    legacy_names = legacy_variables(registry)
    config_file = env.get(CONFIG_FILE_VARIABLE)
    if config_file:
        _merge_yaml(raw, legacy, Path(config_file).expanduser(), legacy_names)

    known = known_variables(registry)
    for name, value in sorted(env.items()):
        if not name.startswith(PREFIX) or name in NOT_SETTINGS:
            continue
        if name in legacy_names:
            legacy[name] = _Legacy(value, name, ENV_LEGACY)  # replaces the file's value of the name
            continue
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            log.warning("%s is not an lmcache-core setting and is ignored%s", name, hint)
            continue
        path = tuple(part.lower() for part in name[len(PREFIX) :].split("__"))
        raw.set(path, value, name, ENV)
    problems = _apply_legacy(raw, legacy, registry)
    for key, value in overrides.items():
        raw.set((key,), value, key, OVERRIDE)
    known_sections = [*Settings.model_fields, *registry.backends]
    for key in raw.data:
        if key not in known_sections:
            where = next(origin for path, origin in raw.origin.items() if path[0] == key)
            close = difflib.get_close_matches(key, known_sections, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            log.warning("%s: %r is not an lmcache-core setting and is ignored%s", where, key, hint)

    settings: Settings | None = None
    try:
        settings = Settings(**_drop_blank(Settings, raw.data, (), raw, problems))
        tiers = settings.tiers
    except ValidationError as error:
        problems.extend(_error_lines(error, raw, Settings))
        tiers = split_list(raw.get(("tiers",), ["cpu"]))  # still report the tiers' own problems
    tiers = tiers if isinstance(tiers, list) else []
    for tier in tiers:
        if tier not in registry.backends:
            problems.append(
                f"{raw.origin_of(('tiers',))}: unknown tier {tier!r}; "
                f"allowed: {', '.join(sorted(registry.backends)) or 'none (no plugin loaded)'}"
            )
    # Every backend section present is validated, in use or not: a typo must not wait for the day
    # the tier is switched on. A tier not in use whose plugin cannot load is skipped here.
    backends: dict[str, BackendSettings] = {}
    for name in registry.backends:
        section = raw.get((name,))
        if name not in tiers and section is None:
            continue
        try:
            model = registry.settings_model(name)
        except Exception as error:
            if name in tiers:
                problems.append(f"{raw.origin_of(('tiers',))}: tier {name!r} cannot load its settings: {error}")
            continue
        section = section if isinstance(section, dict) else {}
        try:
            backends[name] = model.model_validate(_drop_blank(model, section, (name,), raw, problems))
        except ValidationError as error:
            problems.extend(_error_lines(error, raw, model, (name,)))
    codecs = sorted(registry.codecs)
    if settings is not None and settings.codec not in codecs:
        problems.append(f"{raw.origin_of(('codec',))}: unknown codec {settings.codec!r}; allowed: {', '.join(codecs)}")
    for name, section in backends.items():
        if section.codec is not None and section.codec not in codecs:
            problems.append(
                f"{raw.origin_of((name, 'codec'))}: unknown codec {section.codec!r}; allowed: {', '.join(codecs)}"
            )
    if problems or settings is None:
        _raise_problems(problems)
    for name in NOT_YET_IMPLEMENTED:
        if getattr(settings, name):
            log.warning("%s=true is accepted but has no effect in this release", raw.origin_of((name,)))
    settings._backends = {name: section for name, section in backends.items() if name in tiers}
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
