"""Plugins are built on the public plugin API only, so copying one is a valid start for a new backend."""

from __future__ import annotations

import ast
from pathlib import Path

import lmcache_core.plugin_api as plugin_api

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_PACKAGES = [
    *sorted(path for path in (ROOT / "plugins").iterdir() if (path / "__init__.py").exists()),
    ROOT / "examples" / "lmcache-example-backend" / "lmcache_example",
]
ALLOWED = {"lmcache_core", "lmcache_core.plugin_api"}


def is_submodule(name: str) -> bool:
    package = ROOT / "lmcache_core"
    return (package / f"{name}.py").exists() or (package / name / "__init__.py").exists()


def private_imports(source: str) -> list[str]:
    """The ``lmcache_core`` modules other than the public ones that ``source`` imports, anywhere in
    it (a function-level import counts as much as a module-level one)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            modules = [node.module]
            if node.module == "lmcache_core":  # `from lmcache_core import backend` names a module
                modules += [f"lmcache_core.{alias.name}" for alias in node.names if is_submodule(alias.name)]
        else:
            continue
        found += [f"line {node.lineno}: {module}" for module in modules
                  if module.split(".")[0] == "lmcache_core" and module not in ALLOWED]
    return found


def test_the_check_catches_every_form_of_private_import() -> None:
    source = (
        "from lmcache_core.keys import ChunkKey\n"
        "import lmcache_core.serde\n"
        "from lmcache_core import backend\n"
        "def f():\n    from lmcache_core.settings import redact_url\n"
        "from lmcache_core.plugin_api import ByteLRU\n"
        "from lmcache_core import hookimpl, BackendSettings, PLUGIN_API_VERSION\n"
        "from lmcache_disk.settings import DiskSettings\n"
    )
    assert private_imports(source) == [
        "line 1: lmcache_core.keys", "line 2: lmcache_core.serde", "line 3: lmcache_core.backend",
        "line 5: lmcache_core.settings",
    ]


def test_plugins_import_only_the_public_plugin_api() -> None:
    assert len(PLUGIN_PACKAGES) >= 5, PLUGIN_PACKAGES  # cpu, disk, redis, s3 and the example
    violations = {
        str(path.relative_to(ROOT)): found
        for package in PLUGIN_PACKAGES
        for path in sorted(package.rglob("*.py"))
        if (found := private_imports(path.read_text()))
    }
    assert not violations, f"import these from lmcache_core.plugin_api instead: {violations}"


def test_every_exported_name_exists_and_the_contract_is_versioned() -> None:
    missing = [name for name in plugin_api.__all__ if not hasattr(plugin_api, name)]
    assert not missing
    assert isinstance(plugin_api.PLUGIN_API_VERSION, int)
    assert "PLUGIN_API_VERSION" in (plugin_api.__doc__ or "")
    assert "lmcache_core.testing.conformance" in (plugin_api.__doc__ or "")
