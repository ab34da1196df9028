"""Separately installed packages that declare an ``lmcache_core`` entry point: a working backend
appears in ``lmcache-core info`` and serves as a tier; one that fails on import is reported by name
and skipped while everything else keeps working.

The two packages under ``examples/`` are pip-installed (no deps, no build isolation, no index) into
a temporary ``--target`` folder that subprocesses put on ``PYTHONPATH``: the same discovery path as a
real install, without a new virtual environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PACKAGES = ("lmcache-example-backend", "lmcache-broken-plugin")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(install target, copies of the sources); building from copies keeps build/ out of the repo."""
    sources = tmp_path_factory.mktemp("sources")
    for package in PACKAGES:
        shutil.copytree(EXAMPLES / package, sources / package)
    target = tmp_path_factory.mktemp("site-packages")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), *(str(sources / package) for package in PACKAGES)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(target.glob("lmcache_example_backend-*.dist-info"))
    return target, sources


def run(site: tuple[Path, Path], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    target, _ = site
    environ = {name: value for name, value in os.environ.items() if not name.startswith("LMCACHE_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**environ, **env},
                          check=False, timeout=300)


def test_info_lists_the_third_party_backend_and_the_broken_plugin(site: tuple[Path, Path]) -> None:
    result = run(site, "-m", "lmcache_core.cli", "info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["plugins"]["example"] == "loaded"
    assert info["backends"]["example"]["status"] == "available"
    assert info["backends"]["example"]["plugin"] == "example"
    assert info["plugins"]["broken"].startswith("failed: ImportError")
    assert "fails on purpose" in info["plugins"]["broken"]
    for builtin in ("cpu", "disk"):
        assert info["backends"][builtin]["status"] == "available"
    assert "'broken'" in result.stderr  # the warning names the plugin

    table = run(site, "-m", "lmcache_core.cli", "info")
    assert table.returncode == 0, table.stderr
    assert "example" in table.stdout and "broken" in table.stdout


def test_strict_mode_refuses_to_start_with_the_broken_plugin(site: tuple[Path, Path]) -> None:
    allow = "codecs,cpu,disk,example,broken"
    result = run(site, "-m", "lmcache_core.cli", "info", LMCACHE_PLUGINS__STRICT="1", LMCACHE_PLUGINS__ALLOW=allow)
    assert result.returncode != 0
    assert "'broken'" in result.stderr and "fails on purpose" in result.stderr
    denied = run(site, "-m", "lmcache_core.cli", "info", "--json", LMCACHE_PLUGINS__STRICT="1",
                 LMCACHE_PLUGINS__ALLOW=allow, LMCACHE_PLUGINS__DENY="broken")
    assert denied.returncode == 0, denied.stderr
    assert json.loads(denied.stdout)["backends"]["example"]["status"] == "available"


_ROUND_TRIP = textwrap.dedent(
    """
    import json
    import torch
    from lmcache_core import CacheEngine, KVLayout

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    tokens = list(range(1000, 1100))
    kv = torch.randn(layout.chunk_shape(100), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with CacheEngine.from_env(model_name="m", layout=layout) as engine:
        engine.store(tokens, kv)
        assert engine.flush()
        cpu, example = engine.stack.backends
        cpu.clear()  # only the third-party tier has the chunks now
        hit = engine.lookup(tokens)
        out = engine.retrieve(tokens)
        print(json.dumps({
            "tiers": [type(b).__module__ for b in engine.stack.backends],
            "hit": hit,
            "equal": out is not None and torch.equal(out.view(torch.uint8), kv[:, :, :hit].view(torch.uint8)),
            "stats": engine.stats()["example"],
        }))
    """
)


def test_the_third_party_backend_serves_as_a_tier(site: tuple[Path, Path]) -> None:
    result = run(site, "-c", _ROUND_TRIP, LMCACHE_TIERS="cpu,example", LMCACHE_CHUNK_SIZE="16",
                 LMCACHE_EXAMPLE__MAX_ENTRIES="100")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["tiers"] == ["lmcache_cpu.backend", "lmcache_example.backend"]
    assert report["hit"] == 96 and report["equal"] is True
    assert report["stats"]["hits"] == 6 and report["stats"]["entries"] == 6


def test_the_example_passes_the_conformance_suite_when_installed(site: tuple[Path, Path]) -> None:
    _, sources = site
    tests = sources / "lmcache-example-backend" / "tests"
    result = run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout
