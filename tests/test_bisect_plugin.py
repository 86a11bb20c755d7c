"""The bisection options of the pytest plugin, driven through pytester."""
from __future__ import annotations

import json

import pytest

FAST = ("--moe-tokens", "3,1,4,1,5", "--moe-stages", "attn_out,moe_router_indices,moe_ffn_out,post_ffn_residual,lm_head")


def test_help_lists_the_bisection_options(pytester):
    out = pytester.runpytest("--help").stdout.str()
    for opt in ("--moe-inject", "--moe-isolated", "--moe-forced-routing", "--moe-no-drilldown",
                "moe_inject", "moe_isolated", "moe_forced_routing", "moe_drilldown"):
        assert opt in out, opt


def test_inject_isolated_forced_on_the_builtin_item(pytester, tiny_model_path, tmp_path):
    report = tmp_path / "report.json"
    res = pytester.runpytest("--moe-model", str(tiny_model_path), "--include-heavy", "--moe-candidate", "numpy",
                             "--moe-inject", "scale=1.5@3:attn_out", "--moe-isolated", "--moe-forced-routing",
                             "--moe-report-json", str(report), *FAST)
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines([
        "*First divergence: layer 3, stage attn_out, verdict Diverge*",
        "*Injected into the candidate: scale=1.5@3:attn_out*",
        "*layer 3: wrong by itself (isolated Diverge at attn_out)*",
        "*layers 4-7: inherit (isolated Match)*",
        "*with the reference's expert choices layer 3 still diverges at attn_out*",
        "*moeparity summary*",
        "*isolated: wrong by itself at layer(s) 3*",
    ])
    doc = json.loads(report.read_text())
    assert doc["injected_faults"] == ["scale=1.5@3:attn_out"]
    assert doc["isolated"]["own_layers"] == [3] and doc["forced_routing"]["summary"]
    assert doc["reports"][0]["isolated"]["inherited_layers"] == [4, 5, 6, 7]
    if _has_matplotlib():
        assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        res.stdout.fnmatch_lines(["*moeparity heatmap: *report.png*"])
    else:
        res.stdout.fnmatch_lines(["*matplotlib is not installed*"])


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_ini_keys_and_the_moe_parity_fixture(pytester, tiny_model_path, tmp_path):
    report = tmp_path / "r.json"
    pytester.makeini(f"""
        [pytest]
        moe_model = {tiny_model_path}
        moe_candidate = numpy
        moe_tokens = 3,1,4,1,5
        moe_stages = moe_router_indices,moe_ffn_out,post_ffn_residual
        moe_inject = dispatch=q6_k@*:ffn_down_exps
        moe_isolated = true
        moe_forced_routing = true
        moe_report_json = {report}
    """)
    pytester.makepyfile("""
        def test_sections(moe_parity, moe_options):
            assert moe_options.isolated and moe_options.forced_routing and moe_options.drilldown
            assert not moe_parity.ok
            b = moe_parity.bisect
            assert b.isolated.own_layers() == [1, 2, 4, 5]
            d = b.drilldown[0]
            assert (d.layer, d.stage, d.quant_types["ffn_down_exps"]) == (1, "moe_expert_out", "Q4_K")

        def test_candidate_trace_has_the_fault(moe_candidate_trace, moe_reference_trace):
            import numpy as np
            assert not np.allclose(moe_candidate_trace["layer.1.moe_ffn_out"], moe_reference_trace["layer.1.moe_ffn_out"])
            assert np.array_equal(moe_candidate_trace["layer.0.moe_ffn_out"], moe_reference_trace["layer.0.moe_ffn_out"])
    """)
    res = pytester.runpytest("-k", "test_sections or test_candidate_trace", "-rA")
    res.assert_outcomes(passed=2)
    res.stdout.fnmatch_lines(["*moeparity divergence table*", "*Per-expert drill-down*",
                              "*drill-down: layer 1 expert * first differs at moe_expert_out*Q4_K/Q4_K/Q4_K*"])
    doc = json.loads(report.read_text())
    assert doc["drilldown"][0]["quant_types"]["ffn_down_exps"] == "Q4_K"
    assert doc["isolated"] is not None and doc["forced_routing"] is not None


def test_no_drilldown_flag_and_ini(pytester, tiny_model_path, tmp_path):
    report = tmp_path / "r.json"
    pytester.makeini("""
        [pytest]
        moe_drilldown = false
    """)
    pytester.makepyfile("""
        def test_opts(moe_options):
            assert not moe_options.drilldown and not moe_options.isolated
    """)
    pytester.runpytest("-k", "test_opts").assert_outcomes(passed=1)
    # "--opt=PATH", not "--opt PATH": pytest takes a bare existing path into its rootdir/ini search
    res = pytester.runpytest(f"--moe-model={tiny_model_path}", "--include-heavy", "--moe-candidate", "numpy",
                             "--moe-inject", "scale=2@2:moe_ffn_out", "--moe-report-json", str(report),
                             "-k", "parity", *FAST)
    res.assert_outcomes(failed=1)
    doc = json.loads(report.read_text())
    assert doc["drilldown"] == [] and doc["isolated"] is None


def test_bad_inject_spec_is_a_usage_error(pytester):
    res = pytester.runpytest("--moe-inject", "boom@3:attn_out")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "--moe-inject" in res.stderr.str() and "unknown fault kind" in res.stderr.str()


def test_engine_without_modes_fails_clearly(pytester, tiny_model_path):
    pytester.makeconftest("""
        from pytest_moeparity.backends import _NumpyEngine

        class Old:
            def __init__(self, model):
                self.inner = _NumpyEngine(model, "numpy-f64")

            def trace(self, tokens, plan):
                return self.inner.trace(tokens, plan)

        def pytest_moeparity_register_backends(registry):
            registry.register("old", Old)
    """)
    res = pytester.runpytest("--moe-model", str(tiny_model_path), "--include-heavy", "--moe-candidate", "old",
                             "--moe-isolated", *FAST)
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*backend 'old' does not support isolated layers*"])
