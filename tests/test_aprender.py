"""aprender-style dumps (DIR/layer-<N>/<stage>.bin): writer, reader, `moeparity diff`, `trace:DIR`."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from pytest_moeparity.aprender import (MAGIC, DumpError, canonical_stage, read_bin, read_dump, stage_sizes,
                                       write_bin, write_dump)
from pytest_moeparity.bisect import slice_positions
from pytest_moeparity.cli import main
from pytest_moeparity.metrics import Verdict
from pytest_moeparity.model import load_model
from pytest_moeparity.plan import SavePlan
from pytest_moeparity.reference import NumpyForward
from pytest_moeparity.report import compare_traces

TOKENS = [3, 1, 4, 1, 5]
STAGES = "embedding,qkv_matmul,attn_out,router,experts,moe_ffn_out,post_ffn_residual,final_norm,lm_head"


@pytest.fixture(scope="module")
def ref_trace(tiny_model_path):
    return NumpyForward(load_model(tiny_model_path)).run(TOKENS, SavePlan.parse(STAGES)).trace


@pytest.fixture(scope="module")
def ref_file(ref_trace, tmp_path_factory):
    return ref_trace.save(tmp_path_factory.mktemp("aprender") / "ref.safetensors")


@pytest.fixture
def dump(ref_trace, tmp_path):
    d = tmp_path / "dump"
    files = write_dump(ref_trace, d, fuse_qkv=True)
    assert files and all(f.read_bytes()[:4] == MAGIC for f in files)
    return d


def test_roundtrip_all_match(ref_trace, dump, tiny_model_path):
    assert (dump / "layer-3" / "qkv_matmul.bin").is_file() and not (dump / "layer-3" / "q_proj.bin").exists()
    assert (dump / "layer-4294967295" / "lm_head.bin").is_file()
    layer, vals = read_bin(dump / "layer-4294967295" / "lm_head.bin")
    assert layer is None and vals.dtype == np.float32
    got = read_dump(dump, tokens=TOKENS, config=load_model(tiny_model_path).config)
    assert got.meta["layout"] == "flat" and got.positions == [len(TOKENS) - 1]
    assert got.tokens == TOKENS
    assert got["layer.2.moe_router_indices"].dtype.kind == "i"
    assert got["layer.2.q_proj"].shape == (1, 4 * 64) and got["layer.2.k_proj"].shape == (1, 2 * 64)
    assert got["layer.5.moe_router_logits"].shape == (1, 8)
    report = compare_traces(slice_positions(ref_trace, [len(TOKENS) - 1]), got)
    assert report.ok, report.render()
    assert len(report.cells) == len(ref_trace.keys())
    assert {c.verdict for c in report.cells} == {Verdict.Match}


def test_model_stages_at_top_level_and_qkv_split_from_a_reference(ref_trace, tmp_path):
    d = tmp_path / "top"
    write_dump(ref_trace, d, fuse_qkv=True, model_stages_at_top=True)
    assert (d / "lm_head.bin").is_file() and not (d / "layer-4294967295").exists()
    got = read_dump(d, sizes=stage_sizes(ref_trace))
    assert "lm_head" in got and "layer.0.v_proj" in got
    unsplit = read_dump(d)  # no sizes: kept fused, reported
    assert "layer.0.qkv_matmul" in unsplit and "qkv_matmul" in json.loads(unsplit.meta["unknown_stages"])
    assert any("not split" in w for w in json.loads(unsplit.meta["dump_warnings"]))


def test_unknown_stage_names_are_reported_not_dropped(ref_trace, dump):
    write_bin(dump / "layer-1" / "qkv_bias.bin", 1, np.ones(8))
    write_bin(dump / "layer-1" / "LayerOutput.bin", 1, np.asarray(ref_trace["layer.1.post_ffn_residual"])[-1])
    got = read_dump(dump, tokens=TOKENS, sizes=stage_sizes(ref_trace))
    assert json.loads(got.meta["unknown_stages"]) == ["qkv_bias"]
    assert "layer.1.qkv_bias" in got
    report = compare_traces(slice_positions(ref_trace, [4]), got)
    assert any(k == "layer.1.qkv_bias" and why == "unknown stage" for _, k, why in report.ignored_keys)
    assert "ignored: " in report.render()
    assert canonical_stage("MoeFfnOut") == "moe_ffn_out" and canonical_stage("layer_output") == "post_ffn_residual"
    assert canonical_stage("ffn_swigl") is None


def test_planted_nan_is_nangpu_at_that_layer_and_stage(ref_trace, dump):
    f = dump / "layer-4" / "moe_ffn_out.bin"
    layer, vals = read_bin(f)
    vals[7] = np.nan
    write_bin(f, layer, vals)
    report = compare_traces(slice_positions(ref_trace, [4]), read_dump(dump, tokens=TOKENS, sizes=stage_sizes(ref_trace)))
    first = report.first_divergence
    assert (first.layer, first.stage, first.verdict) == (4, "moe_ffn_out", Verdict.NanGpu)


def _raw(layer, count, n_floats, magic=MAGIC):
    return struct.pack("<4sII", magic, layer, count) + np.zeros(n_floats, "<f4").tobytes()


@pytest.mark.parametrize("data, message", [
    (_raw(1, 4, 4, magic=b"GGUF"), "bad magic b'GGUF'"),
    (_raw(1, 5, 4), "count mismatch: the header says 5 float32 (20 bytes) but the file holds 16 bytes"),
    (b"APR", "too short for an APRT header"),
    (_raw(2, 4, 4), "header layer 2 does not match its directory layer-1"),
])
def test_header_errors_are_clear(tmp_path, data, message):
    d = tmp_path / "bad"
    (d / "layer-1").mkdir(parents=True)
    (d / "layer-1" / "attn_out.bin").write_bytes(data)
    with pytest.raises(DumpError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        read_dump(d)
    assert "attn_out.bin" in str(exc.value)


def test_empty_or_missing_dump_dir(tmp_path):
    with pytest.raises(DumpError, match="no such dump directory"):
        read_dump(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DumpError, match="no .bin tensor files"):
        read_dump(tmp_path / "empty")


def test_cli_diff_exit_codes(ref_file, ref_trace, dump, tmp_path, capsys):
    tok = ",".join(map(str, TOKENS))
    assert main(["diff", str(ref_file), str(dump), "--tokens", tok]) == 0
    assert "No divergence" in capsys.readouterr().out
    # the dump on the reference side, the full trace as candidate; position given explicitly
    assert main(["diff", str(dump), str(ref_file), "--positions", "4"]) == 0
    capsys.readouterr()
    # a different prompt than the trace's: refused
    assert main(["diff", str(ref_file), str(dump), "--tokens", "9,9,9,9,9"]) == 2
    assert "differs" in capsys.readouterr().err
    f = dump / "layer-6" / "attn_out.bin"
    layer, vals = read_bin(f)
    vals[0] = np.inf
    write_bin(f, layer, vals)
    report = tmp_path / "r.json"
    assert main(["diff", str(ref_file), str(dump), "--tokens", tok, "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "First divergence: layer 6, stage attn_out, verdict NanGpu" in out
    assert json.loads(report.read_text())["first_divergence"]["stage"] == "attn_out"
    f.write_bytes(b"XXXX" + f.read_bytes()[4:])
    assert main(["diff", str(ref_file), str(dump), "--tokens", tok]) == 2
    assert "bad magic" in capsys.readouterr().err


def test_trace_backend_in_pytest(pytester, tiny_model_path, ref_trace, tmp_path):
    d = tmp_path / "dump"
    write_dump(ref_trace, d, fuse_qkv=True)
    args = ("--moe-model", str(tiny_model_path), "--include-heavy", "--moe-tokens", ",".join(map(str, TOKENS)),
            "--moe-stages", STAGES, "--moe-candidate", f"trace:{d}", "-rA")
    res = pytester.runpytest(*args)
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines(["*No divergence*", "*cut to them*"])
    f = d / "layer-5" / "moe_ffn_out.bin"
    layer, vals = read_bin(f)
    write_bin(f, layer, vals * 3)
    res = pytester.runpytest(*args)
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*First divergence: layer 5, stage moe_ffn_out, verdict Diverge*",
                              "*drill-down skipped: backend 'trace:*"])


# ---- a dump that holds some stages only (as aprender really wrote: router + moe_ffn_out, last token) ----
APRENDER_STAGES = ("moe_router", "moe_ffn_out")


def _partial_dump(ref_trace, d):
    """moe_router and moe_ffn_out of every layer, last token only, NaN planted at layer 6 moe_ffn_out."""
    from pytest_moeparity.trace import Trace

    keys = [k for k in ref_trace.keys() if k.split(".")[-1] in APRENDER_STAGES]
    write_dump(Trace({k: ref_trace[k] for k in keys}, dict(ref_trace.meta)), d)
    assert sorted(p.name for p in (d / "layer-6").iterdir()) == ["moe_ffn_out.bin", "moe_router.bin"]
    f = d / "layer-6" / "moe_ffn_out.bin"
    layer, vals = read_bin(f)
    vals[5] = np.nan
    write_bin(f, layer, vals)
    return d


def test_cli_diff_partial_dump_compares_only_what_the_dump_holds(ref_file, ref_trace, tmp_path, capsys):
    d = _partial_dump(ref_trace, tmp_path / "dump")
    out_json = tmp_path / "r.json"
    assert main(["diff", str(ref_file), str(d), "--json", str(out_json)]) == 1
    out = capsys.readouterr().out
    assert "First divergence: layer 6, stage moe_ffn_out, verdict NanGpu" in out
    doc = json.loads(out_json.read_text())
    assert doc["counts"]["Missing"] == 0 and doc["counts"]["NanGpu"] == 1
    assert doc["counts"]["Match"] == 2 * 8 - 1
    assert {c["stage"] for c in doc["cells"]} == set(APRENDER_STAGES)
    notes = [line for line in out.splitlines() if "not compared" in line and "reference also holds" in line]
    assert len(notes) == 1 and "embedding" in notes[0] and "moe_ffn_out" not in notes[0]
    # the dump on the reference side: the same narrowing, the NaN now on the reference side
    assert main(["diff", str(d), str(ref_file), "--tokens", ",".join(map(str, TOKENS))]) == 1
    assert "First divergence: layer 6, stage moe_ffn_out, verdict NanCpu" in capsys.readouterr().out
    # --stages / --layers (the `check` syntax) narrow further
    assert main(["diff", str(ref_file), str(d), "--stages", "router"]) == 0
    assert "cells: 8 Match" in capsys.readouterr().out
    assert main(["diff", str(ref_file), str(d), "--layers", "0..6"]) == 0
    assert "cells: 12 Match" in capsys.readouterr().out
    assert main(["diff", str(ref_file), str(d), "--layers", "6,7", "--stages", "moe_ffn_out"]) == 1
    assert "cells: 1 Match, 1 NanGpu" in capsys.readouterr().out
    assert main(["diff", str(ref_file), str(d), "--layers", "3..1"]) == 2
    assert "empty layer range" in capsys.readouterr().err
    # a stage the dump holds, missing at one layer, is still a capture gap
    (d / "layer-3" / "moe_router.bin").unlink()
    assert main(["diff", str(ref_file), str(d), "--json", str(out_json)]) == 1
    missing = [(c["layer"], c["stage"]) for c in json.loads(out_json.read_text())["cells"] if c["verdict"] == "Missing"]
    assert missing == [(3, "moe_router")]
    capsys.readouterr()


def test_narrow_to_saved_for_a_trace_candidate(ref_trace, tmp_path):
    """The helper a trace: candidate needs: the reference cut to the dump's stages and layers."""
    from pytest_moeparity.trace import narrow_to_saved

    d = _partial_dump(ref_trace, tmp_path / "dump")
    (d / "layer-7").rename(tmp_path / "layer-7-away")  # the dump holds layers 0-6 only
    cand = read_dump(d, tokens=TOKENS)
    ref = slice_positions(ref_trace, [len(TOKENS) - 1])
    assert compare_traces(ref, cand).counts()["Missing"] > 0  # unnarrowed: the noise of the audit
    cut, note = narrow_to_saved(ref, cand)
    report = compare_traces(cut, cand)
    assert report.counts()["Missing"] == 0 and len(report.cells) == 2 * 7
    first = report.first_divergence
    assert (first.layer, first.stage, first.verdict) == (6, "moe_ffn_out", Verdict.NanGpu)
    assert "embedding" in note and "layer(s) 7" in note and str(d) in note
    assert narrow_to_saved(ref, ref)[1] is None


def test_trace_backend_partial_dump_has_no_missing_cells(pytester, tiny_model_path, ref_trace, tmp_path):
    d = _partial_dump(ref_trace, tmp_path / "dump")
    res = pytester.runpytest("--moe-model", str(tiny_model_path), "--include-heavy", "--moe-tokens",
                             ",".join(map(str, TOKENS)), "--moe-stages", STAGES, "--moe-candidate", f"trace:{d}", "-rA")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*First divergence: layer 6, stage moe_ffn_out, verdict NanGpu*",
                              "*reference also holds stage(s) embedding*not compared*"])
    cells = [line for line in res.stdout.lines if line.startswith("cells: ")]
    assert cells and set(cells) == {"cells: 15 Match, 1 NanGpu"}, cells
