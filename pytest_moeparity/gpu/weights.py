"""Model weights on the device: uploaded once per model per process, or streamed layer by layer.

:func:`device_weights` returns the process-wide :class:`DeviceWeights` of a model file (keyed by
backend, resolved path, size and mtime), so every engine and test on the same file shares one
upload. Quantized tensors go up as their raw GGUF bytes; 1-D tensors (norm weights) as float32;
tensors of a type without a kernel (I-quants, ...) are dequantized to float32 on the host and
uploaded as F32 (one warning per type). ``token_embd`` is never uploaded unless the output is
tied to it: the forward dequantizes only the prompt's rows on the host.

Mode: *resident* when the weights need at most :data:`RESIDENT_FRACTION` of the free device
memory (other cached models are dropped first if that makes room), else *streaming*: a layer's
tensors are uploaded when the layer runs and freed after it, and the output projection is
multiplied in row chunks.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..model import GGUFModel, QTensor
from .kernels import KERNEL_QTYPES, Backend, DeviceTensor

RESIDENT_FRACTION = 0.85
LM_HEAD_CHUNK_BYTES = 256 << 20   # streamed output projection: bytes of weights per chunk

_CACHE: dict[tuple, "DeviceWeights"] = {}
_LOCK = threading.Lock()
_WARNED: set[Q] = set()
# process-wide counters (tests read them through upload_stats())
_STATS = {"tensors": 0, "bytes": 0}


class GpuMemoryError(RuntimeError):
    """The GPU has not enough free memory for what the forward needs."""


def upload_stats() -> dict[str, int]:
    """Tensors and bytes uploaded so far in this process (all models, all backends)."""
    return dict(_STATS)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def device_nbytes(t: QTensor) -> int:
    """Bytes ``t`` takes on the device (float32 for types without a kernel and for 1-D tensors)."""
    if len(t.shape) == 1 or t.qtype not in KERNEL_QTYPES:
        return int(np.prod(t.shape, dtype=np.int64)) * 4
    return t.nbytes


def model_device_bytes(model: GGUFModel) -> int:
    """Device bytes of everything the forward uploads (token_embd only when it is the output)."""
    total = 0
    for name, t in model.tensors.items():
        if name == "token_embd.weight" and not model.config.tied_output:
            continue
        total += device_nbytes(t)
    return total


def _cache_key(model: GGUFModel, backend: Backend) -> tuple:
    p = Path(model.path).resolve()
    st = os.stat(p)
    owner = backend.weights_owner  # a backend variant (other kernel switches) shares its owner's weights
    return (owner.name, id(owner), str(p), st.st_size, st.st_mtime_ns)


class DeviceWeights:
    """Device copies of one model's tensors (see the module docstring)."""

    def __init__(self, model: GGUFModel, backend: Backend, streaming: bool):
        self.model = model
        self.backend = backend
        self.streaming = streaming
        self.tensors: dict[str, DeviceTensor] = {}
        self.vectors: dict[str, object] = {}
        self.uploads = 0
        self.bytes_uploaded = 0
        self.need_bytes = model_device_bytes(model)

    @property
    def mode(self) -> str:
        return "streaming" if self.streaming else "resident"

    # -- uploads -----------------------------------------------------------------------------
    def _count(self, nbytes: int) -> None:
        self.uploads += 1
        self.bytes_uploaded += nbytes
        _STATS["tensors"] += 1
        _STATS["bytes"] += nbytes

    def _upload(self, t: QTensor, rows: slice | None = None) -> DeviceTensor:
        be = self.backend
        raw = t.raw if rows is None else t.raw[rows]
        shape = t.shape if rows is None else (raw.shape[0], *t.shape[1:])
        if t.qtype in KERNEL_QTYPES:
            dev = be.to_device(np.ascontiguousarray(raw))
            out = DeviceTensor(t.name, t.qtype, tuple(shape), dev, t.qtype)
        else:
            if t.qtype not in _WARNED:
                _WARNED.add(t.qtype)
                warnings.warn(f"pytest-moeparity GPU: no kernel for quant type {t.qtype.name} (tensor {t.name}, "
                              "and any other of that type): dequantized to float32 on the host and uploaded once",
                              RuntimeWarning, stacklevel=3)
            vals = QTensor(t.name, t.qtype, tuple(shape), raw).dequantize(np.float32)
            dev = be.to_device(np.ascontiguousarray(vals).view(np.uint8).reshape(*shape[:-1], shape[-1] * 4))
            out = DeviceTensor(t.name, Q.F32, tuple(shape), dev, t.qtype)
        self._count(out.nbytes)
        return out

    def tensor(self, name: str) -> DeviceTensor:
        """A 2-D or 3-D weight (uploaded on first use; in streaming mode until its layer is released)."""
        dt = self.tensors.get(name)
        if dt is None:
            t = self.model.tensor(name)
            if len(t.shape) < 2:
                raise ValueError(f"{name}: 1-D tensor, use vector()")
            dt = self.tensors[name] = self._upload(t)
        return dt

    def layer(self, layer: int, name: str) -> DeviceTensor:
        return self.tensor(f"blk.{layer}.{name}.weight")

    def vector(self, name: str):
        """A 1-D weight (norms) as a float32 device array."""
        v = self.vectors.get(name)
        if v is None:
            t = self.model.tensor(name)
            vals = t.dequantize(np.float32).reshape(-1)
            v = self.vectors[name] = self.backend.to_device(vals)
            self._count(int(vals.nbytes))
        return v

    def layer_vector(self, layer: int, name: str):
        return self.vector(f"blk.{layer}.{name}.weight")

    def output_chunks(self):
        """The output projection as (row start, DeviceTensor) pieces: the whole tensor when resident,
        row chunks of about LM_HEAD_CHUNK_BYTES (uploaded one at a time, not kept) when streaming."""
        out_t = self.model.output
        if not self.streaming:
            yield 0, self.tensor(out_t.name)
            return
        V = out_t.shape[0]
        row_dev = max(1, device_nbytes(out_t) // max(V, 1))
        step = max(1, LM_HEAD_CHUNK_BYTES // row_dev)
        for r0 in range(0, V, step):
            r1 = min(V, r0 + step)
            yield r0, self._upload(out_t, slice(r0, r1))

    # -- streaming ---------------------------------------------------------------------------
    def release_layer(self, layer: int) -> None:
        """Streaming mode: drop the layer's device tensors (their memory returns to the pool)."""
        if not self.streaming:
            return
        prefix = f"blk.{layer}."
        for name in [n for n in self.tensors if n.startswith(prefix)]:
            del self.tensors[name]
        for name in [n for n in self.vectors if n.startswith(prefix)]:
            del self.vectors[name]

    def release_all(self) -> None:
        self.tensors.clear()
        self.vectors.clear()


def device_weights(model: GGUFModel, backend: Backend, *, streaming: bool | None = None) -> DeviceWeights:
    """The shared :class:`DeviceWeights` of ``model`` on ``backend`` (created on first use).

    ``streaming=None`` picks the mode from the free device memory; True/False force it (a forced
    mode different from the cached entry's creates a new entry).
    """
    key = _cache_key(model, backend)
    with _LOCK:
        dw = _CACHE.get(key)
        if dw is not None and (streaming is None or dw.streaming == streaming):
            return dw
        # an older version of the same file (other size/mtime) is stale: drop it
        for k in [k for k in _CACHE if k[:3] == key[:3] and k != key]:
            _CACHE.pop(k).release_all()
        need = model_device_bytes(model)
        if streaming is None:
            free, _ = backend.mem_info()
            if need > RESIDENT_FRACTION * free:
                # make room: drop the other models cached on this backend
                for k in [k for k in _CACHE if k[:2] == key[:2] and k != key]:
                    _CACHE.pop(k).release_all()
                backend.release_cached_memory()
                free, _ = backend.mem_info()
            streaming = need > RESIDENT_FRACTION * free
        if dw is not None:
            dw.release_all()
        dw = _CACHE[key] = DeviceWeights(model, backend, streaming)
        return dw


def clear_cache() -> None:
    """Drop every cached model's device tensors (tests; frees the memory held by the pool)."""
    with _LOCK:
        backends = {id(dw.backend): dw.backend for dw in _CACHE.values()}
        for dw in _CACHE.values():
            dw.release_all()
        _CACHE.clear()
    for be in backends.values():
        be.release_cached_memory()


def memory_error(exc: BaseException, what: str, backend: Backend, weights: DeviceWeights | None) -> GpuMemoryError:
    """A :class:`GpuMemoryError` naming what was needed and what is free."""
    try:
        free, total = backend.mem_info()
        mem = f"{_mib(free)} free of {_mib(total)}"
    except Exception as info_exc:  # the device may be in a bad state
        mem = f"free memory unknown ({info_exc})"
    need = ""
    if weights is not None:
        need = (f"; the model's weights need {_mib(weights.need_bytes)} on the device "
                f"({weights.mode} mode, {_mib(weights.bytes_uploaded)} uploaded so far)")
    return GpuMemoryError(f"GPU out of memory while {what}: {exc}{need}; {mem}. "
                          "Free GPU memory (other processes, cached models: "
                          "pytest_moeparity.gpu.clear_weight_cache()) or use a smaller model / fewer tokens.")
