"""The heatmap picture (matplotlib optional)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pytest_moeparity import heatmap
from pytest_moeparity.cli import main
from pytest_moeparity.report import compare_traces
from pytest_moeparity.trace import Trace

PNG = b"\x89PNG\r\n\x1a\n"


def _report():
    rng = np.random.default_rng(0)
    ref, cand = {}, {}
    for L in range(4):
        for st in ("attn_out", "moe_ffn_out", "post_ffn_residual"):
            x = rng.standard_normal((2, 16)).astype(np.float32)
            ref[f"layer.{L}.{st}"] = x
            cand[f"layer.{L}.{st}"] = x * (2.0 if (L, st) == (2, "moe_ffn_out") else 1.0)
        ref[f"layer.{L}.moe_router_indices"] = np.array([[0, 1], [2, 3]], np.int32)
        cand[f"layer.{L}.moe_router_indices"] = np.array([[0, 1], [2, 3]], np.int32)
    ref["lm_head"] = rng.standard_normal((2, 32)).astype(np.float32)
    cand["lm_head"] = ref["lm_head"].copy()
    cand["lm_head"][0, 0] = np.nan
    cand.pop("layer.1.attn_out")
    return compare_traces(Trace(ref), Trace(cand))


def test_png_written_from_report_and_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    rep = _report()
    assert rep.first_divergence.layer == 1  # the Missing cell comes first
    out = heatmap.write_heatmap(rep, tmp_path / "r.png")
    assert out.read_bytes()[:8] == PNG
    doc = json.loads(json.dumps(rep.to_json(), allow_nan=False))
    out2 = heatmap.write_heatmap(doc, tmp_path / "sub" / "r2.png", metric="rel_l2")
    assert out2.read_bytes()[:8] == PNG
    rows, cols, cells = heatmap.grid(doc)
    assert rows == ["0", "1", "2", "3", "final"] and cols[-1] == "lm_head"
    assert cells[("2", "moe_ffn_out")]["verdict"] == "Diverge" and cells[("final", "lm_head")]["verdict"] == "NanGpu"


def test_png_path_next_to_json():
    assert heatmap.png_path_for("out/report.json").as_posix() == "out/report.png"
    assert heatmap.png_path_for("out/report").as_posix() == "out/report.png"


def test_cell_scores():
    assert heatmap.cell_score({"metrics": {"cosine": 1.0}}) == heatmap.SCORE_CAP
    assert heatmap.cell_score({"metrics": {"cosine": 0.999}}) == pytest.approx(3.0)
    assert heatmap.cell_score({"metrics": {"cosine": "nan"}}) is None
    assert heatmap.cell_score({"metrics": {"rel_l2": 0.01}}, "rel_l2") == pytest.approx(2.0)
    assert heatmap.cell_score({"metrics": {"kind": "index", "agreement": 1.0}}) == heatmap.SCORE_CAP


def test_no_matplotlib_one_info_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(heatmap, "heatmap_available", lambda: False)
    assert heatmap.write_heatmap(_report(), tmp_path / "r.png") is None
    assert not (tmp_path / "r.png").exists()
    ref, cand = Trace({"lm_head": np.ones((1, 4), np.float32)}), Trace({"lm_head": np.ones((1, 4), np.float32)})
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ref.save(a)
    cand.save(b)
    assert main(["diff", str(a), str(b), "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed") == 1 and not (tmp_path / "d.png").exists()


def test_cli_check_png(tmp_path, tiny_model_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "pic.png"
    rc = main(["check", str(tiny_model_path), "--candidate", "numpy", "--tokens", "3,1,4", "--stages",
               "moe_ffn_out,lm_head", "--inject", "nan@2:moe_ffn_out", "--no-drilldown", "--png", str(png)])
    assert rc == 1
    assert png.read_bytes()[:8] == PNG
    assert f"heatmap: {png}" in capsys.readouterr().out


def test_scale_fault_cell_is_labelled_by_rel_l2_not_cosine():
    """_report() plants x2 at layer 2 moe_ffn_out: cosine 1.0 passes, rel_l2 = 1.0 fails."""
    doc = json.loads(json.dumps(_report().to_json(), allow_nan=False))
    _, _, cells = heatmap.grid(doc)
    scaled = cells[("2", "moe_ffn_out")]
    assert scaled["verdict"] == "Diverge" and scaled["metrics"]["cosine"] == pytest.approx(1.0)
    assert heatmap.rel_l2_only(scaled)
    assert heatmap.cell_label(scaled) == "rl2=1.0"
    assert heatmap.cell_label(scaled, "rel_l2") == "0.0"  # the rel_l2 map already shows rel_l2
    assert heatmap.cell_label(cells[("1", "moe_ffn_out")]) == "9+"  # Match cells keep the cosine digits
    assert heatmap.cell_label(cells[("final", "lm_head")]) == "nan"
    # a cell where cosine failed keeps the cosine digits, even if rel_l2 failed too
    both = {"verdict": "Diverge", "metrics": {"cosine": 0.99, "rel_l2": 0.3, "cosine_below": True,
                                               "rel_l2_exceeded": True}}
    assert not heatmap.rel_l2_only(both) and heatmap.cell_label(both) == "2.0"
    small = {"verdict": "Diverge", "metrics": {"cosine": 1.0, "rel_l2": 0.05, "cosine_below": False,
                                                "rel_l2_exceeded": True}}
    assert heatmap.cell_label(small) == "rl2=0.05"


def test_scale_fault_first_divergence_label_in_the_figure():
    pytest.importorskip("matplotlib")
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    ref = {f"layer.{L}.attn_out": x + L for L in range(3)}
    cand = dict(ref, **{"layer.1.attn_out": 2 * (x + 1)})
    rep = compare_traces(Trace(ref), Trace(cand))
    assert (rep.first_divergence.layer, rep.first_divergence.verdict.value) == (1, "Diverge")
    texts = [t.get_text() for t in heatmap.render_figure(rep).axes[0].texts]
    assert texts == ["9+", "rl2=1.0", "9+"]
