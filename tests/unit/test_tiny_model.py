"""``build_tiny_model`` refuses a request it cannot honour before it builds anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_core.testing.tiny_model import build_tiny_model


@pytest.mark.parametrize(("architecture", "sliding_window", "error"), [
    ("gpt2", None, "architecture must be one of llama, mistral, gemma3"),
    ("mistral", None, "sliding_window is required for 'mistral'"),
    ("llama", 256, "refused for 'llama'"),
])
def test_a_model_it_cannot_build_is_refused_up_front(
    tmp_path: Path, architecture: str, sliding_window: int | None, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        build_tiny_model(tmp_path / "model", architecture=architecture, sliding_window=sliding_window)
    assert not (tmp_path / "model").exists()
