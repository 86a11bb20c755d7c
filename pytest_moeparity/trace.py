"""Traces: named tensors captured by a forward, saved as safetensors.

A :class:`Trace` maps trace keys (``layer.6.moe_ffn_out``, ``lm_head``,
``layer.6.expert.17.moe_expert_out``; see :mod:`.contract`) to host NumPy arrays shaped
``[positions, ...]``; ``meta`` holds string metadata (tokens, positions, backend, dtype, model).
:class:`Recorder` is what a forward calls at each stage; it applies the save plan and copies
the captured values to the host at capture time (GPU buffers get reused later).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_path
from .contract import stage_contract, trace_key
from .plan import SavePlan


@dataclass
class Trace:
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def positions(self) -> list[int]:
        return json.loads(self.meta.get("positions", "[]"))

    @property
    def tokens(self) -> list[int]:
        return json.loads(self.meta.get("tokens", "[]"))

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> np.ndarray:
        return self.tensors[key]

    def keys(self):
        return self.tensors.keys()

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same directory, then rename)."""
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={str(k): str(v) for k, v in self.meta.items()})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(path), framework="numpy") as fh:
            meta = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
        return cls(tensors=tensors, meta=meta)


def _numpy_to_host(x) -> np.ndarray:
    return np.array(x, copy=True)


class Recorder:
    """Applies a save plan inside a forward.

    ``capture(stage, layer, value)`` takes the value for *all* prompt positions (leading axis T)
    and keeps the planned positions, copied to the host with ``to_host`` (CuPy: ``cupy.asnumpy``).
    Forwards call ``wants(stage, layer)`` before computing anything that exists only for tracing.
    """

    def __init__(self, plan: SavePlan, n_tokens: int, to_host: Callable = _numpy_to_host, faults=()):
        self.plan = plan
        self.faults = [f for f in faults if f.kind != "dispatch"]
        self.positions = plan.resolve_positions(n_tokens) if not plan.is_empty else []
        self._all_positions = self.positions == list(range(n_tokens))
        self.to_host = to_host
        self.tensors: dict[str, np.ndarray] = {}
        self._contract = stage_contract()

    def wants(self, stage: str, layer: int | None = None) -> bool:
        return self.plan.wants(stage, layer)

    def tap(self, stage: str, layer: int | None, value, expert: int | None = None, preselected: bool = False):
        """A stage boundary in a forward: apply planted faults, capture, return the value to go on with."""
        value = self.apply_faults(stage, layer, value, expert)
        self.capture(stage, layer, value, expert=expert, preselected=preselected)
        return value

    def apply_faults(self, stage: str, layer: int | None, value, expert: int | None = None):
        """Planted faults only (for values computed outside the captured positions)."""
        for fault in self.faults:
            if fault.matches(stage, layer, expert):
                value = fault.apply(value)
        return value

    def capture(self, stage: str, layer: int | None, value, expert: int | None = None,
                preselected: bool = False) -> None:
        """Keep ``value`` ([T, ...], or [len(positions), ...] when ``preselected``) if planned."""
        scope = self._contract.scope_of(stage)
        if (scope == "model") != (layer is None) or (scope == "expert") != (expert is not None):
            raise ValueError(f"stage {stage!r} has scope {scope!r}: captured with layer={layer}, expert={expert}")
        if not self.plan.wants(stage, layer):
            return
        sel = value if (preselected or self._all_positions) else value[self.positions]
        self.tensors[trace_key(stage, layer, expert)] = self.to_host(sel)

    def trace(self, meta: dict[str, str]) -> Trace:
        meta = dict(meta)
        meta.setdefault("positions", json.dumps(self.positions))
        meta.setdefault("plan", self.plan.describe())
        meta.setdefault("contract_version", str(self._contract.version))
        if self.faults:
            meta.setdefault("faults", ";".join(str(f) for f in self.faults))
        return Trace(tensors=dict(self.tensors), meta=meta)



# ---- comparing against a saved trace --------------------------------------------------------
def contract_keys(trace: Trace):
    """(key, value, stage, layer) for every key of ``trace``; stage and layer are None for keys
    outside the stage contract (the comparison lists those as ignored)."""
    from .contract import parse_key

    names = stage_contract().by_name
    for key, val in trace.tensors.items():
        try:
            stage, layer, _ = parse_key(key)
        except ValueError:
            stage, layer = None, None
        if stage not in names:
            stage, layer = None, None
        yield key, val, stage, (int(layer) if layer is not None else None)


def held(trace: Trace) -> tuple[set[str], set[int]]:
    """The contract stages a trace holds, and the layers it holds any layer stage at."""
    stages: set[str] = set()
    layers: set[int] = set()
    for _, _, stage, layer in contract_keys(trace):
        if stage is not None:
            stages.add(stage)
            if layer is not None:
                layers.add(layer)
    return stages, layers


def keep_planned(trace: Trace, plan) -> Trace:
    """The keys of ``trace`` that ``plan`` (a SavePlan: stages, layers) wants; keys outside the
    contract stay."""
    return Trace({k: v for k, v, stage, layer in contract_keys(trace) if stage is None or plan.wants(stage, layer)},
                 dict(trace.meta))


def narrow_to(trace: Trace, other: Trace) -> tuple[Trace, list[str], list[int]]:
    """``trace`` cut to the stages ``other`` holds, at the layers ``other`` holds (whole-model
    stages have no layer). Returns (the cut trace, the stages and the layers that were left out).

    For a saved trace or dump (which cannot be asked for more): what it does not hold is not a
    capture gap, so it is not compared at all instead of showing as Missing. Within the kept
    stages and layers a key that one side lacks still shows as Missing. Keys outside the stage
    contract are kept (the comparison lists them as ignored)."""
    stages, layers = held(other)
    out: dict[str, np.ndarray] = {}
    gone_stages: set[str] = set()
    gone_layers: set[int] = set()
    for key, val, stage, layer in contract_keys(trace):
        if stage is None:
            out[key] = val
        elif stage not in stages:
            gone_stages.add(stage)
        elif layer is not None and layer not in layers:
            gone_layers.add(layer)
        else:
            out[key] = val
    order = stage_contract().names
    return (Trace(out, dict(trace.meta)), [s for s in order if s in gone_stages], sorted(gone_layers))


def _spans(layers: list[int]) -> str:
    parts, start = [], None
    for i, L in enumerate(layers):
        if start is None:
            start = L
        if i + 1 == len(layers) or layers[i + 1] != L + 1:
            parts.append(str(start) if start == L else f"{start}-{L}")
            start = None
    return ", ".join(parts)


def narrow_note(side: str, other: str, stages: list[str], layers: list[int]) -> str | None:
    """One line saying what ``side`` holds that was not compared because ``other`` lacks it."""
    if not stages and not layers:
        return None
    what = []
    if stages:
        shown = ", ".join(stages[:12]) + (f", ... ({len(stages)} stages)" if len(stages) > 12 else "")
        what.append(f"stage(s) {shown}")
    if layers:
        what.append(f"layer(s) {_spans(layers)}")
    return f"the {side} also holds {' and '.join(what)}, not compared: the {other} does not hold them"


def narrow_to_saved(ref: Trace, cand: Trace) -> tuple[Trace, str | None]:
    """For a saved candidate (``trace:PATH``, a dump): the reference cut to what the candidate
    holds (:func:`narrow_to`), and one note line naming what was left out (None if nothing)."""
    cut, stages, layers = narrow_to(ref, cand)
    src = cand.meta.get("source") or cand.meta.get("backend") or "saved candidate"
    return cut, narrow_note("reference", f"saved candidate ({src})", stages, layers)
