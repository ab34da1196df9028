"""Settings from LMCACHE_* variables, a YAML file and LMCache's legacy names; errors that name what
the operator typed; secrets that never reach logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import AnyUrl, BaseModel, Field, SecretStr

from lmcache_core.backend import BackendSettings
from lmcache_core.errors import SettingsError
from lmcache_core.hookspecs import hookimpl
from lmcache_core.plugins import load_registry
from lmcache_core.registry import Registry
from lmcache_core.settings import PluginSettings, Settings, load_settings
from lmcache_kernels import KERNELS_VARIABLE

GIB = 1024**3


class KvStoreSettings(BackendSettings):
    """Settings of a remote store served by a test plugin for ``LMCACHE_REMOTE_URL``."""

    url: AnyUrl = Field(AnyUrl("kv://localhost:7000"), description="Server URL, may hold a password.")
    replica: str | None = Field(None, description="Optional second server URL, may hold a password.")
    password: SecretStr | None = Field(None, description="Password, if not in the URL.")
    timeout_s: float = Field(1.0, gt=0, description="Request timeout.")


class KvStorePlugin:
    """A third-party-style plugin registered through ``extra_plugins``."""

    @hookimpl
    def lmcache_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register(
            "kvstore",
            "kvstore_client.backend:KvStoreBackend",  # imported only when a tier is built: never here
            settings=f"{__name__}:KvStoreSettings",
            url_schemes=("kv", "kvs"),
        )


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(
        {"LMCACHE_PLUGINS__ALLOW": "codecs,cpu,disk"}, extra_plugins=[("kvstore-plugin", KvStorePlugin())]
    )


def load(registry: Registry, env: dict[str, str], **overrides: object) -> Settings:
    return load_settings(registry, env, **overrides)


def error_of(registry: Registry, env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(registry, env)
    return str(info.value)


@pytest.fixture
def config_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "lmcache.yaml"


# --- defaults, env, YAML ------------------------------------------------------------------------


def test_defaults(registry: Registry) -> None:
    settings = load(registry, {})
    assert settings.chunk_size == 256
    assert settings.tiers == ["cpu"]
    assert settings.namespace == "default"
    assert settings.hash_algorithm == "blake3"
    assert settings.key_secret is None
    assert settings.save_unfull_chunk is False
    assert settings.codec == "raw"
    assert settings.plugins == PluginSettings()
    assert settings.backend("cpu").max_size == 5 * GIB


def test_env_nesting_and_sizes(registry: Registry) -> None:
    settings = load(registry, {"LMCACHE_CPU__MAX_SIZE": "4GiB", "LMCACHE_CHUNK_SIZE": "64"})
    assert settings.backend("cpu").max_size == 4 * GIB
    assert settings.chunk_size == 64
    assert load(registry, {"LMCACHE_CPU__MAX_SIZE": "512MB"}).backend("cpu").max_size == 512 * 10**6


def test_lists_are_comma_separated(registry: Registry, tmp_path: Path) -> None:
    settings = load(registry, {"LMCACHE_TIERS": " cpu , disk,", "LMCACHE_DISK__PATH": str(tmp_path)})
    assert settings.tiers == ["cpu", "disk"]
    assert settings.backend("disk").path == tmp_path


def test_a_tier_listed_twice_is_refused(registry: Registry) -> None:
    message = error_of(registry, {"LMCACHE_TIERS": "cpu,cpu"})
    assert "LMCACHE_TIERS" in message and "twice" in message


def test_yaml_file_with_env_over_file_over_defaults(registry: Registry, config_file: Path, tmp_path: Path) -> None:
    config_file.write_text(
        "chunk_size: 128\n"
        "namespace: from-file\n"
        "tiers: [cpu, disk]\n"
        "cpu:\n  max_size: 1GiB\n"
        f"disk:\n  path: {tmp_path}\n  max_size: 3GiB\n"
    )
    env = {"LMCACHE_CONFIG_FILE": str(config_file), "LMCACHE_NAMESPACE": "from-env", "LMCACHE_DISK__MAX_SIZE": "2GiB"}
    settings = load(registry, env)
    assert settings.chunk_size == 128  # file over default
    assert settings.namespace == "from-env"  # env over file
    assert settings.tiers == ["cpu", "disk"]
    assert settings.backend("cpu").max_size == 1 * GIB
    assert settings.backend("disk").max_size == 2 * GIB  # env over file, field by field
    assert settings.backend("disk").path == tmp_path  # the rest of the file's section stays
    assert load(registry, env, namespace="from-code").namespace == "from-code"  # overrides over env


def test_yaml_accepts_a_comma_separated_tier_string(registry: Registry, config_file: Path, tmp_path: Path) -> None:
    config_file.write_text(f"tiers: cpu,disk\ndisk:\n  path: {tmp_path}\n")
    assert load(registry, {"LMCACHE_CONFIG_FILE": str(config_file)}).tiers == ["cpu", "disk"]


# --- LMCache's variable names -------------------------------------------------------------------


def test_legacy_chunk_size(registry: Registry) -> None:
    assert load(registry, {"LMCACHE_CHUNK_SIZE": "512"}).chunk_size == 512


def test_legacy_local_cpu_and_its_size_in_gb(registry: Registry) -> None:
    settings = load(registry, {"LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "2.5"})
    assert settings.tiers == ["cpu"]
    assert settings.backend("cpu").max_size == int(2.5 * GIB)


@pytest.mark.parametrize("url_prefix", ["", "file://"])
def test_legacy_local_disk_path_or_file_url(registry: Registry, tmp_path: Path, url_prefix: str) -> None:
    env = {"LMCACHE_LOCAL_DISK": f"{url_prefix}{tmp_path}", "LMCACHE_MAX_LOCAL_DISK_SIZE": "1.5"}
    settings = load(registry, env)
    assert settings.tiers == ["cpu", "disk"]
    assert settings.backend("disk").path == tmp_path
    assert settings.backend("disk").max_size == int(1.5 * GIB)


def test_legacy_disk_only(registry: Registry, tmp_path: Path) -> None:
    settings = load(registry, {"LMCACHE_LOCAL_CPU": "false", "LMCACHE_LOCAL_DISK": str(tmp_path)})
    assert settings.tiers == ["disk"]


def test_legacy_zero_disk_size_keeps_the_disk_tier_off(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = load(registry, {"LMCACHE_LOCAL_DISK": str(tmp_path), "LMCACHE_MAX_LOCAL_DISK_SIZE": "0"})
    assert settings.tiers == ["cpu"]
    assert "LMCACHE_MAX_LOCAL_DISK_SIZE" in caplog.text


def test_legacy_no_tier_left_is_an_error(registry: Registry) -> None:
    assert "LMCACHE_LOCAL_CPU" in error_of(registry, {"LMCACHE_LOCAL_CPU": "0"})


def test_explicit_tiers_win_over_legacy_tier_switches(registry: Registry, tmp_path: Path) -> None:
    env = {"LMCACHE_TIERS": "cpu", "LMCACHE_LOCAL_DISK": str(tmp_path)}
    assert load(registry, env).tiers == ["cpu"]


@pytest.mark.parametrize("scheme", ["kv", "kvs"])
def test_legacy_remote_url_selects_the_backend_serving_its_scheme(registry: Registry, scheme: str) -> None:
    settings = load(registry, {"LMCACHE_REMOTE_URL": f"{scheme}://cache.internal:7000/0"})
    assert settings.tiers == ["cpu", "kvstore"]
    assert str(settings.backend("kvstore").url) == f"{scheme}://cache.internal:7000/0"


@pytest.mark.parametrize(("serde", "codec"), [("naive", "raw"), ("raw", "raw"), ("fp8", "fp8")])
def test_legacy_remote_serde(registry: Registry, serde: str, codec: str) -> None:
    env = {"LMCACHE_REMOTE_URL": "kv://cache:7000", "LMCACHE_REMOTE_SERDE": serde}
    assert load(registry, env).backend("kvstore").codec == codec


def test_legacy_remote_serde_unknown_names_the_variable_and_choices(registry: Registry) -> None:
    message = error_of(registry, {"LMCACHE_REMOTE_URL": "kv://cache:7000", "LMCACHE_REMOTE_SERDE": "cachegen"})
    assert "LMCACHE_REMOTE_SERDE" in message and "cachegen" in message
    assert "naive" in message and "fp8" in message


def test_legacy_remote_url_with_an_unserved_scheme_names_the_extras(registry: Registry) -> None:
    message = error_of(registry, {"LMCACHE_REMOTE_URL": "mongodb://db:27017"})
    assert "LMCACHE_REMOTE_URL" in message and "'mongodb'" in message
    assert "kv" in message and "lmcache-core[" in message


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("True", True), ("TRUE", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_legacy_booleans(registry: Registry, text: str, value: bool) -> None:
    assert load(registry, {"LMCACHE_SAVE_UNFULL_CHUNK": text}).save_unfull_chunk is value
    tiers = load(registry, {"LMCACHE_LOCAL_CPU": text, "LMCACHE_LOCAL_DISK": "/tmp/lmcache-unused"}).tiers
    assert ("cpu" in tiers) is value


def test_legacy_names_in_a_lmcache_yaml_file(registry: Registry, config_file: Path, tmp_path: Path) -> None:
    config_file.write_text(
        f"chunk_size: 128\nlocal_cpu: false\nlocal_disk: file://{tmp_path}\nmax_local_disk_size: 2\n"
    )
    settings = load(registry, {"LMCACHE_CONFIG_FILE": str(config_file)})
    assert settings.chunk_size == 128
    assert settings.tiers == ["disk"]
    assert settings.backend("disk").path == tmp_path and settings.backend("disk").max_size == 2 * GIB


# --- errors name what the operator typed --------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "must_mention"),
    [
        ({"LMCACHE_MAX_LOCAL_CPU_SIZE": "abc"}, ["LMCACHE_MAX_LOCAL_CPU_SIZE", "'abc'", "GB"]),
        ({"LMCACHE_MAX_LOCAL_DISK_SIZE": "-1"}, ["LMCACHE_MAX_LOCAL_DISK_SIZE", "'-1'"]),
        ({"LMCACHE_CPU__MAX_SIZE": "lots"}, ["LMCACHE_CPU__MAX_SIZE", "'lots'", "4GiB"]),
        ({"LMCACHE_HASH_ALGORITHM": "md5"}, ["LMCACHE_HASH_ALGORITHM", "'md5'", "blake3", "sha256", "xxh3_128"]),
        ({"LMCACHE_TIERS": "cpu,nosuch"}, ["LMCACHE_TIERS", "'nosuch'", "cpu", "disk"]),
        ({"LMCACHE_CHUNK_SIZE": "abc"}, ["LMCACHE_CHUNK_SIZE", "'abc'", "integer"]),
        ({"LMCACHE_CHUNK_SIZE": "0"}, ["LMCACHE_CHUNK_SIZE", "greater than 0"]),
        ({"LMCACHE_SAVE_UNFULL_CHUNK": "maybe"}, ["LMCACHE_SAVE_UNFULL_CHUNK", "'maybe'", "true", "false"]),
        ({"LMCACHE_LOCAL_CPU": "yesplease"}, ["LMCACHE_LOCAL_CPU", "'yesplease'", "true", "false"]),
        ({"LMCACHE_PLUGINS__STRICT": "sometimes"}, ["LMCACHE_PLUGINS__STRICT", "'sometimes'"]),
        (
            {"LMCACHE_REMOTE_URL": "kv://cache:7000", "LMCACHE_KVSTORE__TIMEOUT_S": "soon"},
            ["LMCACHE_KVSTORE__TIMEOUT_S", "'soon'"],
        ),
    ],
)
def test_errors_name_the_variable_and_what_is_allowed(
    registry: Registry, env: dict[str, str], must_mention: list[str]
) -> None:
    message = error_of(registry, env)
    for text in must_mention:
        assert text in message, f"{text!r} missing from: {message}"


def test_every_problem_is_reported_at_once(registry: Registry) -> None:
    message = error_of(registry, {"LMCACHE_CHUNK_SIZE": "abc", "LMCACHE_CPU__MAX_SIZE": "lots"})
    assert "LMCACHE_CHUNK_SIZE" in message and "LMCACHE_CPU__MAX_SIZE" in message


@pytest.mark.parametrize("variable", ["LMCACHE_CODEC", "LMCACHE_CPU__CODEC"])
def test_unknown_codec_is_refused_with_the_choices(registry: Registry, variable: str) -> None:
    """A codec nobody registered would make every write to that tier fail at run time."""
    message = error_of(registry, {variable: "zstd"})
    assert variable in message and "'zstd'" in message
    assert "raw" in message and "fp8" in message


def test_yaml_syntax_error_names_the_file(registry: Registry, config_file: Path) -> None:
    config_file.write_text("chunk_size: [1, 2\n")
    message = error_of(registry, {"LMCACHE_CONFIG_FILE": str(config_file)})
    assert "LMCACHE_CONFIG_FILE" in message and str(config_file) in message and "YAML" in message


def test_yaml_value_error_names_the_file_and_key(registry: Registry, config_file: Path) -> None:
    config_file.write_text("chunk_size: abc\ncpu:\n  max_size: lots\n")
    message = error_of(registry, {"LMCACHE_CONFIG_FILE": str(config_file)})
    assert f"LMCACHE_CONFIG_FILE={config_file} (key chunk_size)" in message and "'abc'" in message
    assert "(key cpu.max_size)" in message and "'lots'" in message


def test_yaml_unknown_key_in_a_backend_section(registry: Registry, config_file: Path) -> None:
    config_file.write_text("cpu:\n  max_sise: 1GiB\n")
    message = error_of(registry, {"LMCACHE_CONFIG_FILE": str(config_file)})
    assert "(key cpu.max_sise)" in message and "unknown setting" in message


def test_yaml_unknown_top_level_key_is_reported(
    registry: Registry, config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in the file must not be dropped silently (the same typo in the env is warned about)."""
    config_file.write_text("chunk_sise: 128\n")
    with caplog.at_level(logging.WARNING):
        try:
            load(registry, {"LMCACHE_CONFIG_FILE": str(config_file)})
        except SettingsError as error:
            reported = str(error)
        else:
            reported = caplog.text
    assert "chunk_sise" in reported and "chunk_size" in reported


@pytest.mark.parametrize(("content", "complaint"), [("- cpu\n- disk\n", "mapping"), (None, "cannot read")])
def test_yaml_file_that_is_no_mapping_or_missing(
    registry: Registry, config_file: Path, content: str | None, complaint: str
) -> None:
    if content is not None:
        config_file.write_text(content)
    message = error_of(registry, {"LMCACHE_CONFIG_FILE": str(config_file)})
    assert "LMCACHE_CONFIG_FILE" in message and complaint in message


# --- unknown variables --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("LMCACHE_CHUNKSIZE", "LMCACHE_CHUNK_SIZE"),
        ("LMCACHE_CPU__MAXSIZE", "LMCACHE_CPU__MAX_SIZE"),
        ("LMCACHE_TEIRS", "LMCACHE_TIERS"),
        ("LMCACHE_KVSTORE__TIMEOUT", "LMCACHE_KVSTORE__TIMEOUT_S"),  # fields of plugin-owned sections
        ("LMCACHE_PLUGINS__STRIKT", "LMCACHE_PLUGINS__STRICT"),
    ],
)
def test_unknown_variable_warns_with_the_closest_name(
    registry: Registry, caplog: pytest.LogCaptureFixture, typo: str, suggestion: str
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = load(registry, {typo: "1"})
    assert settings.tiers == ["cpu"]  # ignored, not fatal
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(typo in message and f"did you mean {suggestion}?" in message for message in warnings), warnings


def test_known_variables_do_not_warn(registry: Registry, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    config_file = tmp_path / "empty.yaml"
    config_file.write_text("")
    env = {
        "LMCACHE_CONFIG_FILE": str(config_file),
        "LMCACHE_CHUNK_SIZE": "16",
        "LMCACHE_CPU__MAX_SIZE": "1GiB",
        "LMCACHE_DISK__FSYNC": "true",
        "LMCACHE_KVSTORE__TIMEOUT_S": "2",
        "LMCACHE_PLUGINS__STRICT": "0",
        "LMCACHE_PLUGINS__ALLOW": "",
        "LMCACHE_SAVE_UNFULL_CHUNK": "1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "1",
        KERNELS_VARIABLE: "reference",  # read by lmcache_kernels, not a setting, but ours
        "PATH": "/usr/bin",  # not ours: never mentioned
    }
    with caplog.at_level(logging.WARNING):
        load(registry, env)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# --- secrets ------------------------------------------------------------------------------------


def test_effective_settings_redact_secrets(registry: Registry) -> None:
    env = {
        "LMCACHE_KEY_SECRET": "hunter1",
        "LMCACHE_REMOTE_URL": "kv://admin:hunter2@cache.internal:7000/0",
        "LMCACHE_KVSTORE__PASSWORD": "hunter3",
        "LMCACHE_KVSTORE__REPLICA": "kv://:hunter4@replica.internal/0",
    }
    settings = load(registry, env)
    assert settings.key_secret is not None and settings.key_secret.get_secret_value() == "hunter1"
    effective = settings.effective()
    dumped = json.dumps(effective, default=str)
    for secret in ("hunter1", "hunter2", "hunter3", "hunter4"):
        assert secret not in dumped
    assert effective["key_secret"] == "**********"
    assert effective["kvstore"]["password"] == "**********"
    assert effective["kvstore"]["replica"] == "kv://:***@replica.internal/0"
    assert effective["kvstore"]["url"] == "kv://admin:***@cache.internal:7000/0"
    assert effective["chunk_size"] == 256  # the rest is shown as is


def test_redaction_survives_a_url_it_cannot_fully_parse(registry: Registry) -> None:
    """`lmcache-core info` must show a bad URL (redacted) rather than crash on it."""
    settings = load(registry, {"LMCACHE_REMOTE_URL": "kv://cache:7000",
                               "LMCACHE_KVSTORE__REPLICA": "kv://admin:hunter5@replica:99999999/0"})
    assert settings.effective()["kvstore"]["replica"] == "kv://admin:***@replica:99999999/0"


def test_settings_errors_do_not_echo_secrets(registry: Registry) -> None:
    """Error messages end up in logs: a password in a rejected URL must be redacted there too."""
    message = error_of(registry, {"LMCACHE_REMOTE_URL": "kv://admin:hunter2@cache.internal:99999999/0"})
    assert "LMCACHE_REMOTE_URL" in message
    assert "hunter2" not in message


# --- documentation ------------------------------------------------------------------------------


def _undocumented(model: type[BaseModel]) -> list[str]:
    return [f"{model.__name__}.{name}" for name, field in model.model_fields.items() if not field.description]


def test_every_setting_has_a_description() -> None:
    """The configuration page is generated from these descriptions: adding a setting means documenting it."""
    registry = load_registry()
    models: set[type[BaseModel]] = {Settings, PluginSettings, BackendSettings}
    for name, spec in registry.backends.items():
        if spec.missing_module() is None:
            models.add(registry.settings_model(name))
    assert {"cpu", "disk"} <= registry.backends.keys()
    assert [name for model in sorted(models, key=lambda m: m.__name__) for name in _undocumented(model)] == []


# --- secrets in URL query strings (issue 9, defect 8) ---------------------------------------------

SECRET = "hunter2"


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("redis://cache.internal:6379/0?password=hunter2", "redis://cache.internal:6379/0?password=***"),
        ("rediss://cache:6380/0?ssl_cert_reqs=none&password=hunter2", "rediss://cache:6380/0?ssl_cert_reqs=none&"),
        ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&"),
        ("redis://user:hunter2@cache:6379/0?password=hunter2", "redis://user:***@cache:6379/0?"),
        ("s3://bucket/prefix?aws_access_key_id=AKIA1&aws_secret_access_key=hunter2", "s3://bucket/prefix?"),
        ("s3://bucket/prefix?X-Amz-Credential=hunter2&X-Amz-Signature=hunter2", "s3://bucket/prefix?"),
        ("https://store.example/p?sv=2024&sig=hunter2", "https://store.example/p?sv=2024&"),
        ("kv://cache/0?api_key=hunter2&timeout=3", "timeout=3"),
        ("kv://cache/0?session_token=hunter2", "kv://cache/0?"),
        ("kv://cache/0?client_secret=hunter2", "kv://cache/0?"),
        ("kv://cache/0?pass%77ord=hunter2", "kv://cache/0?"),  # the name is percent-encoded
        ("kv://cache/0?PASSWORD=hunter2;db=1", "db=1"),
        ("kv://cache/0#access_token=hunter2", "kv://cache/0#"),
        ("kv://[::1/0?password=hunter2", "kv://"),  # unparsable host: still redacted, never a crash
    ],
)
def test_redact_hides_secrets_in_query_strings(url: str, kept: str) -> None:
    from lmcache_core.settings import redact, redact_url

    for redacted in (redact_url(url), redact(url)):
        assert SECRET not in redacted, redacted
        assert kept in redacted, redacted


def test_redact_leaves_urls_without_secrets_alone() -> None:
    from lmcache_core.settings import redact_url

    for url in ("redis://cache:6379/0", "unix:///run/redis.sock?db=0", "s3://bucket/prefix", "kv://h/0?a=1&b"):
        assert redact_url(url) == url


def test_redact_hides_secret_named_entries_of_mappings() -> None:
    """storage_options and similar free-form mappings are shown by ``info``: credentials in them are not."""
    from lmcache_core.settings import redact

    options = {"profile": "cache", "secret": SECRET, "key": SECRET, "client_kwargs": {"aws_session_token": SECRET}}
    shown = redact({"storage_options": options})
    assert SECRET not in json.dumps(shown)
    assert shown["storage_options"]["profile"] == "cache"


def test_effective_settings_redact_query_string_secrets(registry: Registry) -> None:
    env = {"LMCACHE_REMOTE_URL": "kv://cache.internal:7000/0?password=hunter2",
           "LMCACHE_KVSTORE__REPLICA": "kv://replica/0?token=hunter2"}
    assert SECRET not in json.dumps(load(registry, env).effective(), default=str)


# --- settings edge cases (issue 9, defect 9) --------------------------------------------------------


@pytest.mark.parametrize("variable", ["LMCACHE_MAX_LOCAL_CPU_SIZE", "LMCACHE_MAX_LOCAL_DISK_SIZE"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "Infinity"])
def test_legacy_sizes_that_are_no_finite_number_are_a_settings_error(
    registry: Registry, variable: str, value: str
) -> None:
    message = error_of(registry, {variable: value})
    assert variable in message and repr(value) in message and "GB" in message


def test_legacy_size_in_a_yaml_file_that_is_infinite(registry: Registry, config_file: Path) -> None:
    config_file.write_text("max_local_cpu_size: .inf\n")
    message = error_of(registry, {"LMCACHE_CONFIG_FILE": str(config_file)})
    assert "max_local_cpu_size" in message and "GB" in message


# (legacy name, its value, new-style name, its value, what to read, expected from legacy, from new)
_LEGACY_AND_NEW = [
    ("max_local_cpu_size", "2", "LMCACHE_CPU__MAX_SIZE", "4GiB",
     lambda s: s.backend("cpu").max_size, 2 * GIB, 4 * GIB),
    ("max_local_disk_size", "2", "LMCACHE_DISK__MAX_SIZE", "3GiB",
     lambda s: s.backend("disk").max_size, 2 * GIB, 3 * GIB),
    ("local_disk", "/tmp/lmcache-legacy", "LMCACHE_DISK__PATH", "/tmp/lmcache-new",
     lambda s: str(s.backend("disk").path), "/tmp/lmcache-legacy", "/tmp/lmcache-new"),
    ("remote_url", "kv://legacy:7000", "LMCACHE_KVSTORE__URL", "kv://new:7000",
     lambda s: str(s.backend("kvstore").url), "kv://legacy:7000", "kv://new:7000"),
    ("remote_serde", "fp8", "LMCACHE_KVSTORE__CODEC", "raw",
     lambda s: s.backend("kvstore").codec, "fp8", "raw"),
    ("local_cpu", "false", "LMCACHE_TIERS", "cpu,disk",
     lambda s: s.tiers, ["disk", "kvstore"], ["cpu", "disk"]),
]
# what each case needs besides the pair, so that the tiers it reads exist
_CONTEXT = {"LMCACHE_LOCAL_DISK": "/tmp/lmcache-legacy", "LMCACHE_REMOTE_URL": "kv://legacy:7000"}


@pytest.mark.parametrize(("legacy", "legacy_value", "new", "new_value", "read", "from_legacy", "from_new"),
                         _LEGACY_AND_NEW, ids=[case[0] for case in _LEGACY_AND_NEW])
def test_env_wins_over_the_file_for_every_legacy_and_new_pair(
    registry: Registry, config_file: Path, legacy: str, legacy_value: str, new: str, new_value: str,
    read, from_legacy: object, from_new: object,  # type: ignore[no-untyped-def]
) -> None:
    legacy_variable = "LMCACHE_" + legacy.upper()
    context = {k: v for k, v in _CONTEXT.items() if k != legacy_variable}

    # the legacy name in the file, the new name in the environment: the environment wins
    config_file.write_text("".join(f"{k[len('LMCACHE_'):].lower()}: {v}\n" for k, v in context.items())
                           + f"{legacy}: {legacy_value}\n")
    assert read(load(registry, {"LMCACHE_CONFIG_FILE": str(config_file), new: new_value})) == from_new

    # the new name in the file, the legacy name in the environment: the environment wins
    section, _, field = new[len("LMCACHE_"):].lower().partition("__")
    config_file.write_text(f"{section}:\n  {field}: {new_value}\n" if field else f"{section}: {new_value}\n")
    assert read(load(registry, {"LMCACHE_CONFIG_FILE": str(config_file), **context,
                                legacy_variable: legacy_value})) == from_legacy

    # both in the environment: the new name, which says exactly what it sets, wins
    assert read(load(registry, {**context, legacy_variable: legacy_value, new: new_value})) == from_new


@pytest.mark.parametrize(
    ("env", "must_mention"),
    [
        # LMCACHE_REMOTE_SERDE does nothing without LMCACHE_REMOTE_URL, but a typo is still a typo
        ({"LMCACHE_REMOTE_SERDE": "zip"}, ["LMCACHE_REMOTE_SERDE", "'zip'", "naive", "fp8"]),
        ({"LMCACHE_TIERS": "cpu", "LMCACHE_LOCAL_CPU": "maybe"}, ["LMCACHE_LOCAL_CPU", "'maybe'", "true"]),
        ({"LMCACHE_TIERS": "cpu", "LMCACHE_REMOTE_URL": "mongodb://db"}, ["LMCACHE_REMOTE_URL", "'mongodb'"]),
        ({"LMCACHE_TIERS": "cpu", "LMCACHE_REMOTE_URL": ""}, ["LMCACHE_REMOTE_URL", "''"]),
        ({"LMCACHE_REMOTE_URL": "kv://[::1:7000"}, ["LMCACHE_REMOTE_URL"]),
        ({"LMCACHE_LOCAL_DISK": ""}, ["LMCACHE_LOCAL_DISK", "''", "path"]),
        ({"LMCACHE_TIERS": "cpu", "LMCACHE_MAX_LOCAL_DISK_SIZE": "nan"}, ["LMCACHE_MAX_LOCAL_DISK_SIZE", "'nan'"]),
        # a backend section of a tier that is not in use is validated too
        ({"LMCACHE_TIERS": "cpu", "LMCACHE_DISK__MAX_SIZE": "lots"}, ["LMCACHE_DISK__MAX_SIZE", "'lots'", "4GiB"]),
        ({"LMCACHE_TIERS": "cpu", "LMCACHE_KVSTORE__TIMEOUT_S": "soon"}, ["LMCACHE_KVSTORE__TIMEOUT_S", "'soon'"]),
    ],
)
def test_invalid_values_are_refused_even_where_they_take_no_effect(
    registry: Registry, env: dict[str, str], must_mention: list[str]
) -> None:
    message = error_of(registry, env)
    for text in must_mention:
        assert text in message, f"{text!r} missing from: {message}"


def test_legacy_problems_are_reported_with_the_others(registry: Registry) -> None:
    message = error_of(registry, {"LMCACHE_REMOTE_SERDE": "zip", "LMCACHE_LOCAL_CPU": "maybe",
                                  "LMCACHE_CHUNK_SIZE": "abc"})
    assert "LMCACHE_REMOTE_SERDE" in message and "LMCACHE_LOCAL_CPU" in message and "LMCACHE_CHUNK_SIZE" in message


def test_a_valid_serde_without_a_remote_url_is_pointed_out(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        load(registry, {"LMCACHE_REMOTE_SERDE": "naive"})
    assert "LMCACHE_REMOTE_SERDE" in caplog.text and "LMCACHE_REMOTE_URL" in caplog.text
