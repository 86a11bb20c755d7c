"""Bisection that explains: which layers are wrong by themselves, routing flips vs expert math,
and which expert (and which of its weights' quant types) goes wrong first.

Plain module (no pytest). :func:`pytest_moeparity.parity.run_parity` calls :func:`run_bisect`
after the main comparison and hangs the result on the report (``report.bisect``), so the text
report gets the sections after the divergence table and the JSON report gets the keys
``"isolated"``, ``"forced_routing"``, ``"drilldown"`` (and ``"injected_faults"``,
``"bisect_notes"``).

Three tools, each built on a keyword of the engine protocol
(``trace(tokens, plan, *, faults=(), forced_routing=None, layer_inputs=None)``):

* **Isolated layers** (``--moe-isolated``, ``check --isolated``): the candidate runs each
  layer from the *reference's* input to that layer (the reference's ``embedding`` for layer 0,
  its ``layer.{L-1}.post_ffn_residual`` otherwise, at every prompt position), so each layer's
  error is its own. Side by side with the normal (cascaded) run this says "layer 3: wrong by
  itself" and "layers 4-7: inherit (isolated Match)".
* **Forced routing** (``--moe-forced-routing``, ``check --forced-routing``): the candidate uses
  the reference's expert choices at every layer and position (its routing weights still come
  from its own probabilities), which separates expert-math errors from routing flips. Every
  flip of the normal run is listed with the reference's probability margin between its k-th and
  (k+1)-th expert, and whether it is a near-tie (within ``router_tie_tol``).
* **Per-expert drill-down** (on by default; ``--moe-no-drilldown``, ``check --no-drilldown``):
  when ``moe_ffn_out`` diverges at a layer, that layer is re-run alone from the reference's
  input in both backends, capturing gate/up/swiglu/out of every expert the reference chose
  there (at all positions); the report names the expert, its first bad sub-stage in forward
  order and the quant types of that expert's weights.

Fault injection (``--moe-inject SPEC``, ``check --inject SPEC``; grammar in :mod:`.faults`)
plants a known bug in the candidate only. It is the way to prove the harness on a new backend:
a planted ``scale=2@3:attn_out`` must come back as "first divergence: layer 3, attn_out,
Diverge", isolated mode must call layer 3 wrong by itself and layers 4+ inherited, and
``dispatch=q6_k@*:ffn_down_exps`` must be named by the drill-down as the first Q4_K down
projection. See ``docs/bisection.md``.

The reference is traced once with a widened plan (its stages plus ``embedding``,
``post_ffn_residual``, ``moe_router_indices`` and ``moe_router_probs`` at every layer and
position; :func:`widen_plan`) and cut back to the user's plan for the main comparison
(:func:`restrict_trace`), so the bisection needs no second reference forward.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from tabulate import tabulate

from .backends import MODE_NAMES, ModeUnsupported, call_trace, supported_modes
from .contract import S, parse_key, stage_contract, trace_key
from .metrics import Thresholds, Verdict, compare_indices, json_safe
from .plan import SavePlan
from .report import Cell, ParityReport, _worst, compare_traces
from .trace import Trace

__all__ = ["BisectOptions", "BisectReport", "widen_plan", "restrict_trace", "slice_positions", "run_bisect",
           "AUX_STAGES"]

# what the reference must capture at every layer and position for the bisection
AUX_STAGES = (S.embedding, S.post_ffn_residual, S.moe_router_indices, S.moe_router_probs)
EXPERT_STAGES = (S.moe_expert_gate, S.moe_expert_up, S.moe_expert_swiglu, S.moe_expert_out)
ROUTER_STAGES = (S.moe_router_logits, S.moe_router_probs, S.moe_router, S.moe_router_indices)
WEIGHTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_SUBSTAGE_WEIGHT = {S.moe_expert_gate: "ffn_gate_exps", S.moe_expert_up: "ffn_up_exps",
                    S.moe_expert_out: "ffn_down_exps"}
MAX_FLIPS_SHOWN = 12


@dataclass(frozen=True)
class BisectOptions:
    isolated: bool = False
    forced_routing: bool = False
    drilldown: bool = True
    max_drilldown_layers: int = 4

    @property
    def any(self) -> bool:
        return self.isolated or self.forced_routing or self.drilldown


# ---- plans and traces ---------------------------------------------------------------------
def widen_plan(plan: SavePlan, aux: Iterable[str] = AUX_STAGES) -> SavePlan:
    """The plan plus ``aux`` stages, at every layer and every position (same expert spec)."""
    wanted = set(plan.stages) | set(aux)
    stages = tuple(n for n in stage_contract().names if n in wanted)
    return SavePlan(stages=stages, layers=None, positions="all", experts=plan.experts)


def _rows_for(trace: Trace, positions: list[int]) -> list[int]:
    have = trace.positions
    missing = [p for p in positions if p not in have]
    if missing:
        raise ValueError(f"trace holds positions {have}, not {missing}")
    return [have.index(p) for p in positions]


def restrict_trace(trace: Trace, plan: SavePlan, n_tokens: int) -> Trace:
    """What ``plan`` alone would have captured, cut out of a trace taken under a wider plan
    (:func:`widen_plan`): the plan's stages, layers and positions; with ``experts=routed`` only
    the experts this trace's own router chose at the plan's positions."""
    positions = plan.resolve_positions(n_tokens)
    rows = _rows_for(trace, positions)
    identity = rows == list(range(len(trace.positions)))
    routed_cache: dict[int, set[int]] = {}

    def routed(layer: int) -> set[int] | None:
        if layer not in routed_cache:
            key = trace_key(S.moe_router_indices, layer)
            routed_cache[layer] = (set(np.unique(np.asarray(trace[key])[rows]).astype(int).tolist())
                                   if key in trace else None)
        return routed_cache[layer]

    out = {}
    for key, val in trace.tensors.items():
        try:
            stage, layer, expert = parse_key(key)
        except ValueError:
            continue
        if not plan.wants(stage, layer):
            continue
        if expert is not None:
            if plan.experts == "routed":
                r = routed(layer)
                if r is not None and expert not in r:
                    continue
            elif isinstance(plan.experts, tuple) and expert not in plan.experts:
                continue
        out[key] = val if identity else np.asarray(val)[rows]
    meta = dict(trace.meta, positions=json.dumps(positions), plan=plan.describe())
    return Trace(out, meta)


def slice_positions(trace: Trace, positions: list[int]) -> Trace:
    """The rows of ``trace`` at the given token positions (every key is ``[positions, ...]``)."""
    rows = _rows_for(trace, positions)
    return Trace({k: np.asarray(v)[rows] for k, v in trace.tensors.items()},
                 dict(trace.meta, positions=json.dumps(list(positions))))


def _has_all_positions(trace: Trace, n_tokens: int) -> bool:
    return trace.positions == list(range(n_tokens))


def layer_input(ref_full: Trace, layer: int) -> np.ndarray:
    """The reference's input to ``layer`` at every position (``[T, H]``)."""
    key = S.embedding if layer == 0 else trace_key(S.post_ffn_residual, layer - 1)
    if key not in ref_full:
        raise KeyError(f"the reference trace has no {key!r} (needed as layer {layer}'s input)")
    return np.asarray(ref_full[key])


# ---- per-layer summaries ------------------------------------------------------------------
def _cells_of_layer(report: ParityReport, layer: int, stages=None, exclude=()) -> list[Cell]:
    return [c for c in report.cells if c.layer == layer and (stages is None or c.stage in stages)
            and c.stage not in exclude]


@dataclass
class LayerVerdict:
    verdict: str | None  # worst verdict of the layer's cells; None when nothing was compared
    stage: str | None    # the first non-Match stage in forward order (None when all Match)
    expert: int | None = None

    @classmethod
    def of(cls, cells: list[Cell]) -> "LayerVerdict":
        if not cells:
            return cls(None, None)
        worst = _worst(cells)
        bad = [c for c in cells if c.verdict is not Verdict.Match]
        if not bad:
            return cls(Verdict.Match.value, None)
        pos = min(c.forward_pos for c in bad)
        first = _worst(c for c in bad if c.forward_pos == pos)
        return cls(worst.verdict.value, first.stage, first.expert)

    @property
    def ok(self) -> bool:
        return self.verdict in (None, Verdict.Match.value)

    def text(self) -> str:
        if self.verdict is None:
            return "-"
        if self.stage is None:
            return self.verdict
        e = "" if self.expert is None else f" e{self.expert}"
        return f"{self.verdict} ({self.stage}{e})"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "stage": self.stage, "expert": self.expert}


def _ranges(layers: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for n in layers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [(a, b) for a, b in out]


def _span(a: int, b: int) -> str:
    return f"layer {a}" if a == b else f"layers {a}-{b}"


# ---- isolated -----------------------------------------------------------------------------
@dataclass
class IsolatedSection:
    rows: list[dict]          # layer, cascaded, isolated, status
    summary: list[str]
    report: ParityReport | None = None
    note: str | None = None

    def own_layers(self) -> list[int]:
        return [r["layer"] for r in self.rows if r["status"] == "own"]

    def inherited_layers(self) -> list[int]:
        return [r["layer"] for r in self.rows if r["status"] == "inherited"]

    def render(self) -> str:
        lines = ["Isolated layers (the candidate runs each layer from the reference's input to it):"]
        if self.note:
            lines.append("  " + self.note)
        if self.rows:
            label = {"own": "wrong by itself", "inherited": "inherits", "ok": ""}
            body = [[r["layer"], r["cascaded"].text(), r["isolated"].text(), label[r["status"]]] for r in self.rows]
            lines.append(tabulate(body, headers=["layer", "cascaded", "isolated", ""], tablefmt="github",
                                  disable_numparse=True))
        lines.extend("  " + s for s in self.summary)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"layers": [{"layer": r["layer"], "cascaded": r["cascaded"].to_dict(),
                            "isolated": r["isolated"].to_dict(), "status": r["status"]} for r in self.rows],
                "own_layers": self.own_layers(), "inherited_layers": self.inherited_layers(),
                "summary": self.summary, "note": self.note,
                "first_divergence": (self.report.to_json()["first_divergence"] if self.report else None)}


def _isolated_summary(rows: list[dict]) -> list[str]:
    out = []
    own = [r for r in rows if r["status"] == "own"]
    inherited = [r["layer"] for r in rows if r["status"] == "inherited"]
    runs: list[tuple[int, int]] = _ranges(inherited)
    items = [(r["layer"], r) for r in own] + [(a, (a, b)) for a, b in runs]
    for _, item in sorted(items, key=lambda t: t[0]):
        if isinstance(item, dict):
            iso = item["isolated"]
            out.append(f"layer {item['layer']}: wrong by itself (isolated {iso.verdict} at {iso.stage}"
                       + (f" expert {iso.expert}" if iso.expert is not None else "") + ")")
        else:
            a, b = item
            out.append(f"{_span(a, b)}: inherit{'s' if a == b else ''} (isolated Match)")
    if not own and not inherited:
        out.append("every layer matches, cascaded and isolated")
    elif not own:
        out.append("no layer is wrong by itself: the divergence enters before the first compared layer "
                   "or outside the layers (embedding / head)")
    return out


def run_isolated(cand_engine, cand_name: str, tokens, plan: SavePlan, ref_full: Trace, ref_view: Trace,
                 main: ParityReport, th: Thresholds, faults, n_layers: int) -> IsolatedSection:
    contract = stage_contract()
    stages = tuple(s for s in plan.stages if contract.scope_of(s) != "model")
    if not stages:
        return IsolatedSection([], [], None, "not run: the save plan has no per-layer stage")
    layers = plan.resolve_layers(n_layers)
    inputs = {L: layer_input(ref_full, L) for L in layers}
    iso_plan = SavePlan(stages=stages, layers=plan.layers, positions=plan.positions, experts=plan.experts)
    cand_iso = call_trace(cand_engine, tokens, iso_plan, name=cand_name, faults=faults, layer_inputs=inputs)
    ref_layers = Trace({k: v for k, v in ref_view.tensors.items()
                        if contract.scope_of(parse_key(k)[0]) != "model"}, ref_view.meta)
    iso = compare_traces(ref_layers, cand_iso, th)
    rows = []
    for L in layers:
        casc = LayerVerdict.of(_cells_of_layer(main, L))
        isol = LayerVerdict.of(_cells_of_layer(iso, L))
        status = "own" if not isol.ok else ("inherited" if not casc.ok else "ok")
        rows.append({"layer": L, "cascaded": casc, "isolated": isol, "status": status})
    return IsolatedSection(rows, _isolated_summary(rows), iso)


# ---- forced routing -----------------------------------------------------------------------
@dataclass
class ForcedSection:
    rows: list[dict]
    flips: list[dict]
    summary: list[str]
    report: ParityReport | None = None
    note: str | None = None
    n_flips: int = 0
    n_ties: int = 0

    def render(self) -> str:
        lines = ["Forced routing (the candidate uses the reference's expert choices at every layer and position):"]
        if self.note:
            lines.append("  " + self.note)
        if self.rows:
            body = [[r["layer"], r["normal"].text(), _flip_text(r), r["forced_router"].text(), r["forced_rest"].text()]
                    for r in self.rows]
            lines.append(tabulate(body, headers=["layer", "normal run", "flips (all positions)", "forced: router",
                                                 "forced: experts and rest"], tablefmt="github", disable_numparse=True))
        if self.flips:
            lines.append(f"  routing flips of the normal run ({self.n_flips}, {self.n_ties} near-tie):")
            for f in self.flips[:MAX_FLIPS_SHOWN]:
                lines.append("    " + _describe_flip(f))
            if len(self.flips) > MAX_FLIPS_SHOWN:
                lines.append(f"    ... {len(self.flips) - MAX_FLIPS_SHOWN} more in the JSON report")
        lines.extend("  " + s for s in self.summary)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"layers": [{"layer": r["layer"], "normal": r["normal"].to_dict(), "flips": r["flips"],
                            "ties": r["ties"], "forced_router": r["forced_router"].to_dict(),
                            "forced_rest": r["forced_rest"].to_dict()} for r in self.rows],
                "flips": json_safe(self.flips), "n_flips": self.n_flips, "n_ties": self.n_ties,
                "summary": self.summary, "note": self.note,
                "first_divergence": (self.report.to_json()["first_divergence"] if self.report else None)}


def _flip_text(r: dict) -> str:
    if not r["flips"]:
        return "0"
    return f"{r['flips']}" + (f" ({r['ties']} tie)" if r["ties"] else "")


def _fmt_margin(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _describe_flip(f: dict) -> str:
    return (f"layer {f['layer']} position {f['position']}: reference-only {f['ref_only']}, candidate-only "
            f"{f['cand_only']}; reference margin p_k - p_k+1 = {_fmt_margin(f['margin'])}, swapped experts "
            f"within {_fmt_margin(f['swap_margin'])} of p_k" + (" -> near-tie (not a bug)" if f["tie"] else ""))


def routing_flips(ref_full: Trace, cand_full: Trace, th: Thresholds, n_layers: int) -> list[dict]:
    """Every (layer, position) where the two runs choose different expert sets."""
    out = []
    for L in range(n_layers):
        rk, pk = trace_key(S.moe_router_indices, L), trace_key(S.moe_router_probs, L)
        if rk not in ref_full or rk not in cand_full:
            continue
        ref_idx, cand_idx = np.asarray(ref_full[rk]), np.asarray(cand_full[rk])
        probs = np.asarray(ref_full[pk], dtype=np.float64) if pk in ref_full else None
        res = compare_indices(ref_idx, cand_idx, th, ref_probs=probs, positions=list(range(ref_idx.shape[0])))
        k = ref_idx.shape[-1]
        for f in res.metrics.get("flips", []):
            margin = None
            if probs is not None and probs.shape[-1] > k:
                p = np.sort(probs[f["position"]])[::-1]
                margin = float(p[k - 1] - p[k])
            out.append({"layer": L, "position": f["position"], "ref_only": f["ref_only"],
                        "cand_only": f["cand_only"], "margin": margin, "swap_margin": f["margin"],
                        "tie": bool(f["tie"])})
    return out


def run_forced(cand_engine, cand_name: str, tokens, plan: SavePlan, ref_full: Trace, ref_view: Trace,
               cand_full: Trace | None, main: ParityReport, th: Thresholds, faults, n_layers: int) -> ForcedSection:
    forced = {}
    for L in range(n_layers):
        key = trace_key(S.moe_router_indices, L)
        if key not in ref_full:
            raise KeyError(f"the reference trace has no {key!r} at every position (needed for forced routing)")
        forced[L] = np.asarray(ref_full[key]).astype(np.int64)
    cand_forced = call_trace(cand_engine, tokens, plan, name=cand_name, faults=faults, forced_routing=forced)
    rep = compare_traces(ref_view, cand_forced, th)
    n_tokens = len(tokens)
    usable = cand_full is not None and _has_all_positions(cand_full, n_tokens) and all(
        trace_key(S.moe_router_indices, L) in cand_full for L in range(n_layers))
    flips = routing_flips(ref_full, cand_full, th, n_layers) if usable else []
    note = None if usable else "the normal run's routing at every position is unknown: flips not listed"
    rows = []
    for L in plan.resolve_layers(n_layers):
        lf = [f for f in flips if f["layer"] == L]
        rows.append({"layer": L, "normal": LayerVerdict.of(_cells_of_layer(main, L)), "flips": len(lf),
                     "ties": sum(f["tie"] for f in lf),
                     "forced_router": LayerVerdict.of(_cells_of_layer(rep, L, stages=ROUTER_STAGES)),
                     "forced_rest": LayerVerdict.of(_cells_of_layer(rep, L, exclude=ROUTER_STAGES)),
                     "forced_all": LayerVerdict.of(_cells_of_layer(rep, L))})
    n_ties = sum(f["tie"] for f in flips)
    summary = _forced_summary(rows, flips, rep, th)
    return ForcedSection(rows, flips, summary, rep, note, len(flips), n_ties)


def _forced_summary(rows: list[dict], flips: list[dict], rep: ParityReport, th: Thresholds) -> list[str]:
    out = []
    rest_bad = [r for r in rows if not r["forced_rest"].ok]
    # the router itself differs when the first layer that differs under forced routing differs
    # first in its router stages (later layers' routers only see a different input)
    first_bad = next((r for r in rows if not r["forced_all"].ok), None)
    router_bad = [first_bad["layer"]] if first_bad and first_bad["forced_all"].stage in ROUTER_STAGES else []
    model_bad = [c for c in rep.cells if c.layer is None and c.verdict is not Verdict.Match]
    if rest_bad:
        r = rest_bad[0]
        out.append(f"with the reference's expert choices layer {r['layer']} still diverges at "
                   f"{r['forced_rest'].stage} ({r['forced_rest'].verdict}): an arithmetic error "
                   "(or one upstream of it), not a routing flip")
        later = [f for f in flips if f["layer"] >= r["layer"]]
        if later:
            out.append(f"{len(later)} routing flip(s) of the normal run at layer {r['layer']} or later follow "
                       "from that error")
    elif model_bad and not flips:
        out.append(f"with the reference's expert choices every layer matches; {model_bad[0].stage} "
                   f"still diverges ({model_bad[0].verdict.value})")
    elif flips:
        first_layer = flips[0]["layer"]
        at_first = [f for f in flips if f["layer"] == first_layer]
        later = [f for f in flips if f["layer"] > first_layer]
        f = at_first[0]
        tail = (f"; the {len(later)} flip(s) at later layers follow from it (their input already differs)"
                if later else "")
        if all(x["tie"] for x in at_first):
            out.append(f"the normal run first departs from the reference at a near-tie routing flip (layer "
                       f"{first_layer} position {f['position']}: reference margin p_k - p_k+1 = "
                       f"{_fmt_margin(f['margin'])}, within router_tie_tol={th.router_tie_tol:g}) and with the "
                       "reference's choices every layer matches: a near-tie flip, not a bug" + tail)
        else:
            f = next(x for x in at_first if not x["tie"])
            out.append(f"with the reference's expert choices the experts and everything after them match: the "
                       f"normal run's divergence starts with a routing flip beyond near-ties at layer {first_layer} "
                       f"position {f['position']} (reference margin {_fmt_margin(f['margin'])})" + tail)
    else:
        out.append("no routing flip in the normal run" + ("" if rest_bad else
                                                          " and the forced run matches every layer"))
    if router_bad:
        out.append(f"the router itself differs at layer {router_bad[0]} ({first_bad['forced_all'].stage} "
                   f"{first_bad['forced_all'].verdict}) while everything before it matches: check the router "
                   "(ffn_gate_inp matvec, softmax, top-k) there")
    return out


# ---- per-expert drill-down ----------------------------------------------------------------
@dataclass
class Drill:
    layer: int
    experts_checked: list[int]
    expert: int | None
    stage: str | None
    verdict: str | None
    metrics: dict
    quant_types: dict[str, str]
    bad_experts: list[dict]
    router: str | None
    moe_ffn_out: str | None
    message: str
    injected: list[str] = field(default_factory=list)
    upstream_stage: str | None = None  # first bad stage of the lone layer before router and experts

    def to_json(self) -> dict:
        return json_safe({"layer": self.layer, "experts_checked": self.experts_checked, "expert": self.expert,
                          "upstream_stage": self.upstream_stage,
                          "stage": self.stage, "verdict": self.verdict, "metrics": self.metrics,
                          "quant_types": self.quant_types, "bad_experts": self.bad_experts,
                          "router": self.router, "moe_ffn_out": self.moe_ffn_out, "message": self.message,
                          "injected": self.injected})


_SUBSTAGE_HINT = {
    S.moe_expert_gate: "the gate matvec: check the kernel dispatched for ffn_gate_exps's type",
    S.moe_expert_up: "the up matvec: check the kernel dispatched for ffn_up_exps's type",
    S.moe_expert_swiglu: "the SwiGLU (silu(gate) * up) itself, as gate and up match",
    S.moe_expert_out: "the down matvec: check the kernel dispatched for ffn_down_exps's type",
}


def drill_layer(model, ref_engine, cand_engine, names: tuple[str, str], tokens, ref_full: Trace, layer: int,
                th: Thresholds, faults, main_ties: int = 0) -> Drill:
    """Re-run ``layer`` alone from the reference's input, capturing every chosen expert's sub-stages.
    ``main_ties``: near-tie router flips the full run recorded at this layer (its router cell "ties=N")."""
    ids = sorted(set(np.unique(np.asarray(ref_full[trace_key(S.moe_router_indices, layer)])).astype(int).tolist()))
    x = layer_input(ref_full, layer)
    contract = stage_contract()
    upto = contract.by_name[S.moe_ffn_out].order
    plan = SavePlan(stages=tuple(s.name for s in contract.stages if s.scope != "model" and s.order <= upto),
                    layers=((layer, layer + 1),), positions="all", experts=tuple(ids))
    ref_d = call_trace(ref_engine, tokens, plan, name=names[0], layer_inputs={layer: x})
    cand_d = call_trace(cand_engine, tokens, plan, name=names[1], faults=faults, layer_inputs={layer: x})
    rep = compare_traces(ref_d, cand_d, th)
    quant = {w: model.layer(layer, w).type_name for w in WEIGHTS}
    from .faults import dispatch_type

    injected = [f"{w}: read as {dispatch_type(list(faults), layer, w)}" for w in WEIGHTS
                if dispatch_type(list(faults), layer, w) not in (None, quant[w])]
    order = {s: i for i, s in enumerate(EXPERT_STAGES)}
    bad = []
    for e in ids:
        cells = sorted((c for c in rep.cells if c.layer == layer and c.expert == e and c.stage in order),
                       key=lambda c: order[c.stage])
        first = next((c for c in cells if c.verdict is not Verdict.Match), None)
        if first is not None:
            bad.append(first)
    router = LayerVerdict.of([c for c in rep.cells if c.stage in ROUTER_STAGES])
    ffn = LayerVerdict.of([c for c in rep.cells if c.stage == S.moe_ffn_out])
    before = LayerVerdict.of([c for c in rep.cells if c.stage not in ROUTER_STAGES and c.stage not in order
                              and c.stage != S.moe_ffn_out])
    upstream = (f"layer {layer} run alone first differs at {before.stage} ({before.verdict}), before the router "
                "and the experts, so their input differs too: look there first; ") if not before.ok else ""
    bad_list = [{"expert": c.expert, "stage": c.stage, "verdict": c.verdict.value,
                 "cosine": c.result.metrics.get("cosine"), "rel_l2": c.result.metrics.get("rel_l2")} for c in bad]
    types = f"ffn_gate_exps {quant['ffn_gate_exps']}, ffn_up_exps {quant['ffn_up_exps']}, ffn_down_exps {quant['ffn_down_exps']}"
    if upstream:
        first_up = next(c for c in rep.cells if c.stage == before.stage and c.verdict is not Verdict.Match)
        msg = (upstream + f"{len(bad)} of {len(ids)} experts the reference chose differ as a consequence. Weights "
               f"of layer {layer}: {types}")
        return Drill(layer, ids, None, before.stage, before.verdict, json_safe(first_up.result.metrics), quant,
                     bad_list, router.verdict, ffn.verdict, msg, injected, before.stage)
    if bad:
        earliest = min(order[c.stage] for c in bad)
        pick = _worst(c for c in bad if order[c.stage] == earliest)
        m = pick.result.metrics
        weight = _SUBSTAGE_WEIGHT.get(pick.stage)
        detail = [f"cosine {m['cosine']:.4g}" if isinstance(m.get("cosine"), float) else None,
                  f"rel_l2 {m['rel_l2']:.3g}" if isinstance(m.get("rel_l2"), float) else None]
        detail = ", ".join(d for d in detail if d)
        msg = (f"layer {layer}: expert {pick.expert} first differs at {pick.stage} ({pick.verdict.value}"
               + (f", {detail}" if detail else "") + f"); {len(bad)} of {len(ids)} experts the reference chose differ. "
               f"Weights of layer {layer}: {types}"
               + (f"; the suspect is {weight} ({quant[weight]})" if weight else "")
               + f". Look at {_SUBSTAGE_HINT[pick.stage]}")
        if injected:
            msg += f" [injected: {'; '.join(injected)}]"
        return Drill(layer, ids, pick.expert, pick.stage, pick.verdict.value, json_safe(m), quant, bad_list,
                     router.verdict, ffn.verdict, msg, injected, before.stage)
    idx_cell = next((c for c in rep.cells if c.stage == S.moe_router_indices), None)
    ties = int(idx_cell.result.metrics.get("tie_positions") or 0) if idx_cell is not None else 0
    if not ffn.ok and ties and router.ok:
        msg = (f"layer {layer}: in isolation all {len(ids)} experts the reference chose match; the router differs "
               f"only by {ties} near-tie flip(s), so moe_ffn_out ({ffn.verdict}) sums a different expert there: "
               "a near-tie routing flip, not a bug")
    elif not ffn.ok and not router.ok:
        msg = (f"layer {layer}: in isolation all {len(ids)} experts the reference chose match, but the router "
               f"differs ({router.text()}): the moe_ffn_out divergence comes from routing")
    elif not ffn.ok:
        msg = (f"layer {layer}: in isolation all {len(ids)} experts and the router match but moe_ffn_out is "
               f"{ffn.verdict}: check the weighted sum of the experts (routing weights, accumulation)")
    elif main_ties:
        msg = (f"layer {layer}: run alone from the reference's input, the experts, the router and moe_ffn_out "
               f"all match; in the full run the router of layer {layer} flips {main_ties} near-tied expert(s) "
               f"(ties={main_ties} Match), so moe_ffn_out sums a different expert: the divergence follows a "
               "near-tie routing flip (tiny upstream differences), not a bug of the expert math")
    else:
        msg = (f"layer {layer}: run alone from the reference's input, the experts, the router and moe_ffn_out "
               "all match: its moe_ffn_out divergence is inherited from earlier layers")
    return Drill(layer, ids, None, None, None, {}, quant, [], router.verdict, ffn.verdict, msg, injected,
                 before.stage)


# ---- the whole bisection ------------------------------------------------------------------
@dataclass
class BisectReport:
    options: BisectOptions
    faults: list[str] = field(default_factory=list)
    isolated: IsolatedSection | None = None
    forced: ForcedSection | None = None
    drilldown: list[Drill] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.faults or self.isolated or self.forced or self.drilldown or self.notes)

    def render(self) -> str:
        parts = []
        if self.faults:
            parts.append("Injected into the candidate: " + "; ".join(self.faults))
        if self.isolated is not None:
            parts.append(self.isolated.render())
        if self.forced is not None:
            parts.append(self.forced.render())
        if self.drilldown:
            parts.append("Per-expert drill-down (the layer re-run alone from the reference's input, experts the "
                         "reference chose, all positions):\n" + "\n".join("  " + d.message for d in self.drilldown))
        if self.notes:
            parts.append("\n".join("note: " + n for n in self.notes))
        return "\n\n".join(parts)

    def to_json(self) -> dict:
        return {"isolated": self.isolated.to_json() if self.isolated else None,
                "forced_routing": self.forced.to_json() if self.forced else None,
                "drilldown": [d.to_json() for d in self.drilldown],
                "injected_faults": list(self.faults),
                "bisect_notes": list(self.notes)}


def check_modes(engine, name: str, options: BisectOptions, faults) -> None:
    """Fail before any forward when the candidate cannot do an explicitly requested mode."""
    modes = supported_modes(engine)
    asked = []
    if faults:
        asked.append("faults")
    if options.forced_routing:
        asked.append("forced_routing")
    if options.isolated:
        asked.append("layer_inputs")
    missing = [m for m in asked if m not in modes]
    if missing:
        raise ModeUnsupported(f"backend {name!r} does not support "
                              + " or ".join(MODE_NAMES[m] for m in missing)
                              + f": its trace() takes no {', '.join(repr(m) for m in missing)} keyword (the engine "
                              "protocol is trace(tokens, plan, *, faults=(), forced_routing=None, layer_inputs=None))")


def drill_layers(main: ParityReport, isolated: IsolatedSection | None, limit: int) -> list[int]:
    bad = sorted({c.layer for c in main.cells if c.stage == S.moe_ffn_out and c.verdict is not Verdict.Match})
    layers = bad[:1]
    if isolated is not None and isolated.report is not None:
        layers += [c.layer for c in isolated.report.cells
                   if c.stage == S.moe_ffn_out and c.verdict is not Verdict.Match]
    return sorted(set(layers))[:limit]


def run_bisect(model, tokens, plan: SavePlan, main: ParityReport, *, ref_engine, cand_engine,
               names: tuple[str, str], ref_full: Trace, ref_view: Trace, cand_full: Trace | None,
               options: BisectOptions, th: Thresholds, faults=()) -> BisectReport:
    """The bisection sections for a finished main comparison (see the module docstring)."""
    n_layers, n_tokens = model.config.n_layers, len(tokens)
    out = BisectReport(options, [str(f) for f in faults])
    have_inputs = _has_all_positions(ref_full, n_tokens) and all(
        (S.embedding if L == 0 else trace_key(S.post_ffn_residual, L - 1)) in ref_full for L in range(n_layers))
    have_routing = _has_all_positions(ref_full, n_tokens) and all(
        trace_key(S.moe_router_indices, L) in ref_full for L in range(n_layers))
    if options.isolated:
        if have_inputs:
            out.isolated = run_isolated(cand_engine, names[1], tokens, plan, ref_full, ref_view, main, th, faults,
                                        n_layers)
        else:
            out.notes.append("isolated mode not run: the reference trace lacks the layer inputs at every position")
    if options.forced_routing:
        if have_routing:
            out.forced = run_forced(cand_engine, names[1], tokens, plan, ref_full, ref_view, cand_full, main, th,
                                    faults, n_layers)
        else:
            out.notes.append("forced routing not run: the reference trace lacks moe_router_indices at every "
                             "position")
    if options.drilldown:
        layers = drill_layers(main, out.isolated, options.max_drilldown_layers)
        if layers:
            cand_modes, ref_modes = supported_modes(cand_engine), supported_modes(ref_engine)
            if "layer_inputs" not in cand_modes or "layer_inputs" not in ref_modes:
                who = names[1] if "layer_inputs" not in cand_modes else names[0]
                out.notes.append(f"per-expert drill-down skipped: backend {who!r} does not support isolated "
                                 "layers (trace(..., layer_inputs=...))")
            elif not (have_inputs and have_routing):
                out.notes.append("per-expert drill-down skipped: the reference trace lacks the layer inputs or "
                                 "router choices at every position")
            else:
                ties = {c.layer: int(c.result.metrics.get("tie_positions") or 0) for c in main.cells
                        if c.stage == S.moe_router_indices and c.verdict is Verdict.Match}
                for L in layers:
                    out.drilldown.append(drill_layer(model, ref_engine, cand_engine, names, tokens, ref_full, L,
                                                     th, faults, main_ties=ties.get(L, 0)))
    return out
