"""Which weights a model runs with, as a short string that goes into every chunk key.

KV depends on the weights, not on the folder they sit in: a base model and its fine-tune share
``config.json``, a ``/models/current`` symlink gets re-pointed, a hub repo gets new weights under
``revision=None``. So the cache scope carries an identity of the weights, computed once at start-up,
equal for identical files on every machine (instances share KV through Redis, S3 and disks) and
cheap: it never reads whole weight files and never looks at mtimes.

In order of preference:

1. ``revision:<value>``: the operator's ``LMCACHE_MODEL_REVISION``, trusted as is.
2. ``hf:<commit>``: the folder is (or resolves to) a Hugging Face hub cache snapshot
   ``.../models--org--name/snapshots/<commit>/``; the commit names the files exactly.
3. ``files:<digest>``: a digest of each weight file directly in the folder (``*.safetensors``,
   ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``; or the file itself for a single-file model), over its
   name, its size, its safetensors header (tensor names, dtypes, shapes, offsets) and
   :data:`SAMPLES` fixed samples of :data:`SAMPLE_BYTES` bytes spread evenly over the file. A
   fine-tune that changes only a few tensors may escape the samples; set ``LMCACHE_MODEL_REVISION``
   for those.

``None`` when none applies (weights streamed from object storage, a hub id not in the local cache):
the caller then keys by name, config and revision only, and says so.

This module imports neither vLLM nor torch; ``huggingface_hub`` only to resolve a hub id.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLES = 16
SAMPLE_BYTES = 4096
MAX_HEADER_BYTES = 16 * 1024 * 1024  # safetensors headers of large shards are a few MB at most
_COMMIT = re.compile(r"[0-9a-f]{40}")


def weights_identity(
    model: str, *, revision: str | None = None, cache_dir: str | None = None, override: str | None = None
) -> str | None:
    """The identity of the weights of ``model`` (a local path or a hub repo id); see the module doc.

    ``revision`` and ``cache_dir`` are what the model was loaded with (vLLM's ``--revision`` and
    ``--download-dir``); they are used only to find a hub id in the local cache.
    """
    if override:
        return f"revision:{override}"
    path = Path(model).expanduser()
    if not path.exists():
        path = _hub_snapshot_path(model, revision, cache_dir)
        if path is None:
            return None
    commit = hub_snapshot_commit(path)
    if commit is not None:
        return f"hf:{commit}"
    try:
        digest = fingerprint_files(path)
    except OSError:  # an unreadable file must not stop the server: the caller reports that it cannot tell
        return None
    return f"files:{digest}" if digest is not None else None


def hub_snapshot_commit(path: Path) -> str | None:
    """The commit of the hub cache snapshot that ``path`` (symlinks resolved) lies in, if any."""
    parts = path.resolve().parts
    for index in range(2, len(parts)):
        if parts[index - 1] == "snapshots" and parts[index - 2].startswith("models--") and _COMMIT.fullmatch(
            parts[index]
        ):
            return parts[index]
    return None


def weight_files(path: Path) -> list[Path]:
    """The weight files that :func:`fingerprint_files` covers, sorted by name."""
    if path.is_file():
        return [path]
    return sorted(
        (entry for entry in path.iterdir() if entry.suffix in WEIGHT_SUFFIXES and entry.is_file()),
        key=lambda entry: entry.name,
    )


def fingerprint_files(path: Path) -> str | None:
    """A digest of the weight files at ``path`` (a folder or one file), or ``None`` if it has none.

    Reads at most ``8 + MAX_HEADER_BYTES + SAMPLES * SAMPLE_BYTES`` bytes per file.
    """
    files = weight_files(path)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(_file_fingerprint(file))
    return digest.hexdigest()[:32]


def _file_fingerprint(file: Path) -> bytes:
    size = file.stat().st_size
    digest = hashlib.sha256()
    name = file.name.encode()
    digest.update(struct.pack("<QQ", len(name), size) + name)
    with open(file, "rb") as handle:
        if file.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            digest.update(handle.read(min(header_len, MAX_HEADER_BYTES, size - 8)))
        for offset in _sample_offsets(size):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.digest()


def _sample_offsets(size: int) -> list[int]:
    """Where the samples start: spread evenly from the first byte to the last, the same for
    every file of this size (so identical files give identical samples)."""
    if size <= SAMPLES * SAMPLE_BYTES:
        return list(range(0, size, SAMPLE_BYTES))
    last = size - SAMPLE_BYTES
    return [last * index // (SAMPLES - 1) for index in range(SAMPLES)]


def _hub_snapshot_path(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The local snapshot folder of a hub repo (no network), or ``None``."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # not a hub id, or not in this cache: the caller reports that it cannot tell
        return None
    return Path(folder)
