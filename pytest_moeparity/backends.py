"""Backend registry: name -> factory of an engine that runs a traced forward.

An *engine* is any object with ``trace(tokens, plan) -> Trace`` (see :class:`Engine`). Built-ins
are registered here; other packages add theirs through the entry-point group
``moeparity.backends`` (the entry point's name is the backend name, its object a
:class:`BackendSpec` or a factory ``f(model) -> engine``), or through :meth:`Registry.register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Protocol

from .model import GGUFModel
from .plan import SavePlan
from .trace import Trace

ENTRY_POINT_GROUP = "moeparity.backends"


class Engine(Protocol):
    def trace(self, tokens, plan: SavePlan) -> Trace: ...


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no GPU, package missing, ...): tests skip, the CLI says why."""


@dataclass
class BackendSpec:
    name: str
    factory: Callable[[GGUFModel], Engine]
    description: str = ""
    # returns None when usable here, else the reason it is not
    availability: Callable[[], str | None] = field(default=lambda: None)
    gpu: bool = False


class _NumpyEngine:
    def __init__(self, model: GGUFModel, name: str):
        from .reference import BACKENDS, NumpyForward

        self.forward = NumpyForward(model, name=name, **BACKENDS[name])

    def trace(self, tokens, plan: SavePlan) -> Trace:
        return self.forward.run(tokens, plan).trace


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
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"unknown backend {name!r}; registered: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._specs

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
