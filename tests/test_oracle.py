"""Agreement of the NumPy reference with an independent implementation: transformers' Qwen3-MoE.

Both sides get the same weights: the GGUF tensors of a random model, dequantized to float64.
``numpy-f64`` is compared with transformers in float64 and ``numpy`` with transformers in
float32, stage by stage where transformers exposes the stage (embedding, every layer's output,
the router's choice and weights, the final norm, the logits).

transformers' float64 is not float64 throughout: its RMSNorm computes in float32 and its
attention and router softmaxes return float32 before casting back, so the float64 floor here is
~1e-7, not ~1e-15. The bound of 1e-6 still sits an order of magnitude above that floor and many
orders below what any real mismatch gives (``test_oracle_catches_mapping_mistakes`` shows that
wrong expert fusing, a missing top-k renormalisation or a wrong RoPE base all land above 1e-3).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers oracle needs torch (pip install '.[oracle]')")
transformers = pytest.importorskip("transformers", reason="the oracle needs transformers (pip install '.[oracle]')")
try:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
except ImportError as exc:  # pragma: no cover - an old transformers without Qwen3-MoE
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3-MoE ({exc})", allow_module_level=True)

from pytest_moeparity.make_model import ModelSpec, make_model  # noqa: E402
from pytest_moeparity.model import GGUFModel  # noqa: E402
from pytest_moeparity.plan import SavePlan  # noqa: E402
from pytest_moeparity.reference import BACKENDS, NumpyForward  # noqa: E402

# K-quant rows must be multiples of 256: hidden and expert_ff are 256. Three layers: the Q4_K_M
# file then mixes Q4_K (layers 0, 1) and Q6_K (layer 2) in ffn_down_exps.
SPEC = ModelSpec(n_layers=3, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                 n_experts_used=2, expert_ff=256, vocab=512, context_length=512)
TOKENS = [1, 300, 17, 511, 42, 256, 99, 7]  # 8 positions: causal mask and RoPE positions matter

TOL = {"float64": 1e-6, "float32": 1e-4}
OUR_BACKEND = {"float64": "numpy-f64", "float32": "numpy"}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}

CASES = [(q, tied) for q in ("F32", "Q8_0", "Q4_K_M") for tied in (False, True)]
PLAN = SavePlan.parse("embedding,moe_router,moe_router_indices,post_ffn_residual,final_norm,lm_head")

def rel_l2(ours, theirs) -> float:
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    assert np.isfinite(a).all() and np.isfinite(b).all(), "non-finite values"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls: torch's thread pool only adds overhead, and on a busy machine (xdist workers,
    CI runners) its spinning threads make a 30 ms forward take a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclasses.dataclass
class Case:
    quant: str
    tied: bool
    model: GGUFModel
    weights: dict  # GGUF name -> float64 ndarray


@pytest.fixture(scope="module", params=CASES, ids=[f"{q}-{'tied' if t else 'untied'}" for q, t in CASES])
def case(request, tmp_path_factory) -> Case:
    quant, tied = request.param
    spec = dataclasses.replace(SPEC, tied_output=tied)
    path = tmp_path_factory.mktemp("oracle") / f"oracle-{quant}-{'tied' if tied else 'untied'}.gguf"
    make_model(path, spec, quant=quant, seed=11 + CASES.index(request.param), progress=False)
    model = GGUFModel(path)
    assert model.config.tied_output is tied
    assert ("output.weight" in model.tensors) is (not tied)
    weights = {name: t.dequantize(np.float64) for name, t in model.tensors.items()}
    return Case(quant, tied, model, weights)


# ---- the transformers side -----------------------------------------------------------------
def hf_config(cfg, **overrides) -> Qwen3MoeConfig:
    kw = dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              moe_intermediate_size=cfg.expert_ff, intermediate_size=cfg.expert_ff,
              num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_used,
              norm_topk_prob=True,  # llama.cpp always renormalises the top-k weights
              decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=cfg.rms_eps,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
              tie_word_embeddings=cfg.tied_output, attention_bias=False, use_sliding_window=False,
              max_position_embeddings=cfg.context_length, attn_implementation="eager",
              # the default grouped_mm experts kernel has no float64 path
              experts_implementation="eager")
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def hf_state_dict(c: Case, dtype, swap_gate_up: bool = False) -> dict:
    def t(name):
        return torch.from_numpy(c.weights[name]).to(dtype)

    sd = {"model.embed_tokens.weight": t("token_embd.weight"),
          "model.norm.weight": t("output_norm.weight"),
          "lm_head.weight": t("token_embd.weight" if c.tied else "output.weight")}
    names = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
             "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
             "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
             "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate.weight": "ffn_gate_inp",
             "mlp.experts.down_proj": "ffn_down_exps"}  # [E, H, F] on both sides
    for layer in range(c.model.config.n_layers):
        hf, gg = f"model.layers.{layer}.", f"blk.{layer}."
        for hf_name, gguf_name in names.items():
            sd[hf + hf_name] = t(f"{gg}{gguf_name}.weight")
        # transformers fuses gate and up as [E, 2F, H] and splits the output: first F = gate
        gate, up = t(f"{gg}ffn_gate_exps.weight"), t(f"{gg}ffn_up_exps.weight")
        sd[hf + "mlp.experts.gate_up_proj"] = torch.cat([up, gate] if swap_gate_up else [gate, up], dim=1)
    return sd


def build_hf(c: Case, dtype, swap_gate_up: bool = False, **config_overrides):
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(hf_config(c.model.config, **config_overrides)).to(dtype).eval()
    sd = hf_state_dict(c, dtype, swap_gate_up)
    want = model.state_dict()
    assert set(sd) == set(want), (f"parameter mapping is off: missing {sorted(set(want) - set(sd))}, "
                                  f"unexpected {sorted(set(sd) - set(want))}")
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(want[k].shape), f"{k}: ours {tuple(v.shape)} vs HF {tuple(want[k].shape)}"
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    for k, v in model.state_dict().items():  # what sits in the model is what we loaded, in the dtype asked
        assert v.dtype == dtype, f"{k} is {v.dtype}"
        assert torch.equal(v, sd[k]), f"{k} did not load"
    return model


def run_hf(model, tokens) -> dict:
    """Forward with hooks on the modules whose outputs are our stages."""
    got: dict = {"layer": {}, "router": {}}
    hooks = []

    def keep(key, sub=None):
        def hook(_mod, _inp, out):
            if sub is None:
                got[key] = out.detach()
            else:
                got[key][sub] = out.detach() if torch.is_tensor(out) else tuple(o.detach() for o in out)
        return hook

    inner = model.model
    hooks.append(inner.embed_tokens.register_forward_hook(keep("embedding")))
    hooks.append(inner.norm.register_forward_hook(keep("final_norm")))
    for i, layer in enumerate(inner.layers):
        hooks.append(layer.register_forward_hook(keep("layer", i)))
        hooks.append(layer.mlp.gate.register_forward_hook(keep("router", i)))
    try:
        with torch.no_grad():
            out = model(torch.tensor([tokens]), output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    got["logits"] = out.logits[0]
    got["hidden_states"] = [h[0] for h in out.hidden_states]
    return got


_RUNS: dict = {}


def runs(c: Case, dtype: str):
    """(our trace, HF captures) for a case and dtype, computed once per module."""
    key = (c.quant, c.tied, dtype)
    if key not in _RUNS:
        be = OUR_BACKEND[dtype]
        ours = NumpyForward(c.model, name=be, **BACKENDS[be]).run(TOKENS, PLAN).trace
        theirs = run_hf(build_hf(c, TORCH_DTYPE[dtype]), TOKENS)
        _RUNS[key] = (ours, theirs)
    return _RUNS[key]


def check(dtype: str, err: float, what: str) -> None:
    assert err < TOL[dtype], f"{what}: rel L2 {err:.3g} >= {TOL[dtype]:g} ({dtype})"


# ---- the tests -----------------------------------------------------------------------------
def test_quant_mix_is_what_the_case_says(case):
    """The cases really cover the types they claim (Q4_K_M mixes Q4_K and Q6_K experts)."""
    types = {case.model.layer(i, "ffn_down_exps").type_name for i in range(SPEC.n_layers)}
    want = {"F32": {"F32"}, "Q8_0": {"Q8_0"}, "Q4_K_M": {"Q4_K", "Q6_K"}}[case.quant]
    assert types == want


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_logits_match_transformers(case, dtype):
    ours, theirs = runs(case, dtype)
    assert ours["lm_head"].dtype == np.dtype(dtype)
    assert ours["lm_head"].shape == (len(TOKENS), SPEC.vocab)
    check(dtype, rel_l2(ours["lm_head"], theirs["logits"].numpy()), "logits vs transformers")
    # and the same argmax at every position (the thing a user of the logits sees)
    assert (np.argmax(ours["lm_head"], -1) == theirs["logits"].argmax(-1).numpy()).all()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_layer_output_matches_transformers(case, dtype):
    ours, theirs = runs(case, dtype)
    check(dtype, rel_l2(ours["embedding"], theirs["embedding"][0].numpy()), "embedding")
    for layer in range(SPEC.n_layers):
        check(dtype, rel_l2(ours[f"layer.{layer}.post_ffn_residual"], theirs["layer"][layer][0].numpy()),
              f"layer {layer} post_ffn_residual vs decoder layer {layer} output")
    check(dtype, rel_l2(ours["final_norm"], theirs["final_norm"][0].numpy()), "final_norm")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hidden_states_tuple_layout(case, dtype):
    """HF's ``hidden_states``: [embedding, layer 0 .. n-2 outputs, final-normed last layer]."""
    ours, theirs = runs(case, dtype)
    hs = theirs["hidden_states"]
    n = SPEC.n_layers
    assert len(hs) == n + 1
    check(dtype, rel_l2(ours["embedding"], hs[0].numpy()), "hidden_states[0] vs embedding")
    for i in range(1, n):
        check(dtype, rel_l2(ours[f"layer.{i - 1}.post_ffn_residual"], hs[i].numpy()),
              f"hidden_states[{i}] vs layer {i - 1} post_ffn_residual")
    # the last entry is the final-normed output, not layer n-1's raw output
    check(dtype, rel_l2(ours["final_norm"], hs[n].numpy()), "hidden_states[-1] vs final_norm")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_router_choices_match_transformers(case, dtype):
    ours, theirs = runs(case, dtype)
    for layer in range(SPEC.n_layers):
        _logits, hf_w, hf_idx = theirs["router"][layer]
        our_idx = ours[f"layer.{layer}.moe_router_indices"]
        assert our_idx.shape == (len(TOKENS), SPEC.n_experts_used)
        hf_idx = hf_idx.numpy()
        for t in range(len(TOKENS)):
            assert sorted(our_idx[t].tolist()) == sorted(hf_idx[t].tolist()), \
                f"layer {layer} position {t}: experts {our_idx[t].tolist()} vs transformers {hf_idx[t].tolist()}"
        # both list the chosen experts by descending probability: the weights line up
        check(dtype, rel_l2(ours[f"layer.{layer}.moe_router"], hf_w.numpy()),
              f"layer {layer} moe_router weights")


MUTANTS = {
    "gate_up_swapped": dict(swap_gate_up=True),
    "no_topk_renorm": dict(norm_topk_prob=False),
    "wrong_rope_base": dict(rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
}


@pytest.fixture(scope="module")
def f32_case(tmp_path_factory) -> Case:
    path = tmp_path_factory.mktemp("oracle-mutants") / "oracle-mutants.gguf"
    make_model(path, SPEC, quant="F32", seed=5, progress=False)
    model = GGUFModel(path)
    return Case("F32", False, model, {n: t.dequantize(np.float64) for n, t in model.tensors.items()})


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_oracle_catches_mapping_mistakes(f32_case, mutant):
    """The comparison is sensitive: plausible mistakes on the HF side miss the float64 bound by far."""
    ours, theirs = runs(f32_case, "float64")
    assert rel_l2(ours["lm_head"], theirs["logits"].numpy()) < TOL["float64"]
    bad = run_hf(build_hf(f32_case, torch.float64, **MUTANTS[mutant]), TOKENS)
    assert rel_l2(ours["lm_head"], bad["logits"].numpy()) > 1e-3
