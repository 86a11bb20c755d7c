"""The per-cell classifier (pytest_moeparity.metrics) on seeded random data."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from pytest_moeparity.contract import contracts_dir
from pytest_moeparity.metrics import (CellResult, Thresholds, Verdict, compare_float, compare_indices,
                                      json_safe)

TH = Thresholds(min_cosine=0.999, max_rel_l2=0.02, router_tie_tol=0.001)


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def perturbed(ref: np.ndarray, eps: float, seed: int = 1) -> np.ndarray:
    """ref + eps * u with u orthogonal to ref and ||u|| = ||ref||: rel_l2 = eps and
    cosine = 1 / sqrt(1 + eps^2), analytically."""
    r = ref.ravel()
    u = np.random.default_rng(seed).standard_normal(r.shape)
    u -= (u @ r) / (r @ r) * r
    u *= np.linalg.norm(r) / np.linalg.norm(u)
    return (r + eps * u).reshape(ref.shape)


def eps_for_cosine(c: float) -> float:
    return math.sqrt(1.0 / (c * c) - 1.0)


def assert_json_plain(res: CellResult):
    json.dumps(res.to_dict(), allow_nan=False)


# ---- verdict enum ------------------------------------------------------------------------
def test_verdict_values_are_their_names():
    assert [v.value for v in Verdict] == ["Match", "Diverge", "NanGpu", "NanCpu", "NanBoth", "Missing"]
    assert f"{Verdict.NanGpu}" == "NanGpu" and Verdict("Diverge") is Verdict.Diverge


# ---- float stages ------------------------------------------------------------------------
def test_identical_is_match_with_metrics():
    ref = rand((4, 32)).astype(np.float32)
    res = compare_float(ref, ref.copy(), TH)
    assert res.verdict is Verdict.Match and res.reason is None
    m = res.metrics
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert m["rel_l2"] == 0.0 and m["nmse"] == 0.0 and m["max_abs"] == 0.0
    assert m["n"] == 128 and m["ref_shape"] == [4, 32] == m["cand_shape"]
    assert (m["ref_nan"], m["ref_inf"], m["cand_nan"], m["cand_inf"]) == (0, 0, 0, 0)
    assert res.summary() == "1.00000 Match"
    assert_json_plain(res)


def test_metric_formulas():
    ref = rand((3, 50), seed=2)
    cand = ref + 0.01 * rand((3, 50), seed=3)
    m = compare_float(ref, cand, TH).metrics
    a, b = ref.ravel(), cand.ravel()
    assert m["cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
    assert m["rel_l2"] == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a), rel=1e-12)
    assert m["nmse"] == pytest.approx(np.sum((b - a) ** 2) / np.sum(a ** 2), rel=1e-12)
    assert m["max_abs"] == pytest.approx(np.max(np.abs(b - a)), rel=1e-12)


def test_rel_l2_threshold_edges():
    ref = rand(256, seed=4)
    at = compare_float(ref, perturbed(ref, 0.02), TH)
    assert at.metrics["rel_l2"] == pytest.approx(0.02, rel=1e-9)
    assert at.metrics["cosine"] > TH.min_cosine
    assert at.verdict is Verdict.Match  # exactly at max_rel_l2 is still Match
    beyond = compare_float(ref, perturbed(ref, 0.02 * 1.001), TH)
    assert beyond.verdict is Verdict.Diverge
    assert "rel_l2" in beyond.reason and "cosine" in beyond.reason  # cosine fine: says scale error?


def test_cosine_threshold_edges():
    th = Thresholds(min_cosine=0.999, max_rel_l2=1.0, router_tie_tol=0.001)  # isolate cosine
    ref = rand(512, seed=5)
    at = compare_float(ref, perturbed(ref, eps_for_cosine(0.999)), th)
    assert at.metrics["cosine"] == pytest.approx(0.999, abs=1e-12)
    assert at.verdict is Verdict.Match  # exactly at min_cosine is still Match
    beyond = compare_float(ref, perturbed(ref, eps_for_cosine(0.999 - 1e-6)), th)
    assert beyond.metrics["cosine"] < 0.999
    assert beyond.verdict is Verdict.Diverge and "min_cosine" in beyond.reason


def test_default_thresholds_catch_a_small_orthogonal_error_by_rel_l2():
    # cosine 0.9995 passes min_cosine 0.999, but rel_l2 ~0.0316 fails max_rel_l2 0.02
    ref = rand(300, seed=6)
    res = compare_float(ref, perturbed(ref, eps_for_cosine(0.9995)), TH)
    assert res.metrics["cosine"] > 0.999 and res.verdict is Verdict.Diverge


def test_scale_bug_is_diverge_although_cosine_is_one():
    ref = rand((2, 64), seed=7).astype(np.float32)
    res = compare_float(ref, 2 * ref, TH)
    assert res.metrics["cosine"] == pytest.approx(1.0, abs=1e-7)
    assert res.metrics["rel_l2"] == pytest.approx(1.0, rel=1e-6)
    assert res.verdict is Verdict.Diverge
    assert "rl2=" in res.summary() and res.summary().endswith("Diverge")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where, expected", [("ref", Verdict.NanCpu), ("cand", Verdict.NanGpu),
                                             ("both", Verdict.NanBoth)])
def test_nonfinite_sides(bad, where, expected):
    ref = rand((3, 16), seed=8).astype(np.float32)
    cand = ref.copy()
    if where in ("ref", "both"):
        ref[1, 2] = bad
    if where in ("cand", "both"):
        cand[0, 5] = bad
        cand[2, 7] = bad
    res = compare_float(ref, cand, TH)
    assert res.verdict is expected
    m = res.metrics
    kind = "nan" if np.isnan(bad) else "inf"
    other = "inf" if kind == "nan" else "nan"
    assert m[f"ref_{kind}"] == (1 if where in ("ref", "both") else 0)
    assert m[f"cand_{kind}"] == (2 if where in ("cand", "both") else 0)
    assert m[f"ref_{other}"] == 0 and m[f"cand_{other}"] == 0
    assert m["cosine"] is None and m["rel_l2"] is None
    assert expected.value in res.summary() and f"{kind}=" in res.summary()
    assert_json_plain(res)


def test_nan_and_inf_counted_separately():
    ref = rand(20, seed=9)
    cand = ref.copy()
    cand[[1, 2, 3]] = np.nan
    cand[4] = np.inf
    res = compare_float(ref, cand, TH)
    assert res.verdict is Verdict.NanGpu
    assert (res.metrics["cand_nan"], res.metrics["cand_inf"]) == (3, 1)
    assert res.summary() == "nan=3 inf=1 NanGpu"


def test_both_zero_is_match():
    res = compare_float(np.zeros((2, 8), np.float32), np.zeros((2, 8), np.float32), TH)
    assert res.verdict is Verdict.Match
    assert res.metrics["cosine"] == 1.0 and res.metrics["rel_l2"] == 0.0


def test_reference_zero_candidate_not():
    res = compare_float(np.zeros(16), rand(16, seed=10), TH)
    assert res.verdict is Verdict.Diverge
    assert res.metrics["rel_l2"] == math.inf and "reference is all zeros" in res.reason
    d = res.to_dict()
    assert d["metrics"]["rel_l2"] == "inf"
    json.dumps(d, allow_nan=False)


def test_candidate_zero_reference_not():
    res = compare_float(rand(16, seed=11), np.zeros(16), TH)
    assert res.verdict is Verdict.Diverge
    assert res.metrics["cosine"] == 0.0 and "candidate is all zeros" in res.reason


@pytest.mark.parametrize("cand_shape", [(4, 3), (12,), (3, 5)])
def test_shape_mismatch(cand_shape):
    ref = rand((3, 4), seed=12)
    cand = rand(cand_shape, seed=13)
    res = compare_float(ref, cand, TH)
    assert res.verdict is Verdict.Diverge
    assert res.metrics["shape_mismatch"] and "shape mismatch" in res.reason
    assert res.summary() == "shape Diverge"


def test_float16_large_values_do_not_overflow():
    rng = np.random.default_rng(14)
    ref = rng.uniform(4e4, 6e4, size=(4, 256)).astype(np.float16)
    sign = rng.choice([-1, 1], size=ref.shape).astype(np.float16)
    ref = ref * sign
    with np.errstate(over="ignore"):
        assert np.isinf(ref[0, 0] * ref[0, 0])  # naive f16 squares overflow
    same = compare_float(ref, ref.copy(), TH)
    assert same.verdict is Verdict.Match and same.metrics["cosine"] == pytest.approx(1.0, abs=1e-12)
    cand = (ref.astype(np.float32) * 1.001).astype(np.float16)
    res = compare_float(ref, cand, TH)
    assert res.verdict is Verdict.Match
    assert res.metrics["rel_l2"] == pytest.approx(1e-3, rel=0.5)  # f16 rounding of the product
    assert all(math.isfinite(res.metrics[k]) for k in ("cosine", "rel_l2", "nmse", "max_abs"))


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_extreme_float64_magnitudes(scale):
    unit = rand(64, seed=15)
    ref, cand = unit * scale, perturbed(unit, 0.01) * scale
    res = compare_float(ref, cand, TH)
    assert res.verdict is Verdict.Match
    assert res.metrics["rel_l2"] == pytest.approx(0.01, rel=1e-9)


def test_default_thresholds_used_when_none():
    ref = rand(64, seed=16)
    assert compare_float(ref, 2 * ref).verdict is Verdict.Diverge


# ---- router indices ----------------------------------------------------------------------
def router_case(seed=20, positions=4, experts=16, k=4, tol=0.001):
    """Random reference probabilities with a planted near-tie at the k-th place of position 1
    (gap tol/2) and a clear gap everywhere else; indices = reference top-k."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(experts), size=positions)
    order = np.argsort(-probs, axis=1)
    row = probs[1]
    kth, nxt = order[1, k - 1], order[1, k]
    row[nxt] = row[kth] - tol / 2
    probs[1] = row / row.sum()
    order = np.argsort(-probs, axis=1)
    idx = order[:, :k].copy()
    return probs, idx, order


def test_identical_indices_match_in_any_order():
    probs, idx, _ = router_case()
    res = compare_indices(idx, idx[:, ::-1].copy(), TH, ref_probs=probs)
    assert res.verdict is Verdict.Match
    m = res.metrics
    assert m["positions"] == 4 and m["mismatched_positions"] == 0 and m["tie_positions"] == 0
    assert m["agreement"] == 1.0 and m["flips"] == []
    assert res.summary() == "1.000 Match"


def test_near_tie_swap_is_match_with_tie_reported():
    probs, idx, order = router_case()
    k = idx.shape[1]
    cand = idx.copy()
    cand[1, k - 1] = order[1, k]  # swap the k-th for the (k+1)-th: gap tol/2
    res = compare_indices(idx, cand, TH, ref_probs=probs, positions=[10, 11, 12, 13])
    assert res.verdict is Verdict.Match
    m = res.metrics
    assert m["mismatched_positions"] == 1 and m["tie_positions"] == 1 and m["diverged_positions"] == 0
    flip = m["flips"][0]
    assert flip["position"] == 11 and flip["tie"] is True
    assert flip["ref_only"] == [int(order[1, k - 1])] and flip["cand_only"] == [int(order[1, k])]
    gap = probs[1, order[1, k - 1]] - probs[1, order[1, k]]
    assert 0 < gap < TH.router_tie_tol and flip["margin"] == pytest.approx(gap, rel=1e-9)
    assert m["agreement"] < 1.0
    assert res.summary() == "ties=1 Match" and "near-tie" in res.reason
    assert_json_plain(res)


def test_swap_beyond_tolerance_is_diverge():
    probs, idx, order = router_case()
    k = idx.shape[1]
    cand = idx.copy()
    cand[0, k - 1] = order[0, k + 3]  # position 0 has no planted tie
    res = compare_indices(idx, cand, TH, ref_probs=probs)
    assert res.verdict is Verdict.Diverge
    assert res.metrics["diverged_positions"] == 1 and res.metrics["flips"][0]["tie"] is False
    assert res.metrics["flips"][0]["margin"] > TH.router_tie_tol
    assert res.summary() == "flips=1 Diverge"


def test_tie_tolerance_is_configurable():
    probs, idx, order = router_case()
    k = idx.shape[1]
    cand = idx.copy()
    cand[1, k - 1] = order[1, k]
    tight = Thresholds.from_contract(router_tie_tol=0.0001)
    assert compare_indices(idx, cand, tight, ref_probs=probs).verdict is Verdict.Diverge


def test_dropping_the_top_expert_is_never_a_tie():
    probs, idx, order = router_case()
    k = idx.shape[1]
    cand = idx.copy()
    cand[1, 0] = order[1, k]  # the added expert is near the k-th, but the dropped one is the top
    assert compare_indices(idx, cand, TH, ref_probs=probs).verdict is Verdict.Diverge


def test_differing_sets_without_probs_diverge():
    probs, idx, order = router_case()
    k = idx.shape[1]
    cand = idx.copy()
    cand[1, k - 1] = order[1, k]  # a genuine near-tie, but no probabilities to prove it
    res = compare_indices(idx, cand, TH)
    assert res.verdict is Verdict.Diverge
    assert res.metrics["tie_rule"] is False and "no reference moe_router_probs" in res.reason


def test_index_shape_mismatch():
    probs, idx, _ = router_case()
    res = compare_indices(idx, idx[:, :-1].copy(), TH, ref_probs=probs)
    assert res.verdict is Verdict.Diverge and "shape mismatch" in res.reason
    res = compare_indices(idx, idx[:-1].copy(), TH, ref_probs=probs)
    assert res.verdict is Verdict.Diverge


def test_duplicate_candidate_ids_diverge():
    probs, idx, _ = router_case()
    cand = idx.copy()
    cand[2, 1] = cand[2, 0]
    res = compare_indices(idx, cand, TH, ref_probs=probs)
    assert res.verdict is Verdict.Diverge and res.metrics["flips"][0].get("duplicate_ids")


# ---- thresholds --------------------------------------------------------------------------
def test_thresholds_defaults_equal_the_contract():
    with open(contracts_dir() / "verdicts.yaml", encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)["thresholds"]
    th = Thresholds.from_contract()
    assert th.to_dict() == {k: float(raw[k]) for k in ("min_cosine", "max_rel_l2", "router_tie_tol")}


def test_thresholds_overrides():
    base = Thresholds.from_contract()
    th = Thresholds.from_contract(min_cosine=0.99, max_rel_l2=None, router_tie_tol="0.005")
    assert th.min_cosine == 0.99 and th.max_rel_l2 == base.max_rel_l2 and th.router_tie_tol == 0.005
    assert Thresholds.from_contract(max_rel_l2=float("inf")).max_rel_l2 == math.inf  # disables the check


@pytest.mark.parametrize("kwargs", [
    {"min_cosine": "abc"}, {"min_cosine": 1.5}, {"min_cosine": -1.01}, {"min_cosine": float("nan")},
    {"max_rel_l2": -0.1}, {"router_tie_tol": -1e-9}, {"max_rel_l2": float("nan")},
    {"min_cosine": True}, {"router_tie_tol": [0.1]}, {"min_cos": 0.9},
])
def test_thresholds_invalid(kwargs):
    with pytest.raises(ValueError) as err:
        Thresholds.from_contract(**kwargs)
    assert next(iter(kwargs)).split("_")[0] in str(err.value)


def test_json_safe():
    obj = {"a": float("nan"), "b": [np.float32(1.5), np.int64(3), float("-inf")], "c": (Verdict.Match,)}
    assert json_safe(obj) == {"a": "nan", "b": [1.5, 3, "-inf"], "c": ["Match"]}
