"""pytest-html integration: the heatmap is attached to the test's HTML report as an image/png extra."""
from __future__ import annotations

import base64
import html
import json
import re

import pytest


def test_html_report_embeds_the_heatmap_png(pytester, tiny_model_path, tmp_path):
    pytest.importorskip("pytest_html")
    pytest.importorskip("matplotlib")
    out, rep_json = tmp_path / "report.html", tmp_path / "rep.json"
    res = pytester.runpytest("--moe-model", str(tiny_model_path), "--include-heavy", "--moe-candidate", "numpy",
                             "--moe-inject", "scale=2@3:attn_out", "--moe-tokens", "3,1,4",
                             "--moe-stages", "attn_out,moe_ffn_out", "--moe-no-drilldown", "--moe-report-json",
                             str(rep_json), "--html", str(out), "--self-contained-html")
    res.assert_outcomes(failed=1)
    page = html.unescape(out.read_text())
    blobs = re.findall(r'"format_type": "image", "content": "data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(blobs) == 1, page[:2000]
    png = base64.b64decode(blobs[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the very picture the plugin writes next to the JSON report (same report, same renderer)
    assert json.loads(rep_json.read_text())["first_divergence"]["layer"] == 3
    assert png == rep_json.with_suffix(".png").read_bytes()
