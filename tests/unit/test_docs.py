"""The docs cannot drift: the configuration page is generated, and the site builds strictly."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_page_is_current() -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_config
    finally:
        sys.path.pop(0)
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == gen_config.render(), "docs/configuration.md is stale: run `python docs/gen_config.py`"


def test_every_page_is_in_the_nav() -> None:
    import yaml

    def pages_of(entries: list) -> set[str]:
        found: set[str] = set()
        for entry in entries:
            for value in entry.values():
                found |= pages_of(value) if isinstance(value, list) else {value}
        return found

    listed = pages_of(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    pages = {str(path.relative_to(ROOT / "docs")) for path in (ROOT / "docs").rglob("*.md")}
    assert pages <= listed, f"pages missing from mkdocs.yml nav: {sorted(pages - listed)}"


def test_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: pip install 'lmcache-core[docs]'")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr


INCLUDE = re.compile(r"<!-- include: (?P<path>\S+) -->\n```[a-z]*\n(?P<body>.*?)^```\n", re.DOTALL | re.MULTILINE)


def test_the_plugin_tutorial_shows_the_example_package_as_it_is() -> None:
    page = (ROOT / "docs" / "plugins.md").read_text()
    included = {match["path"]: match["body"] for match in INCLUDE.finditer(page)}
    assert len(included) >= 4 and page.count("<!-- include:") == len(included), "a malformed include marker"
    stale = [path for path, body in included.items() if body != (ROOT / path).read_text()]
    assert not stale, f"docs/plugins.md differs from these files: copy them in again: {stale}"
