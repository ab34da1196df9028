"""Fault matrix, input rows: every settings field with invalid values.

The cases are generated from the models themselves (core ``Settings``, its nested sections, and the
settings model of every backend the registry knows), so a field added tomorrow is covered without
touching this file. Each invalid value must end in a :class:`SettingsError` that names the variable
the operator typed and what it allows (never a bare traceback), whether or not the setting takes
effect, and ``lmcache-core`` must exit with status 2 and one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, ByteSize
from pydantic.fields import FieldInfo

from lmcache_core.cli import main
from lmcache_core.errors import SettingsError
from lmcache_core.plugins import load_registry
from lmcache_core.registry import Registry
from lmcache_core.settings import LEGACY_VARIABLES, PREFIX, Settings, load_settings

pytestmark = pytest.mark.faults

REGISTRY = load_registry({})


class Case(NamedTuple):
    variable: str
    value: str
    tier: str | None  # the backend whose section it is (None: core)
    allowed: tuple[str, ...]  # the message must mention one of these (all, for choices)
    all_allowed: bool = False


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        arguments = [a for a in get_args(annotation) if a is not type(None)]
        return arguments[0] if len(arguments) == 1 else annotation
    return annotation


def _lower_bound(field: FieldInfo) -> str | None:
    """A value just below the field's declared lower bound, if it has one."""
    for item in field.metadata:
        if getattr(item, "gt", None) is not None:
            return str(item.gt)
        if getattr(item, "ge", None) is not None:
            return str(item.ge - 1)
    return None


def invalid_values(field: FieldInfo) -> tuple[list[str], tuple[str, ...], bool]:
    """Invalid text values for ``field``, the words of which one must appear in the error (all of
    them for a choice), and whether all must."""
    annotation = _without_none(field.annotation)
    blank = [] if field.default is None and field.default_factory is None else ["", " "]  # "" = unset
    below = _lower_bound(field)
    bounded = [below] if below is not None else []
    if get_origin(annotation) is Literal:
        return ["nosuch", *blank], tuple(map(str, get_args(annotation))), True
    if annotation is bool:
        return ["maybe", "2", *blank], ("true",), False
    if isinstance(annotation, type) and issubclass(annotation, ByteSize):
        return ["lots", *blank, "inf", "nan", "1e400", "-1", "-1GiB", "4 parsecs"], ("4GiB",), False
    if annotation is int:
        return ["abc", "1.5", *blank, "inf", "nan", "1e400", *bounded], ("integer", "greater than", "finite"), False
    if annotation is float:
        return ["abc", *blank, "inf", "-inf", "nan", "1e400", *bounded], ("number", "greater than"), False
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return blank, ("path",), False
    if annotation is dict or get_origin(annotation) is dict:
        return ["not json", "[1, 2]", "42"], ("JSON", "dictionary"), False
    if annotation is list or get_origin(annotation) is list:
        return [], (), False  # an empty string is an empty list; items are checked by hand below
    return blank, ("non-empty", "at least 1 character"), False


# Fields whose values are checked beyond their type, with a value of the right type that is wrong.
_BY_NAME: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "codec": (["zstd"], ("raw", "fp8")),
    "tiers": (["nosuch", "", "cpu,cpu", "cpu,nosuch"], ("tier", "allowed")),
    # (an object-store URL of an unknown protocol is only refused when the tier opens: fsspec decides)
    "url": (["no-scheme", "cache.internal:6379"], ("URL", "redis://", "s3://")),
}


def _cases_of(model: type[BaseModel], prefix: str, tier: str | None) -> list[Case]:
    cases = []
    for name, field in model.model_fields.items():
        nested = _without_none(field.annotation)
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            cases += _cases_of(nested, f"{prefix}{name.upper()}__", tier)
            continue
        values, allowed, all_allowed = invalid_values(field)
        cases += [Case(f"{prefix}{name.upper()}", value, tier, allowed, all_allowed) for value in values]
        if name in _BY_NAME:
            extra, words = _BY_NAME[name]
            cases += [Case(f"{prefix}{name.upper()}", value, tier, words) for value in extra]
    return cases


def _backend_models(registry: Registry) -> dict[str, type[BaseModel]]:
    models = {}
    for name, spec in registry.backends.items():
        if spec.missing_module() is None:
            models[name] = registry.settings_model(name)
    return models


# LMCache's names are no model fields: their cases are listed, and a test checks every one is.
_LEGACY_CASES = [
    Case("LMCACHE_LOCAL_CPU", "maybe", None, ("true",)),
    Case("LMCACHE_LOCAL_CPU", "", None, ("true",)),
    *[Case(variable, value, None, ("GB",))
      for variable in ("LMCACHE_MAX_LOCAL_CPU_SIZE", "LMCACHE_MAX_LOCAL_DISK_SIZE")
      for value in ("abc", "", "inf", "-inf", "nan", "1e400", "-1", "4GiB")],
    Case("LMCACHE_LOCAL_DISK", "", None, ("path",)),
    Case("LMCACHE_LOCAL_DISK", "   ", None, ("path",)),
    Case("LMCACHE_REMOTE_URL", "", None, ("URL",)),
    Case("LMCACHE_REMOTE_URL", "mongodb://db:27017", None, ("schemes",)),
    Case("LMCACHE_REMOTE_URL", "no-scheme", None, ("schemes",)),
    Case("LMCACHE_REMOTE_URL", "redis://[::1:6379", None, ("URL", "schemes", "redis")),
    Case("LMCACHE_REMOTE_SERDE", "zip", None, ("naive", "fp8"), True),  # no URL: takes no effect, still refused
    Case("LMCACHE_REMOTE_SERDE", "", None, ("naive", "fp8"), True),
    Case("LMCACHE_SAVE_UNFULL_CHUNK", "maybe", None, ("true",)),
    Case("LMCACHE_SAVE_UNFULL_CHUNK", "", None, ("true",)),
]
_BACKEND_EXTRA_CASES = [Case("LMCACHE_REDIS__URL", "http://cache:6379/0", "redis", ("redis://",))]

CORE_CASES = _cases_of(Settings, PREFIX, None)
BACKEND_CASES = [case for name, model in sorted(_backend_models(REGISTRY).items())
                 for case in _cases_of(model, f"{PREFIX}{name.upper()}__", name)]
ALL_CASES = CORE_CASES + BACKEND_CASES + _BACKEND_EXTRA_CASES + _LEGACY_CASES


def _id(case: Case) -> str:
    return f"{case.variable}={case.value!r}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)


def _assert_names_variable_and_allowed(message: str, case: Case) -> None:
    assert case.variable in message, message
    found = [word for word in case.allowed if word in message]
    if case.all_allowed:
        assert found == list(case.allowed), f"allowed values missing from: {message}"
    else:
        assert found, f"none of {case.allowed} in: {message}"


# Backend fields twice: with their tier not in use (still validated) and in use.
_SETTINGS_CASES = [(case, False) for case in ALL_CASES] + [
    (case, True) for case in BACKEND_CASES + _BACKEND_EXTRA_CASES
]


@pytest.mark.parametrize(("case", "in_use"), _SETTINGS_CASES,
                         ids=[f"{_id(case)}{'-in-use' if in_use else ''}" for case, in_use in _SETTINGS_CASES])
def test_invalid_value_is_a_settings_error_naming_the_variable(case: Case, in_use: bool) -> None:
    env = {case.variable: case.value}
    if in_use:
        env["LMCACHE_TIERS"] = "cpu" if case.tier == "cpu" else f"cpu,{case.tier}"
    with pytest.raises(SettingsError) as failure:
        load_settings(REGISTRY, env)
    _assert_names_variable_and_allowed(str(failure.value), case)


@pytest.mark.parametrize("case", ALL_CASES, ids=_id)
def test_cli_exits_2_with_one_line(
    case: Case, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(case.variable, case.value)
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcache-core: "), captured.err
    _assert_names_variable_and_allowed(lines[0], case)


_NUMERIC_FIELDS = [
    (f"{section}.{name}" if section else name, field)
    for section, model in [(None, Settings), *sorted(_backend_models(REGISTRY).items())]
    for name, field in model.model_fields.items()
    if _without_none(field.annotation) in (int, float)
    or (isinstance(_without_none(field.annotation), type) and issubclass(_without_none(field.annotation), ByteSize))
]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1.0e+400"])
@pytest.mark.parametrize(("key", "field"), _NUMERIC_FIELDS, ids=[key for key, _ in _NUMERIC_FIELDS])
def test_non_finite_numbers_in_the_yaml_file_are_refused(
    tmp_path: Path, key: str, field: FieldInfo, value: str
) -> None:
    """YAML hands over real floats (inf, nan), not text: the same refusal, naming the file and key."""
    section, _, name = key.rpartition(".")
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"{section}:\n  {name}: {value}\n" if section else f"{name}: {value}\n")
    with pytest.raises(SettingsError) as failure:
        load_settings(REGISTRY, {"LMCACHE_CONFIG_FILE": str(config)})
    assert f"(key {key})" in str(failure.value)


_OPTIONAL_FIELDS = [
    (f"{prefix}{name.upper()}", section, name)
    for prefix, section, model in [(PREFIX, None, Settings), *((f"{PREFIX}{n.upper()}__", n, m)
                                                             for n, m in sorted(_backend_models(REGISTRY).items()))]
    for name, field in model.model_fields.items()
    if field.default is None and field.default_factory is None
]


@pytest.mark.parametrize(("variable", "section", "name"), _OPTIONAL_FIELDS, ids=[v for v, _, _ in _OPTIONAL_FIELDS])
def test_an_empty_variable_unsets_a_setting_that_may_be_unset(variable: str, section: str | None, name: str) -> None:
    """``-e LMCACHE_REDIS__USERNAME=`` in a container template means "not set", not an empty user."""
    env = {variable: "", **({"LMCACHE_TIERS": f"cpu,{section}"} if section not in (None, "cpu") else {})}
    settings = load_settings(REGISTRY, env)
    assert getattr(settings.backend(section) if section else settings, name) is None


def test_every_field_and_legacy_name_has_cases() -> None:
    """The generator must keep up: each field of each model yields a case (lists may rely on
    by-name cases), and every LMCache name is listed."""
    covered = {case.variable for case in ALL_CASES}
    for prefix, model in [(PREFIX, Settings), *((f"{PREFIX}{n.upper()}__", m)
                                                for n, m in _backend_models(REGISTRY).items())]:
        for name, field in model.model_fields.items():
            nested = _without_none(field.annotation)
            if isinstance(nested, type) and issubclass(nested, BaseModel):
                continue
            variable = f"{prefix}{name.upper()}"
            assert variable in covered or variable in {v for v, _, _ in _OPTIONAL_FIELDS} or (
                get_origin(_without_none(field.annotation)) is list and not field.metadata), variable
    assert set(LEGACY_VARIABLES) <= covered
    assert {"cpu", "disk", "redis", "s3"} <= _backend_models(REGISTRY).keys()
