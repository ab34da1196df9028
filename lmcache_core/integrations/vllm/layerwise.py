"""Layer-by-layer transfers (``LMCACHE_USE_LAYERWISE``): one step's loads and saves, one layer at a time.

vLLM calls two hooks around every attention layer of the forward pass: ``wait_for_layer_load`` before
it reads the layer's pages, ``save_kv_layer`` after it has written them. :class:`LayerwiseCopies`
moves the step's KV in those hooks instead of all layers at once around the forward pass:

- loads: the worker reads the chunks and decides what loads in ``start_load_kv`` (a failure is
  reported there, before the forward pass uses any page) and hands over ``(buffer, slots)`` pieces.
  On CUDA every layer's host-to-device copy and scatter is queued at once on a side stream, with an
  event per layer; layer ``i``'s hook makes the compute stream wait for event ``i`` only, so layer
  0 computes while later layers still arrive. On CPU layer 0 is copied at once and layer ``i``
  when its hook comes: there is no copy engine to overlap with, so the copies are the same ones,
  spread through the forward pass.
- saves: layer ``i``'s hook gathers layer ``i`` of the step's completed chunks into their buffers.
  On CUDA the gather runs on the side stream after an event recorded on the compute stream (layer
  ``i``'s KV is written), into a device staging buffer and from there into pinned host memory,
  while layer ``i + 1`` computes. :meth:`LayerwiseCopies.finish` (in ``wait_for_save``) waits for
  the last copy, so the buffers are complete when the worker hands them to the engine.

A layer whose hook vLLM never calls in a step is copied in :meth:`~LayerwiseCopies.finish`
(loads first: a saved layer may attend to loaded pages), so the pages and the chunks are always
complete at the end of a step; such layers are counted (``late``).

Each copy is :func:`.paged.copy_piece` on a one-layer list, so :mod:`lmcache_kernels`' dispatch
stays the one place that picks the Triton kernel or the torch reference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from lmcache_core.integrations.vllm.paged import Direction, PagedLayout, Piece, copy_piece

__all__ = ["LayerwiseCopies", "Piece"]


class LayerwiseCopies:
    """A step's layer-by-layer loads and saves between chunk buffers and vLLM's per-layer pages.

    ``names`` are vLLM's layer names in the order of ``layers`` (``register_kv_caches``). Per step:
    :meth:`start_loads` and/or :meth:`start_saves`, then the hooks (:meth:`wait_for_layer`,
    :meth:`save_layer`) in any number, then :meth:`finish`.
    """

    def __init__(self, names: Sequence[str], layers: Sequence[torch.Tensor], layout: PagedLayout) -> None:
        if len(names) != len(layers):
            raise ValueError(f"{len(names)} layer names for {len(layers)} layers")
        self._index = {name: index for index, name in enumerate(names)}
        self._layers = list(layers)
        self._layout = layout
        self.on_cuda = bool(layers) and layers[0].is_cuda
        self._stream = torch.cuda.Stream(device=layers[0].device) if self.on_cuda else None
        self._loads: list[Piece] = []
        self._saves: list[Piece] = []
        self._load_pending: set[int] = set()  # layers no hook has waited for (on CPU: not loaded yet)
        self._save_pending: set[int] = set()  # layers not gathered yet
        self._loaded: list[torch.cuda.Event] = []  # CUDA: one per layer, recorded on the side stream
        self._saved: torch.cuda.Event | None = None  # CUDA: after the last gather queued
        # Since reset_counters(): host seconds in load and save copies (on CPU the copies themselves,
        # on CUDA queueing them and waiting for the saves), layers handled in hooks, layers without one.
        self.load_s = self.save_s = 0.0
        self.hooked = self.late = 0

    # Loads ------------------------------------------------------------------------------------

    def start_loads(self, pieces: list[Piece]) -> None:
        """Queue every layer's copy of ``pieces`` into the pages (CUDA) or copy layer 0 (CPU)."""
        if not pieces or not self._layers:
            return
        started = time.perf_counter()
        layers = range(len(self._layers))
        self._load_pending = set(layers)
        if self._stream is None:
            self._loads = pieces
            self._copy(0, self._loads, "load")
        else:
            # After what the compute stream has queued so far (vLLM zeroes new pages there, and an
            # earlier step may still read pages that are now this request's).
            ready = torch.cuda.Event()
            ready.record()
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                device = self._layers[0]
                self._loads = [replace(piece, buffer=_pinned(piece.buffer), slots=_on_device(piece.slots, device))
                               for piece in pieces]
                self._loaded = []
                for layer in layers:
                    self._copy(layer, self._loads, "load")
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    self._loaded.append(event)
        self.load_s += time.perf_counter() - started

    def wait_for_layer(self, name: str) -> None:
        """Make layer ``name``'s loaded pages ready for what the compute stream does next."""
        layer = self._index.get(name)
        if layer is None or layer not in self._load_pending:
            return  # not ours, no loads this step, or waited for already (a drafter runs its layers again)
        self._load_pending.discard(layer)
        self.hooked += 1
        if self._stream is not None:
            torch.cuda.current_stream().wait_event(self._loaded[layer])
        elif layer:  # layer 0 was copied in start_loads
            started = time.perf_counter()
            self._copy(layer, self._loads, "load")
            self.load_s += time.perf_counter() - started

    # Saves ------------------------------------------------------------------------------------

    def start_saves(self, pieces: list[Piece]) -> None:
        """The step's chunks to fill; their buffers are pinned host memory on CUDA."""
        if not pieces or not self._layers:
            return
        if self._stream is not None:
            if not all(piece.buffer.is_cuda or piece.buffer.is_pinned() for piece in pieces):
                raise ValueError("layer-by-layer saves from a CUDA cache need pinned host buffers")
            with torch.cuda.stream(self._stream):
                pieces = [replace(piece, slots=_on_device(piece.slots, self._layers[0])) for piece in pieces]
        self._saves = pieces
        self._save_pending = set(range(len(self._layers)))

    def save_layer(self, name: str) -> None:
        """Gather layer ``name`` of the step's chunks (on CUDA: queued after its KV is written)."""
        layer = self._index.get(name)
        if layer is None or layer not in self._save_pending:
            return  # not ours, no saves this step, or already saved (a drafter runs its layers again)
        started = time.perf_counter()
        self._save_pending.discard(layer)
        self._save(layer)
        self.save_s += time.perf_counter() - started
        self.hooked += 1

    def _save(self, layer: int) -> None:
        if self._stream is None:
            self._copy(layer, self._saves, "save")
            return
        written = torch.cuda.Event()
        written.record()  # on the compute stream: the layer's KV for this step is in its pages
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(written)
            self._copy(layer, self._saves, "save")
            self._saved = torch.cuda.Event()
            self._saved.record(self._stream)

    # End of step ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Copy the layers no hook came for (loads first: a saved layer may attend to loaded pages),
        wait until the save buffers are filled, and leave the compute stream behind every load;
        then forget the step. The counters stay until :meth:`reset_counters`."""
        started = time.perf_counter()
        for layer in sorted(self._load_pending):
            if self._stream is None and layer:  # on CUDA every layer is queued; layer 0 is copied
                self._copy(layer, self._loads, "load")
            self.late += 1
        if self._loaded:  # the side stream runs them in order: the last event covers all
            torch.cuda.current_stream().wait_event(self._loaded[-1])
        loaded = time.perf_counter()
        self.load_s += loaded - started
        for layer in sorted(self._save_pending):
            self._save(layer)
            self.late += 1
        if self._saved is not None:
            self._saved.synchronize()
        self.save_s += time.perf_counter() - loaded
        self._loads, self._saves = [], []
        self._load_pending, self._save_pending = set(), set()
        self._loaded, self._saved = [], None

    def reset_counters(self) -> tuple[float, float, int, int]:
        """``(load_s, save_s, hooked, late)`` since the last call."""
        counters = (self.load_s, self.save_s, self.hooked, self.late)
        self.load_s = self.save_s = 0.0
        self.hooked = self.late = 0
        return counters

    def _copy(self, layer: int, pieces: list[Piece], direction: Direction) -> None:
        paged = self._layers[layer : layer + 1]
        for piece in pieces:
            copy_piece(paged, piece.layer(layer), self._layout, direction)


def _pinned(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer`` if its host-to-device copies can be asynchronous, else a pinned copy: a copy from
    pageable memory waits for the stream, so queueing the layers would wait for each one."""
    return buffer if buffer.is_cuda or buffer.is_pinned() else buffer.contiguous().pin_memory()


def _on_device(slots: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The slots on the cache's device, copied once per step (through pinned memory: asynchronous)."""
    return slots.pin_memory().to(like.device, non_blocking=True)
