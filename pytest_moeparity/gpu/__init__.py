"""The CuPy GPU backend: quantized-weight kernels (``kernels.cu``) and a traced forward.

Importing this package never imports CuPy; :func:`availability` and the engine import it lazily.

- :func:`availability` -> ``None`` when CuPy imports and a CUDA device is visible, else the
  reason (never raises).
- :class:`CupyEngine` ``(model, act_dtype="float32"|"float16"|"bfloat16", name=...)`` with
  ``trace(tokens, plan) -> Trace`` (see :mod:`.forward`).
- :func:`upload_stats`, :func:`clear_weight_cache`: the process-wide device weight cache.
- :class:`GpuMemoryError`: raised instead of CuPy's OutOfMemoryError, naming need and free memory.

See README.md in this folder for the design.
"""
from __future__ import annotations

from .weights import GpuMemoryError, upload_stats
from .weights import clear_cache as clear_weight_cache

__all__ = ["CupyEngine", "GpuMemoryError", "availability", "clear_weight_cache", "upload_stats"]


def availability() -> str | None:
    """``None`` when the GPU backend can run here, else why not. Never raises."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA installation raising anything
        return (f"CuPy is not importable ({type(exc).__name__}: {exc}); "
                "install pytest-moeparity[cuda12] or [cuda13]")
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return "no CUDA device visible (CUDA_VISIBLE_DEVICES?)"
    return None


def __getattr__(name: str):
    if name == "CupyEngine":
        from .forward import CupyEngine

        return CupyEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
