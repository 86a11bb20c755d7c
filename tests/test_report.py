"""compare_traces / ParityReport on synthetic traces (seeded random data)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pytest_moeparity.contract import S, stage_contract, trace_key
from pytest_moeparity.metrics import Thresholds, Verdict
from pytest_moeparity.report import compare_traces
from pytest_moeparity.trace import Trace

P, H, E, K = 3, 16, 8, 2
EXPERTS = (1, 5)
TH = Thresholds(min_cosine=0.999, max_rel_l2=0.02, router_tie_tol=0.001)


def make_traces(n_layers=4, experts=EXPERTS, seed=0, positions=(0, 1, 2)):
    """Two identical traces over every contract stage (float stages [P, H], probs [P, E],
    indices [P, K]); callers plant differences into the candidate."""
    rng = np.random.default_rng(seed)
    ref: dict[str, np.ndarray] = {}
    for st in stage_contract().stages:
        layers = [None] if st.scope == "model" else range(n_layers)
        for layer in layers:
            if st.name == S.moe_router_probs:
                probs = rng.dirichlet(np.ones(E), size=P)
                # clear gaps everywhere so that only planted flips are ties
                probs = np.sort(probs, axis=1)[:, ::-1]
                probs[:, :K] += 0.05
                probs /= probs.sum(axis=1, keepdims=True)
                perm = rng.permutation(E)
                ref[trace_key(st.name, layer)] = probs[:, np.argsort(perm)].astype(np.float32)
            elif st.kind == "index":
                continue  # filled in from the probabilities below
            elif st.scope == "expert":
                for e in experts:
                    ref[trace_key(st.name, layer, e)] = rng.standard_normal((P, H)).astype(np.float32)
            else:
                ref[trace_key(st.name, layer)] = rng.standard_normal((P, H)).astype(np.float32)
    for layer in range(n_layers):
        probs = ref[trace_key(S.moe_router_probs, layer)]
        ref[trace_key(S.moe_router_indices, layer)] = np.argsort(-probs, axis=1)[:, :K].astype(np.int32)
    meta = {"positions": json.dumps(list(positions)), "backend": "numpy"}
    cand = {k: v.copy() for k, v in ref.items()}
    return ref, cand, meta


def report_of(ref, cand, meta, **kw):
    return compare_traces(Trace(ref, dict(meta)), Trace(cand, dict(meta, backend="cupy")), TH, **kw)


def plant_nan_cascade(cand, n_layers=4, bad_layer=2):
    cand[trace_key(S.moe_ffn_out, bad_layer)][1, 3] = np.nan
    cand[trace_key(S.post_ffn_residual, bad_layer)][1:] = np.nan
    rng = np.random.default_rng(99)
    for layer in range(bad_layer + 1, n_layers):  # poisoned / diverging downstream
        for st in (S.attn_norm, S.q_proj, S.post_attn_residual, S.moe_ffn_out, S.post_ffn_residual):
            cand[trace_key(st, layer)][:] = np.nan
        cand[trace_key(S.moe_router_logits, layer)] += rng.standard_normal((P, H)).astype(np.float32)
    for st in (S.final_norm, S.lm_head):
        cand[st][:] = np.nan


@pytest.fixture(scope="module")
def nan_report():
    ref, cand, meta = make_traces()
    plant_nan_cascade(cand)
    return report_of(ref, cand, meta), ref, meta


def test_identical_traces_are_ok():
    ref, cand, meta = make_traces()
    rep = report_of(ref, cand, meta)
    assert rep.ok and rep.first_divergence is None
    assert all(c.verdict is Verdict.Match and not c.downstream for c in rep.cells)
    n_expected = len(ref)
    assert len(rep.cells) == n_expected
    assert f"No divergence: {n_expected} cells Match" in rep.render()
    assert rep.junit_properties()[0] == ("moe_parity_ok", "true")


def test_first_divergence_is_the_planted_nan(nan_report):
    rep, _, _ = nan_report
    fd = rep.first_divergence
    assert (fd.layer, fd.stage, fd.expert, fd.verdict) == (2, S.moe_ffn_out, None, Verdict.NanGpu)
    assert fd.result.metrics["cand_nan"] == 1 and not fd.downstream
    assert not rep.ok
    text = rep.render()
    assert "First divergence: layer 2, stage moe_ffn_out, verdict NanGpu" in text
    assert "cand_nan=1" in text


def test_downstream_marking(nan_report):
    rep, _, _ = nan_report
    for c in rep.cells:
        if c.layer is not None and c.layer < 2:
            assert c.verdict is Verdict.Match and not c.downstream
        if c.verdict is not Verdict.Match and c is not rep.first_divergence:
            assert c.downstream, c.key
    down = {(c.layer, c.stage) for c in rep.cells if c.downstream}
    assert (3, S.moe_router_logits) in down and (3, S.post_ffn_residual) in down
    assert (None, S.lm_head) in down and (2, S.post_ffn_residual) in down
    table = rep.table()
    assert "NanGpu!" in table  # the first divergence
    assert "NanGpu*" in table and "Diverge*" in table
    assert "downstream" in rep.render()


def test_json_structure_and_round_trip(nan_report, tmp_path):
    rep, ref, meta = nan_report
    data = rep.to_json()
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert {"first_divergence", "ok", "cells", "thresholds", "meta", "hints"} <= set(back)
    fd = back["first_divergence"]
    assert fd["layer"] == 2 and fd["stage"] == "moe_ffn_out" and fd["expert"] is None
    assert fd["verdict"] == "NanGpu" and fd["metrics"]["cand_nan"] == 1 and fd["reason"]
    assert back["ok"] is False
    assert back["thresholds"] == {"min_cosine": 0.999, "max_rel_l2": 0.02, "router_tie_tol": 0.001}
    assert back["meta"]["reference"] == meta and back["meta"]["candidate"]["backend"] == "cupy"
    assert len(back["cells"]) == len(rep.cells)
    for cell in back["cells"]:
        assert set(cell) == {"layer", "stage", "expert", "verdict", "metrics", "reason", "downstream"}
        assert cell["verdict"] in {v.value for v in Verdict}
    assert any(c["downstream"] for c in back["cells"])
    assert back["hints"] == rep.hints()
    path = rep.write_json(tmp_path / "sub" / "report.json")
    assert json.loads(path.read_text()) == back
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left


def test_junit_properties(nan_report):
    rep, _, _ = nan_report
    props = dict(rep.junit_properties())
    assert props["moe_first_divergence_layer"] == "2"
    assert props["moe_first_divergence_stage"] == "moe_ffn_out"
    assert props["moe_first_divergence_verdict"] == "NanGpu"
    assert props["moe_parity_ok"] == "false"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rep.junit_properties())


def test_table_columns_in_contract_order(nan_report):
    rep, _, _ = nan_report
    lines = rep.table().splitlines()
    header = lines[0]
    names = stage_contract().names
    cols = [c.strip() for c in header.strip("| ").split("|")]
    assert cols[0] == "layer" and cols[1:] == list(names)
    labels = [line.strip("| ").split("|")[0].strip() for line in lines[2:]]
    assert labels == ["embed", "0", "1", "2", "3", "final"]


def test_table_max_width_splits_columns(nan_report):
    rep, _, _ = nan_report
    text = rep.table(max_width=120)
    assert all(len(line) <= 120 for line in text.splitlines())
    headers = [line for line in text.splitlines() if line.startswith("| layer")]
    assert len(headers) > 1
    seen = [c.strip() for h in headers for c in h.strip("| ").split("|")[1:]]
    assert seen == list(stage_contract().names)


def test_hints_for_expert_computation():
    ref, cand, meta = make_traces(experts=())  # no per-expert captures, as in aprender
    plant_nan_cascade(cand)
    rep = report_of(ref, cand, meta)
    hints = " | ".join(rep.hints())
    assert "router of layer 2 matches" in hints and "expert computation of layer 2" in hints
    assert "quant type dispatch" in hints
    assert "layer-specific" in hints and "layers 0..1 match" in hints
    assert "cascade" in hints


def test_missing_key():
    ref, cand, meta = make_traces()
    plant_nan_cascade(cand)
    del cand[trace_key(S.attn_out, 1)]
    rep = report_of(ref, cand, meta)
    missing = [c for c in rep.cells if c.verdict is Verdict.Missing]
    assert [(c.layer, c.stage) for c in missing] == [(1, S.attn_out)]
    assert missing[0].result.metrics["present_in"] == "reference" and not missing[0].downstream
    assert rep.first_divergence is missing[0]
    real = rep.first_non_match(include_missing=False)
    assert (real.layer, real.stage) == (2, S.moe_ffn_out)
    assert "Missing" in rep.table()
    assert any("capture gap" in h for h in rep.hints())
    assert any("first numeric divergence: layer 2, stage moe_ffn_out" in h for h in rep.hints())


def test_key_only_in_candidate_is_missing():
    ref, cand, meta = make_traces(n_layers=2)
    cand[trace_key(S.attn_out, 5)] = np.ones((P, H), np.float32)
    rep = report_of(ref, cand, meta)
    (cell,) = [c for c in rep.cells if c.verdict is Verdict.Missing]
    assert cell.layer == 5 and cell.result.metrics["present_in"] == "candidate"


def test_per_expert_worst_cell_is_named():
    ref, cand, meta = make_traces()
    cand[trace_key(S.moe_expert_out, 1, 5)] *= 2  # expert 5: scale bug; expert 1 matches
    rep = report_of(ref, cand, meta)
    fd = rep.first_divergence
    assert (fd.layer, fd.stage, fd.expert, fd.verdict) == (1, S.moe_expert_out, 5, Verdict.Diverge)
    expert_cells = [c for c in rep.cells if c.layer == 1 and c.stage == S.moe_expert_out]
    assert sorted(c.expert for c in expert_cells) == [1, 5]
    row1 = [line for line in rep.table().splitlines() if line.startswith("| 1 ")][0]
    assert "Diverge e5!" in row1
    assert any("expert 5 of layer 1" in h for h in rep.hints())
    assert any("scale error" in h for h in rep.hints())
    assert dict(rep.junit_properties())["moe_first_divergence_expert"] == "5"


def test_router_tie_is_match_and_its_one_sided_experts_are_skipped():
    ref, cand, meta = make_traces(n_layers=2, experts=())
    layer = 1
    probs = ref[trace_key(S.moe_router_probs, layer)]
    idx = ref[trace_key(S.moe_router_indices, layer)]
    order = np.argsort(-probs[0])
    kth, nxt = order[K - 1], order[K]
    probs[0, nxt] = probs[0, kth] - 0.0004  # plant a near-tie in the reference at position 0
    cand[trace_key(S.moe_router_probs, layer)] = probs.copy()
    cidx = idx.copy()
    cidx[0, list(idx[0]).index(kth)] = nxt
    cand[trace_key(S.moe_router_indices, layer)] = cidx
    # routed captures: each side captured the expert it chose
    x = np.random.default_rng(3).standard_normal((P, H)).astype(np.float32)
    ref[trace_key(S.moe_expert_out, layer, int(kth))] = x
    cand[trace_key(S.moe_expert_out, layer, int(nxt))] = x.copy()
    rep = report_of(ref, cand, meta)
    router = [c for c in rep.cells if c.stage == S.moe_router_indices and c.layer == layer][0]
    assert router.verdict is Verdict.Match and router.result.metrics["tie_positions"] == 1
    assert rep.ok, rep.render()
    assert "ties=1 Match" in rep.table()
    assert any("near-tie routing flip at layer(s) 1" in h and "not a bug" in h for h in rep.hints())
    assert sorted(k for k, _ in rep.skipped) == sorted(
        trace_key(S.moe_expert_out, layer, int(e)) for e in (kth, nxt))
    assert not any(c.verdict is Verdict.Missing for c in rep.cells)


def test_router_flip_beyond_tolerance_diverges():
    ref, cand, meta = make_traces(n_layers=2)
    idx = cand[trace_key(S.moe_router_indices, 0)]
    probs = ref[trace_key(S.moe_router_probs, 0)]
    idx[2, 0] = np.argsort(probs[2])[0]  # the least likely expert replaces the top one
    rep = report_of(ref, cand, meta)
    fd = rep.first_divergence
    assert (fd.layer, fd.stage, fd.verdict) == (0, S.moe_router_indices, Verdict.Diverge)
    assert "flips=1 Diverge!" in rep.table()


@pytest.mark.parametrize("stage, layer, words", [
    (S.embedding, None, "embedding"),
    (S.q_post_rope, 0, "attention path at layer 0"),
    (S.attn_softmax, 0, "attention path at layer 0"),
    (S.lm_head, None, "only lm_head diverges: the output projection"),
])
def test_stage_hints(stage, layer, words):
    ref, cand, meta = make_traces(n_layers=2)
    cand[trace_key(stage, layer)] += 0.5 * np.random.default_rng(4).standard_normal((P, H)).astype(np.float32)
    rep = report_of(ref, cand, meta)
    assert rep.first_divergence.stage == stage
    assert any(words in h for h in rep.hints()), rep.hints()


def test_stage_filter_and_ignored_keys():
    ref, cand, meta = make_traces(n_layers=2)
    ref["layer.0.not_a_stage"] = cand["layer.0.not_a_stage"] = np.zeros((P, H), np.float32)
    rep = report_of(ref, cand, meta, stages="router")
    assert {c.stage for c in rep.cells} == {S.moe_router_logits, S.moe_router_probs, S.moe_router,
                                            S.moe_router_indices}
    assert ("reference", "layer.0.not_a_stage", "unknown stage") in rep.ignored_keys
    assert rep.ok


def test_positions_mismatch_raises():
    ref, cand, meta = make_traces(n_layers=1)
    with pytest.raises(ValueError, match="positions"):
        compare_traces(Trace(ref, dict(meta)), Trace(cand, dict(meta, positions="[0, 1, 5]")), TH)


def test_empty_comparison_is_not_ok():
    rep = compare_traces(Trace({}, {}), Trace({}, {}), TH)
    assert not rep.ok and rep.first_divergence is None
    assert "Nothing compared" in rep.render()
    json.dumps(rep.to_json(), allow_nan=False)


def test_missing_cells_after_the_first_divergence_are_downstream():
    ref, cand, meta = make_traces()
    plant_nan_cascade(cand)
    del cand[trace_key(S.attn_out, 1)]  # before the NaN at layer 2: a capture gap only
    del cand[trace_key(S.moe_expert_out, 3, EXPERTS[0])]  # after it: part of the cascade
    rep = report_of(ref, cand, meta)
    missing = {(c.layer, c.stage, c.expert): c.downstream for c in rep.cells if c.verdict is Verdict.Missing}
    assert missing == {(1, S.attn_out, None): False, (3, S.moe_expert_out, EXPERTS[0]): True}
    row3 = [line for line in rep.table().splitlines() if line.startswith("| 3 ")][0]
    assert f"Missing e{EXPERTS[0]}*" in row3
    assert rep.to_json()["cells"][[c.key for c in rep.cells].index(
        trace_key(S.moe_expert_out, 3, EXPERTS[0]))]["downstream"] is True


def test_render_header_names_both_backends_the_model_and_the_prompt():
    ref, cand, meta = make_traces(n_layers=1)
    meta = dict(meta, model="tiny-q4km.gguf", tokens=json.dumps([3, 1, 4]))
    rep = report_of(ref, cand, meta)
    assert rep.render().splitlines()[0] == "reference numpy vs candidate cupy, model tiny-q4km.gguf, 3 tokens"
    assert rep.header() == rep.render().splitlines()[0]
    # traces that name no backend (e.g. two bare dumps) get no header line
    bare = compare_traces(Trace(ref, {}), Trace(cand, {}), TH)
    assert bare.header() is None and bare.render().startswith("| layer")


def plant_near_tie_flip(ref, cand, layer):
    """The reference's k-th and (k+1)-th experts of ``layer`` tie within router_tie_tol at position 0
    and the candidate picks the other one: a router cell ``ties=1 Match``."""
    probs = ref[trace_key(S.moe_router_probs, layer)]
    idx = ref[trace_key(S.moe_router_indices, layer)]
    order = np.argsort(-probs[0])
    kth, nxt = order[K - 1], order[K]
    probs[0, nxt] = probs[0, kth] - 0.0004
    cand[trace_key(S.moe_router_probs, layer)] = probs.copy()
    cidx = idx.copy()
    cidx[0, list(idx[0]).index(kth)] = nxt
    cand[trace_key(S.moe_router_indices, layer)] = cidx


@pytest.mark.parametrize("stages, first", [
    (None, (2, S.moe_ffn_out)),  # the flipped layer's MoE output is the first divergence
    ("moe_router_probs,moe_router_indices,attn_norm", (3, S.attn_norm)),  # the next layer's first capture
])
def test_divergence_after_a_near_tie_flip_is_not_called_a_bug(stages, first):
    ref, cand, meta = make_traces(experts=())
    plant_near_tie_flip(ref, cand, 2)
    rng = np.random.default_rng(5)
    for key in [trace_key(S.moe_ffn_out, 2), trace_key(S.post_ffn_residual, 2), trace_key(S.attn_norm, 3)]:
        cand[key] = cand[key] + 0.3 * rng.standard_normal(cand[key].shape).astype(np.float32)
    rep = report_of(ref, cand, meta, stages=stages)
    fd = rep.first_divergence
    assert (fd.layer, fd.stage) == first
    assert "ties=1 Match" in rep.table()
    hints = rep.hints()
    flip = [h for h in hints if "follows a near-tie routing flip" in h]
    assert len(flip) == 1 and "router of layer 2" in flip[0] and "not a bug of the expert math" in flip[0]
    text = " | ".join(hints)
    assert "layer-specific" not in text and "inherited" not in text and "expert computation" not in text
