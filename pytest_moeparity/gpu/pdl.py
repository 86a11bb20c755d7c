"""Kernel launches with CUDA's programmatic dependent launch (PDL), through the driver's
``cuLaunchKernelEx``: CuPy's ``RawKernel`` launch has no way to pass launch attributes.

With the attribute ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` a kernel may start
while the kernel before it in the stream runs its last wave; ``kernels.cu`` makes that safe
(``mp_grid_sync``: every thread waits for its predecessors' completion and memory before it reads
what they wrote) and useful (the products prefetch their weight rows into L2 first). Stream
captures record the edge, so CUDA graphs keep it.

Used by :class:`~pytest_moeparity.gpu.kernels.CupyBackend` where the driver has
``cuLaunchKernelEx`` (CUDA 12 and later) and the GPU is sm_90 or newer (older GPUs would run
the kernels correctly but gain nothing); ``MOEPARITY_PDL=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

PDL_ENV = "MOEPARITY_PDL"
_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID
_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
            np.dtype(np.float32): ctypes.c_float}


class _LaunchAttributeValue(ctypes.Union):  # CUlaunchAttributeValue: 64 bytes; the member PDL sets
    _fields_ = [("programmaticStreamSerializationAllowed", ctypes.c_int), ("pad", ctypes.c_char * 64)]


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding to 8 bytes, the value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _LaunchAttributeValue)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


class PdlLauncher:
    """``launch(function, grid, block, stream_ptr, args)``: args are device arrays (``.data.ptr``)
    and NumPy scalars of int32, int64 or float32, as the kernels' C signatures take them."""

    def __init__(self, lib: Any):
        self._launch = lib.cuLaunchKernelEx
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(ctypes.c_void_p)]
        self._error_name = lib.cuGetErrorName
        self._error_name.restype = ctypes.c_int
        self._error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self._attr = _LaunchAttribute(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
        self._attr.value.programmaticStreamSerializationAllowed = 1

    def launch(self, function_ptr: int, grid: tuple, block: tuple, stream_ptr: int, args: tuple) -> None:
        values = []
        for a in args:
            if isinstance(a, np.generic):
                values.append(_SCALARS[a.dtype](a.item()))
            else:
                values.append(ctypes.c_void_p(int(a.data.ptr)))
        params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        cfg = _LaunchConfig(*(int(g) for g in grid), *(int(b) for b in block), 0, ctypes.c_void_p(stream_ptr or None),
                            ctypes.pointer(self._attr), 1)
        rc = self._launch(ctypes.byref(cfg), ctypes.c_void_p(function_ptr), params, None)
        if rc != 0:
            name = ctypes.c_char_p()
            self._error_name(rc, ctypes.byref(name))
            raise RuntimeError(f"cuLaunchKernelEx failed: {(name.value or b'?').decode()} ({rc})")


def pdl_launcher(compute_capability: int) -> tuple[PdlLauncher | None, str]:
    """(launcher, "") where PDL can be used, else (None, why not)."""
    if os.environ.get(PDL_ENV, "1") == "0":
        return None, f"{PDL_ENV}=0"
    if compute_capability < 90:
        return None, f"compute capability {compute_capability} < 90"
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        return PdlLauncher(lib), ""
    except (OSError, AttributeError) as exc:
        return None, f"no cuLaunchKernelEx in the driver: {exc}"
