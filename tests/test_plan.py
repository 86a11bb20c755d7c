"""The save-plan grammar, for strings and for Python lists, and what a plan makes a forward capture."""
from __future__ import annotations

import numpy as np
import pytest

from pytest_moeparity.contract import parse_key, stage_contract
from pytest_moeparity.make_model import ModelSpec, make_model
from pytest_moeparity.model import load_model
from pytest_moeparity.plan import PlanError, SavePlan, parse_experts, parse_layers, parse_positions, parse_stages
from pytest_moeparity.reference import reference_forward

NAMES = stage_contract().names
SPEC = ModelSpec(n_layers=4, hidden=64, n_heads=2, n_kv_heads=1, head_dim=32, n_experts=4,
                 n_experts_used=2, expert_ff=64, vocab=300, context_length=64)
TOKENS = [5, 17, 250, 3, 99]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.gguf"
    make_model(path, SPEC, quant="Q8_0", seed=7, progress=False)
    return load_model(path)


def captured(model, plan) -> dict:
    return reference_forward(model, TOKENS, plan).trace.tensors


# ---- stages --------------------------------------------------------------------------------
def test_stages_all_and_none_give_every_stage_in_order():
    assert parse_stages("all") == parse_stages(None) == parse_stages(["ALL"]) == NAMES
    assert len(NAMES) > 20 and NAMES[0] == "embedding" and NAMES[-1] == "lm_head"


@pytest.mark.parametrize("spec", ["lm_head,moe_router,embedding", " LM_Head , Moe_Router,EMBEDDING ",
                                  ["lm_head", "moe_router", "embedding"], ("Embedding", " lm_head", "MOE_ROUTER")])
def test_stages_comma_list_case_insensitive_forward_order(spec):
    # forward order whatever the order asked, duplicates merged
    assert parse_stages(spec) == ("embedding", "moe_router", "lm_head")


@pytest.mark.parametrize("alias, want", [
    ("layer_output", ("post_ffn_residual",)),
    ("qkv_matmul", ("q_proj", "k_proj", "v_proj")),
    ("router", ("moe_router_logits", "moe_router_probs", "moe_router", "moe_router_indices")),
    ("experts", ("moe_expert_gate", "moe_expert_up", "moe_expert_swiglu", "moe_expert_out")),
    ("moe_expert_swigl", ("moe_expert_swiglu",)),
])
def test_stage_aliases(alias, want):
    assert parse_stages(alias) == want
    assert parse_stages([alias.upper()]) == want
    assert parse_stages(f"{alias},post_ffn_residual") == tuple(n for n in NAMES if n in set(want) | {"post_ffn_residual"})


@pytest.mark.parametrize("spec", ["nope", "embedding,nope", ["nope"], ["embedding", "nope"]])
def test_unknown_stage_lists_valid_names(spec):
    with pytest.raises(PlanError) as exc:
        parse_stages(spec)
    msg = str(exc.value)
    assert "unknown stage 'nope'" in msg
    for name in ("embedding", "moe_ffn_out", "lm_head", "layer_output", "router"):
        assert name in msg


@pytest.mark.parametrize("spec", ["", " ", ",", [], [""], ("",)])
def test_empty_stage_list(spec):
    with pytest.raises(PlanError, match="empty stage list.*valid stages: embedding"):
        parse_stages(spec)


@pytest.mark.parametrize("spec", ["embedding,,lm_head", ["embedding", ""]])
def test_empty_name_in_stage_list(spec):
    with pytest.raises(PlanError, match="empty name in stage list"):
        parse_stages(spec)


# ---- layers --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, want", [
    (None, None), ("all", None), ("ALL", None), (" All ", None),
    ("3", ((3, 4),)), (3, ((3, 4),)), (np.int64(3), ((3, 4),)),
    ("1..3", ((1, 3),)), ("..2", ((None, 2),)), ("2..", ((2, None),)), ("..", ((None, None),)),
    ("0, 2..4", ((0, 1), (2, 4))), ([0, 2], ((0, 1), (2, 3))), ((1,), ((1, 2),)),
    ([0, "2..4"], ((0, 1), (2, 4))), (["3"], ((3, 4),)),
])
def test_layers_grammar(spec, want):
    assert parse_layers(spec) == want


def test_layer_range_is_end_exclusive():
    plan = SavePlan.parse("post_ffn_residual", layers="1..3")
    assert plan.resolve_layers(4) == [1, 2]
    assert SavePlan.parse(layers="2..").resolve_layers(4) == [2, 3]
    assert SavePlan.parse(layers="..1").resolve_layers(4) == [0]
    assert SavePlan.parse(layers="3").resolve_layers(4) == [3]
    assert SavePlan.parse(layers=[3, 0]).resolve_layers(4) == [0, 3]
    assert SavePlan.parse(layers="all").resolve_layers(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("spec, match", [
    ("-1", "negative layer -1"), ([-1], "negative layer -1"), (-1, "negative layer -1"),
    ([0, -2], "negative layer -2"), ("-1..2", "negative layer in '-1..2'"), (["-1..2"], "negative layer in"),
    ("3..1", r"empty layer range '3\.\.1'"), ("2..2", "empty layer range"), (["3..1"], "empty layer range"),
    ("", "empty layer specification"), ([], "empty layer specification"), ((), "empty layer specification"),
    ("two", "bad layer 'two'"), (["two"], "bad layer 'two'"), ([1.5], "bad layer 1.5"), ([True], "bad layer True"),
    ([None], "bad layer None"), ("1,,2", "empty name in layer list"), (["1", ""], "empty name in layer list"),
    ("a..3", "bad layer range start 'a'"),
])
def test_bad_layers(spec, match):
    with pytest.raises(PlanError, match=match):
        parse_layers(spec)


@pytest.mark.parametrize("spec, match", [
    ("4", "layer 4 out of range: the model has 4 layers"), ([4], "layer 4 out of range"),
    ([0, 9], "layer 9 out of range"), ("2..5", "layer range end 5 out of range"),
    (["1..7"], "layer range end 7 out of range"),
])
def test_layers_out_of_range(spec, match, model):
    plan = SavePlan.parse("post_ffn_residual", layers=spec)
    with pytest.raises(PlanError, match=match):
        plan.resolve_layers(4)
    with pytest.raises(PlanError, match=match):
        reference_forward(model, TOKENS, plan)


# ---- positions -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec, want", [
    (None, "all"), ("all", "all"), ("LAST", "last"), (" last ", "last"), ("0,2", (0, 2)), ("-1", (-1,)),
    ([0, 2], (0, 2)), ((-1,), (-1,)), (3, (3,)), (["1", " 4"], (1, 4)), ([np.int32(2)], (2,)),
])
def test_positions_grammar(spec, want):
    assert parse_positions(spec) == want


def test_positions_resolve():
    assert SavePlan.parse(positions="last").resolve_positions(5) == [4]
    assert SavePlan.parse(positions="all").resolve_positions(3) == [0, 1, 2]
    assert SavePlan.parse(positions=[-1, 0, 4]).resolve_positions(5) == [0, 4]  # -1 and 4 are one position
    assert SavePlan.parse(positions="3,-5").resolve_positions(5) == [0, 3]


@pytest.mark.parametrize("spec, match", [
    ("", "empty position specification"), ([], "empty position specification"),
    ((), "empty position specification"), ("x", "bad token position 'x'"), ([1.0], "bad token position 1.0"),
    (["first"], "bad token position 'first'"), ("1,,2", "empty name in position list"),
])
def test_bad_positions(spec, match):
    with pytest.raises(PlanError, match=match):
        parse_positions(spec)


@pytest.mark.parametrize("spec", ["5", [5], [-6], "0,-6"])
def test_positions_out_of_range(spec, model):
    plan = SavePlan.parse("lm_head", positions=spec)
    with pytest.raises(PlanError, match="token position -?[56] out of range for 5 tokens"):
        reference_forward(model, TOKENS, plan)


# ---- experts -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, want", [
    (None, "routed"), ("routed", "routed"), ("ALL", "all"), ("3,1,3", (1, 3)), ([3, 1, 3], (1, 3)),
    (2, (2,)), (["0"], (0,)),
])
def test_experts_grammar(spec, want):
    assert parse_experts(spec) == want


@pytest.mark.parametrize("spec, match", [
    ("-2", "negative expert id -2"), ([-2], "negative expert id -2"), (-2, "negative expert id -2"),
    ("", "empty expert specification"), ([], "empty expert specification"), ("e1", "bad expert id 'e1'"),
    ([0.5], "bad expert id 0.5"),
])
def test_bad_experts(spec, match):
    with pytest.raises(PlanError, match=match):
        parse_experts(spec)


def test_experts_out_of_range(model):
    plan = SavePlan.parse("moe_expert_out", experts=[1, 4])
    with pytest.raises(PlanError, match=r"expert ids \[4\] out of range: the model has 4 experts"):
        reference_forward(model, TOKENS, plan)


# ---- a plan built without parse still fails loudly ---------------------------------------------
def test_unparsed_plans_are_checked_at_resolve():
    with pytest.raises(PlanError, match="negative layer"):
        SavePlan(stages=NAMES, layers=((-1, 0),)).resolve_layers(4)
    with pytest.raises(PlanError, match="empty layer specification"):
        SavePlan(stages=NAMES, layers=()).resolve_layers(4)
    with pytest.raises(PlanError, match="empty position specification"):
        SavePlan(stages=NAMES, positions=()).resolve_positions(4)
    with pytest.raises(PlanError, match="out of range"):
        SavePlan(stages=NAMES, experts=(-2,)).resolve_experts(4)


# ---- what a forward captures ---------------------------------------------------------------------
def test_empty_plan_captures_nothing(model):
    plan = SavePlan.empty()
    assert plan.is_empty and plan.stages == ()
    result = reference_forward(model, TOKENS, plan)
    assert result.trace.tensors == {}
    assert result.logits.shape == (len(TOKENS), SPEC.vocab) and np.isfinite(result.logits).all()
    # the same forward with a plan captures: the empty trace is the plan's doing
    assert captured(model, SavePlan.parse("lm_head"))


def test_list_plan_captures_exactly_what_it_names(model):
    plan = SavePlan.parse(["post_ffn_residual", "MOE_EXPERT_OUT", "lm_head"], layers=[0, "2..4"],
                          positions=[-1, 1], experts=[2, 0])
    got = captured(model, plan)
    keys = {parse_key(k) for k in got}
    want = {("lm_head", None, None)}
    want |= {("post_ffn_residual", layer, None) for layer in (0, 2, 3)}
    want |= {("moe_expert_out", layer, e) for layer in (0, 2, 3) for e in (0, 2)}
    assert keys == want
    assert got["lm_head"].shape == (2, SPEC.vocab)
    full = captured(model, SavePlan.parse("post_ffn_residual,lm_head"))
    np.testing.assert_array_equal(got["lm_head"], full["lm_head"][[1, 4]])
    np.testing.assert_array_equal(got["layer.2.post_ffn_residual"], full["layer.2.post_ffn_residual"][[1, 4]])


def test_string_and_list_plans_agree(model):
    a = SavePlan.parse("Router,layer_output", layers="1..3", positions="0,-1", experts="1,3")
    b = SavePlan.parse(["router", "LAYER_OUTPUT"], layers=[1, 2], positions=[0, -1], experts=[3, 1])
    assert a.stages == b.stages and a.positions == b.positions and a.experts == b.experts
    assert a.resolve_layers(4) == b.resolve_layers(4) == [1, 2]
    ka, kb = captured(model, a), captured(model, b)
    assert set(ka) == set(kb) and len(ka) == 2 * 5
    for k in ka:
        np.testing.assert_array_equal(ka[k], kb[k])


def test_describe_round_trips():
    plan = SavePlan.parse("lm_head,embedding", layers=[0, "2..4", "6.."], positions="last", experts=[3, 1])
    assert plan.describe() == "stages=embedding,lm_head layers=0,2..4,6.. positions=last experts=1,3"
    assert SavePlan.parse().describe() == "stages=all layers=all positions=all experts=routed"
