"""Backend registry: name -> factory of an engine that runs a traced forward.

An *engine* is any object with ``trace(tokens, plan) -> Trace`` (see :class:`Engine`). Built-ins
are registered here; other packages add theirs through the entry-point group
``moeparity.backends`` (the entry point's name is the backend name, its object a
:class:`BackendSpec` or a factory ``f(model) -> engine``), or through :meth:`Registry.register`.

The full engine protocol takes three keyword arguments, each needed only by one mode::

    trace(tokens, plan, *, faults=(), forced_routing=None, layer_inputs=None) -> Trace

``faults`` (a list of :class:`~.faults.Fault`, for ``--moe-inject``), ``forced_routing``
(``{layer: expert ids [T, K]}``, for ``--moe-forced-routing``) and ``layer_inputs``
(``{layer: x [T, H]}``: run only those layers, each from its given input; for
``--moe-isolated`` and the per-expert drill-down). An engine whose ``trace`` lacks one of them
(or that lists its modes in a ``supported_modes`` attribute without it) still runs plain
comparisons; asking it for that mode raises :class:`ModeUnsupported` naming the backend and
the mode (see :func:`call_trace`).

``trace:PATH`` names a saved trace as a backend (a safetensors file from ``moeparity trace`` /
``--moe-save-dir``, or an aprender-style dump directory, see :mod:`.aprender`).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Protocol

from .model import GGUFModel
from .plan import SavePlan
from .trace import Trace

ENTRY_POINT_GROUP = "moeparity.backends"
TRACE_PREFIX = "trace:"
MODES = ("faults", "forced_routing", "layer_inputs")
MODE_NAMES = {"faults": "fault injection (--moe-inject)", "forced_routing": "forced routing (--moe-forced-routing)",
              "layer_inputs": "isolated layers (--moe-isolated, drill-down)"}


class Engine(Protocol):
    def trace(self, tokens, plan: SavePlan, *, faults=(), forced_routing=None, layer_inputs=None) -> Trace: ...


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no GPU, package missing, ...): tests skip, the CLI says why."""


class ModeUnsupported(BackendUnavailable, ValueError):
    """The engine's ``trace`` does not take the keyword a requested mode needs."""


def supported_modes(engine) -> frozenset[str]:
    """Modes (``faults``, ``forced_routing``, ``layer_inputs``) that ``engine.trace`` accepts.

    An explicit ``engine.supported_modes`` wins; otherwise the signature of ``trace`` is read
    (a ``**kwargs`` parameter counts as accepting everything)."""
    declared = getattr(engine, "supported_modes", None)
    if declared is not None:
        return frozenset(declared)
    try:
        params = inspect.signature(engine.trace).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(MODES)
    return frozenset(m for m in MODES if m in params)


def call_trace(engine, tokens, plan: SavePlan, *, name: str | None = None, faults=(),
               forced_routing=None, layer_inputs=None) -> Trace:
    """``engine.trace`` with only the mode keywords that are in use; a clear error when the
    engine cannot take one of them."""
    kw = {}
    if faults:
        kw["faults"] = list(faults)
    if forced_routing is not None:
        kw["forced_routing"] = forced_routing
    if layer_inputs is not None:
        kw["layer_inputs"] = layer_inputs
    if kw:
        missing = [m for m in kw if m not in supported_modes(engine)]
        if missing:
            label = name or getattr(engine, "name", None) or type(engine).__name__
            raise ModeUnsupported(
                f"backend {label!r} does not support " + " or ".join(MODE_NAMES[m] for m in missing)
                + f": its trace() takes no {', '.join(repr(m) for m in missing)} keyword (the engine protocol "
                "is trace(tokens, plan, *, faults=(), forced_routing=None, layer_inputs=None))")
    return engine.trace(tokens, plan, **kw)


@dataclass
class BackendSpec:
    name: str
    factory: Callable[[GGUFModel], Engine]
    description: str = ""
    # returns None when usable here, else the reason it is not
    availability: Callable[[], str | None] = field(default=lambda: None)
    gpu: bool = False


# Dequantized weights of small models are kept per process (bisection runs a model several
# times); a model whose dequantized size exceeds this is never cached.
WEIGHT_CACHE_BYTES = int(float(os.environ.get("MOEPARITY_NUMPY_CACHE_MB", "512")) * 2**20)
_WEIGHT_CACHES: dict[tuple, dict] = {}


def _dequantized_nbytes(model: GGUFModel, itemsize: int) -> int:
    n = 0
    for t in model.tensors.values():
        size = 1
        for d in t.shape:
            size *= int(d)
        n += size * itemsize
    return n


def _cached_forward_class():
    from .faults import dispatch_type
    from .reference import NumpyForward

    class CachedNumpyForward(NumpyForward):
        """NumpyForward whose dequantized weights are shared between runs (small models only)."""

        def __init__(self, model, cache: dict | None, **kw):
            super().__init__(model, **kw)
            self._cache = cache

        def w(self, layer, name, expert=None):
            if self._cache is None:
                return super().w(layer, name, expert)
            key = (layer, name, expert, dispatch_type(self.faults, layer, name))
            hit = self._cache.get(key)
            if hit is None:
                hit = super().w(layer, name, expert)
                hit.setflags(write=False)
                self._cache[key] = hit
            return hit

    return CachedNumpyForward


class _NumpyEngine:
    """The NumPy forward as an engine; supports every mode of the protocol."""

    supported_modes = MODES

    def __init__(self, model: GGUFModel, name: str):
        from .reference import BACKENDS

        import numpy as np

        kw = BACKENDS[name]
        itemsize = np.dtype(kw.get("compute", np.float32)).itemsize
        cache = None
        if _dequantized_nbytes(model, itemsize) <= WEIGHT_CACHE_BYTES:
            st = model.path.stat()
            cache = _WEIGHT_CACHES.setdefault((str(model.path), st.st_size, st.st_mtime_ns, itemsize), {})
        self.name = name
        self.forward = _cached_forward_class()(model, cache, name=name, **kw)

    def trace(self, tokens, plan: SavePlan, *, faults=(), forced_routing=None, layer_inputs=None) -> Trace:
        from .faults import parse_faults

        if isinstance(faults, str):
            faults = parse_faults(faults)
        return self.forward.run(tokens, plan, faults=faults, forced_routing=forced_routing,
                                layer_inputs=layer_inputs).trace


class SavedTraceEngine:
    """A saved trace as the candidate (``trace:PATH``): a safetensors file or a dump directory.

    ``trace(tokens, plan)`` returns the saved tensors the plan asks for (keys outside the plan
    are left out, so they do not show as Missing); it runs nothing, so it supports no mode.
    """

    supported_modes = ()

    def __init__(self, path: str | os.PathLike, model: GGUFModel | None = None):
        self.path = Path(path).expanduser()
        self.model = model
        self.name = TRACE_PREFIX + str(path)

    def load(self, tokens=None) -> Trace:
        if self.path.is_dir():
            from .aprender import read_dump

            return read_dump(self.path, tokens=tokens, config=self.model.config if self.model else None)
        if not self.path.is_file():
            raise BackendUnavailable(f"backend {self.name!r}: no such trace file or dump directory: {self.path}")
        return Trace.load(self.path)

    def trace(self, tokens, plan: SavePlan) -> Trace:
        from .contract import parse_key

        tr = self.load(tokens)
        out = {}
        for key, val in tr.tensors.items():
            try:
                stage, layer, expert = parse_key(key)
            except ValueError:
                out[key] = val  # reported by the comparison as outside the contract
                continue
            if not _known_stage(stage):
                out[key] = val
            elif plan.wants(stage, layer) and (expert is None or not isinstance(plan.experts, tuple)
                                               or expert in plan.experts):
                out[key] = val
        tr.meta.setdefault("backend", self.name)
        tr.meta["source"] = str(self.path)
        return Trace(out, tr.meta)


def _known_stage(stage: str) -> bool:
    from .contract import stage_contract

    return stage in stage_contract().by_name


def _numpy_spec(name: str, description: str) -> BackendSpec:
    return BackendSpec(name, lambda model: _NumpyEngine(model, name), description)


def _cupy_availability() -> str | None:
    try:
        from .gpu import availability
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        return f"GPU backend not importable: {exc}"
    return availability()


def _cupy_spec(name: str, act: str) -> BackendSpec:
    def factory(model: GGUFModel):
        from .gpu import CupyEngine

        return CupyEngine(model, act_dtype=act, name=name)

    return BackendSpec(name, factory, f"CuPy CUDA forward, quantized weights on the GPU, {act} activations",
                       _cupy_availability, gpu=True)


class Registry:
    def __init__(self):
        self._specs: dict[str, BackendSpec] = {}

    def register(self, spec: BackendSpec | str, factory: Callable | None = None, **kw) -> BackendSpec:
        if isinstance(spec, str):
            if factory is None:
                raise TypeError("register(name, factory) needs a factory")
            spec = BackendSpec(spec, factory, **kw)
        self._specs[spec.name] = spec
        return spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> BackendSpec:
        if name not in self._specs and name.startswith(TRACE_PREFIX):
            path = name[len(TRACE_PREFIX):]
            if not path:
                raise KeyError(f"backend {name!r}: give a path after {TRACE_PREFIX!r} (a .safetensors trace "
                               "or a dump directory)")
            return BackendSpec(name, lambda model: SavedTraceEngine(path, model),
                               f"saved trace {path}", lambda: None if Path(path).expanduser().exists()
                               else f"no such trace file or dump directory: {path}")
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"unknown backend {name!r}; registered: {', '.join(self.names())} "
                           f"(or {TRACE_PREFIX}PATH for a saved trace)") from None

    def __contains__(self, name: str) -> bool:
        return name in self._specs or (name.startswith(TRACE_PREFIX) and len(name) > len(TRACE_PREFIX))

    def create(self, name: str, model: GGUFModel) -> Engine:
        spec = self.get(name)
        reason = spec.availability()
        if reason:
            raise BackendUnavailable(f"backend {name!r} unavailable: {reason}")
        return spec.factory(model)

    def load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()
            if isinstance(obj, BackendSpec):
                self.register(obj)
            else:
                self.register(ep.name, obj, description=f"from entry point {ep.value}")

    def default_candidate(self) -> str:
        """``cupy`` where a GPU is usable, else ``numpy-f64`` (so the flow still runs)."""
        if "cupy" in self and self.get("cupy").availability() is None:
            return "cupy"
        return "numpy-f64"


def default_registry(entry_points: bool = True) -> Registry:
    reg = Registry()
    reg.register(_numpy_spec("numpy", "NumPy reference, float32"))
    reg.register(_numpy_spec("numpy-f64", "NumPy reference, float64"))
    reg.register(_numpy_spec("numpy-f16", "NumPy, float16 activations between ops (a half-precision GPU path)"))
    reg.register(_cupy_spec("cupy", "float32"))
    reg.register(_cupy_spec("cupy-f16", "float16"))
    reg.register(_cupy_spec("cupy-bf16", "bfloat16"))
    if entry_points:
        reg.load_entry_points()
    return reg
