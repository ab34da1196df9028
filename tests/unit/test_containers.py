"""The container files (containers/) are checked without building or starting anything.

Operators change these files by hand and find out at deploy time when a variable name is misspelt (lmcache-core
only warns about an unknown ``LMCACHE_*`` variable and runs on its defaults) or a value is invalid. So every
environment block is validated here the way the connector validates its process environment, and the wiring
that is easy to break (Dockerfile paths, extras, the connector's configuration, Service selectors) is checked
statically. ``docker compose config`` runs too where Docker's compose plugin is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

from lmcache_core.errors import SettingsError
from lmcache_core.plugins import load_registry
from lmcache_core.settings import PREFIX, is_secret_name, known_variables, load_settings

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
COMPOSE = CONTAINERS / "compose.yaml"
KUBERNETES = CONTAINERS / "kubernetes.yaml"
ENTRY_POINT = CONTAINERS / "serve.sh"
DOCKERFILES = sorted(CONTAINERS.glob("Dockerfile*"))
# What a Kubernetes variable read from a Secret stands for here: its value is only known in the cluster.
FROM_A_SECRET = "value-from-a-secret"
# ${NAME}, ${NAME:-default} or ${NAME-default}: compose's interpolation, resolved to the default as `up` would
# with nothing set in the shell.
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")
KV_TRANSFER_CONFIG = re.compile(r"""--kv-transfer-config '(\{.*?\})'""")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def kubernetes() -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(KUBERNETES.read_text()) if document]


def interpolated(value: str) -> str:
    """``value`` as compose would pass it on with an empty shell; a reference without a default fails."""

    def default(match: re.Match[str]) -> str:
        assert match["default"] is not None, f"{match[0]}: give it a default so the file runs as it is"
        return match["default"]

    resolved = INTERPOLATION.sub(default, value)
    assert "$" not in resolved.replace("$$", ""), f"{value!r}: use ${{NAME:-default}} to interpolate"
    return resolved


def compose_environments() -> Iterator[tuple[str, dict[str, str | None]]]:
    """(service, its environment as written) for every service; a list entry ``NAME`` is a null value."""
    for name, service in compose()["services"].items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(entry.split("=", 1) if "=" in entry else (entry, None) for entry in environment)
        yield name, {key: None if value is None else str(value) for key, value in environment.items()}


def kubernetes_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for document in kubernetes():
        if document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                yield f"{document['metadata']['name']}/{container['name']}", container


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) in order, continuation lines joined and comments left out."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def dockerfile_environment(path: Path) -> dict[str, str]:
    environment: dict[str, str] = {}
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ENV":
            words = shlex.split(arguments)
            if "=" in words[0]:
                environment.update(word.split("=", 1) for word in words)
            else:  # the older `ENV NAME value` form
                environment[words[0]] = " ".join(words[1:])
    return environment


def build_contexts() -> dict[Path, Path]:
    """Each Dockerfile compose builds, with the context it is built in."""
    contexts = {}
    for service in compose()["services"].values():
        build = service.get("build")
        if build is not None:
            context = (CONTAINERS / (build if isinstance(build, str) else build["context"])).resolve()
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            contexts[(context / dockerfile).resolve()] = context
    return contexts


def setting_problems(environment: Mapping[str, str]) -> list[str]:
    """What lmcache-core would reject or ignore in ``environment``, as the connector loads it."""
    registry = load_registry(environment)
    known = known_variables(registry)
    unknown = sorted(name for name in environment if name.startswith(PREFIX) and name not in known)
    if unknown:
        return [f"{name} is not an lmcache-core setting (docs/configuration.md lists them)" for name in unknown]
    try:
        load_settings(registry, environment)
    except SettingsError as error:
        return [str(error)]
    return []


def container_port_names(deployment: dict[str, Any]) -> set[str | int]:
    ports = [port for container in deployment["spec"]["template"]["spec"]["containers"]
             for port in container.get("ports", [])]
    return {key for port in ports for key in (port.get("name"), port["containerPort"]) if key is not None}


@pytest.mark.parametrize("path", sorted(CONTAINERS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_yaml_file_parses(path: Path) -> None:
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document is not None]
    assert documents and all(isinstance(document, dict) for document in documents)


def test_compose_services_configure_valid_settings() -> None:
    problems = []
    for service, environment in compose_environments():
        resolved = {name: interpolated(value) for name, value in environment.items() if value is not None}
        problems += [f"{service}: {problem}" for problem in setting_problems(resolved)]
        problems += [
            f"{service}: {name} is read from ${{{match['name']}}}, so the shell's {name} would not reach it"
            for name, value in environment.items() if name.startswith(PREFIX)
            for match in INTERPOLATION.finditer(value or "") if match["name"] != name
        ]
        if "build" in compose()["services"][service] and "LMCACHE_TIERS" not in environment:
            problems.append(f"{service}: builds a vLLM image but sets no LMCACHE_TIERS")
    assert not problems, "\n".join(problems)


def test_kubernetes_containers_configure_valid_settings() -> None:
    problems = []
    for where, container in kubernetes_containers():
        environment = {
            variable["name"]: FROM_A_SECRET if "valueFrom" in variable else str(variable["value"])
            for variable in container.get("env", [])
        }
        problems += [f"{where}: {problem}" for problem in setting_problems(environment)]
        if container["image"].startswith("lmcache-core") and "LMCACHE_TIERS" not in environment:
            problems.append(f"{where}: runs lmcache-core but sets no LMCACHE_TIERS")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_set_only_valid_settings(path: Path) -> None:
    problems = setting_problems(dockerfile_environment(path))
    assert not problems, "\n".join(problems)


def test_no_secret_is_written_into_the_files() -> None:
    """Passwords and tokens come from the operator's shell (compose) or a Secret (Kubernetes), never inline."""
    inline = [
        f"compose.yaml {service}: {name}"
        for service, environment in compose_environments()
        for name, value in environment.items()
        if is_secret_name(name) and value is not None and not INTERPOLATION.fullmatch(value)
    ]
    inline += [
        f"kubernetes.yaml {where}: {variable['name']}"
        for where, container in kubernetes_containers()
        for variable in container.get("env", [])
        if is_secret_name(variable["name"]) and "secretKeyRef" not in variable.get("valueFrom", {})
    ]
    inline += [f"{path.name}: {name}" for path in DOCKERFILES for name in dockerfile_environment(path)
               if is_secret_name(name)]
    assert not inline, f"secrets written inline: {inline}"


def test_the_redis_url_names_the_redis_service() -> None:
    services = compose()["services"]
    for _, environment in compose_environments():
        if url := environment.get("LMCACHE_REDIS__URL"):
            assert urlsplit(interpolated(url)).hostname in services
    names = {document["metadata"]["name"] for document in kubernetes() if document["kind"] == "Service"}
    urls = [variable["value"] for _, container in kubernetes_containers() for variable in container.get("env", [])
            if variable["name"] == "LMCACHE_REDIS__URL"]
    assert urls and all(urlsplit(url).hostname in names for url in urls)


def test_kubernetes_services_select_their_deployments() -> None:
    pods = [
        (container_port_names(document), document["spec"]["template"]["metadata"]["labels"])
        for document in kubernetes() if document["kind"] == "Deployment"
    ]
    for service in (document for document in kubernetes() if document["kind"] == "Service"):
        selector = service["spec"]["selector"]
        ports = [port_names for port_names, labels in pods if selector.items() <= labels.items()]
        assert ports, f"Service {service['metadata']['name']} selects no Deployment's pods"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports[0], f"Service {service['metadata']['name']}: no port {port}"


def test_compose_builds_every_dockerfile() -> None:
    built = build_contexts()
    missing = [str(path.relative_to(ROOT)) for path in built if not path.is_file()]
    assert not missing, f"compose.yaml builds Dockerfiles that do not exist: {missing}"
    assert set(built) == {path.resolve() for path in DOCKERFILES}, "a Dockerfile that compose.yaml never builds"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_copy_files_that_exist(path: Path) -> None:
    context = build_contexts().get(path.resolve())
    assert context is not None, f"compose.yaml does not build {path.name}, so its build context is unknown"
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "COPY" and "--from" not in arguments:
            sources = [word for word in shlex.split(arguments)[:-1] if not word.startswith("--")]
            assert all((context / source).exists() for source in sources), f"COPY {arguments}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_install_lmcache_core_with_extras_that_exist_and_torch_kept(path: Path) -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = [
        command for keyword, arguments in dockerfile_instructions(path) if keyword == "RUN"
        for command in re.split(r"&&|;|\|", arguments) if "pip install" in command
    ]
    named = [set(match.split(",")) for command in installs for match in re.findall(r"\.\[([\w,-]+)\]", command)]
    assert named, "no `pip install '.[extras]'` of the copied source"
    assert all(chosen <= extras for chosen in named), f"unknown extras {named}; pyproject.toml has {sorted(extras)}"
    assert any({"redis", "s3"} <= chosen for chosen in named)
    # Without the pin, resolving the extras may replace the image's torch by another (multi-GB) build.
    assert all('"torch==$TORCH_VERSION"' in command for command in installs if re.search(r"\.\[", command))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_the_images_start_vllm_with_the_connector_as_the_docs_say(path: Path) -> None:
    documented = {json.dumps(json.loads(config)) for config in
                  KV_TRANSFER_CONFIG.findall((ROOT / "docs" / "vllm.md").read_text())}
    configured = re.search(r"KV_TRANSFER_CONFIG='(\{.*\})'", ENTRY_POINT.read_text())
    assert configured and json.dumps(json.loads(configured[1])) in documented
    instructions = dockerfile_instructions(path)
    entry_point = json.loads(next(arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"))
    copies = [shlex.split(arguments) for keyword, arguments in instructions if keyword == "COPY"]
    assert [f"containers/{ENTRY_POINT.name}", f"/usr/local/bin/{entry_point[0]}"] in copies


def compose_unavailable() -> str | None:
    """Why ``docker compose`` cannot run here, or None."""
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not on PATH"
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        said = (probe.stderr or probe.stdout).strip().splitlines()
        return f"`docker compose version` failed (no compose plugin?): {said[0] if said else probe.returncode}"
    return None


def test_docker_compose_accepts_the_file() -> None:
    reason = compose_unavailable()
    if reason is not None:
        pytest.skip(f"{reason}; `docker compose config` not run. The static checks of compose.yaml in this file ran.")
    # Every profile, so that the vLLM services are checked too, not only Redis.
    profiles = {profile for service in compose()["services"].values() for profile in service.get("profiles", [])}
    command = ["docker", "compose", "-f", str(COMPOSE), *(f"--profile={name}" for name in sorted(profiles))]
    result = subprocess.run([*command, "config", "--quiet"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
