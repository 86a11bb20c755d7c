"""Bisection that explains: isolated layers, forced routing, per-expert drill-down, fault injection.

All on the tiny Q4_K_M model (8 layers; ffn_down_exps Q6_K at layers 0, 3, 6, 7 and Q4_K at 1, 2,
4, 5) with the NumPy backend as the candidate, so the only differences are the planted ones.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pytest_moeparity.backends import ModeUnsupported, call_trace, default_registry
from pytest_moeparity.bisect import restrict_trace, widen_plan
from pytest_moeparity.faults import FaultError, parse_faults
from pytest_moeparity.metrics import Verdict
from pytest_moeparity.model import load_model
from pytest_moeparity.parity import run_parity
from pytest_moeparity.plan import SavePlan
from pytest_moeparity.report import compare_traces

TOKENS = [17, 301, 44, 5, 480, 123]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture(scope="module")
def registry():
    return default_registry(entry_points=False)


@pytest.fixture(scope="module")
def reference(model, registry):
    """The reference trace of every stage at every position (shared by the injection cases)."""
    return call_trace(registry.create("numpy", model), TOKENS, SavePlan.parse(), name="numpy")


def _bad(x):
    return x.verdict not in (None, "Match")


# ---- isolated -----------------------------------------------------------------------------
def test_isolated_layer3_is_wrong_by_itself_later_layers_inherit(model, registry):
    run = run_parity(model, TOKENS, SavePlan.parse("attn_out,moe_router_indices,moe_ffn_out,post_ffn_residual"),
                     candidate="numpy", registry=registry, faults="scale=1.5@3:attn_out", isolated=True,
                     drilldown=False)
    first = run.report.first_divergence
    assert (first.layer, first.stage, first.verdict) == (3, "attn_out", Verdict.Diverge)
    iso = run.report.bisect.isolated
    rows = {r["layer"]: r for r in iso.rows}
    assert rows[3]["status"] == "own" and rows[3]["isolated"].stage == "attn_out"
    for L in (4, 5, 6, 7):
        assert rows[L]["status"] == "inherited"
        assert rows[L]["isolated"].verdict == "Match" and _bad(rows[L]["cascaded"])
    for L in (0, 1, 2):
        assert rows[L]["status"] == "ok"
    assert iso.own_layers() == [3] and iso.inherited_layers() == [4, 5, 6, 7]
    text = run.report.render()
    assert "layer 3: wrong by itself (isolated Diverge at attn_out)" in text
    assert "layers 4-7: inherit (isolated Match)" in text
    doc = json.loads(json.dumps(run.report.to_json(), allow_nan=False))
    assert doc["isolated"]["own_layers"] == [3] and doc["isolated"]["inherited_layers"] == [4, 5, 6, 7]
    assert doc["injected_faults"] == ["scale=1.5@3:attn_out"]
    assert doc["forced_routing"] is None and doc["drilldown"] == []


# ---- forced routing -----------------------------------------------------------------------
def test_forced_routing_separates_a_router_fault_from_expert_math(model, registry, reference):
    L = 2
    chosen = set(np.unique(reference[f"layer.{L}.moe_router_indices"]).tolist())
    never = sorted(set(range(model.config.n_experts)) - chosen)
    assert never, "the test needs an expert the reference never chooses at layer 2"
    j = never[0]
    run = run_parity(model, TOKENS, SavePlan.parse("router,experts,moe_ffn_out,post_ffn_residual,lm_head"),
                     candidate="numpy", registry=registry, faults=f"add=20@{L}:moe_router_logits#{j}",
                     forced_routing=True, drilldown=False)
    # the normal run: the router logits are first, the chosen experts flip at every position of layer 2
    first = run.report.first_divergence
    assert (first.layer, first.stage) == (L, "moe_router_logits")
    forced = run.report.bisect.forced
    flips_l = [f for f in forced.flips if f["layer"] == L]
    assert len(flips_l) == len(TOKENS)
    for f in flips_l:
        assert f["cand_only"] == [j] and not f["tie"]
        assert f["margin"] is not None and f["margin"] >= 0
    # with the reference's choices the experts and everything after them match at every layer
    assert all(r["forced_rest"].ok for r in forced.rows)
    assert not any(c.verdict is not Verdict.Match for c in forced.report.cells
                   if c.stage in ("moe_expert_gate", "moe_expert_up", "moe_expert_swiglu", "moe_expert_out",
                                  "moe_ffn_out", "post_ffn_residual", "lm_head"))
    text = "\n".join(forced.summary)
    assert "routing flip beyond near-ties at layer 2" in text
    assert "the router itself differs at layer 2" in text
    doc = run.report.to_json()
    assert doc["forced_routing"]["n_flips"] == len(forced.flips)
    assert all(isinstance(f["margin"], float) for f in doc["forced_routing"]["flips"])
    assert "reference margin p_k - p_k+1" in run.report.render()


def test_near_tie_flip_is_reported_as_a_flip_not_a_bug(tmp_path, tiny_model_path):
    spec = importlib.util.spec_from_file_location("near_tie_example", EXAMPLES / "near_tie" / "near_tie.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import shutil

    shutil.copyfile(tiny_model_path, tmp_path / "tiny-q4km.gguf")
    res, (layer, a, b, t, fault) = mod.run(tmp_path)
    router = next(c for c in res.report.cells if c.stage == "moe_router_indices" and c.layer == layer)
    assert router.verdict is Verdict.Match and router.result.metrics["tie_positions"] == 1
    forced = res.report.bisect.forced
    first = forced.flips[0]
    assert (first["layer"], first["position"], first["tie"]) == (layer, t, True)
    assert first["margin"] == 0.0 and first["ref_only"] == [a] and first["cand_only"] == [b]
    assert all(r["forced_rest"].ok and r["forced_router"].ok for r in forced.rows)
    assert "a near-tie flip, not a bug" in " ".join(forced.summary)
    assert "ties=1 Match" in res.report.render()


def _near_tie_tipped_upstream(tmp_path, model, registry, reference, tau=1e-3):
    """A model whose router at some layer L >= 1 holds a near-tie (expert a above b by tau in logit at
    position t, a at the k-th place) that a small nudge of layer L - 1's output tips the other way.

    Row b of blk.L.ffn_gate_inp becomes row a - tau h/|h|^2 + mu v, with h the reference's router input
    at t, v the unit part of the nudge's change dh of h orthogonal to h, and mu = 2 tau / (v . dh): the
    reference's logit gap b - a is -tau, the nudged run's +tau. Returns (path, L, a, b, t, fault)."""
    from gguf import GGUFReader

    cfg = model.config
    k = cfg.n_experts_used

    def straddles(L: int, a: int, b: int, t: int) -> bool:  # a k-th, b (k+1)-th, no third expert near
        row = np.asarray(reference[f"layer.{L}.moe_router_logits"], np.float64)[t].copy()
        row[b] = row[a] - tau
        order = np.argsort(-row, kind="stable")
        return order[k - 1] == a and order[k] == b and np.min(np.abs(np.delete(row, [a, b]) - row[a])) > 20 * tau

    found = next(((L, a, b, t) for L in range(1, cfg.n_layers) for a in range(cfg.n_experts)
                  for b in range(cfg.n_experts) if b != a for t in range(len(TOKENS)) if straddles(L, a, b, t)), None)
    if found is None:
        pytest.fail("no router row pair of the tiny model straddles the top-k boundary")
    L, a, b, t = found
    x = np.asarray(reference[f"layer.{L - 1}.post_ffn_residual"], np.float64)
    fault = f"add={2e-3 * np.sqrt((x * x).mean()):.6g}@{L - 1}:post_ffn_residual"
    nudged = registry.create("numpy", model).trace(TOKENS, SavePlan.parse("ffn_norm", layers=[L]), faults=parse_faults(fault))
    h = np.asarray(reference[f"layer.{L}.ffn_norm"], np.float64)[t]
    dh = np.asarray(nudged[f"layer.{L}.ffn_norm"], np.float64)[t] - h
    u = h / (h @ h)
    v = dh - (dh @ u) * h
    v /= np.linalg.norm(v)
    name = f"blk.{L}.ffn_gate_inp.weight"
    assert model.tensor(name).type_name == "F32"
    path = tmp_path / "tiny-tipped.gguf"
    import shutil

    shutil.copyfile(model.path, path)
    info = next(ti for ti in GGUFReader(path).tensors if ti.name == name)
    row_bytes = cfg.hidden * 4
    with open(path, "r+b") as fh:
        fh.seek(int(info.data_offset) + a * row_bytes)
        row_a = np.frombuffer(fh.read(row_bytes), np.float32).astype(np.float64)
        fh.seek(int(info.data_offset) + b * row_bytes)
        fh.write((row_a - tau * u + (2 * tau / (v @ dh)) * v).astype(np.float32).tobytes())
    return path, L, a, b, t, fault


def test_drilldown_blames_a_near_tie_tipped_by_upstream_differences(tmp_path, model, registry, reference):
    """Run alone, layer L matches; in the full run a tiny upstream difference (within every threshold)
    tips a near-tied router choice at L, so L's moe_ffn_out is the first divergence: the drill-down must
    say it follows a near-tie flip, not a bug of the expert math."""
    path, L, a, b, t, fault = _near_tie_tipped_upstream(tmp_path, model, registry, reference)
    res = run_parity(load_model(path), TOKENS, SavePlan.parse(), candidate="numpy", faults=fault, isolated=True,
                     registry=registry)
    rep = res.report
    bad = [c for c in rep.cells if c.verdict is not Verdict.Match]
    assert (bad[0].layer, bad[0].stage) == (L, "moe_ffn_out"), "the nudge itself (layer L - 1) stays a Match"
    router = next(c for c in rep.cells if c.stage == "moe_router_indices" and c.layer == L)
    assert router.verdict is Verdict.Match and router.result.metrics["tie_positions"] == 1
    flip = router.result.metrics["flips"][0]
    assert (flip["position"], flip["ref_only"], flip["cand_only"], flip["tie"]) == (t, [a], [b], True)
    iso = next(c for c in rep.bisect.isolated.report.cells if c.stage == "moe_ffn_out" and c.layer == L)
    assert iso.verdict is Verdict.Match
    drill = next(d for d in rep.bisect.drilldown if d.layer == L)
    assert (f"in the full run the router of layer {L} flips 1 near-tied expert(s)" in drill.message
            and "not a bug of the expert math" in drill.message), drill.message


# ---- drill-down ---------------------------------------------------------------------------
def test_drilldown_names_the_expert_and_its_quant_types(model, registry, reference):
    run = run_parity(model, TOKENS, SavePlan.parse("moe_router,moe_router_indices,moe_ffn_out,post_ffn_residual"),
                     candidate="numpy", registry=registry, faults="dispatch=q6_k@*:ffn_down_exps")
    first = run.report.first_divergence
    assert (first.layer, first.stage) == (1, "moe_ffn_out")
    drills = run.report.bisect.drilldown
    assert [d.layer for d in drills] == [1]
    d = drills[0]
    chosen = set(np.unique(reference["layer.1.moe_router_indices"]).tolist())
    assert d.expert in chosen and set(d.experts_checked) == chosen
    assert d.stage == "moe_expert_out" and d.verdict == "Diverge"
    assert d.quant_types == {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K", "ffn_down_exps": "Q4_K"}
    assert f"expert {d.expert} first differs at moe_expert_out" in d.message
    assert "ffn_down_exps (Q4_K)" in d.message and "read as Q6_K" in d.message
    j = run.report.to_json()["drilldown"][0]
    assert (j["layer"], j["expert"], j["stage"]) == (1, d.expert, "moe_expert_out")


def test_drilldown_off_and_unneeded(model, registry):
    run = run_parity(model, TOKENS, SavePlan.parse("moe_ffn_out"), candidate="numpy", registry=registry,
                     faults="scale=2@4:moe_ffn_out", drilldown=False)
    assert run.report.bisect.drilldown == []
    clean = run_parity(model, TOKENS, SavePlan.parse("moe_ffn_out"), candidate="numpy", registry=registry)
    assert clean.report.ok and clean.report.bisect.drilldown == []
    assert clean.report.to_json()["drilldown"] == [] and "Per-expert" not in clean.report.render()


# ---- every injection kind is named where it was planted ------------------------------------
CASES = [
    ("nan@2:attn_out", (2, "attn_out", None), Verdict.NanGpu),
    ("inf@5:q_post_rope", (5, "q_post_rope", None), Verdict.NanGpu),
    ("scale=2@3:moe_ffn_out", (3, "moe_ffn_out", None), Verdict.Diverge),
    ("add=0.5@6:ffn_norm", (6, "ffn_norm", None), Verdict.Diverge),
    ("zero@4:v_proj", (4, "v_proj", None), Verdict.Diverge),
    ("dispatch=q6_k@*:ffn_down_exps", (1, "moe_expert_out", "routed"), Verdict.Diverge),
    ("nan@lm_head", (None, "lm_head", None), Verdict.NanGpu),
    ("scale=3@2:moe_expert_out#{E}", (2, "moe_expert_out", "E"), Verdict.Diverge),
]


@pytest.mark.parametrize("spec, where, verdict", CASES, ids=[c[0].split("@")[0] + "@" + c[0].split("@")[1].split("#")[0]
                                                             + ("#E" if "#" in c[0] else "") for c in CASES])
def test_each_injection_kind_is_named_at_its_layer_and_stage(model, registry, reference, spec, where, verdict):
    chosen2 = sorted(set(np.unique(reference["layer.2.moe_router_indices"]).tolist()))
    e = chosen2[0]
    spec = spec.format(E=e)
    cand = call_trace(registry.create("numpy", model), TOKENS, SavePlan.parse(), name="numpy",
                      faults=parse_faults(spec))
    first = compare_traces(reference, cand).first_divergence
    layer, stage, expert = where
    assert (first.layer, first.stage, first.verdict) == (layer, stage, verdict), spec
    if expert == "E":
        assert first.expert == e
    elif expert == "routed":
        assert first.expert in set(np.unique(reference["layer.1.moe_router_indices"]).tolist())


def test_column_faults_only_touch_their_expert():
    (f,) = parse_faults("add=3@2:moe_router_logits#5")
    assert f.column and f.matches("moe_router_logits", 2, None) and not f.matches("moe_router_logits", 1, None)
    x = np.zeros((2, 8), np.float32)
    y = f.apply(x)
    assert y[:, 5].tolist() == [3.0, 3.0] and np.count_nonzero(y) == 2 and np.count_nonzero(x) == 0
    (n,) = parse_faults("nan@0:moe_router_probs#1")
    assert np.isnan(n.apply(x)[:, 1]).all() and not np.isnan(n.apply(x)[:, 0]).any()
    with pytest.raises(FaultError, match="per-expert stages"):
        parse_faults("add=1@2:attn_out#3")


# ---- the engine protocol ------------------------------------------------------------------
class _PlainEngine:
    """An engine from before the protocol grew its keywords: trace(tokens, plan) only."""

    def __init__(self, model):
        from pytest_moeparity.backends import _NumpyEngine

        self.inner = _NumpyEngine(model, "numpy")

    def trace(self, tokens, plan):
        return self.inner.trace(tokens, plan)


@pytest.mark.parametrize("kw, mode", [(dict(isolated=True), "isolated"), (dict(forced_routing=True), "forced routing"),
                                      (dict(faults="nan@1:attn_out"), "fault injection")])
def test_engine_without_a_mode_gets_a_clear_error(model, kw, mode):
    reg = default_registry(entry_points=False)
    reg.register("plain", _PlainEngine)
    with pytest.raises(ModeUnsupported, match=rf"backend 'plain' does not support {mode}") as exc:
        run_parity(model, TOKENS, SavePlan.parse("moe_ffn_out"), candidate="plain", registry=reg, **kw)
    assert isinstance(exc.value, ValueError)


def test_engine_without_layer_inputs_skips_the_drilldown_with_a_note(model):
    class Scaled(_PlainEngine):
        def trace(self, tokens, plan):
            tr = self.inner.trace(tokens, plan)
            tr.tensors = {k: (v * 2 if k == "layer.2.moe_ffn_out" else v) for k, v in tr.tensors.items()}
            return tr

    reg = default_registry(entry_points=False)
    reg.register("scaled", Scaled)
    run = run_parity(model, TOKENS, SavePlan.parse("moe_ffn_out"), candidate="scaled", registry=reg)
    assert run.report.first_divergence.layer == 2
    assert run.report.bisect.drilldown == []
    assert any("drill-down skipped: backend 'scaled'" in n for n in run.report.bisect.notes)


def test_widened_reference_cut_back_equals_the_plain_plan(model, registry, reference):
    plan = SavePlan.parse("attn_out,moe_router_indices,experts,lm_head", layers="2..5", positions="last")
    direct = call_trace(registry.create("numpy", model), TOKENS, plan, name="numpy")
    wide = call_trace(registry.create("numpy", model), TOKENS, widen_plan(plan), name="numpy")
    cut = restrict_trace(wide, plan, len(TOKENS))
    assert sorted(cut.keys()) == sorted(direct.keys())
    for k in direct.keys():
        if ".expert." in k:  # per-expert captures are computed on the captured rows only: BLAS rounding
            np.testing.assert_allclose(cut[k], direct[k], rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(cut[k], direct[k])
    assert cut.positions == direct.positions == [len(TOKENS) - 1]


# ---- the mis-dispatch on rows that hold whole Q6_K blocks: the garbage-read path ------------
def test_misdispatch_reads_garbage_where_q4k_rows_hold_two_q6k_blocks(tmp_path_factory, registry):
    """On the tiny model a Q4_K expert row (144 bytes) holds less than one 210-byte Q6_K block, so
    the planted mis-dispatch only zeroes it. With expert_ff=768 a Q4_K row is 432 bytes = 2 whole
    Q6_K blocks: the bytes are decoded as Q6_K (garbage scales), the path of the historical NaN."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from pytest_moeparity.cli import main
    from pytest_moeparity.faults import misdispatch_dequantize

    path = tmp_path_factory.mktemp("ff768") / "ff768-q4km.gguf"
    assert main(["make-model", str(path), "--layers", "8", "--hidden", "64", "--heads", "2", "--kv-heads", "1",
                 "--head-dim", "32", "--experts", "4", "--experts-used", "2", "--expert-ff", "768",
                 "--vocab", "320", "--quant", "Q4_K_M", "--quiet"]) == 0
    m = load_model(path)
    types = [m.layer(L, "ffn_down_exps").type_name for L in range(8)]
    first_q4k = types.index("Q4_K")
    assert types[:first_q4k] and set(types[:first_q4k]) == {"Q6_K"}  # a Q6_K layer (no-op fault) before it
    down = m.layer(first_q4k, "ffn_down_exps")
    q6_block, q6_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]
    assert down.raw.shape[-1] // q6_bytes >= 2  # each row holds >= 2 whole Q6_K blocks
    wrong = misdispatch_dequantize(down.raw, "Q6_K", down.shape[-1])
    read = 2 * q6_block
    assert np.count_nonzero(np.nan_to_num(wrong[..., :read], nan=1.0)) > 0.5 * wrong[..., :read].size
    assert not np.any(wrong[..., read:])

    run = run_parity(m, [3, 1, 4, 1, 5], SavePlan.parse("moe_router_indices,moe_ffn_out,post_ffn_residual"),
                     candidate="numpy", registry=registry, faults="dispatch=q6_k@*:ffn_down_exps")
    first = run.report.first_divergence
    assert (first.layer, first.stage) == (first_q4k, "moe_ffn_out"), run.report.render()
    assert first.verdict in (Verdict.NanGpu, Verdict.Diverge)
    cand = np.asarray(run.candidate[f"layer.{first_q4k}.moe_ffn_out"])
    assert np.count_nonzero(np.nan_to_num(cand, nan=1.0)) > 0.5 * cand.size  # not the all-zero degenerate case
    assert all(c.verdict is Verdict.Match for c in run.report.cells if c.layer is not None and c.layer < first_q4k)
    (d,) = [d for d in run.report.bisect.drilldown if d.layer == first_q4k]
    assert d.stage == "moe_expert_out" and d.verdict in ("NanGpu", "Diverge")
    assert d.quant_types["ffn_down_exps"] == "Q4_K" and "ffn_down_exps (Q4_K)" in d.message
