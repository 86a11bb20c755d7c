"""``moeparity trace`` writes what the contract says; ``moeparity make-model`` writes what it says.

The trace file is read back with safetensors directly (not through :class:`Trace`), and the
expected shapes are evaluated from ``contracts/stages.yaml`` read here with PyYAML, so this
test does not lean on the code it checks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from gguf import GGUFReader
from safetensors import safe_open

from pytest_moeparity.cli import main
from pytest_moeparity.make_model import PRESETS, make_model
from pytest_moeparity.model import GGUFModel

TINY = PRESETS["tiny"]  # 8 layers, hidden 256, 4/2 heads x 64, 8 experts top-2, ffn 256, vocab 512
TOKENS = [3, 141, 59, 265, 358, 97, 93, 238]
CONTRACT = yaml.safe_load((Path(__file__).resolve().parents[1] / "contracts" / "stages.yaml").read_text())
STAGES = {s["name"]: s for s in CONTRACT["stages"]}


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, f"moeparity {' '.join(map(str, argv))}: exit {rc}: {err}"
    assert "Traceback" not in err
    return out


def read(path):
    with safe_open(str(path), framework="numpy") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def contract_shape(stage: str, n_tokens: int) -> tuple[int, ...]:
    c = TINY
    env = {"H": c.hidden, "NH": c.n_heads, "NKV": c.n_kv_heads, "HD": c.head_dim, "E": c.n_experts,
           "K": c.n_experts_used, "F": c.expert_ff, "V": c.vocab, "T": n_tokens}
    return tuple(int(np.prod([env[f.strip()] for f in str(d).split("*")])) for d in STAGES[stage]["shape"])


def split_key(key: str):
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) == 3 and parts[0] == "layer":
        return parts[2], int(parts[1]), None
    assert len(parts) == 5 and parts[0] == "layer" and parts[2] == "expert", key
    return parts[4], int(parts[1]), int(parts[3])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    make_model(path, TINY, quant="Q4_K_M", seed=0, progress=False)
    return path


@pytest.fixture(scope="module")
def full_trace(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "full.safetensors"
    assert main(["trace", str(tiny), "--tokens", ",".join(map(str, TOKENS)), "--out", str(out)]) == 0
    return read(out)


# ---- moeparity trace -----------------------------------------------------------------------
def test_trace_keys_and_shapes_follow_the_contract(full_trace):
    tensors, _meta = full_trace
    T = len(TOKENS)
    assert tensors["layer.6.moe_ffn_out"].shape == (T, TINY.hidden)
    assert tensors["lm_head"].shape == (T, TINY.vocab)
    assert tensors["layer.0.attn_scores"].shape == (T, TINY.n_heads, T)
    assert tensors["layer.7.q_post_rope"].shape == (T, TINY.n_heads, TINY.head_dim)
    # every layer- and model-scope stage of the contract, at every layer
    for name, st in STAGES.items():
        if st["scope"] == "model":
            assert name in tensors, name
        elif st["scope"] == "layer":
            for layer in range(TINY.n_layers):
                assert f"layer.{layer}.{name}" in tensors, f"layer.{layer}.{name}"
    # and nothing but contract stages, each with its contract shape and kind
    for key, value in tensors.items():
        stage, layer, expert = split_key(key)
        assert stage in STAGES, key
        assert (layer is None) == (STAGES[stage]["scope"] == "model"), key
        assert (expert is None) == (STAGES[stage]["scope"] != "expert"), key
        assert value.shape == (T, *contract_shape(stage, T)), key
        if STAGES[stage].get("kind") == "index":
            assert np.issubdtype(value.dtype, np.integer), key
        else:
            assert value.dtype == np.float32, key
            assert np.isfinite(value).all(), key


def test_trace_per_expert_stages_cover_the_routed_experts(full_trace):
    tensors, _ = full_trace
    T = len(TOKENS)
    for layer in range(TINY.n_layers):
        routed = set(np.unique(tensors[f"layer.{layer}.moe_router_indices"]).tolist())
        for stage in ("moe_expert_gate", "moe_expert_up", "moe_expert_swiglu", "moe_expert_out"):
            have = {split_key(k)[2] for k in tensors if k.startswith(f"layer.{layer}.expert.") and k.endswith(stage)}
            assert have == routed, (layer, stage)
        for e in routed:
            out = tensors[f"layer.{layer}.expert.{e}.moe_expert_out"]
            assert out.shape == (T, TINY.hidden)
    # moe_ffn_out is the routing-weighted sum of the chosen experts' outputs
    layer = 6
    idx, w = tensors[f"layer.{layer}.moe_router_indices"], tensors[f"layer.{layer}.moe_router"]
    want = np.zeros((T, TINY.hidden))
    for t in range(T):
        for slot in range(TINY.n_experts_used):
            want[t] += w[t, slot] * tensors[f"layer.{layer}.expert.{idx[t, slot]}.moe_expert_out"][t]
    got = tensors[f"layer.{layer}.moe_ffn_out"]
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_trace_metadata(full_trace, tiny):
    _, meta = full_trace
    assert meta["model"] == tiny.name
    assert meta["model_size"] == str(tiny.stat().st_size)
    assert json.loads(meta["tokens"]) == TOKENS
    assert json.loads(meta["positions"]) == list(range(len(TOKENS)))
    assert meta["dtype"] == "float32"
    assert meta["contract_version"] == str(CONTRACT["version"])
    assert meta["backend"] == "numpy"


def test_trace_positions_last(tiny, tmp_path, capsys, full_trace):
    out = tmp_path / "last.safetensors"
    cli(capsys, "trace", tiny, "--tokens", ",".join(map(str, TOKENS)), "--positions", "last", "--out", out)
    tensors, meta = read(out)
    full, _ = full_trace
    assert json.loads(meta["positions"]) == [len(TOKENS) - 1]
    is_expert = {k: STAGES[split_key(k)[0]]["scope"] == "expert" for k in full}
    assert {k for k in tensors if not is_expert[k]} == {k for k in full if not is_expert[k]}
    for key, value in tensors.items():
        assert value.shape[0] == 1, key
        # the same values as the last row of the all-positions trace; per-expert stages are
        # computed on the captured rows only (a 1-row matmul), so equal to rounding
        if is_expert[key]:
            a, b = value[0].astype(np.float64), full[key][-1].astype(np.float64)
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), key
        else:
            np.testing.assert_array_equal(value[0], full[key][-1], err_msg=key)
    # per-expert stages: only the experts routed at the last position
    for layer in range(TINY.n_layers):
        routed = set(tensors[f"layer.{layer}.moe_router_indices"][0].tolist())
        have = {split_key(k)[2] for k in tensors if k.startswith(f"layer.{layer}.expert.")}
        assert have == routed, layer


def test_trace_layer_range(tiny, tmp_path, capsys):
    out = tmp_path / "layers.safetensors"
    cli(capsys, "trace", tiny, "--tokens", "1,2,3", "--layers", "2..4", "--out", out)
    tensors, _ = read(out)
    layers = {split_key(k)[1] for k in tensors}
    assert layers == {None, 2, 3}
    for name in ("embedding", "final_norm", "lm_head"):
        assert tensors[name].shape[0] == 3, name
    assert "layer.2.moe_ffn_out" in tensors and "layer.3.post_ffn_residual" in tensors


def test_trace_stage_subset(tiny, tmp_path, capsys):
    out = tmp_path / "stages.safetensors"
    cli(capsys, "trace", tiny, "--tokens", "1,2,3", "--stages", "moe_router,layer_output", "--out", out)
    tensors, _ = read(out)
    assert {split_key(k)[0] for k in tensors} == {"moe_router", "post_ffn_residual"}
    assert len(tensors) == 2 * TINY.n_layers


def test_trace_float64(tiny, tmp_path, capsys, full_trace):
    out = tmp_path / "f64.safetensors"
    cli(capsys, "trace", tiny, "--tokens", ",".join(map(str, TOKENS)), "--dtype", "float64", "--out", out)
    tensors, meta = read(out)
    full, _ = full_trace
    assert meta["dtype"] == "float64"
    assert meta["backend"] == "numpy-f64"
    for key, value in tensors.items():
        if STAGES[split_key(key)[0]].get("kind") == "index":
            assert np.issubdtype(value.dtype, np.integer), key
            continue
        assert value.dtype == np.float64, key
    a, b = tensors["lm_head"], full["lm_head"].astype(np.float64)
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a)


# ---- moeparity make-model --------------------------------------------------------------------
def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits(i_layer, n_layers), written out again here."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


F32_ALWAYS = {"attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "output_norm", "ffn_gate_inp"}
FILE_TYPE = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15}


def expected_type(kind: str, layer, n: int, quant: str) -> str:
    if kind in F32_ALWAYS:
        return "F32"
    if quant in ("Q4_K_M", "Q5_K_M"):
        if kind == "output":
            return "Q6_K"
        if kind in ("ffn_down_exps", "attn_v") and more_bits(layer, n):
            return "Q6_K"
        return "Q4_K" if quant == "Q4_K_M" else "Q5_K"
    return quant


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("quant", list(FILE_TYPE))
def test_make_model_quant_types(quant, tmp_path, capsys):
    out = tmp_path / f"m-{quant}.gguf"
    # the tiny preset with 4 experts instead of 8 (halves the time; the type rules do not look at E)
    text = cli(capsys, "make-model", out, "--quant", quant.lower(), "--experts", "4", "--quiet")
    assert str(out) in text
    model = GGUFModel(out)
    assert model.config.n_layers == TINY.n_layers and model.config.hidden == TINY.hidden
    assert not model.config.tied_output
    types = tensor_types(out)
    assert len(types) == 1 + 12 * TINY.n_layers + 2
    for name, tname in types.items():
        parts = name.split(".")
        layer, kind = (int(parts[1]), parts[2]) if parts[0] == "blk" else (None, parts[0])
        assert tname == expected_type(kind, layer, TINY.n_layers, quant), name
    assert GGUFReader(out).fields["general.file_type"].contents() == FILE_TYPE[quant]
    if quant == "Q4_K_M":  # the 8-layer mix: Q6_K at 0, 3, 6, 7 and Q4_K at 1, 2, 4, 5
        down = [types[f"blk.{i}.ffn_down_exps.weight"] for i in range(8)]
        assert down == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    # loadable means usable: a short forward gives finite logits
    tr = tmp_path / "t.safetensors"
    cli(capsys, "trace", out, "--tokens", "1,2", "--stages", "lm_head", "--out", tr)
    tensors, _ = read(tr)
    assert tensors["lm_head"].shape == (2, TINY.vocab) and np.isfinite(tensors["lm_head"]).all()


def test_make_model_tied(tmp_path, capsys):
    out = tmp_path / "tied.gguf"
    cli(capsys, "make-model", out, "--tied", "--quant", "Q8_0", "--layers", "2", "--quiet")
    assert "output.weight" not in tensor_types(out)
    model = GGUFModel(out)
    assert model.config.tied_output
    tr = tmp_path / "t.safetensors"
    cli(capsys, "trace", out, "--tokens", "5,6,7", "--stages", "final_norm,lm_head", "--dtype", "float64", "--out", tr)
    tensors, _ = read(tr)
    emb = model.tensors["token_embd.weight"].dequantize(np.float64)
    want = tensors["final_norm"] @ emb.T
    assert np.linalg.norm(tensors["lm_head"] - want) <= 1e-10 * np.linalg.norm(want)


def test_make_model_hot_layer(tmp_path, capsys):
    small = ["--experts", "4", "--quiet"]
    cold, hot = tmp_path / "cold.gguf", tmp_path / "hot.gguf"
    cli(capsys, "make-model", cold, "--seed", "7", *small)
    cli(capsys, "make-model", hot, "--seed", "7", "--hot-layer", "2", "--hot-scale", "1e6", *small)
    mc, mh = GGUFModel(cold), GGUFModel(hot)
    assert mh.get_meta("moeparity.hot_layer") == 2
    assert set(mc.tensors) == set(mh.tensors)
    for name, tc in mc.tensors.items():
        th = mh.tensors[name]
        if name == "blk.2.ffn_down_exps.weight":
            assert th.qtype == tc.qtype
            a, b = tc.dequantize(np.float64), th.dequantize(np.float64)
            assert np.isfinite(b).all()
            ratio = np.sqrt(np.mean(b * b) / np.mean(a * a))
            assert 0.97e6 < ratio < 1.03e6, ratio
            # the same draw, scaled: the hot tensor points where the cold one does
            cos = float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))
            assert cos > 0.99
        else:
            np.testing.assert_array_equal(th.raw, tc.raw, err_msg=f"{name} changed by --hot-layer 2")


def test_make_model_seed_determinism(tmp_path, capsys):
    small = ["--layers", "2", "--experts", "2", "--quant", "Q4_K_M", "--quiet"]
    paths = {n: tmp_path / f"{n}.gguf" for n in ("a", "b", "c")}
    cli(capsys, "make-model", paths["a"], "--seed", "3", *small)
    cli(capsys, "make-model", paths["b"], "--seed", "3", *small)
    cli(capsys, "make-model", paths["c"], "--seed", "4", *small)
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert paths["a"].read_bytes() != paths["c"].read_bytes()
    ma, mc = GGUFModel(paths["a"]), GGUFModel(paths["c"])
    # the weights differ, not just the metadata naming the seed
    for name in ("token_embd.weight", "blk.1.ffn_down_exps.weight", "output.weight"):
        assert not np.array_equal(ma.tensors[name].raw, mc.tensors[name].raw), name
    assert ma.config == mc.config
