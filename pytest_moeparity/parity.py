"""One parity run: both backends under one save plan, compared cell by cell.

Plain module: the CLI's ``check``, the pytest plugin's fixtures and scripts all call
:func:`run_parity`. With ``faults`` the candidate gets planted bugs (:mod:`.faults`); with
``isolated`` / ``forced_routing`` / ``drilldown`` the report gets the bisection sections of
:mod:`.bisect` (``run.report.bisect``, rendered after the table and merged into the JSON).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import Registry, SavedTraceEngine, call_trace, default_registry
from .bisect import BisectOptions, BisectReport, restrict_trace, run_bisect, slice_positions, widen_plan
from .contract import S, parse_key, trace_key
from .model import GGUFModel
from .plan import SavePlan
from .report import ParityReport, compare_traces
from .metrics import Thresholds
from .trace import Trace, narrow_to_saved


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
    notes: list[str] = field(default_factory=list)

    @property
    def bisect(self) -> BisectReport | None:
        return getattr(self.report, "bisect", None)


def _stamp(trace: Trace, backend: str, model: GGUFModel, tokens) -> Trace:
    trace.meta.setdefault("backend", backend)
    trace.meta.setdefault("tokens", json.dumps(list(map(int, tokens))))
    trace.meta.setdefault("model", model.path.name)
    trace.meta.setdefault("model_size", str(model.file_size))
    return trace


def run_trace(registry: Registry, backend: str, model: GGUFModel, tokens, plan: SavePlan, *,
              faults=()) -> tuple[Trace, float]:
    engine = registry.create(backend, model)
    t0 = time.perf_counter()
    trace = call_trace(engine, tokens, plan, name=backend, faults=faults)
    dt = time.perf_counter() - t0
    return _stamp(trace, backend, model, tokens), dt


def align_positions(ref: Trace, cand: Trace) -> tuple[Trace, str | None]:
    """Cut the reference down to the candidate's positions when the candidate (a saved trace,
    e.g. a last-token dump) holds a strict subset of them."""
    rp, cp = ref.positions, cand.positions
    if cp and rp and cp != rp and set(cp) < set(rp):
        cut = slice_positions(ref, cp)
        # per-expert captures of experts routed only at the dropped positions go too
        for key in [k for k in cut.keys() if k not in cand]:
            stage, layer, expert = parse_key(key)
            idx = trace_key(S.moe_router_indices, layer) if layer is not None else None
            if expert is not None and idx in cut and expert not in set(np.asarray(cut[idx]).ravel().tolist()):
                del cut.tensors[key]
        return cut, (f"the candidate holds position(s) {cp} only: the reference (positions {rp[0]}..{rp[-1]}) "
                     "was cut to them")
    return ref, None


def _parse_faults(faults):
    from .faults import parse_faults

    if faults is None:
        return []
    if isinstance(faults, str):
        return parse_faults(faults)
    return list(faults)


def run_parity(model: GGUFModel, tokens=None, plan: SavePlan | None = None, reference: str = "numpy",
               candidate: str | None = None, thresholds: Thresholds | None = None,
               registry: Registry | None = None, save_dir: str | os.PathLike | None = None,
               save_tag: str = "run", *, faults=None, isolated: bool = False, forced_routing: bool = False,
               drilldown: bool = True, max_drilldown_layers: int = 4) -> ParityRun:
    """Reference vs candidate under one plan, plus the bisection sections asked for.

    ``faults``: a spec string or a list of :class:`~.faults.Fault`, planted in the candidate only.
    Raises :class:`~.backends.ModeUnsupported` before running anything when the candidate
    cannot take a requested mode (drill-down, automatic, is skipped with a note instead).
    """
    from .bisect import check_modes

    registry = registry or default_registry()
    candidate = candidate or registry.default_candidate()
    tokens = model.validate_tokens(tokens if tokens is not None else default_tokens(model.config.vocab))
    plan = plan or SavePlan.parse()
    plan.resolve_layers(model.config.n_layers)
    plan.resolve_positions(len(tokens))
    thresholds = thresholds or Thresholds.from_contract()
    faults = _parse_faults(faults)
    options = BisectOptions(isolated=isolated, forced_routing=forced_routing, drilldown=drilldown,
                            max_drilldown_layers=max_drilldown_layers)
    ref_engine = registry.create(reference, model)
    cand_engine = registry.create(candidate, model)
    check_modes(cand_engine, candidate, options, faults)

    ref_plan = widen_plan(plan) if options.any else plan
    t0 = time.perf_counter()
    ref_full = _stamp(call_trace(ref_engine, tokens, ref_plan, name=reference), reference, model, tokens)
    t_ref = time.perf_counter() - t0
    ref = ref_full
    if ref_plan != plan and ref_full.positions == list(range(len(tokens))):
        ref = restrict_trace(ref_full, plan, len(tokens))
    cand_plan = widen_plan(plan, (S.moe_router_indices,)) if options.forced_routing else plan
    t0 = time.perf_counter()
    cand_full = _stamp(call_trace(cand_engine, tokens, cand_plan, name=candidate, faults=faults),
                       candidate, model, tokens)
    t_cand = time.perf_counter() - t0
    cand = cand_full
    if cand_plan != plan and cand_full.positions == list(range(len(tokens))):
        cand = restrict_trace(cand_full, plan, len(tokens))
    if faults:
        cand.meta["injected_faults"] = ";".join(str(f) for f in faults)
    ref, note = align_positions(ref, cand)
    notes = [note] if note else []
    if isinstance(cand_engine, SavedTraceEngine):  # a dump holds what its engine saved: compare that
        ref, narrowed = narrow_to_saved(ref, cand)
        notes += [narrowed] if narrowed else []
    report = compare_traces(ref, cand, thresholds)
    run = ParityRun(report, ref, cand, {reference: t_ref, candidate: t_cand})
    run.notes.extend(notes)
    if options.any or faults or notes:
        t0 = time.perf_counter()
        bis = run_bisect(model, tokens, plan, report, ref_engine=ref_engine, cand_engine=cand_engine,
                         names=(reference, candidate), ref_full=ref_full, ref_view=ref,
                         cand_full=cand_full if options.forced_routing else None, options=options, th=thresholds,
                         faults=faults)
        bis.notes[:0] = run.notes
        report.bisect = bis
        if options.any:
            run.seconds["bisect"] = time.perf_counter() - t0
    if save_dir is not None:
        d = Path(save_dir)
        run.saved["reference"] = ref.save(d / f"{save_tag}.reference.{reference}.safetensors")
        run.saved["candidate"] = cand.save(d / f"{save_tag}.candidate.{candidate}.safetensors")
    return run
