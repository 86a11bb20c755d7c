"""Per-cell comparison of one captured stage: reference (CPU side) against candidate (GPU side).

Plain module (no pytest). :func:`compare_float` classifies a float stage by cosine similarity
and relative L2 error; :func:`compare_indices` compares the router's chosen expert ids as sets,
forgiving swaps explained by a near-tie in the reference's router probabilities. Thresholds
default to ``contracts/verdicts.yaml``.

Naming: "CPU" always means the reference side and "GPU" the candidate side, whatever the two
backends really are (the verdict names come from the tool this one replaces).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Sequence

import numpy as np

from .contract import load_yaml

__all__ = ["Verdict", "Thresholds", "CellResult", "compare_float", "compare_indices", "json_safe"]


class Verdict(str, Enum):
    Match = "Match"
    Diverge = "Diverge"
    NanGpu = "NanGpu"    # only the candidate has a NaN or Inf
    NanCpu = "NanCpu"    # only the reference has a NaN or Inf
    NanBoth = "NanBoth"  # both sides have a NaN or Inf
    Missing = "Missing"  # captured on one side only

    def __str__(self) -> str:  # f"{v}" gives "Match", not "Verdict.Match"
        return self.value

    @property
    def is_nonfinite(self) -> bool:
        return self in (Verdict.NanGpu, Verdict.NanCpu, Verdict.NanBoth)

    @property
    def severity(self) -> int:
        """Ranking used to pick the worst of several cells (higher is worse)."""
        return _SEVERITY[self]


_SEVERITY = {Verdict.Match: 0, Verdict.Missing: 1, Verdict.Diverge: 2, Verdict.NanCpu: 3,
             Verdict.NanBoth: 4, Verdict.NanGpu: 5}

# Relative slack on the threshold comparisons so that a value analytically *at* a threshold is
# not flipped to Diverge by float64 rounding (far below any meaningful difference).
_EDGE = 1e-12


# ---- thresholds ---------------------------------------------------------------------------
def _as_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"threshold {name} must be a number, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"threshold {name} must be a number, got {value!r}")


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds. ``min_cosine`` in [-1, 1]; ``max_rel_l2`` and ``router_tie_tol`` >= 0
    (``inf`` disables the check). Numeric strings (ini values) are accepted."""

    min_cosine: float
    max_rel_l2: float
    router_tie_tol: float

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _as_number(f.name, getattr(self, f.name)))
        if not (-1.0 <= self.min_cosine <= 1.0):
            raise ValueError(f"threshold min_cosine must lie in [-1, 1], got {self.min_cosine!r}")
        for name in ("max_rel_l2", "router_tie_tol"):
            val = getattr(self, name)
            if math.isnan(val) or val < 0:
                raise ValueError(f"threshold {name} must be a non-negative number, got {val!r}")

    @classmethod
    def from_contract(cls, **overrides) -> "Thresholds":
        """Defaults from ``contracts/verdicts.yaml``; keyword overrides of ``None`` are ignored."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown threshold(s) {unknown}; valid: {', '.join(names)}")
        raw = (load_yaml("verdicts.yaml") or {}).get("thresholds") or {}
        missing = [n for n in names if n not in raw]
        if missing:
            raise ValueError(f"contracts/verdicts.yaml: thresholds lack {missing}")
        values = {n: raw[n] for n in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _default_thresholds(th: Thresholds | None) -> Thresholds:
    return th if th is not None else Thresholds.from_contract()


# ---- result -------------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """Recursively turn NaN/Inf floats into the strings ``"nan"``, ``"inf"``, ``"-inf"``,
    NumPy scalars into Python scalars and tuples into lists (for ``json.dumps(allow_nan=False)``)."""
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_safe(v) for v in obj.tolist()]
    return obj


@dataclass
class CellResult:
    """Outcome of one comparison. ``metrics`` holds plain Python values (floats may be ``inf``:
    use :meth:`to_dict` / :func:`json_safe` before ``json.dumps(allow_nan=False)``)."""

    verdict: Verdict
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.Match

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "metrics": json_safe(self.metrics), "reason": self.reason}

    def summary(self) -> str:
        """Short text for a table cell: ``0.99998 Match``, ``nan=12 NanGpu``, ``ties=1 Match``."""
        v, m = self.verdict, self.metrics
        if v is Verdict.Missing:
            return "Missing"
        if v.is_nonfinite:
            def side(prefix):
                parts = []
                if m.get(prefix + "_nan"):
                    parts.append(f"nan={m[prefix + '_nan']}")
                if m.get(prefix + "_inf"):
                    parts.append(f"inf={m[prefix + '_inf']}")
                return " ".join(parts)
            if v is Verdict.NanGpu:
                text = side("cand")
            elif v is Verdict.NanCpu:
                text = side("ref")
            else:
                text = f"{side('ref')} | {side('cand')}"
            return f"{text} {v.value}".strip()
        if m.get("kind") == "index":
            ties, flips = m.get("tie_positions", 0), m.get("diverged_positions", 0)
            if m.get("shape_mismatch") or m.get("agreement") is None:
                return f"shape {v.value}" if m.get("shape_mismatch") else v.value
            if v is Verdict.Match:
                return f"ties={ties} Match" if ties else f"{m['agreement']:.3f} Match"
            return f"flips={flips}" + (f" ties={ties}" if ties else "") + f" {v.value}"
        if m.get("shape_mismatch"):
            return f"shape {v.value}"
        cos, rel = m.get("cosine"), m.get("rel_l2")
        if cos is None:
            return v.value
        text = f"{cos:.5f}"
        if v is Verdict.Diverge and m.get("rel_l2_exceeded") and not m.get("cosine_below"):
            text += f" rl2={rel:.3g}"
        return f"{text} {v.value}"


# ---- float stages -------------------------------------------------------------------------
def _nonfinite_counts(x: np.ndarray) -> tuple[int, int]:
    if x.dtype.kind not in "fc":
        return 0, 0
    return int(np.count_nonzero(np.isnan(x))), int(np.count_nonzero(np.isinf(x)))


def _maxabs(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if x.size else 0.0


def _nonfinite_verdict(ref_bad: int, cand_bad: int) -> Verdict | None:
    if ref_bad and cand_bad:
        return Verdict.NanBoth
    if ref_bad:
        return Verdict.NanCpu
    if cand_bad:
        return Verdict.NanGpu
    return None


def _nonfinite_reason(verdict: Verdict, m: dict) -> str:
    r = f"reference nan={m['ref_nan']} inf={m['ref_inf']}"
    c = f"candidate nan={m['cand_nan']} inf={m['cand_inf']}"
    return {Verdict.NanGpu: f"non-finite values on the candidate side only ({c} of {m['n']})",
            Verdict.NanCpu: f"non-finite values on the reference side only ({r} of {m['n']})",
            Verdict.NanBoth: f"non-finite values on both sides ({r}; {c})"}[verdict]


def compare_float(ref, cand, th: Thresholds | None = None) -> CellResult:
    """Compare two float tensors (flattened, in float64).

    Metrics: ``cosine``, ``rel_l2`` = ||cand-ref||/||ref||, ``nmse`` = sum((cand-ref)^2)/sum(ref^2),
    ``max_abs``, ``ref_nan``, ``ref_inf``, ``cand_nan``, ``cand_inf``, ``n``, ``ref_shape``,
    ``cand_shape``. Diverge when cosine < min_cosine or rel_l2 > max_rel_l2 (values exactly at a
    threshold Match), or when the shapes differ.
    """
    th = _default_thresholds(th)
    ref, cand = np.asarray(ref), np.asarray(cand)
    rn, ri = _nonfinite_counts(ref)
    cn, ci = _nonfinite_counts(cand)
    m: dict[str, Any] = {"kind": "float", "cosine": None, "rel_l2": None, "nmse": None, "max_abs": None,
                         "ref_nan": rn, "ref_inf": ri, "cand_nan": cn, "cand_inf": ci,
                         "n": int(ref.size), "ref_shape": list(ref.shape), "cand_shape": list(cand.shape),
                         "ref_dtype": str(ref.dtype), "cand_dtype": str(cand.dtype)}
    if ref.shape != cand.shape:
        m["shape_mismatch"] = True
        reason = f"shape mismatch: reference {tuple(ref.shape)} vs candidate {tuple(cand.shape)}"
        if rn + ri or cn + ci:
            reason += f" (non-finite: reference {rn + ri}, candidate {cn + ci})"
        return CellResult(Verdict.Diverge, m, reason)
    bad = _nonfinite_verdict(rn + ri, cn + ci)
    if bad is not None:
        return CellResult(bad, m, _nonfinite_reason(bad, m))

    # float64 first: f16 squares overflow above ~256, and sums of f32 squares lose precision.
    a = ref.astype(np.float64, copy=False).ravel()
    b = cand.astype(np.float64, copy=False).ravel()
    diff = b - a
    m["max_abs"] = float(np.max(np.abs(diff))) if diff.size else 0.0
    # Each vector is scaled by its own largest magnitude before squaring, so that squares can
    # neither overflow nor underflow even in float64; the norms are rescaled afterwards.
    sa, sb = _maxabs(a), _maxabs(b)
    if sa == 0.0 and sb == 0.0:  # both all-zero (or empty)
        m.update(cosine=1.0, rel_l2=0.0, nmse=0.0, cosine_below=False, rel_l2_exceeded=False)
        return CellResult(Verdict.Match, m, None)
    if sa == 0.0:
        m.update(cosine=0.0, rel_l2=math.inf, nmse=math.inf, rel_l2_exceeded=True, cosine_below=True)
        return CellResult(Verdict.Diverge, m, "reference is all zeros but the candidate is not")
    if sb == 0.0:
        m.update(cosine=0.0, rel_l2=1.0, nmse=1.0, cosine_below=True, rel_l2_exceeded=1.0 > th.max_rel_l2)
        return CellResult(Verdict.Diverge, m, "candidate is all zeros but the reference is not")
    an, bn = a / sa, b / sb
    ref_norm, cand_norm = sa * math.sqrt(float(an @ an)), sb * math.sqrt(float(bn @ bn))
    sd = _maxabs(diff)
    dn = diff / sd if sd > 0 else diff
    diff_norm = sd * math.sqrt(float(dn @ dn))
    rel_l2 = diff_norm / ref_norm
    cosine = float(np.clip((an @ bn) / math.sqrt(float(an @ an) * float(bn @ bn)), -1.0, 1.0))
    m.update(cosine=cosine, rel_l2=rel_l2, nmse=rel_l2 * rel_l2)
    cos_low = cosine < th.min_cosine - _EDGE
    rel_high = rel_l2 > th.max_rel_l2 * (1.0 + _EDGE)
    m["cosine_below"], m["rel_l2_exceeded"] = cos_low, rel_high
    if not (cos_low or rel_high):
        return CellResult(Verdict.Match, m, None)
    why = []
    if cos_low:
        why.append(f"cosine {cosine:.6g} < min_cosine {th.min_cosine:g}")
    if rel_high:
        why.append(f"rel_l2 {rel_l2:.6g} > max_rel_l2 {th.max_rel_l2:g}")
        if not cos_low:
            why.append(f"(cosine is fine: a scale error? candidate/reference norm ratio "
                       f"{cand_norm / ref_norm:.4g})")
    return CellResult(Verdict.Diverge, m, "; ".join(why))


# ---- index stages (moe_router_indices) ----------------------------------------------------
_MAX_FLIPS = 64  # flips listed in the metrics (all are counted)


def _as_index_rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim == 1 else x


def compare_indices(ref_idx, cand_idx, th: Thresholds | None = None, ref_probs=None,
                    positions: Sequence[int] | None = None) -> CellResult:
    """Compare chosen expert ids ``[positions, K]`` position by position, as sets.

    A position whose sets differ is a *tie* (forgiven) when ``ref_probs`` ``[positions, E]`` (the
    reference's ``moe_router_probs``) is given and every expert in the symmetric difference
    (chosen by one side only) has a reference probability within ``router_tie_tol`` of the
    reference's k-th largest probability. Checking both the experts the candidate added and the
    ones it dropped means that dropping the reference's top expert is never a tie. Without
    ``ref_probs`` every differing position diverges. ``positions`` labels rows in the metrics
    (token positions); rows are numbered from 0 otherwise.
    """
    th = _default_thresholds(th)
    ref, cand = _as_index_rows(np.asarray(ref_idx)), _as_index_rows(np.asarray(cand_idx))
    rn, ri = _nonfinite_counts(ref)
    cn, ci = _nonfinite_counts(cand)
    m: dict[str, Any] = {"kind": "index", "positions": int(ref.shape[0]) if ref.ndim else 0,
                         "k": int(ref.shape[1]) if ref.ndim == 2 else None,
                         "mismatched_positions": None, "tie_positions": None, "diverged_positions": None,
                         "agreement": None, "exact_fraction": None,
                         "ref_nan": rn, "ref_inf": ri, "cand_nan": cn, "cand_inf": ci,
                         "ref_shape": list(np.asarray(ref_idx).shape), "cand_shape": list(np.asarray(cand_idx).shape),
                         "tie_rule": False, "flips": [], "flipped_experts": []}
    if ref.shape != cand.shape or ref.ndim != 2:
        m["shape_mismatch"] = True
        return CellResult(Verdict.Diverge, m,
                          f"shape mismatch: reference {m['ref_shape']} vs candidate {m['cand_shape']}"
                          + ("" if ref.ndim == 2 else " (expected [positions, K])"))
    bad = _nonfinite_verdict(rn + ri, cn + ci)
    if bad is not None:
        m["n"] = int(ref.size)
        return CellResult(bad, m, _nonfinite_reason(bad, m))
    for name, arr in (("reference", ref), ("candidate", cand)):
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            return CellResult(Verdict.Diverge, m, f"{name} expert ids are not integers")
    ref, cand = ref.astype(np.int64), cand.astype(np.int64)
    n_pos, k = ref.shape

    probs = None
    note = None
    if ref_probs is not None:
        probs = np.asarray(ref_probs, dtype=np.float64)
        probs = probs.reshape(1, -1) if probs.ndim == 1 else probs
        if probs.ndim != 2 or probs.shape[0] != n_pos or probs.shape[1] < k:
            note = (f"tie rule off: reference moe_router_probs shape {list(np.shape(ref_probs))} "
                    f"does not fit indices {list(ref.shape)}")
            probs = None
    else:
        note = "tie rule off: no reference moe_router_probs"
    m["tie_rule"] = probs is not None
    labels = list(positions) if positions is not None and len(positions) == n_pos else list(range(n_pos))

    jaccard, mismatched, ties, flipped = [], 0, 0, set()
    flips = []
    for row in range(n_pos):
        r_list, c_list = ref[row].tolist(), cand[row].tolist()
        r_set, c_set = set(r_list), set(c_list)
        union = r_set | c_set
        jaccard.append(len(r_set & c_set) / len(union) if union else 1.0)
        if r_set == c_set and len(c_set) == len(c_list) == len(r_list):
            continue
        mismatched += 1
        ref_only, cand_only = sorted(r_set - c_set), sorted(c_set - r_set)
        flipped.update(ref_only)
        flipped.update(cand_only)
        margin, is_tie = None, False
        dup = len(c_set) != len(c_list) or len(r_set) != len(r_list)
        if probs is not None and not dup:
            p = probs[row]
            swapped = ref_only + cand_only
            if all(0 <= e < p.shape[0] for e in swapped):
                kth = float(np.partition(p, p.shape[0] - k)[p.shape[0] - k])  # k-th largest
                margin = max(abs(float(p[e]) - kth) for e in swapped)
                is_tie = math.isfinite(margin) and margin <= th.router_tie_tol * (1.0 + _EDGE)
        if is_tie:
            ties += 1
        if len(flips) < _MAX_FLIPS:
            flip = {"position": int(labels[row]), "ref_only": ref_only, "cand_only": cand_only,
                    "margin": margin, "tie": is_tie}
            if dup:
                flip["duplicate_ids"] = True
            flips.append(flip)
    diverged = mismatched - ties
    m.update(mismatched_positions=mismatched, tie_positions=ties, diverged_positions=diverged,
             agreement=float(np.mean(jaccard)) if jaccard else 1.0,
             exact_fraction=(n_pos - mismatched) / n_pos if n_pos else 1.0,
             flips=flips, flipped_experts=sorted(int(e) for e in flipped))
    if len(flips) < mismatched:
        m["flips_truncated"] = True
    if diverged == 0:
        reason = (f"{ties} of {n_pos} positions differ only by near-tie swaps "
                  f"(within router_tie_tol {th.router_tie_tol:g})") if ties else None
        return CellResult(Verdict.Match, m, reason)
    reason = f"{diverged} of {n_pos} positions choose different experts"
    reason += f" beyond near-ties ({ties} tie positions)" if m["tie_rule"] else f" ({note})"
    return CellResult(Verdict.Diverge, m, reason)
