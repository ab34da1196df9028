"""Plugins: built-ins load through the entry-point loop like third-party packages; a broken plugin
is logged under its own name and skipped (fatal in strict mode); backends are listed without
importing anything heavy."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import tomllib
import torch
from pydantic import Field

from lmcache_core import hookspecs, plugins
from lmcache_core.backend import BackendSettings, Chunk, StorageBackend
from lmcache_core.codecs import BUILTIN_CODECS
from lmcache_core.engine import CacheEngine
from lmcache_core.errors import MissingExtraError, PluginError, SettingsError, UnsupportedEntryError
from lmcache_core.hookspecs import PLUGIN_API_VERSION, hookimpl
from lmcache_core.keys import CacheScope, ChunkHasher, ChunkKey, KVLayout
from lmcache_core.plugins import load_registry
from lmcache_core.registry import Registry
from lmcache_core.serde import decode_chunk, encode_to_bytes
from lmcache_core.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
BUILTINS = "cpu,disk"  # an allow list that leaves out plugins other sessions may be writing
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")


# --- a third-party style backend, registered by name like any plugin ----------------------------


class DictSettings(BackendSettings):
    max_entries: int = Field(1000, gt=0, description="Chunks kept before new ones are dropped.")


class DictBackend(StorageBackend):
    """Tensors in a dict: the smallest backend that honours the contract."""

    settings: DictSettings

    def __init__(self, settings: DictSettings, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings, context)
        self.entries: dict[ChunkKey, torch.Tensor] = {}

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        return next((i for i, key in enumerate(keys) if key not in self.entries), len(keys))

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        return [self.entries.get(key) for key in keys]

    def put_many(self, chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:
            if len(self.entries) < self.settings.max_entries:
                self.entries[chunk.key] = chunk.kv.clone()
                self.count("puts")

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return sum(self.entries.pop(key, None) is not None for key in keys)


class DictPlugin:
    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register("dict", f"{__name__}:DictBackend", settings=f"{__name__}:DictSettings", description="a dict")


class BrokenHookPlugin:
    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("the plugin's hook exploded")


class SecondCpuPlugin:
    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register("cpu", f"{__name__}:DictBackend")


class FuturePlugin:
    PLUGIN_API_VERSION = hookspecs.PLUGIN_API_VERSION + 1

    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register("future", f"{__name__}:DictBackend")


class NeedsExtraPlugin:
    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register("faraway", "lmcache_tests_no_such_module.backend:Backend", requires=["lmcache_tests_no_such_module"],
                 extra="faraway")
        register("nested", "lmcache_tests_no_such_pkg.sub:Backend", requires=["lmcache_tests_no_such_pkg.sub"],
                 extra="nested")
        register("noextra", "lmcache_tests_no_such_module:Backend", requires=["lmcache_tests_no_such_module"])
        register("present", f"{__name__}:DictBackend", requires=["json"], extra="present")


def registry_with(*extra: tuple[str, object], env: dict[str, str] | None = None) -> Registry:
    return load_registry({"LMCACHE_PLUGINS__ALLOW": BUILTINS, **(env or {})}, extra_plugins=extra)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


# --- discovery ----------------------------------------------------------------------------------


def test_builtins_load_through_our_own_entry_points() -> None:
    registry = load_registry({})
    for name in ("builtin_codecs", "cpu", "disk"):
        assert registry.plugins[name] == "loaded"
    assert registry.backends["cpu"].plugin == "cpu" and registry.backends["cpu"].status == "available"
    assert registry.backends["disk"].plugin == "disk" and registry.backends["disk"].status == "available"
    assert registry.backends["disk"].url_schemes == ("file",)
    assert {"raw", "fp8"} <= set(registry.codecs)
    declared = {ep.name for ep in plugins.entry_points(group=hookspecs.ENTRY_POINT_GROUP)}
    assert {"cpu", "disk"} <= declared and declared & {"builtin_codecs", "codecs"}  # `codecs` before the rename
    assert set(registry.plugins) >= declared  # every declared plugin has a status


def test_extra_plugin_works_end_to_end_as_a_tier() -> None:
    registry = registry_with(("dict-plugin", DictPlugin()))
    assert registry.plugins["dict-plugin"] == "loaded"
    settings = load_settings(registry, {"LMCACHE_TIERS": "cpu,dict", "LMCACHE_DICT__MAX_ENTRIES": "64",
                                        "LMCACHE_CHUNK_SIZE": "8"})
    assert settings.backend("dict").max_entries == 64
    engine = CacheEngine(settings, registry, CacheScope("plugins", "m", "0" * 16, LAYOUT))
    try:
        cpu, dict_tier = engine.stack.backends
        assert isinstance(dict_tier, DictBackend) and dict_tier.settings.max_entries == 64
        tokens = list(range(40))
        kv = torch.randn(LAYOUT.chunk_shape(40))
        assert engine.store(tokens, kv) == 40
        assert engine.flush()
        assert len(dict_tier.entries) == 5  # written through in the background
        cpu.clear()  # only the plugin's tier has the chunks now
        assert engine.lookup(tokens) == 40
        retrieved = engine.retrieve(tokens)
        assert retrieved is not None and torch.equal(retrieved, kv)
        assert engine.stats()["dict"]["hits"] == 5
        assert cpu.contains(engine.keys(tokens)) == 5  # promoted into the upper tier
    finally:
        engine.close()


# --- broken plugins -----------------------------------------------------------------------------


def test_a_plugin_whose_hook_raises_is_logged_by_name_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        registry = registry_with(("broken-hook", BrokenHookPlugin()), ("dict-plugin", DictPlugin()))
    assert registry.plugins["broken-hook"].startswith("failed: RuntimeError: the plugin's hook exploded")
    assert any("'broken-hook'" in message and "exploded" in message for message in warnings_of(caplog))
    assert {"cpu", "disk", "dict"} <= registry.backends.keys()  # the others still work
    assert registry.plugins["dict-plugin"] == "loaded"


@pytest.fixture
def broken_entry_points(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Add entry points that fail to load, next to the real ones, as a broken installed package would."""
    fake = [
        EntryPoint("missing", "lmcache_tests_no_such_module", hookspecs.ENTRY_POINT_GROUP),
        EntryPoint("badattr", "json:no_such_attribute", hookspecs.ENTRY_POINT_GROUP),
    ]
    real = plugins.entry_points

    def entry_points(**kwargs: object) -> list[EntryPoint]:
        return [*real(**kwargs), *fake]  # type: ignore[arg-type]

    monkeypatch.setattr(plugins, "entry_points", entry_points)
    return [ep.name for ep in fake]


def test_an_entry_point_that_fails_to_import_is_logged_by_name_and_skipped(
    broken_entry_points: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        registry = load_registry({"LMCACHE_PLUGINS__ALLOW": f"{BUILTINS},missing,badattr"})
    assert registry.plugins["missing"].startswith("failed: ModuleNotFoundError")
    assert registry.plugins["badattr"].startswith("failed: AttributeError")
    for name in broken_entry_points:
        assert any(f"'{name}'" in message for message in warnings_of(caplog))
    assert registry.backends["cpu"].status == "available" and "disk" in registry.backends


def test_strict_mode_makes_a_broken_entry_point_fatal(broken_entry_points: list[str]) -> None:
    env = {"LMCACHE_PLUGINS__STRICT": "1", "LMCACHE_PLUGINS__ALLOW": f"{BUILTINS},missing"}
    with pytest.raises(PluginError, match="'missing'"):
        load_registry(env)


@pytest.mark.parametrize("strict", ["1", "true", "TRUE", "yes", "on"])
def test_strict_mode_makes_a_broken_hook_fatal(strict: str) -> None:
    with pytest.raises(PluginError, match=r"'broken-hook'.*exploded"):
        registry_with(("broken-hook", BrokenHookPlugin()), env={"LMCACHE_PLUGINS__STRICT": strict})


def test_strict_mode_loads_healthy_plugins() -> None:
    registry = registry_with(("dict-plugin", DictPlugin()), env={"LMCACHE_PLUGINS__STRICT": "1"})
    assert {"cpu", "disk", "dict"} <= registry.backends.keys()


def test_a_duplicate_backend_name_is_refused_and_attributed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        registry = registry_with(("second-cpu", SecondCpuPlugin()))
    status = registry.plugins["second-cpu"]
    assert status.startswith("failed") and "already registered by 'cpu'" in status
    assert any("'second-cpu'" in message for message in warnings_of(caplog))
    assert registry.backends["cpu"].plugin == "cpu"
    assert registry.backends["cpu"].target == "lmcache_cpu.backend:CpuBackend"  # the first one stays
    with pytest.raises(PluginError, match="'second-cpu' registers backend 'cpu', already registered by 'cpu'"):
        registry_with(("second-cpu", SecondCpuPlugin()), env={"LMCACHE_PLUGINS__STRICT": "1"})


def test_a_plugin_for_a_newer_api_is_refused() -> None:
    registry = registry_with(("future", FuturePlugin()))
    status = registry.plugins["future"]
    assert status.startswith("failed") and f"plugin API {PLUGIN_API_VERSION + 1}" in status
    assert "upgrade lmcache-core" in status
    assert "future" not in registry.backends


class MisnamedHookPlugin:
    @hookimpl
    def lmcache_register_backend(self, register) -> None:  # type: ignore[no-untyped-def]  # typo: no "s"
        register("misnamed", f"{__name__}:DictBackend")


class WrongArgumentPlugin:
    @hookimpl
    def lmcache_register_backends(self, registrar) -> None:  # type: ignore[no-untyped-def]
        registrar("wrongarg", f"{__name__}:DictBackend")


@pytest.mark.parametrize(
    ("plugin", "hook"),
    [(MisnamedHookPlugin(), "lmcache_register_backend"), (WrongArgumentPlugin(), "lmcache_register_backends")],
    ids=["unknown-hook", "wrong-argument"],
)
def test_hook_implementations_are_validated_against_the_specs(plugin: object, hook: str) -> None:
    """A typo in a hook name must not make a plugin silently register nothing."""
    registry = registry_with(("sloppy", plugin))
    assert registry.plugins["sloppy"].startswith("failed"), registry.plugins["sloppy"]
    assert hook in registry.plugins["sloppy"]


class InvalidRegistrationsPlugin:
    def __init__(self, name: str, target: str) -> None:
        self.name, self.target = name, target

    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register(self.name, self.target)


@pytest.mark.parametrize(
    ("name", "target", "complaint"),
    [("Dict", "m:C", "lower-case identifier"), ("my-dict", "m:C", "lower-case identifier"),
     ("mydict", "module.Class", "'module:Class'")],
)
def test_invalid_registrations_are_refused(name: str, target: str, complaint: str) -> None:
    registry = registry_with(("invalid", InvalidRegistrationsPlugin(name, target)))
    assert registry.plugins["invalid"].startswith("failed") and complaint in registry.plugins["invalid"]
    assert name not in registry.backends


class LongCodecNamePlugin:
    class Codec:
        name = "much-too-long"

        def encode(self, tensor):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def decode(self, payload, dtype, shape):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    @hookimpl
    def lmcache_register_codecs(self, register) -> None:  # type: ignore[no-untyped-def]
        register(self.Codec())


def test_a_codec_name_that_does_not_fit_the_header_is_refused() -> None:
    registry = registry_with(("long-codec", LongCodecNamePlugin()))
    assert "longer than 8 bytes" in registry.plugins["long-codec"]
    assert "much-too-long" not in registry.codecs


class HalfCodecPlugin:
    """Stores float32 KV as float16 (a codec a third party might add)."""

    class Codec:
        name = "half"

        def encode(self, tensor: torch.Tensor) -> list[memoryview]:
            return [memoryview(tensor.half().numpy()).cast("B")]

        def decode(self, payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            return torch.frombuffer(bytearray(payload), dtype=torch.float16).view(shape).to(dtype)

    @hookimpl
    def lmcache_register_codecs(self, register) -> None:  # type: ignore[no-untyped-def]
        register(self.Codec())


KEY = ChunkHasher(CacheScope("plugins", "m", "0" * 16, LAYOUT), chunk_size=2).keys([1, 2])[0]


class SecondRawCodecPlugin:
    @hookimpl
    def lmcache_register_codecs(self, register) -> None:  # type: ignore[no-untyped-def]
        register(type("ImpostorRaw", (HalfCodecPlugin.Codec,), {"name": "raw"})())


def test_a_duplicate_codec_name_is_refused_and_attributed() -> None:
    registry = registry_with(("second-raw", SecondRawCodecPlugin()))
    assert "registers codec 'raw', already registered by 'builtin_codecs'" in registry.plugins["second-raw"]
    assert registry.codecs["raw"] is BUILTIN_CODECS["raw"]  # the built-in one stays
    with pytest.raises(PluginError, match="'second-raw' registers codec 'raw', already registered by 'builtin_codecs'"):
        registry_with(("second-raw", SecondRawCodecPlugin()), env={"LMCACHE_PLUGINS__STRICT": "1"})


def test_codecs_belong_to_a_registry_not_to_the_process() -> None:
    """A codec one registry's plugin adds is unknown to another registry and to the serde default."""
    mine = registry_with(("half", HalfCodecPlugin()))
    assert mine.codecs["half"].name == "half"
    assert "half" not in load_registry({"LMCACHE_PLUGINS__ALLOW": BUILTINS}).codecs
    assert "half" not in BUILTIN_CODECS
    data = encode_to_bytes(KEY, torch.ones(1, 2, 2, 1, 1), codec="half", codecs=mine.codecs)
    assert torch.equal(decode_chunk(data, KEY, codecs=mine.codecs).tensor, torch.ones(1, 2, 2, 1, 1))
    with pytest.raises(UnsupportedEntryError, match="'half' is not installed"):
        decode_chunk(data, KEY)


@pytest.mark.parametrize("environ", [{"LMCACHE_PLUGINS__DENY": "builtin_codecs,codecs"},
                                     {"LMCACHE_PLUGINS__ALLOW": "cpu"}])
def test_the_builtin_codecs_cannot_be_turned_off(environ: dict[str, str]) -> None:
    registry = load_registry(environ)
    assert registry.plugins["builtin_codecs"] == "loaded"
    assert {"raw", "fp8"} <= registry.codecs.keys()


def test_pyproject_declares_the_builtin_codecs_under_their_new_name() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmcache_core"]
    assert declared["builtin_codecs"] == "lmcache_codecs" and "codecs" not in declared


def test_an_install_that_still_declares_the_retired_codecs_entry_point_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Metadata written before the rename says ``codecs = lmcache_core.codecs`` and nothing about
    ``builtin_codecs``: the built-ins still load, by module name."""
    old = [EntryPoint("codecs", "lmcache_core.codecs", hookspecs.ENTRY_POINT_GROUP),
           EntryPoint("cpu", "lmcache_cpu", hookspecs.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: old)
    registry = load_registry({})
    assert registry.plugins == {"codecs": "retired: builtin_codecs does its job", "cpu": "loaded",
                                "builtin_codecs": "loaded"}
    assert {"raw", "fp8"} <= registry.codecs.keys()


# --- allow / deny -------------------------------------------------------------------------------


def test_deny_list_disables_a_plugin() -> None:
    registry = load_registry({"LMCACHE_PLUGINS__DENY": "disk"})
    assert registry.plugins["disk"] == "disabled by LMCACHE_PLUGINS__ALLOW/DENY"
    assert "disk" not in registry.backends and "cpu" in registry.backends
    with pytest.raises(SettingsError, match="unknown tier 'disk'"):
        load_settings(registry, {"LMCACHE_TIERS": "cpu,disk"})


def test_allow_list_loads_only_the_named_plugins() -> None:
    registry = load_registry({"LMCACHE_PLUGINS__ALLOW": " codecs , cpu "})
    assert registry.plugins["cpu"] == "loaded" and registry.plugins["disk"].startswith("disabled")
    assert set(registry.backends) == {"cpu"}


def test_deny_wins_over_allow() -> None:
    registry = load_registry({"LMCACHE_PLUGINS__ALLOW": "codecs,cpu,disk", "LMCACHE_PLUGINS__DENY": "disk"})
    assert set(registry.backends) == {"cpu"}


# --- optional dependencies ----------------------------------------------------------------------


def test_a_backend_with_a_missing_module_names_its_extra() -> None:
    registry = registry_with(("needs", NeedsExtraPlugin()))
    assert registry.plugins["needs"] == "loaded"
    spec = registry.backends["faraway"]
    assert spec.status == "needs lmcache_tests_no_such_module: pip install 'lmcache-core[faraway]'"
    with pytest.raises(MissingExtraError, match=r"pip install 'lmcache-core\[faraway\]'") as info:
        registry.backend_class("faraway")
    assert info.value.extra == "faraway" and info.value.module == "lmcache_tests_no_such_module"
    assert isinstance(info.value, ImportError)  # code that catches ImportError keeps working
    no_extra = registry.backends["noextra"].status
    assert no_extra == "needs lmcache_tests_no_such_module: pip install lmcache_tests_no_such_module"
    assert registry.backends["present"].status == "available"
    assert registry.backend_class("present") is DictBackend


def test_a_missing_parent_package_is_reported_not_raised() -> None:
    """``requires`` may name a submodule (``google.cloud.storage``); its parent may be missing too."""
    registry = registry_with(("needs", NeedsExtraPlugin()))
    status = registry.backends["nested"].status
    assert status.startswith("needs lmcache_tests_no_such_pkg") and "pip install 'lmcache-core[nested]'" in status
    with pytest.raises(MissingExtraError, match="nested"):
        registry.backend_class("nested")


def test_an_engine_over_a_backend_without_its_extra_says_what_to_install() -> None:
    registry = registry_with(("needs", NeedsExtraPlugin()))
    settings = load_settings(registry, {"LMCACHE_TIERS": "cpu,faraway"})
    with pytest.raises(MissingExtraError, match=r"lmcache-core\[faraway\]"):
        CacheEngine(settings, registry, CacheScope("plugins", "m", "0" * 16, LAYOUT))


# --- the contract -------------------------------------------------------------------------------


def test_every_hookspec_is_documented_typed_and_versioned() -> None:
    specs = [value for name, value in vars(hookspecs).items() if name.startswith("lmcache_") and callable(value)]
    assert len(specs) >= 2
    for spec in specs:
        assert "Since API version" in (spec.__doc__ or ""), spec.__name__
        assert list(inspect.signature(spec).parameters) == ["register"], spec.__name__
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(spec).parameters.values())


_HEAVY = ("s3fs", "redis", "boto3", "botocore", "aiobotocore", "vllm")

_IMPORT_CHECK = f"""
import importlib, json, pathlib, sys
import lmcache_core
from lmcache_core.plugins import load_registry

for package in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    if (package / "__init__.py").is_file():
        importlib.import_module(package.name)
        if (package / "settings.py").is_file():  # the docs and `info` import settings models too
            importlib.import_module(package.name + ".settings")
registry = load_registry()
statuses = {{name: spec.status for name, spec in registry.backends.items()}}
heavy = sorted(name for name in sys.modules if name.split(".")[0] in {_HEAVY!r})
backend_modules = sorted(name for name in sys.modules if name.endswith(".backend") and name != "lmcache_core.backend")
print(json.dumps({{"heavy": heavy, "backend_modules": backend_modules, "statuses": statuses}}))
"""


def test_importing_core_plugins_and_the_registry_imports_no_heavy_client() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "plugins"),
                                                                      os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, str(REPO / "plugins")],
        capture_output=True, text=True, env=env, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["heavy"] == []
    assert report["backend_modules"] == []  # listing backends and their status imports none of them
    assert report["statuses"]["cpu"] == report["statuses"]["disk"] == "available"


# --- plugin settings come from the validated settings ------------------------------------------


def test_the_yaml_plugins_section_takes_effect(tmp_path: Path) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text("plugins:\n  deny: [disk]\n")
    registry = load_registry({"LMCACHE_CONFIG_FILE": str(config)})
    assert registry.plugins["disk"] == "disabled by LMCACHE_PLUGINS__ALLOW/DENY"
    assert "disk" not in registry.backends and "cpu" in registry.backends


def test_the_environment_wins_over_the_yaml_plugins_section(tmp_path: Path) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text("plugins:\n  deny: [disk]\n")
    registry = load_registry({"LMCACHE_CONFIG_FILE": str(config), "LMCACHE_PLUGINS__DENY": ""})
    assert registry.plugins["disk"] == "loaded"


@pytest.mark.parametrize(("variable", "value"), [("LMCACHE_PLUGINS__STRICT", "maybe"),
                                                 ("LMCACHE_PLUGINS__STRICT", "")])
def test_an_invalid_plugin_setting_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"{variable}: .*expected true or false"):
        load_registry({variable: value})


def test_an_invalid_plugin_setting_in_the_yaml_names_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text("plugins:\n  strict: maybe\n")
    with pytest.raises(SettingsError, match=r"lmcache.yaml \(key plugins.strict\).*expected true or false"):
        load_registry({"LMCACHE_CONFIG_FILE": str(config)})
