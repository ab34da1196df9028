"""Weights identity: equal for identical files anywhere, different when the weights differ, cheap."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from lmcache_core import model_identity
from lmcache_core.errors import SettingsError
from lmcache_core.model_identity import (
    MAX_HEADER_BYTES,
    SAMPLE_BYTES,
    SAMPLES,
    fingerprint_files,
    hub_snapshot_commit,
    weights_identity,
)
from lmcache_core.plugins import load_registry
from lmcache_core.settings import load_settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def safetensors(weights: bytes, dtype: str = "BF16") -> bytes:
    header = json.dumps({"w": {"dtype": dtype, "shape": [len(weights) // 2], "data_offsets": [0, len(weights)]}})
    encoded = header.encode()
    return struct.pack("<Q", len(encoded)) + encoded + weights


def weights(size: int = 200_000, seed: int = 0) -> bytes:
    return bytes((index * 31 + seed) % 251 for index in range(size))


def checkpoint(folder: Path, files: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if files is None:
        files = {"model-00001.safetensors": safetensors(weights()), "extra.bin": weights(9000)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_identical_copies_in_two_folders_get_the_same_id(tmp_path: Path) -> None:
    original = checkpoint(tmp_path / "machine-a" / "llama")
    copy = tmp_path / "machine-b" / "somewhere" / "else"
    shutil.copytree(original, copy)
    assert weights_identity(str(original)) == weights_identity(str(copy))
    assert weights_identity(str(original)).startswith("files:")


@pytest.mark.parametrize("which", range(SAMPLES))
def test_a_byte_changed_in_any_sample_changes_the_id(tmp_path: Path, which: int) -> None:
    data = safetensors(weights())
    original = checkpoint(tmp_path / "a", {"model.safetensors": data})
    offset = (len(data) - SAMPLE_BYTES) * which // (SAMPLES - 1) + SAMPLE_BYTES // 2
    changed = bytearray(data)
    changed[offset] ^= 0xFF
    tuned = checkpoint(tmp_path / "b", {"model.safetensors": bytes(changed)})
    assert weights_identity(str(original)) != weights_identity(str(tuned))


def test_size_header_and_names_of_files_change_the_id(tmp_path: Path) -> None:
    base = fingerprint_files(checkpoint(tmp_path / "base", {"m.safetensors": safetensors(weights())}))
    longer = checkpoint(tmp_path / "longer", {"m.safetensors": safetensors(weights()) + b"\0"})
    header = checkpoint(tmp_path / "header", {"m.safetensors": safetensors(weights(), dtype="F16")})
    renamed = checkpoint(tmp_path / "renamed", {"n.safetensors": safetensors(weights())})
    more = checkpoint(tmp_path / "more", {"m.safetensors": safetensors(weights()), "n.pt": b"x"})
    others = [fingerprint_files(folder) for folder in (longer, header, renamed, more)]
    assert len({base, *others}) == 5


def test_files_that_are_not_weights_do_not_count(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "m")
    before = fingerprint_files(folder)
    (folder / "README.md").write_text("new docs")
    (folder / "tokenizer.json").write_text("{}")
    assert fingerprint_files(folder) == before


def test_a_repointed_symlink_changes_the_id(tmp_path: Path) -> None:
    current = tmp_path / "models" / "current"
    current.parent.mkdir()
    current.symlink_to(checkpoint(tmp_path / "v1", {"m.safetensors": safetensors(weights(seed=1))}))
    before = weights_identity(str(current))
    current.unlink()
    current.symlink_to(checkpoint(tmp_path / "v2", {"m.safetensors": safetensors(weights(seed=2))}))
    assert weights_identity(str(current)) != before


def test_a_single_weight_file_is_its_own_model(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(weights(seed=1))
    (tmp_path / "b.gguf").write_bytes(weights(seed=2))
    assert weights_identity(str(tmp_path / "a.gguf")) != weights_identity(str(tmp_path / "b.gguf"))
    assert weights_identity(str(tmp_path / "a.gguf")).startswith("files:")


class CountingFile(io.RawIOBase):
    def __init__(self, handle: Any, counter: list[int]) -> None:
        self._handle, self._counter = handle, counter

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._counter[0] += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def close(self) -> None:
        self._handle.close()
        super().close()


def test_reads_a_bounded_number_of_bytes_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    header = safetensors(b"")
    for name in ("model-00001.safetensors", "model-00002.safetensors", "consolidated.pth"):
        with open(folder / name, "wb") as handle:  # 1 GiB each, sparse: nothing is written
            handle.write(header)
            handle.truncate(1 << 30)
    read = [0]
    opened: list[str] = []

    def counting_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> CountingFile:
        assert mode == "rb"
        opened.append(Path(path).name)
        return CountingFile(open(path, mode, *args, **kwargs), read)

    monkeypatch.setattr(model_identity, "open", counting_open, raising=False)
    assert fingerprint_files(folder) is not None
    assert sorted(opened) == ["consolidated.pth", "model-00001.safetensors", "model-00002.safetensors"]
    header_bytes = len(header) - 8
    assert read[0] == 2 * (8 + header_bytes) + 3 * SAMPLES * SAMPLE_BYTES
    assert read[0] <= 3 * (8 + MAX_HEADER_BYTES + SAMPLES * SAMPLE_BYTES)


def test_a_hub_snapshot_is_identified_by_its_commit(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / COMMIT
    checkpoint(snapshot)
    assert hub_snapshot_commit(snapshot) == COMMIT
    assert weights_identity(str(snapshot)) == f"hf:{COMMIT}"
    link = tmp_path / "current"
    link.symlink_to(snapshot)
    assert weights_identity(str(link)) == f"hf:{COMMIT}"
    assert hub_snapshot_commit(tmp_path) is None


def test_a_hub_id_resolves_through_the_local_cache(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    checkpoint(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert weights_identity("org/name", cache_dir=str(tmp_path)) == f"hf:{COMMIT}"
    assert weights_identity("org/missing", cache_dir=str(tmp_path)) is None


def test_the_operator_revision_wins_without_reading_anything(tmp_path: Path) -> None:
    assert weights_identity(str(tmp_path / "does-not-exist"), override="release-7") == "revision:release-7"


def test_a_folder_without_weights_has_no_identity(tmp_path: Path) -> None:
    assert weights_identity(str(checkpoint(tmp_path / "empty", {}))) is None


@pytest.mark.parametrize(("value", "expected"), [("v2", "v2"), ("3f2a9c1", "3f2a9c1"), ("", None)])
def test_the_revision_setting_accepts_one_word(value: str, expected: str | None) -> None:
    settings = load_settings(load_registry({"LMCACHE_PLUGINS__ALLOW": "codecs,cpu"}), {"LMCACHE_MODEL_REVISION": value})
    assert settings.model_revision == expected


@pytest.mark.parametrize("value", ["v 2", "v2\n"])
def test_the_revision_setting_refuses_spaces_naming_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match=r"LMCACHE_MODEL_REVISION: .*without spaces"):
        load_settings(load_registry({"LMCACHE_PLUGINS__ALLOW": "codecs,cpu"}), {"LMCACHE_MODEL_REVISION": value})


def test_an_unreadable_weight_file_gives_no_identity_instead_of_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = checkpoint(tmp_path / "m")

    def refuse(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(model_identity, "open", refuse, raising=False)
    assert weights_identity(str(folder)) is None
