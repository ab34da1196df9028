"""Payload codecs: how a chunk tensor becomes bytes and back.

A pure library: this module imports only torch and registers nothing. Which codecs a process
knows is the :class:`lmcache_core.registry.Registry`'s business (plugins register them through the
``lmcache_register_codecs`` hook; the two built-in ones below come from the ``builtin_codecs``
plugin, ``plugins/lmcache_codecs``). Encoders and decoders are handed a codec or a name lookup;
:data:`BUILTIN_CODECS` is the read-only lookup used where none is given.

- ``raw``: the tensor's bytes, zero-copy both ways.
- ``fp8``: float8 e4m3 with one float32 scale per (layer, K/V, head); halves bf16/fp16 payloads
  and quarters fp32 ones. Lossy: error is bounded by e4m3's 3-bit mantissa (~6% relative).

A lossy codec only ever sees floating-point KV of at least 16 bits: vLLM keeps quantized caches
(``--kv-cache-dtype fp8``) as uint8, and re-quantizing those bytes as if they were numbers corrupts
them. :func:`codec_accepts` is that rule; the engine applies it at start-up (falling back to
``raw``) and :class:`Fp8Codec` again on every encode and decode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Codec(Protocol):
    """A payload codec. Codecs may also set ``lossy = False`` to say that they give back every
    bit; one that does not say so is treated as lossy (see :func:`codec_accepts`)."""

    name: str

    def encode(self, tensor: torch.Tensor) -> list[memoryview]:
        """Turn a contiguous CPU tensor into payload buffers (may share its memory)."""

    def decode(self, payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Rebuild a tensor of ``dtype`` and ``shape``; raise ``ValueError`` if the payload does not fit."""


def _tensor_view(payload: memoryview, dtype: torch.dtype, count: int) -> torch.Tensor:
    if payload.readonly:  # torch.frombuffer needs a writable buffer; copy once
        payload = memoryview(bytearray(payload))
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(payload, dtype=dtype, count=count)


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B") if tensor.numel() else memoryview(b"")


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return resolved


def codec_accepts(codec: Codec, dtype: torch.dtype | str) -> bool:
    """Whether ``codec`` may encode KV of ``dtype`` without corrupting it.

    Lossless codecs take anything. Lossy ones take only floating-point KV wider than 8 bits:
    integer KV (vLLM's fp8 caches are uint8 bytes) is not a number to re-quantize, and 8-bit
    floats have nothing left to save.
    """
    if getattr(codec, "lossy", True) is False:
        return True
    resolved = _torch_dtype(dtype)
    return resolved.is_floating_point and resolved.itemsize > 1


class RawCodec:
    name = "raw"
    lossy = False

    def encode(self, tensor: torch.Tensor) -> list[memoryview]:
        return [_bytes_view(tensor.reshape(-1))]

    def decode(self, payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape)
        if payload.nbytes != count * dtype.itemsize:
            raise ValueError(f"raw payload is {payload.nbytes} bytes, expected {count * dtype.itemsize}")
        return _tensor_view(payload, dtype, count).view(shape)


class Fp8Codec:
    """e4m3 with per-(layer, K/V, head) scales. Expects the chunk layout [L, 2, T, H, D]."""

    name = "fp8"
    lossy = True
    _MAX = 448.0  # largest finite float8_e4m3fn

    def _refuse_unless_accepted(self, dtype: torch.dtype) -> None:
        if not codec_accepts(self, dtype):
            raise ValueError(
                f"the fp8 codec only encodes floating-point KV of 16 bits or more, not "
                f"{str(dtype).removeprefix('torch.')} (already-quantized KV must be stored raw)"
            )

    def encode(self, tensor: torch.Tensor) -> list[memoryview]:
        self._refuse_unless_accepted(tensor.dtype)
        if tensor.dim() != 5:
            raise ValueError("fp8 codec expects a [layers, 2, tokens, kv_heads, head_dim] tensor")
        x = tensor.float()
        amax = x.abs().amax(dim=(2, 4)).clamp_min(1e-12)  # [L, 2, H]
        scales = (amax / self._MAX).contiguous()
        quantized = (x / scales[:, :, None, :, None]).to(torch.float8_e4m3fn).contiguous()
        return [_bytes_view(scales.reshape(-1)), _bytes_view(quantized.reshape(-1))]

    def decode(self, payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        self._refuse_unless_accepted(dtype)  # written by a version that did not refuse: a miss
        if len(shape) != 5:
            raise ValueError("fp8 payload needs a 5-dimensional shape")
        layers, two, _tokens, heads, _head_dim = shape
        num_scales = layers * two * heads
        count = math.prod(shape)
        if payload.nbytes != num_scales * 4 + count:
            raise ValueError(f"fp8 payload is {payload.nbytes} bytes, expected {num_scales * 4 + count}")
        scales = _tensor_view(payload[: num_scales * 4], torch.float32, num_scales).view(layers, two, heads)
        quantized = _tensor_view(payload[num_scales * 4 :], torch.float8_e4m3fn, count).view(shape)
        return (quantized.float() * scales[:, :, None, :, None]).to(dtype)


BUILTIN_CODECS: Mapping[str, Codec] = MappingProxyType({codec.name: codec for codec in (RawCodec(), Fp8Codec())})


def get_codec(name: str, codecs: Mapping[str, Codec] = BUILTIN_CODECS) -> Codec:
    """The codec called ``name`` in ``codecs``; ``KeyError`` naming the available ones otherwise."""
    try:
        return codecs[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r}; available: {', '.join(sorted(codecs))}") from None
