"""Stage-by-stage comparison of two traces and its layer x stage report.

Plain module (no pytest). :func:`compare_traces` classifies every captured (layer, stage[,
expert]) of a reference trace (CPU side) against a candidate trace (GPU side) and returns a
:class:`ParityReport`: the cells, the first divergence in forward order, a table, hints, JSON
and JUnit properties.
"""
from __future__ import annotations

import functools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text
from typing import Iterable

import numpy as np
from tabulate import tabulate

from .contract import S, parse_key, stage_contract, trace_key
from .metrics import CellResult, Thresholds, Verdict, compare_float, compare_indices, json_safe
from .plan import parse_stages
from .trace import Trace

__all__ = ["Cell", "ParityReport", "compare_traces", "run_header"]

_ATTENTION = (S.q_proj, S.k_proj, S.v_proj, S.q_norm, S.k_norm, S.q_post_rope, S.k_post_rope,
              S.attn_scores, S.attn_softmax, S.attention, S.attn_out)
_ROUTER = (S.moe_router_logits, S.moe_router_probs, S.moe_router, S.moe_router_indices)
_STAGE_HINT = {
    S.embedding: "the token embedding lookup / dequantization of token_embd",
    S.attn_norm: "the attention-input RMSNorm (eps, attn_norm weight)",
    S.q_proj: "the q projection (attn_q matvec and its quant type)",
    S.k_proj: "the k projection (attn_k matvec and its quant type)",
    S.v_proj: "the v projection (attn_v matvec and its quant type)",
    S.q_norm: "the per-head q RMSNorm (attn_q_norm, applied before RoPE)",
    S.k_norm: "the per-head k RMSNorm (attn_k_norm, applied before RoPE)",
    S.q_post_rope: "RoPE on q (NEOX half rotation, position, freq base)",
    S.k_post_rope: "RoPE on k (NEOX half rotation, position, freq base)",
    S.attn_scores: "the attention scores (q.k^T / sqrt(head_dim), GQA head mapping)",
    S.attn_softmax: "the attention softmax (causal mask, scaling)",
    S.attention: "the attention context (softmax . v, GQA head mapping)",
    S.attn_out: "the attention output projection (attn_output matvec and its quant type)",
    S.post_attn_residual: "the residual add after attention",
    S.ffn_norm: "the MoE-input RMSNorm (eps, ffn_norm weight)",
    S.moe_router_logits: "the router logits (ffn_gate_inp matvec)",
    S.moe_router_probs: "the router softmax over all experts",
    S.moe_router: "the router's top-k selection or weight renormalisation",
    S.moe_router_indices: "the router's expert choice beyond near-tie tolerance (compare moe_router_logits/probs)",
    S.moe_expert_gate: "the expert's gate matvec (ffn_gate_exps slice: check its quant type dispatch)",
    S.moe_expert_up: "the expert's up matvec (ffn_up_exps slice: check its quant type dispatch)",
    S.moe_expert_swiglu: "the expert's SwiGLU (silu(gate) * up)",
    S.moe_expert_out: "the expert's down matvec (ffn_down_exps slice: check its quant type dispatch)",
    S.moe_ffn_out: "the MoE output (the experts' computation or their weighted sum)",
    S.post_ffn_residual: "the residual add after the MoE",
    S.final_norm: "the final RMSNorm (output_norm)",
    S.lm_head: "the output projection (output.weight, or token_embd when tied, and its quant type)",
}

LEGEND = ("legend: cell = cosine (float stages) or set agreement (router indices) and verdict; "
          "! first divergence (and the first numeric one, when a Missing cell comes first); * downstream of it (likely a cascade); eN = worst expert N of a "
          "per-expert stage; ties=N = near-tie routing flips (not a bug); blank = not captured")


# ---- forward order ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _first_layer_order() -> int:
    orders = [s.order for s in stage_contract().stages if s.scope != "model"]
    return min(orders) if orders else 0


def _forward_pos(stage: str, layer: int | None) -> tuple[int, int, int]:
    """(group, layer, stage order): group 0 = model stages before the layers, 1 = layers, 2 = after."""
    st = stage_contract().by_name[stage]
    if st.scope == "model":
        return (0 if st.order < _first_layer_order() else 2, -1, st.order)
    return (1, int(layer), st.order)


def _row_label(pos: tuple[int, int, int]) -> str:
    return {0: "embed", 2: "final"}.get(pos[0], str(pos[1]))


@dataclass
class Cell:
    layer: int | None
    stage: str
    expert: int | None
    result: CellResult
    downstream: bool = False

    @property
    def verdict(self) -> Verdict:
        return self.result.verdict

    @property
    def key(self) -> str:
        return trace_key(self.stage, self.layer, self.expert)

    @property
    def forward_pos(self) -> tuple[int, int, int]:
        return _forward_pos(self.stage, self.layer)

    def label(self) -> str:
        parts = [] if self.layer is None else [f"layer {self.layer}"]
        parts.append(f"stage {self.stage}")
        if self.expert is not None:
            parts.append(f"expert {self.expert}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "stage": self.stage, "expert": self.expert,
                "verdict": self.verdict.value, "metrics": json_safe(self.result.metrics),
                "reason": self.result.reason, "downstream": bool(self.downstream)}


def _rank(cell: Cell) -> tuple:
    """Sort key: larger is worse (severity, non-finite count, low cosine/agreement, high rel_l2)."""
    m = cell.result.metrics
    score = m.get("cosine")
    if score is None:
        score = m.get("agreement")
    if score is None:
        score = -2.0
    nonfinite = sum(int(m.get(k) or 0) for k in ("ref_nan", "ref_inf", "cand_nan", "cand_inf"))
    rel = m.get("rel_l2") or 0.0
    return (cell.verdict.severity, nonfinite, -float(score), float(rel), -(cell.expert or 0))


def _worst(cells: Iterable[Cell]) -> Cell:
    return max(cells, key=_rank)


def _fmt(x, name: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and name == "cosine":
        return f"{x:.6f}"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def run_header(ref_meta: dict | None, cand_meta: dict | None) -> str | None:
    """One line naming the two backends, the model and the prompt length, from the traces' meta
    (as in the JSON report's ``meta``); None when neither side names its backend."""
    ref_meta, cand_meta = ref_meta or {}, cand_meta or {}
    ref, cand = ref_meta.get("backend"), cand_meta.get("backend")
    if not ref and not cand:
        return None
    parts = [f"reference {ref or '?'} vs candidate {cand or '?'}"]
    model = ref_meta.get("model") or cand_meta.get("model")
    if model:
        parts.append(f"model {model}")
    for meta in (ref_meta, cand_meta):
        try:
            tokens = json.loads(meta["tokens"]) if isinstance(meta.get("tokens"), str) else meta.get("tokens")
        except ValueError:
            tokens = None
        if isinstance(tokens, list):
            parts.append(f"{len(tokens)} token{'s' if len(tokens) != 1 else ''}")
            break
    return ", ".join(parts)


# ---- report -------------------------------------------------------------------------------
class ParityReport:
    """Result of :func:`compare_traces`.

    ``cells`` are in forward order (experts of one stage by id). ``ignored_keys`` lists trace
    keys that are not contract stages; ``skipped`` lists per-expert captures present on one side
    only because of a near-tie routing flip (not compared, not counted).
    """

    def __init__(self, cells: list[Cell], thresholds: Thresholds, ref_meta: dict | None = None,
                 cand_meta: dict | None = None, ignored_keys: list[tuple[str, str, str]] | None = None,
                 skipped: list[tuple[str, str]] | None = None):
        self.cells = sorted(cells, key=lambda c: (c.forward_pos, c.expert if c.expert is not None else -1))
        self.thresholds = thresholds
        self.ref_meta = dict(ref_meta or {})
        self.cand_meta = dict(cand_meta or {})
        self.ignored_keys = list(ignored_keys or [])
        self.skipped = list(skipped or [])
        # bisection sections (pytest_moeparity.bisect.BisectReport), set by run_parity: rendered
        # after the table and merged into to_json()
        self.bisect = None
        self._mark_downstream()

    # -- classification --------------------------------------------------------------------
    def first_non_match(self, include_missing: bool = True) -> Cell | None:
        """First non-Match cell in forward order; among experts of that stage, the worst one."""
        bad = [c for c in self.cells
               if c.verdict is not Verdict.Match and (include_missing or c.verdict is not Verdict.Missing)]
        if not bad:
            return None
        pos = min(c.forward_pos for c in bad)
        return _worst(c for c in bad if c.forward_pos == pos)

    @property
    def first_divergence(self) -> Cell | None:
        return self.first_non_match(include_missing=True)

    @property
    def ok(self) -> bool:
        """True when there is at least one cell and every cell is Match."""
        return bool(self.cells) and all(c.verdict is Verdict.Match for c in self.cells)

    def _mark_downstream(self) -> None:
        # Missing is a capture gap, not a numeric error: it never anchors a cascade. After the first
        # numeric divergence it joins it like any other non-Match cell (e.g. experts captured on one
        # side only because the routers of a later layer choose differently).
        anchor = self.first_non_match(include_missing=False)
        for c in self.cells:
            c.downstream = (anchor is not None and c.verdict is not Verdict.Match
                            and c.forward_pos > anchor.forward_pos)

    def counts(self) -> dict[str, int]:
        cnt = Counter(c.verdict.value for c in self.cells)
        return {v.value: cnt.get(v.value, 0) for v in Verdict}

    def tie_layers(self) -> list[int]:
        return sorted({c.layer for c in self.cells
                       if c.stage == S.moe_router_indices and c.verdict is Verdict.Match
                       and c.result.metrics.get("tie_positions")})

    def grouped(self) -> dict[tuple[tuple[int, int, int], str], list[Cell]]:
        """Cells per (forward position, stage): several for a per-expert stage."""
        out: dict = {}
        for c in self.cells:
            out.setdefault((c.forward_pos, c.stage), []).append(c)
        return out

    # -- text ------------------------------------------------------------------------------
    def _table_data(self) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
        contract = stage_contract()
        present = {c.stage for c in self.cells}
        columns = [n for n in contract.names if n in present]
        rows: list[tuple[tuple[int, int], str]] = []
        text: dict[tuple[str, str], str] = {}
        first = self.first_divergence
        anchor = self.first_non_match(include_missing=False)
        for (pos, stage), cells in self.grouped().items():
            row = _row_label(pos)
            if (pos[0], pos[1]) not in [r[0] for r in rows]:
                rows.append(((pos[0], pos[1]), row))
            worst = _worst(cells)
            cell_text = worst.result.summary()
            if worst.expert is not None:
                cell_text += f" e{worst.expert}"
            if any(c is first or c is anchor for c in cells):
                cell_text += "!"
            elif worst.downstream:
                cell_text += "*"
            text[(row, stage)] = cell_text
        rows.sort()
        return [r[1] for r in rows], columns, text

    def table(self, max_width: int | None = None, tablefmt: str = "github") -> str:
        """Rows = ``embed``, layers, ``final``; columns = stages in forward order. With
        ``max_width``, the stage columns are split into several tables that each fit."""
        rows, columns, text = self._table_data()
        if not columns:
            return "(no cells)"

        def render(cols: list[str]) -> str:
            body = [[r] + [text.get((r, c), "") for c in cols] for r in rows]
            body = [row for row in body if any(row[1:])]  # rows with nothing in these columns
            return tabulate(body, headers=["layer"] + cols, tablefmt=tablefmt, disable_numparse=True)

        if not max_width:
            return render(columns)
        blocks, current = [], []
        for col in columns:
            trial = current + [col]
            if current and max(len(line) for line in render(trial).splitlines()) > max_width:
                blocks.append(render(current))
                current = [col]
            else:
                current = trial
        blocks.append(render(current))
        return "\n\n".join(blocks)

    def describe_cell(self, cell: Cell) -> str:
        m = cell.result.metrics
        if cell.verdict is Verdict.Missing:
            return f"{cell.label()}, verdict Missing"
        if m.get("kind") == "index":
            keys = ["agreement", "diverged_positions", "tie_positions"]
        else:
            keys = ["cosine", "rel_l2"]
        shown = [f"{k}={_fmt(m.get(k), k)}" for k in keys]
        shown += [f"{k}={m[k]}" for k in ("ref_nan", "ref_inf", "cand_nan", "cand_inf") if m.get(k)]
        return f"{cell.label()}, verdict {cell.verdict.value} ({', '.join(shown)})"

    def header(self) -> str | None:
        """``reference numpy vs candidate numpy-f64, model tiny.gguf, 8 tokens`` (None without backend names)."""
        return run_header(self.ref_meta, self.cand_meta)

    def render(self, max_width: int | None = None) -> str:
        head = self.header()
        lines = ([head] if head else []) + [self.table(max_width=max_width), LEGEND]
        counts = {k: v for k, v in self.counts().items() if v}
        n_down = sum(c.downstream for c in self.cells)
        lines.append("cells: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                     + (f" ({n_down} downstream)" if n_down else ""))
        first = self.first_divergence
        if not self.cells:
            lines.append("Nothing compared: the traces share no contract stage")
        elif first is None:
            ties = self.tie_layers()
            lines.append(f"No divergence: {len(self.cells)} cells Match"
                         + (f" (near-tie routing flips at layer(s) {', '.join(map(str, ties))})" if ties else ""))
        else:
            lines.append("First divergence: " + self.describe_cell(first))
            if first.result.reason:
                lines.append(f"  reason: {first.result.reason}")
        if self.skipped:
            lines.append(f"not compared: {len(self.skipped)} per-expert capture(s) routed on one side only "
                         "(near-tie routing flips)")
        if self.ignored_keys:
            lines.append(f"ignored: {len(self.ignored_keys)} trace key(s) outside the stage contract, e.g. "
                         f"{self.ignored_keys[0][1]!r} ({self.ignored_keys[0][2]})")
        hints = self.hints()
        if hints:
            lines.append("Hints:")
            lines.extend(f"  - {h}" for h in hints)
        if self.bisect is not None and not self.bisect.empty:
            lines.append("")
            lines.append(self.bisect.render())
        return "\n".join(lines)

    # -- hints -----------------------------------------------------------------------------
    def _cells_at(self, layer: int | None, stages: Iterable[str]) -> list[Cell]:
        stages = set(stages)
        return [c for c in self.cells if c.layer == layer and c.stage in stages]

    def hints(self) -> list[str]:
        """Short decision help about where the first divergence points."""
        out: list[str] = []
        if not self.cells:
            return ["nothing was compared: the traces share no contract stage (check the save plan "
                    "and the stage filter)"]
        ties = self.tie_layers()
        tie_hint = (f"near-tie routing flip at layer(s) {', '.join(map(str, ties))} (swapped experts within "
                    f"router_tie_tol={self.thresholds.router_tie_tol:g} of the k-th probability): not a bug")
        first = self.first_divergence
        if first is None:
            return [tie_hint] if ties else []
        if first.verdict is Verdict.Missing:
            side = first.result.metrics.get("present_in", "one side")
            out.append(f"{first.label()} was captured by the {side} only: a capture gap in the other "
                       "backend (or the save plan), not a numeric divergence")
            first = self.first_non_match(include_missing=False)
            if first is None:
                return out + ([tie_hint] if ties else [])
            out.append(f"first numeric divergence: {self.describe_cell(first)}")
        v, stage, layer, m = first.verdict, first.stage, first.layer, first.result.metrics
        where = f"layer {layer}" if layer is not None else "the model output"
        # near-tie router flips (router cell "ties=N Match") at or before the first divergence:
        # everything before it matches, so the flip (not the expert math) is what the divergence follows
        flips = sorted({c.layer for c in self._cells_at_any_layer(S.moe_router_indices)
                        if c.layer in ties and c.forward_pos < first.forward_pos})

        if v is Verdict.NanCpu:
            out.append("the reference (CPU side) turns non-finite first: the reference itself is broken here")
        elif v is Verdict.NanBoth:
            out.append("both sides turn non-finite at the same place: suspect the weights or the input, "
                       "not one backend")
        if m.get("shape_mismatch"):
            out.append("shape mismatch: the backends disagree on the tensor layout (check the capture "
                       "against the shapes in contracts/stages.yaml)")
        elif v is Verdict.Diverge and m.get("rel_l2_exceeded") and not m.get("cosine_below"):
            out.append(f"cosine is {_fmt(m.get('cosine'), 'cosine')} but rel_l2 is {_fmt(m.get('rel_l2'))}: a scale error "
                       "(a missing or extra factor), which cosine alone cannot see")

        if stage == S.embedding:
            out.append("first divergence in the embedding: " + _STAGE_HINT[stage])
        elif stage in _ATTENTION and layer == 0:
            out.append(f"first divergence in the attention path at layer 0 ({stage}): {_STAGE_HINT[stage]}")
        elif stage == S.moe_ffn_out:
            routers = self._cells_at(layer, _ROUTER)
            experts = [c for c in self.cells if c.layer == layer
                       and stage_contract().by_name[c.stage].scope == "expert"]
            if layer in ties:
                pass  # the near-tie flip hint below says it
            elif experts and all(c.verdict is Verdict.Match for c in experts):
                out.append(f"the experts of layer {layer} match but moe_ffn_out does not: check the weighted "
                           "sum (routing weights, which experts are summed)")
            elif routers and all(c.verdict is Verdict.Match for c in routers):
                out.append(f"the router of layer {layer} matches but moe_ffn_out is {v.value}: the expert "
                           f"computation of layer {layer} (check each expert tensor's quant type dispatch)")
            else:
                out.append(f"moe_ffn_out of layer {layer}: {_STAGE_HINT[stage]}; capture the router and "
                           "per-expert stages to narrow it down")
        elif stage == S.lm_head and all(c.verdict is Verdict.Match for c in self.cells if c is not first
                                        and c.stage != S.lm_head):
            out.append("only lm_head diverges: " + _STAGE_HINT[stage])
        elif first.expert is not None:
            out.append(f"expert {first.expert} of layer {layer} ({stage}): {_STAGE_HINT[stage]}")
        else:
            out.append(f"first divergence at {where}, {stage}: {_STAGE_HINT.get(stage, stage)}")

        if flips:
            t = flips[-1]
            out.append(f"{first.label()} follows a near-tie routing flip: the router of layer {t} swaps "
                       f"near-tied experts ({self._ties_text(t)}) and the cells before match, so "
                       f"{'moe_ffn_out sums a different expert there' if (t, stage) == (layer, S.moe_ffn_out) else 'the flip'}"
                       " (tiny upstream differences within the thresholds can tip it), not a bug of the expert "
                       "math, explains it; --moe-forced-routing checks it (with the reference's expert choices "
                       "every layer should match)")
        elif layer is not None and layer > 0:
            earlier_cells = [c for c in self.cells if c.layer is not None and c.layer < layer]
            earlier = sorted({c.layer for c in earlier_cells})
            if earlier:
                span = (f"layer {earlier[0]} matches" if len(earlier) == 1
                        else f"layers {earlier[0]}..{earlier[-1]} match")
                if any(c.verdict is Verdict.Missing for c in earlier_cells):
                    span += " (apart from Missing captures)"
                out.append(f"first divergence at layer {layer} > 0 while {span}: the bug is layer-specific "
                           f"(compare what differs at layer {layer}, e.g. the quant types of its tensors)")
            else:
                out.append(f"no layer before {layer} was compared: widen the layer range to confirm "
                           "the bug is layer-specific")
        n_down = sum(c.downstream for c in self.cells)
        if n_down:
            out.append(f"{n_down} later non-Match cell(s) marked * are probably a cascade from the first "
                       "divergence: fix that one first")
        if ties and ties != flips[-1:]:
            out.append(tie_hint)
        return out

    def _cells_at_any_layer(self, stage: str) -> list[Cell]:
        return [c for c in self.cells if c.stage == stage]

    def _ties_text(self, layer: int) -> str:
        cell = next((c for c in self._cells_at(layer, (S.moe_router_indices,))), None)
        n = int(cell.result.metrics.get("tie_positions") or 0) if cell is not None else 0
        return f"ties={n} Match"

    # -- machine-readable ------------------------------------------------------------------
    def to_json(self) -> dict:
        first = self.first_divergence
        fd = None
        if first is not None:
            fd = {"layer": first.layer, "stage": first.stage, "expert": first.expert,
                  "verdict": first.verdict.value, "metrics": json_safe(first.result.metrics),
                  "reason": first.result.reason}
        out = {
            "first_divergence": fd,
            "ok": self.ok,
            "cells": [c.to_dict() for c in self.cells],
            "thresholds": json_safe(self.thresholds.to_dict()),
            "meta": {"reference": json_safe(self.ref_meta), "candidate": json_safe(self.cand_meta)},
            "hints": self.hints(),
            "counts": self.counts(),
            "ignored_keys": [{"side": s, "key": k, "why": w} for s, k, w in self.ignored_keys],
            "skipped": [{"key": k, "why": w} for k, w in self.skipped],
        }
        if self.bisect is not None:
            out.update(self.bisect.to_json())
        return out

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` atomically (temp file in the same directory, then rename)."""
        return write_text(path, json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")

    def junit_properties(self) -> list[tuple[str, str]]:
        """Properties for a JUnit XML record; the ``moe_first_divergence_*`` ones only when there is one."""
        counts = self.counts()
        props = [("moe_parity_ok", "true" if self.ok else "false"),
                 ("moe_cells", str(len(self.cells))),
                 ("moe_cells_non_match", str(len(self.cells) - counts[Verdict.Match.value]))]
        first = self.first_divergence
        if first is not None:
            props += [("moe_first_divergence_layer", "" if first.layer is None else str(first.layer)),
                      ("moe_first_divergence_stage", first.stage),
                      ("moe_first_divergence_verdict", first.verdict.value)]
            if first.expert is not None:
                props.append(("moe_first_divergence_expert", str(first.expert)))
        return props

    def __repr__(self) -> str:
        first = self.first_divergence
        return (f"<ParityReport cells={len(self.cells)} ok={self.ok} first="
                f"{first.key + ':' + first.verdict.value if first else None}>")


# ---- comparison ---------------------------------------------------------------------------
def _check_same_prompt(ref: Trace, cand: Trace) -> None:
    for name in ("positions", "tokens"):
        if name in ref.meta and name in cand.meta:
            try:
                a, b = json.loads(ref.meta[name]), json.loads(cand.meta[name])
            except (TypeError, ValueError):
                a, b = ref.meta[name], cand.meta[name]
            if a != b:
                raise ValueError(f"traces are not comparable: meta[{name!r}] differs (reference {a}, "
                                 f"candidate {b}); run both backends with the same prompt and save plan")


def _index_keys(trace: Trace, side: str, wanted: set[str] | None, ignored: list) -> dict:
    contract = stage_contract()
    out = {}
    for key in trace.keys():
        try:
            stage, layer, expert = parse_key(key)
        except ValueError:
            ignored.append((side, key, "not a trace key"))
            continue
        st = contract.by_name.get(stage)
        if st is None:
            ignored.append((side, key, "unknown stage"))
            continue
        if (st.scope == "model") != (layer is None) or (st.scope == "expert") != (expert is not None):
            ignored.append((side, key, f"stage has scope {st.scope!r}"))
            continue
        if wanted is not None and stage not in wanted:
            continue
        out[(stage, layer, expert)] = key
    return out


def _flatten_rows(x):
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1) if x.ndim >= 1 and x.shape[0] else x.reshape(1, -1)


def compare_traces(ref: Trace, cand: Trace, th: Thresholds | None = None,
                   stages: tuple[str, ...] | list[str] | str | None = None) -> ParityReport:
    """Compare a reference trace (CPU side) with a candidate trace (GPU side).

    ``stages`` restricts the comparison (names or aliases, as in the save plan). Raises
    ValueError when both traces record ``positions`` (or ``tokens``) and they differ.
    """
    th = th if th is not None else Thresholds.from_contract()
    _check_same_prompt(ref, cand)
    contract = stage_contract()
    wanted = set(parse_stages(stages)) if stages is not None else None
    ignored: list[tuple[str, str, str]] = []
    ref_keys = _index_keys(ref, "reference", wanted, ignored)
    cand_keys = _index_keys(cand, "candidate", wanted, ignored)
    positions = ref.positions or None
    # flat traces (e.g. aprender dumps: one [1, count] row per stage) are compared row by row
    flat = "flat" in (ref.meta.get("layout"), cand.meta.get("layout"))

    cells: dict[tuple, Cell] = {}
    skipped: list[tuple[str, str]] = []
    ids = sorted(set(ref_keys) | set(cand_keys),
                 key=lambda i: (contract.by_name[i[0]].scope == "expert", _forward_pos(i[0], i[1]), i[2] or 0))
    for ident in ids:  # layer/model stages first, so expert stages can consult their layer's router
        stage, layer, expert = ident
        st = contract.by_name[stage]
        in_ref, in_cand = ident in ref_keys, ident in cand_keys
        if in_ref and in_cand:
            a, b = ref[ref_keys[ident]], cand[cand_keys[ident]]
            if flat:
                a, b = _flatten_rows(a), _flatten_rows(b)
            if st.kind == "index":
                probs_key = trace_key(S.moe_router_probs, layer)
                probs = ref[probs_key] if probs_key in ref else None
                result = compare_indices(a, b, th, ref_probs=probs, positions=positions)
            else:
                result = compare_float(a, b, th)
        else:
            side = "reference" if in_ref else "candidate"
            reason = f"captured by the {side} only"
            if st.scope == "expert":
                router = cells.get((S.moe_router_indices, layer, None))
                flipped = router.result.metrics.get("flipped_experts", []) if router else []
                if router is not None and expert in flipped:
                    if router.verdict is Verdict.Match:
                        skipped.append((trace_key(stage, layer, expert),
                                        f"expert routed by the {side} only (near-tie routing flip)"))
                        continue
                    reason += " (the routers of this layer choose different experts)"
            result = CellResult(Verdict.Missing, {"present_in": side}, reason)
        cells[ident] = Cell(layer=layer, stage=stage, expert=expert, result=result)
    return ParityReport(list(cells.values()), th, ref.meta, cand.meta, ignored, skipped)
