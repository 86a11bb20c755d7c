"""make-model: the tokenizer block, the 30b-a3b preset's shapes, progress output, atomic writes,
and the reference forward's streaming memory on the files it makes."""
from __future__ import annotations

import dataclasses
import os
import re
import tracemalloc

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

import pytest_moeparity.make_model as mm
from pytest_moeparity.cli import main
from pytest_moeparity.make_model import PRESETS, ModelSpec, make_model, plan_tensors
from pytest_moeparity.model import GGUFModel, load_model
from pytest_moeparity.plan import SavePlan
from pytest_moeparity.reference import reference_forward

# F32 rows need no block multiple: the smallest model that make-model writes
MINI = ModelSpec(n_layers=1, hidden=32, n_heads=1, n_kv_heads=1, head_dim=32, n_experts=2,
                 n_experts_used=1, expert_ff=32, vocab=300, context_length=64)


# ---- the tokenizer block -----------------------------------------------------------------------
def check_tokenizer(kv: dict, vocab: int) -> None:
    """The gpt2/qwen2 byte-level BPE block that llama.cpp loads."""
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == "qwen2"
    tokens, types, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.merges"]
    assert len(tokens) == len(types) == vocab
    assert len(set(tokens)) == vocab, "duplicate tokens"
    # the 256 byte tokens of GPT-2's byte-level BPE first, three control tokens last
    assert all(len(t) == 1 for t in tokens[:256]) and len(set(tokens[:256])) == 256
    assert list(tokens[-3:]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert list(types[-3:]) == [3, 3, 3] and set(types[:-3]) == {1}
    assert kv["tokenizer.ggml.bos_token_id"] == vocab - 3
    assert kv["tokenizer.ggml.eos_token_id"] == vocab - 1
    # every merge is "a b" with a, b and a+b in the vocabulary; the merges make the merged tokens
    assert len(merges) == vocab - 256 - 3 > 0
    vocab_set = set(tokens)
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab_set and b in vocab_set and a + b in vocab_set, m
    assert {a + b for a, b in (m.split(" ") for m in merges)} == set(tokens[256:-3])


@pytest.mark.parametrize("vocab", [260, 300, PRESETS["small"].vocab])
def test_tokenizer_block_in_file(tmp_path, vocab):
    path = tmp_path / "tok.gguf"
    make_model(path, dataclasses.replace(MINI, vocab=vocab), quant="F32", seed=1, progress=False)
    reader = GGUFReader(path)
    check_tokenizer({k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}, vocab)
    assert GGUFModel(path).config.vocab == vocab  # token count == embedding rows


def test_tokenizer_block_30b_vocab(tmp_path):
    """The 30b-a3b vocabulary (151936) goes past the letter-pair merges into merges of longer
    tokens. Checked on the writer's key/values: gguf's reader takes ~8 s over 151936 strings."""
    w = GGUFWriter(tmp_path / "never-written.gguf", "qwen3moe")
    mm._tokenizer(w, PRESETS["30b-a3b"].vocab)
    kv = {k: v.value for d in w.kv_data for k, v in d.items()}
    w.close()
    check_tokenizer(kv, 151936)
    assert any(len(m.split(" ")[0]) > 2 for m in kv["tokenizer.ggml.merges"])  # the second regime is reached


def test_tokenizer_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab 259 too small: needs at least 260"):
        make_model(tmp_path / "v.gguf", dataclasses.replace(MINI, vocab=259), quant="F32", progress=False)
    assert not list(tmp_path.iterdir())  # nothing left behind


# ---- the 30b-a3b preset (shapes only: nothing is generated) --------------------------------------
def test_30b_a3b_preset_is_qwen3_30b_a3b():
    spec = PRESETS["30b-a3b"]
    assert (spec.hidden, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (2048, 48, 32, 4, 128)
    assert (spec.n_experts, spec.n_experts_used, spec.expert_ff, spec.vocab) == (128, 8, 768, 151936)
    assert spec.rms_eps == 1e-6 and spec.rope_base == 1e6 and spec.tied_output is False
    plans = {tp.name: tp for tp in plan_tensors(spec, "Q4_K_M", 0)}
    assert len(plans) == 2 + 48 * 12 + 1  # token_embd, output_norm, output; 12 per layer
    assert plans["token_embd.weight"].shape == plans["output.weight"].shape == (151936, 2048)
    assert plans["blk.47.attn_q.weight"].shape == (32 * 128, 2048)
    assert plans["blk.47.attn_k.weight"].shape == plans["blk.0.attn_v.weight"].shape == (4 * 128, 2048)
    assert plans["blk.0.attn_output.weight"].shape == (2048, 4096)
    assert plans["blk.0.attn_q_norm.weight"].shape == (128,)
    assert plans["blk.0.ffn_gate_inp.weight"].shape == (128, 2048)
    assert plans["blk.0.ffn_gate_exps.weight"].shape == plans["blk.0.ffn_up_exps.weight"].shape == (128, 768, 2048)
    assert plans["blk.0.ffn_down_exps.weight"].shape == (128, 2048, 768)
    params = sum(int(np.prod(tp.shape)) for tp in plans.values())
    expert_params = 3 * 768 * 2048
    active = params - 48 * (128 - 8) * expert_params
    assert 30.4e9 < params < 30.6e9, params  # "30B"
    assert 3.2e9 < active < 3.4e9, active      # "A3B"
    # ~17 GiB at Q4_K_M, with llama.cpp's Q6_K/Q4_K mix in ffn_down_exps
    assert 17.0 < sum(tp.nbytes for tp in plans.values()) / 2**30 < 17.6
    down = {plans[f"blk.{i}.ffn_down_exps.weight"].qtype.name for i in range(48)}
    assert down == {"Q4_K", "Q6_K"}


# ---- progress on stderr ------------------------------------------------------------------------
CLI_SMALL = ["--layers", "2", "--experts", "4", "--quant", "Q8_0", "--seed", "3"]
LINE = re.compile(r"^writing (\S+): +([\d.]+) / ([\d.]+) MiB \( *([\d.]+)%\) +([\d.]+) MiB/s$")


def test_progress_over_threshold(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mm, "PROGRESS_MIN_BYTES", 256 * 1024)  # the file is ~1.7 MiB
    out = tmp_path / "p.gguf"
    assert main(["make-model", str(out), *CLI_SMALL]) == 0
    stdout, stderr = capsys.readouterr()
    size = out.stat().st_size
    assert size > mm.PROGRESS_MIN_BYTES
    lines = stderr.strip().splitlines()
    assert len(lines) >= 5, stderr
    done = []
    for line in lines:
        m = LINE.match(line)
        assert m, f"not a progress line: {line!r}"
        assert m.group(1) == "p.gguf" and float(m.group(5)) > 0
        done.append(float(m.group(2)))
    assert done == sorted(done) and lines[-1].split("(")[1].startswith("100.0%")
    assert abs(done[-1] - size / 2**20) < 0.1  # the tensor data is almost all of the file
    m = re.fullmatch(r"wrote (\S+) \(([\d.]+) MiB, (\d+) tensors\) in [\d.]+ s = ([\d.]+) MiB/s\n", stdout)
    assert m, stdout
    assert m.group(1) == str(out) and int(m.group(3)) == 3 + 2 * 12 and float(m.group(4)) > 0
    # --quiet silences the progress, not the summary
    assert main(["make-model", str(tmp_path / "q.gguf"), *CLI_SMALL, "--quiet"]) == 0
    stdout, stderr = capsys.readouterr()
    assert stderr == "" and "MiB/s" in stdout
    assert (tmp_path / "q.gguf").read_bytes() == out.read_bytes()  # same seed, same file


def test_no_progress_under_threshold(tmp_path, capsys):
    assert main(["make-model", str(tmp_path / "s.gguf"), *CLI_SMALL]) == 0
    stdout, stderr = capsys.readouterr()
    assert (tmp_path / "s.gguf").stat().st_size < mm.PROGRESS_MIN_BYTES
    assert stderr == "" and "MiB/s" in stdout


# ---- atomic writes -------------------------------------------------------------------------------
def test_failing_write_leaves_existing_file(tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    old = np.random.default_rng(5).bytes(3000)
    out.write_bytes(old)
    real, calls = mm.make_chunk, []

    def failing(tp, chunk):
        calls.append(tp.name)
        if len(calls) == 10:
            raise OSError("disk full (simulated)")
        return real(tp, chunk)

    monkeypatch.setattr(mm, "make_chunk", failing)
    with pytest.raises(OSError, match="disk full"):
        make_model(out, dataclasses.replace(MINI, n_layers=2), quant="F32", seed=1, jobs=1, progress=False)
    assert len(calls) == 10  # it failed part-way through the tensor data
    assert out.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]  # no temp file behind
    # a write that succeeds replaces the file whole, again leaving no temp file
    monkeypatch.setattr(mm, "make_chunk", real)
    make_model(out, dataclasses.replace(MINI, n_layers=2), quant="F32", seed=1, jobs=1, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]
    assert GGUFModel(out).config.n_layers == 2


# ---- streaming memory of the reference -----------------------------------------------------------
def test_reference_streams_weights(tmp_path):
    """A forward dequantizes one expert at a time: the peak of traced allocations (NumPy reports
    its buffers to tracemalloc) stays under 3x one layer's dequantized weights, far below the
    dequantized model (12 layers)."""
    path = tmp_path / "small.gguf"
    make_model(path, PRESETS["small"], quant="Q8_0", seed=0, jobs=1, progress=False)
    model = load_model(path)
    names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp",
             "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    layer_bytes = sum(int(np.prod(model.layer(0, n).shape)) * 4 for n in names)
    dense_bytes = sum(int(np.prod(t.shape)) * 4 for t in model.tensors.values())
    assert 3 * layer_bytes < dense_bytes / 4  # so the bound separates streaming from dequantizing all
    tracemalloc.start()
    try:
        result = reference_forward(model, [1, 2, 3, 4], SavePlan.empty())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.isfinite(result.logits).all()
    # the measurement sees NumPy buffers at all: one expert's three matrices are dequantized at once
    assert peak > 3 * 512 * 512 * 4
    print(f"peak {peak / 2**20:.1f} MiB, one layer {layer_bytes / 2**20:.1f} MiB, model {dense_bytes / 2**20:.1f} MiB")
    assert peak < 3 * layer_bytes, f"peak {peak / 2**20:.1f} MiB vs one layer {layer_bytes / 2**20:.1f} MiB"
