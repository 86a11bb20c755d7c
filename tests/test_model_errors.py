"""Bad input: every problem is a ModelError/PlanError naming it, and one line + exit 2 on the CLI.

Damaged files are made from a real (small) model: the GGUF is copied with gguf's reader and
writer (a plain copy is byte-identical, checked below), dropping, reshaping or retyping one
tensor or metadata key; header fields are patched in place; truncation cuts the bytes.
"""
from __future__ import annotations

import dataclasses
import struct
import time

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

from pytest_moeparity.cli import main
from pytest_moeparity.make_model import ModelSpec, make_model
from pytest_moeparity.model import GGUFModel, ModelError, load_model
from pytest_moeparity.plan import PlanError, SavePlan
from pytest_moeparity.reference import reference_forward

# Q8_0 blocks are 32 wide; expert_ff != hidden so that a transposed expert tensor is a wrong shape
SPEC = ModelSpec(n_layers=2, hidden=64, n_heads=2, n_kv_heads=1, head_dim=32, n_experts=4,
                 n_experts_used=2, expert_ff=96, vocab=300, context_length=128)
EIGHT = dataclasses.replace(SPEC, n_layers=8)


# ---- helpers --------------------------------------------------------------------------------
def rewrite(src, dst, *, drop_tensors=(), drop_keys=(), set_keys=None, alter=None, arch=None):
    """Copy a GGUF through gguf's reader and writer.

    ``set_keys`` maps a metadata key to a new value (same type); ``alter`` maps a tensor name to
    ``f(data, qtype) -> (data, qtype)``; ``data`` is what GGUFReader holds (uint8 bytes
    ``[..., row_bytes]`` for quantized types, NumPy order).
    """
    set_keys = set_keys or {}
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch or str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, set_keys.get(key, field.contents()), vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        data, qtype = np.array(t.data), t.tensor_type
        if alter and t.name in alter:
            data, qtype = alter[t.name](data, qtype)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_error(capsys, argv, *needles, rc=2):
    code, out, err = cli(capsys, *argv)
    assert code == rc, f"{argv}: exit {code}, stderr {err!r}"
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{argv}: expected one line on stderr, got {err!r}"
    assert lines[0].startswith("moeparity: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{argv}: {needle!r} not in {lines[0]!r}"
    return lines[0]


# ---- the models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    make_model(path, SPEC, quant="Q8_0", seed=1, progress=False)
    return path


@pytest.fixture(scope="module")
def eight_layers(tmp_path_factory):
    path = tmp_path_factory.mktemp("eight") / "eight.gguf"
    make_model(path, EIGHT, quant="Q8_0", seed=2, progress=False)
    return path


def _half_width(data, qtype):
    return np.concatenate([data, data]), qtype  # [H] -> [2H]


def _transposed_down(data, qtype):
    # ffn_down_exps [E, H, F] written as [E, F, H] (a converter that forgot to transpose)
    e = data.shape[0]
    return gguf_quants.quantize(np.zeros((e, SPEC.expert_ff, SPEC.hidden), np.float32), qtype), qtype


def _as_int32(data, qtype):
    return data.astype(np.int32), None  # raw_dtype None: the writer types it I32


def _as_int8(data, qtype):
    return np.zeros((SPEC.n_heads * SPEC.head_dim, SPEC.hidden), np.int8), None


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    b[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(b)


def _patch_field(src, dst, key: str, part: int, value: int):
    """Copy ``src`` with one part of metadata field ``key`` (a u64: a string length or an array
    count) set to ``value``; the offset is found with gguf's reader, the rest is byte-identical."""
    field = GGUFReader(src).fields[key]
    offset = int(field.offset) + sum(int(p.nbytes) for p in field.parts[:part])
    data = src.read_bytes()
    assert field.parts[part].dtype == np.uint64
    assert struct.unpack_from("<Q", data, offset)[0] == int(field.parts[part][0])  # the field we mean
    dst.write_bytes(_patch(data, offset, "<Q", value))
    return dst


def _set_key(key, value):
    return lambda g, d: rewrite(g, d / f"{key.rsplit('.', 1)[-1]}.gguf", set_keys={key: value})


# parts of an array field: [name length, name, type, item type, count, items...];
# of a string field: [name length, name, type, string length, bytes]
ABSURD = {"absurd_array_count": ("tokenizer.ggml.token_type", 4, 2**60,
                                  ["'tokenizer.ggml.token_type'", f"array of {2**60} INT32 values", "are left in the"]),
          "absurd_string_array_count": ("tokenizer.ggml.tokens", 4, 2**59,
                                        ["'tokenizer.ggml.tokens'", f"array of {2**59} STRING values"]),
          "absurd_string_length": ("tokenizer.ggml.model", 3, 2**62,
                                   ["'tokenizer.ggml.model'", f"string of length {2**62}", "are left in the"]),
          "absurd_key_length": ("general.name", 0, 2**40,
                                ["metadata key #", f"string of length {2**40}", "are left in the"])}


# name -> (make(good_path, dir) -> path, substrings of the message)
BAD = {
    "wrong_architecture": (None, ["architecture is 'llama'", "expected 'qwen3moe'"]),
    "random_bytes": (lambda g, d: _write(d / "random.gguf", np.random.default_rng(0).bytes(4096)),
                     ["not a GGUF file", "magic"]),
    "text_file": (lambda g, d: _write(d / "notes.txt", b"this is not a model\n" * 50),
                  ["not a GGUF file", "b'this'"]),
    "three_bytes": (lambda g, d: _write(d / "short.gguf", b"GGU"), ["not a GGUF file", "only 3 bytes"]),
    "truncated_half": (lambda g, d: _write(d / "half.gguf", g.read_bytes()[: g.stat().st_size // 2]),
                       ["truncated"]),
    "truncated_tail": (lambda g, d: _write(d / "tail.gguf", g.read_bytes()[:-4096]), ["truncated"]),
    "truncated_header": (lambda g, d: _write(d / "head.gguf", g.read_bytes()[:200]),
                         ["corrupt GGUF header", "200-byte file"]),
    "absurd_tensor_count": (lambda g, d: _write(d / "count.gguf", _patch(g.read_bytes(), 8, "<Q", 2**60)),
                            ["corrupt GGUF header", str(2**60), "tensors"]),
    "absurd_kv_count": (lambda g, d: _write(d / "kv.gguf", _patch(g.read_bytes(), 16, "<Q", 2**50)),
                        ["corrupt GGUF header", str(2**50), "metadata keys"]),
    "bad_version": (lambda g, d: _write(d / "v9.gguf", _patch(g.read_bytes(), 4, "<I", 9)),
                    ["unsupported GGUF version 9"]),
    "missing_expert_tensor": (lambda g, d: rewrite(g, d / "noup.gguf", drop_tensors={"blk.1.ffn_up_exps.weight"}),
                              ["missing tensor 'blk.1.ffn_up_exps.weight'"]),
    "missing_token_embd": (lambda g, d: rewrite(g, d / "noembd.gguf", drop_tensors={"token_embd.weight"}),
                           ["missing tensor 'token_embd.weight'"]),
    "missing_metadata": (lambda g, d: rewrite(g, d / "nokey.gguf", drop_keys={"qwen3moe.expert_count"}),
                         ["missing metadata key 'qwen3moe.expert_count'"]),
    "wrong_shape_norm": (lambda g, d: rewrite(g, d / "shape.gguf", alter={"blk.0.attn_norm.weight": _half_width}),
                         ["'blk.0.attn_norm.weight'", "shape [128]", "expected [64]"]),
    "wrong_shape_experts": (lambda g, d: rewrite(g, d / "down.gguf",
                                                 alter={"blk.1.ffn_down_exps.weight": _transposed_down}),
                            ["'blk.1.ffn_down_exps.weight'", "shape [4, 96, 64]", "expected [4, 64, 96]", "E x H x F"]),
    "unsupported_type_i32": (lambda g, d: rewrite(g, d / "i32.gguf", alter={"blk.0.ffn_norm.weight": _as_int32}),
                             ["'blk.0.ffn_norm.weight'", "unsupported type I32"]),
    "unsupported_type_i8": (lambda g, d: rewrite(g, d / "i8.gguf", alter={"blk.1.attn_q.weight": _as_int8}),
                            ["'blk.1.attn_q.weight'", "unsupported type I8"]),
    **{case: ((lambda key, part, value: lambda g, d: _patch_field(g, d / "absurd.gguf", key, part, value))(
        key, part, value), needles) for case, (key, part, value, needles) in ABSURD.items()},
    "rms_eps_zero": (_set_key("qwen3moe.attention.layer_norm_rms_epsilon", 0.0),
                     ["'qwen3moe.attention.layer_norm_rms_epsilon'", "= 0.0", "finite positive"]),
    "rms_eps_nan": (_set_key("qwen3moe.attention.layer_norm_rms_epsilon", float("nan")),
                    ["'qwen3moe.attention.layer_norm_rms_epsilon'", "nan", "finite positive"]),
    "rope_base_negative": (_set_key("qwen3moe.rope.freq_base", -10000.0),
                           ["'qwen3moe.rope.freq_base'", "-10000.0", "finite positive"]),
    "rope_base_inf": (_set_key("qwen3moe.rope.freq_base", float("inf")),
                      ["'qwen3moe.rope.freq_base'", "inf", "finite positive"]),
    "missing_file": (lambda g, d: d / "does-not-exist.gguf", ["does-not-exist.gguf", "no such file"]),
    "directory": (lambda g, d: d, ["not a regular file"]),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _wrong_arch(d):
    path = d / "llama.gguf"
    w = GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((300, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bad_files(good, tmp_path_factory):
    out = {}
    for name, (make, needles) in BAD.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (_wrong_arch(d) if make is None else make(good, d), needles)
    return out


# ---- the copy helper is faithful (so the damaged files differ only in what we changed) ---------
def test_rewrite_is_byte_identical(good, tmp_path):
    copy = rewrite(good, tmp_path / "copy.gguf")
    assert copy.read_bytes() == good.read_bytes()
    assert GGUFModel(copy).config == GGUFModel(good).config


# ---- bad files: API ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_api(bad_files, case):
    path, needles = bad_files[case]
    for opener in (GGUFModel, load_model):
        with pytest.raises(ModelError) as exc:
            opener(path)
        msg = str(exc.value)
        assert "\n" not in msg
        for needle in needles:
            assert needle in msg, f"{needle!r} not in {msg!r}"
        if case != "missing_file":
            assert path.name in msg  # names the file


def test_absurd_lengths_are_rejected_fast(bad_files, capsys):
    """gguf's reader walks a metadata array element by element: a 2**60 count in a small file
    used to run for minutes and eat tens of GB. The header walk rejects it before that."""
    for case in ABSURD:
        path, _ = bad_files[case]
        t0 = time.perf_counter()
        with pytest.raises(ModelError, match="corrupt GGUF header"):
            GGUFModel(path)
        assert cli(capsys, "info", path)[0] == 2
        assert time.perf_counter() - t0 < 3.0, case


def test_header_walk_accepts_every_made_file(good, tmp_path):
    """The header walk passes real files (all value types make-model writes, tied and untied)."""
    tied = make_model(tmp_path / "tied.gguf", dataclasses.replace(SPEC, tied_output=True, rope_base=5e5,
                                                                 rms_eps=1e-5), quant="F16", seed=4,
                      progress=False).path
    for path in (good, tied):
        model = GGUFModel(path)
        reader = GGUFReader(path)
        assert len(reader.fields) > 20 and len(model.tensors) == len(reader.tensors)
    assert GGUFModel(tied).config.rms_eps == pytest.approx(1e-5)
    assert GGUFModel(tied).config.rope_base == 5e5


# ---- bad files: CLI ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["info", "trace", "check"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_cli(bad_files, case, command, capsys, tmp_path):
    path, needles = bad_files[case]
    out_file = tmp_path / "t.safetensors"
    argv = {"info": ["info", path],
            "trace": ["trace", path, "--tokens", "1,2,3", "--out", out_file],
            "check": ["check", path, "--candidate", "numpy-f64", "--tokens", "1,2,3"]}[command]
    assert_cli_error(capsys, argv, *needles)
    assert not out_file.exists()


# ---- the good file works (so the failures above are about the damage) --------------------------
def test_good_file_cli(good, capsys, tmp_path):
    code, out, err = cli(capsys, "info", good)
    assert code == 0 and "qwen3moe, 2 layers" in out
    code, out, err = cli(capsys, "trace", good, "--tokens", "1,2,3", "--out", tmp_path / "t.safetensors")
    assert code == 0, err
    code, out, err = cli(capsys, "check", good, "--candidate", "numpy-f64", "--tokens", "1,2,3")
    assert code == 0, err


# ---- tokens ------------------------------------------------------------------------------------
def test_token_out_of_range_api(good):
    model = load_model(good)
    with pytest.raises(ModelError, match=r"token ids \[300\] out of range.*300 tokens"):
        model.validate_tokens([1, 300])
    with pytest.raises(ModelError, match=r"token ids \[-1\] out of range"):
        model.validate_tokens([-1, 2])
    with pytest.raises(ModelError, match="out of range"):
        reference_forward(model, [5, 10_000])
    assert model.validate_tokens([0, 299]) == [0, 299]


def test_empty_tokens_api(good):
    model = load_model(good)
    with pytest.raises(ModelError, match="empty token list"):
        model.validate_tokens([])
    with pytest.raises(ModelError, match="empty token list"):
        reference_forward(model, [])


@pytest.mark.parametrize("command", ["trace", "check"])
@pytest.mark.parametrize("tokens, needles", [
    ("1,300", ["token ids [300] out of range", "300 tokens"]),
    ("5,999999", ["token ids [999999] out of range"]),
    ("3,-1", ["token ids [-1] out of range"]),
    ("", ["empty --tokens"]),
    (",", ["empty --tokens"]),
    ("1,x", ["--tokens must be a comma list of integers", "'1,x'"]),
])
def test_bad_tokens_cli(good, command, tokens, needles, capsys, tmp_path):
    out_file = tmp_path / "t.safetensors"
    argv = {"trace": ["trace", good, "--tokens", tokens, "--out", out_file],
            "check": ["check", good, "--candidate", "numpy-f64", "--tokens", tokens]}[command]
    assert_cli_error(capsys, argv, *needles)
    assert not out_file.exists()


# ---- plan specs --------------------------------------------------------------------------------
PLAN_CASES = {
    "unknown_stage": (["--stages", "nope"], ["unknown stage 'nope'", "valid stages:", "embedding",
                                             "moe_ffn_out", "lm_head", "layer_output"]),
    "empty_range": (["--layers", "5..2"], ["empty layer range '5..2'"]),
    "layer_past_end": (["--layers", "99"], ["layer 99 out of range", "8 layers"]),
    "range_past_end": (["--layers", "2..12"], ["layer range end 12 out of range", "8 layers"]),
    "position_past_end": (["--positions", "50"], ["token position 50 out of range for 3 tokens"]),
    "bad_layer_text": (["--layers", "two"], ["bad layer 'two'"]),
}


@pytest.mark.parametrize("command", ["trace", "check"])
@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_bad_plan_cli(eight_layers, command, case, capsys, tmp_path):
    extra, needles = PLAN_CASES[case]
    out_file = tmp_path / "t.safetensors"
    argv = {"trace": ["trace", eight_layers, "--tokens", "1,2,3", "--out", out_file, *extra],
            "check": ["check", eight_layers, "--candidate", "numpy-f64", "--tokens", "1,2,3", *extra]}[command]
    assert_cli_error(capsys, argv, *needles)
    assert not out_file.exists()


def test_bad_plan_api(eight_layers):
    with pytest.raises(PlanError, match="unknown stage 'nope'.*valid stages"):
        SavePlan.parse("nope")
    with pytest.raises(PlanError, match="empty layer range"):
        SavePlan.parse(layers="5..2")
    model = load_model(eight_layers)
    with pytest.raises(PlanError, match="layer 99 out of range.*8 layers"):
        reference_forward(model, [1, 2, 3], SavePlan.parse(layers="99"))
    with pytest.raises(PlanError, match="token position 50 out of range for 3 tokens"):
        reference_forward(model, [1, 2, 3], SavePlan.parse(positions="50"))
