"""The built docs site in a real headless browser (Debian's chromium): the home and configuration
pages render, a screenshot of each is saved, and every internal link of every page resolves.

The site is built as ``make docs`` builds it (``mkdocs build --strict``) and served over HTTP from a
local port, as a reader's browser gets it. Screenshots go to ``.test-artifacts/docs/`` at the
repository root (ignored by git), where a CI run can keep them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".test-artifacts" / "docs"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/install-services.sh installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed here (CI installs it: scripts/install-services.sh)")
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(folder)], cwd=ROOT,
                            capture_output=True, text=True, check=False, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def url(site: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # the base class names it `format`
        pass


def browse(url: str, *, screenshot: Path | None = None) -> str:
    """The DOM after chromium rendered ``url`` (scripts run), and a screenshot if asked."""
    command = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--window-size=1280,1600", "--virtual-time-budget=3000"]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    result = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize(("page", "expected"), [
    ("", ["lmcache-core", "Quickstart", "Configuration"]),
    ("configuration/", ["LMCACHE_CHUNK_SIZE", "LMCACHE_TIERS", "LMCache variable names"]),
], ids=["home", "configuration"])
def test_pages_render_in_a_browser(url: str, page: str, expected: list[str]) -> None:
    shot = ARTIFACTS / f"{page.strip('/') or 'home'}.png"
    dom = browse(url + page, screenshot=shot)
    for text in expected:
        assert text in dom, f"{text!r} not on the rendered page {page or '/'}"
    assert 'class="md-nav' in dom  # the theme's navigation rendered, not a bare file listing
    assert png_size(shot) == (1280, 1600) and shot.stat().st_size > 20_000  # a drawn page, not a blank one


LINK = re.compile(r'<a [^>]*href="([^"]+)"')
ANCHOR = re.compile(r'id="([^"]+)"')


def test_every_internal_link_resolves(site: Path) -> None:
    pages = {path.relative_to(site).as_posix(): path.read_text(errors="replace") for path in site.rglob("*.html")}
    anchors = {name: set(ANCHOR.findall(html)) for name, html in pages.items()}
    broken = []
    for name, html in pages.items():
        base = "/" + name
        for href in LINK.findall(html):
            if href.startswith(("http:", "https:", "mailto:", "javascript:")):
                continue
            target = urlsplit(urljoin(base, href))
            path = unquote(target.path).lstrip("/")
            if path == "" or path.endswith("/"):
                path += "index.html"
            if path not in pages:
                if not (site / path).exists():
                    broken.append(f"{name} -> {href}")
                continue
            if target.fragment and target.fragment not in anchors[path]:
                broken.append(f"{name} -> {href} (no such anchor)")
    assert len(pages) > 10
    assert not broken, broken
