"""One parity run: both backends under one save plan, compared cell by cell.

Plain module: the CLI's ``check``, the pytest plugin's fixtures and scripts all call
:func:`run_parity`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import Registry, default_registry
from .model import GGUFModel
from .plan import SavePlan
from .report import ParityReport, compare_traces
from .metrics import Thresholds
from .trace import Trace


def default_tokens(vocab: int, n: int = 8) -> list[int]:
    """A fixed, spread-out prompt of ``n`` token ids inside the vocabulary."""
    return [(17 + 7919 * i) % vocab for i in range(n)]


@dataclass
class ParityRun:
    report: ParityReport
    reference: Trace
    candidate: Trace
    seconds: dict[str, float] = field(default_factory=dict)
    saved: dict[str, Path] = field(default_factory=dict)


def run_trace(registry: Registry, backend: str, model: GGUFModel, tokens, plan: SavePlan) -> tuple[Trace, float]:
    engine = registry.create(backend, model)
    t0 = time.perf_counter()
    trace = engine.trace(tokens, plan)
    dt = time.perf_counter() - t0
    trace.meta.setdefault("backend", backend)
    trace.meta.setdefault("tokens", json.dumps(list(map(int, tokens))))
    trace.meta.setdefault("model", model.path.name)
    trace.meta.setdefault("model_size", str(model.file_size))
    return trace, dt


def run_parity(model: GGUFModel, tokens=None, plan: SavePlan | None = None, reference: str = "numpy",
               candidate: str | None = None, thresholds: Thresholds | None = None,
               registry: Registry | None = None, save_dir: str | os.PathLike | None = None,
               save_tag: str = "run") -> ParityRun:
    registry = registry or default_registry()
    candidate = candidate or registry.default_candidate()
    tokens = model.validate_tokens(tokens if tokens is not None else default_tokens(model.config.vocab))
    plan = plan or SavePlan.parse()
    thresholds = thresholds or Thresholds.from_contract()
    ref, t_ref = run_trace(registry, reference, model, tokens, plan)
    cand, t_cand = run_trace(registry, candidate, model, tokens, plan)
    report = compare_traces(ref, cand, thresholds)
    run = ParityRun(report, ref, cand, {reference: t_ref, candidate: t_cand})
    if save_dir is not None:
        d = Path(save_dir)
        run.saved["reference"] = ref.save(d / f"{save_tag}.reference.{reference}.safetensors")
        run.saved["candidate"] = cand.save(d / f"{save_tag}.candidate.{candidate}.safetensors")
    return run
