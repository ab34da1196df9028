"""What a backend declares at registration (medium, URL schemes, aliases, LMCache names) and how the
core uses it: the core names no backend, so a third-party backend gets the same treatment."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import Field

from lmcache_core.backend import BackendSettings
from lmcache_core.cli import main
from lmcache_core.errors import PluginError, SettingsError
from lmcache_core.hookspecs import hookimpl
from lmcache_core.plugins import load_registry
from lmcache_core.registry import LegacyVariable
from lmcache_core.settings import load_settings, redact

BUILTINS = "cpu,disk,redis,s3"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)


def registry_with(*extra: tuple[str, object]):  # type: ignore[no-untyped-def]
    return load_registry({"LMCACHE_PLUGINS__ALLOW": BUILTINS}, extra_plugins=extra)


class ShelfSettings(BackendSettings):
    slots: int = Field(8, gt=0, description="Chunks kept.")
    where: str = Field("shelf://default", description="The shelf.")


class ShelfPlugin:
    """A third-party backend that declares its own LMCache-style names."""

    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register("shelf", "lmcache_cpu.backend:CpuBackend", settings=f"{__name__}:ShelfSettings",
                 medium="disk", url_schemes=("shelf",), url_setting="where", aliases=("bookcase",),
                 legacy=(LegacyVariable("LMCACHE_LOCAL_SHELF", "bool", tier="switch", default=False),
                         LegacyVariable("LMCACHE_SHELF_SLOTS", "text", setting="slots")))


class ShelfThiefPlugin:
    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register("thief", "lmcache_cpu.backend:CpuBackend", legacy=(LegacyVariable("LMCACHE_LOCAL_SHELF", "bool"),))


def test_each_backend_declares_its_medium() -> None:
    registry = registry_with()
    media = {name: spec.medium for name, spec in registry.backends.items()}
    assert media == {"cpu": "host", "disk": "disk", "redis": "remote", "objectstore": "remote", "s3": "remote"}


def test_a_file_url_as_the_remote_url_is_a_disk_tier(tmp_path: Path) -> None:
    """LMCACHE_REMOTE_URL=file:///dir was "unknown setting": the disk plugin declares the file scheme."""
    settings = load_settings(registry_with(), {"LMCACHE_REMOTE_URL": f"file://{tmp_path}"})
    assert settings.tiers == ["cpu", "disk"]
    assert settings.backend("disk").path == tmp_path


def test_info_shows_the_disk_tier_of_a_file_remote_url(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LMCACHE_REMOTE_URL", f"file://{tmp_path}")
    assert main(["info"]) == 0
    assert "tiers: cpu -> disk" in capsys.readouterr().out


def test_a_file_url_and_a_local_disk_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="LMCACHE_REMOTE_URL: selects the disk tier"):
        load_settings(registry_with(), {"LMCACHE_REMOTE_URL": f"file://{tmp_path}", "LMCACHE_LOCAL_DISK": "/x"})


def test_the_s3_alias_keeps_its_name_its_variables_and_its_url_scheme() -> None:
    registry = registry_with()
    assert registry.backends["s3"] is registry.backends["objectstore"]
    assert registry.aliases == {"s3": "objectstore"}
    assert registry.backends["s3"].requires == ("fsspec",)  # gs:// users need no s3fs
    settings = load_settings(registry, {"LMCACHE_TIERS": "cpu,s3", "LMCACHE_S3__URL": "s3://bucket/p"})
    assert settings.tiers == ["cpu", "s3"] and settings.backend("s3").url == "s3://bucket/p"
    remote = load_settings(registry, {"LMCACHE_REMOTE_URL": "s3://bucket/p", "LMCACHE_S3__TIMEOUT": "3"})
    assert remote.tiers == ["cpu", "s3"] and remote.backend("s3").timeout == 3
    google = load_settings(registry, {"LMCACHE_REMOTE_URL": "gs://bucket/p"})
    assert google.tiers == ["cpu", "objectstore"] and google.backend("objectstore").url == "gs://bucket/p"


def test_the_neutral_name_has_its_own_section() -> None:
    settings = load_settings(registry_with(), {"LMCACHE_TIERS": "objectstore",
                                               "LMCACHE_OBJECTSTORE__URL": "memory://cache"})
    assert settings.backend("objectstore").url == "memory://cache"


def test_a_third_party_backend_gets_its_lmcache_names_scheme_and_alias(caplog: pytest.LogCaptureFixture) -> None:
    registry = registry_with(("shelf", ShelfPlugin()))
    assert registry.backends["bookcase"] is registry.backends["shelf"]
    with caplog.at_level(logging.WARNING):
        settings = load_settings(registry, {"LMCACHE_LOCAL_SHELF": "true", "LMCACHE_SHELF_SLOTS": "3"})
    assert not [r for r in caplog.records if "not an lmcache-core setting" in r.getMessage()]
    assert settings.tiers == ["cpu", "shelf"]  # ordered by medium: host, then disk
    assert settings.backend("shelf").slots == 3
    by_url = load_settings(registry, {"LMCACHE_REMOTE_URL": "shelf://far", "LMCACHE_LOCAL_CPU": "false"})
    assert by_url.tiers == ["shelf"] and by_url.backend("shelf").where == "shelf://far"
    with pytest.raises(SettingsError, match="LMCACHE_LOCAL_SHELF: expected true/false"):
        load_settings(registry, {"LMCACHE_LOCAL_SHELF": "maybe"})


def test_an_lmcache_name_declared_twice_is_refused_and_attributed() -> None:
    registry = registry_with(("shelf", ShelfPlugin()), ("thief", ShelfThiefPlugin()))
    assert "declares LMCACHE_LOCAL_SHELF, already declared by 'shelf'" in registry.plugins["thief"]
    assert "thief" not in registry.backends


@pytest.mark.parametrize(("keyword", "value", "complaint"), [
    ("medium", "tape", "medium 'tape'"),
    ("aliases", ("Bad-Name",), "must be a lower-case identifier"),
    ("aliases", ("cpu",), "registers backend 'cpu', already registered by 'cpu'"),
])
def test_invalid_declarations_are_refused(keyword: str, value: object, complaint: str) -> None:
    class Plugin:
        @hookimpl
        def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
            register("odd", "lmcache_cpu.backend:CpuBackend", **{keyword: value})

    with pytest.raises(PluginError, match=complaint):
        load_registry({"LMCACHE_PLUGINS__ALLOW": BUILTINS, "LMCACHE_PLUGINS__STRICT": "1"},
                      extra_plugins=[("odd", Plugin())])


@pytest.mark.parametrize(("variable", "value", "field", "expected"), [
    ("LMCACHE_SAVE_DECODE_CACHE", "true", "save_decode_cache", True),
    ("LMCACHE_USE_LAYERWISE", "1", "use_layerwise", True),
    ("LMCACHE_ENABLE_ASYNC_LOADING", "yes", "enable_async_loading", True),
    ("LMCACHE_ENABLE_BLENDING", "on", "enable_blending", True),
    ("LMCACHE_BLEND_SPECIAL_STR", " ## ", "blend_special_str", " ## "),
    ("LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.1,0.2", "blend_recompute_ratios", [0.1, 0.2]),
    ("LMCACHE_BLEND_CHECK_LAYERS", "1,3", "blend_check_layers", [1, 3]),
    ("LMCACHE_BLEND_MIN_TOKENS", "128", "blend_min_tokens", 128),
])
def test_lmcache_names_about_no_backend_are_core_settings(
    variable: str, value: str, field: str, expected: object, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = load_settings(registry_with(), {variable: value})
    assert getattr(settings, field) == expected
    assert not [r for r in caplog.records if "not an lmcache-core setting" in r.getMessage()]
    assert field in redact(settings.effective())


def test_a_feature_not_there_yet_says_so_when_switched_on(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_settings(registry_with(), {"LMCACHE_ENABLE_BLENDING": "true"})
    assert "LMCACHE_ENABLE_BLENDING=true is accepted but has no effect in this release" in caplog.text


@pytest.mark.parametrize(("variable", "value"), [("LMCACHE_BLEND_RECOMPUTE_RATIOS", "1.5"),
                                                 ("LMCACHE_BLEND_CHECK_LAYERS", "-1")])
def test_blend_lists_are_checked(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(registry_with(), {variable: value})
