"""The pytest plugin, driven through pytester: options, ini keys, markers, skips, fixtures, reports."""
from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET

import pytest

FAST = ("--moe-tokens", "3,1,4,1,5", "--moe-stages", "moe_router,moe_router_indices,moe_ffn_out,post_ffn_residual,lm_head")


def test_help_lists_every_option(pytester):
    res = pytester.runpytest("--help")
    out = res.stdout.str()
    for opt in ("--moe-model", "--include-heavy", "--moe-stages", "--moe-layers", "--moe-positions",
                "--moe-experts", "--moe-tokens", "--moe-reference", "--moe-candidate", "--moe-min-cosine",
                "--moe-max-rel-l2", "--moe-router-tie-tol", "--moe-save-dir", "--moe-report-json"):
        assert opt in out, opt
    for ini in ("moe_model", "moe_include_heavy", "moe_stages", "moe_report_json", "moe_min_cosine"):
        assert ini in out, ini


def test_markers_registered(pytester):
    res = pytester.runpytest("--markers")
    res.stdout.fnmatch_lines(["*@pytest.mark.heavy*", "*@pytest.mark.gpu*"])


HEAVY_TEST = """
import pytest

@pytest.mark.heavy
def test_needs_model(moe_model):
    assert moe_model.config.n_layers == 8
"""


def test_heavy_skips_without_include_heavy(pytester, tiny_model_path):
    pytester.makepyfile(HEAVY_TEST)
    res = pytester.runpytest("-rs", "-p", "no:cacheprovider", "-k", "needs_model", "--moe-model", str(tiny_model_path))
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*--include-heavy*"])


def test_heavy_skip_names_missing_model(pytester):
    pytester.makepyfile(HEAVY_TEST)
    res = pytester.runpytest("-rs", "-k", "needs_model", "--include-heavy", "--moe-model", "/no/such/model.gguf")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*model file not found: /no/such/model.gguf*"])


def test_heavy_skips_without_model_option(pytester):
    pytester.makepyfile(HEAVY_TEST)
    res = pytester.runpytest("-rs", "--include-heavy")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*--moe-model*"])


def test_heavy_runs_with_include_heavy(pytester, tiny_model_path):
    pytester.makepyfile(HEAVY_TEST)
    res = pytester.runpytest("-k", "needs_model", "--include-heavy", "--moe-model", str(tiny_model_path))
    res.assert_outcomes(passed=1)


def test_ini_keys_configure_the_run(pytester, tiny_model_path):
    pytester.makeini(f"""
        [pytest]
        moe_model = {tiny_model_path}
        moe_include_heavy = true
        moe_candidate = numpy-f64
        moe_tokens = 5,6,7
        moe_stages = moe_ffn_out,lm_head
        moe_layers = 1..3
        moe_positions = last
        moe_min_cosine = 0.5
    """)
    pytester.makepyfile("""
        def test_opts(moe_options, moe_plan, moe_tokens, moe_thresholds, moe_candidate_name):
            assert moe_options.include_heavy
            assert moe_tokens == [5, 6, 7]
            assert moe_plan.stages == ("moe_ffn_out", "lm_head")
            assert moe_plan.resolve_layers(8) == [1, 2]
            assert moe_plan.resolve_positions(3) == [2]
            assert moe_thresholds.min_cosine == 0.5
            assert moe_candidate_name == "numpy-f64"

        def test_trace(moe_candidate_trace):
            assert sorted(moe_candidate_trace.keys()) == ["layer.1.moe_ffn_out", "layer.2.moe_ffn_out", "lm_head"]
            assert moe_candidate_trace["lm_head"].shape == (1, 512)
    """)
    res = pytester.runpytest("-p", "no:randomly")
    # 2 tests of the file + the built-in parity check contributed because moe_model is set
    res.assert_outcomes(passed=3)


def test_command_line_overrides_ini(pytester, tiny_model_path):
    pytester.makeini("""
        [pytest]
        moe_stages = lm_head
    """)
    pytester.makepyfile("""
        def test_plan(moe_plan):
            assert moe_plan.stages == ("attn_out",)
    """)
    res = pytester.runpytest("--moe-stages", "ATTN_OUT")
    res.assert_outcomes(passed=1)


@pytest.mark.parametrize("args, message", [
    (("--moe-stages", "nope"), "unknown stage 'nope'"),
    (("--moe-layers", "5..2"), "empty layer range"),
    (("--moe-min-cosine", "abc"), "not a number"),
    (("--moe-tokens", "1,x"), "comma list of integers"),
])
def test_bad_option_values_are_usage_errors(pytester, args, message):
    res = pytester.runpytest(*args)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert message in res.stderr.str()


def test_gpu_marker_skips_without_gpu(pytester):
    pytest.importorskip  # noqa: B018 (documentation: the skip below is what CI sees)
    from pytest_moeparity.plugin import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is usable here; the skip path cannot be shown")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.gpu
        def test_on_gpu():
            raise AssertionError("must not run without a GPU")
    """)
    res = pytester.runpytest("-rs")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*gpu test:*"])


def test_builtin_parity_test_on_a_repo_without_tests(pytester, tiny_model_path):
    res = pytester.runpytest("--moe-model", str(tiny_model_path), "--include-heavy",
                             "--moe-candidate", "numpy-f64", "-rA", *FAST)
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines(["*No divergence*", "*moeparity summary*", "*PASSED*moeparity::parity*"])


def test_builtin_parity_on_builtin_model_needs_no_include_heavy(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("MOEPARITY_CACHE", str(tmp_path / "cache"))
    res = pytester.runpytest("--moe-model", "builtin:tiny", "--moe-candidate", "numpy-f64", *FAST)
    res.assert_outcomes(passed=1)
    assert list((tmp_path / "cache").glob("tiny-*.gguf"))


def test_no_model_no_builtin_parity_test(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    res = pytester.runpytest()
    res.assert_outcomes(passed=1)


def test_hot_layer_numpy_f16_fails_at_layer_2(pytester, hot_model_path, tmp_path):
    report = tmp_path / "report.json"
    junit = tmp_path / "junit.xml"
    res = pytester.runpytest("--moe-model", str(hot_model_path), "--include-heavy", "--moe-candidate", "numpy-f16",
                             "--moe-report-json", str(report), f"--junitxml={junit}", *FAST)
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert "First divergence: layer 2, stage moe_ffn_out, verdict NanGpu" in out
    res.stdout.fnmatch_lines(["*first divergence at layer 2, stage moe_ffn_out: NanGpu*"])
    doc = json.loads(report.read_text())
    fd = doc["first_divergence"]
    assert (fd["layer"], fd["stage"], fd["verdict"]) == (2, "moe_ffn_out", "NanGpu")
    assert any(c["verdict"] == "NanGpu" and c["layer"] == 2 for c in doc["cells"])
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    assert props["moe_first_divergence_layer"] == "2"
    assert props["moe_first_divergence_stage"] == "moe_ffn_out"
    assert props["moe_first_divergence_verdict"] == "NanGpu"


def test_moe_parity_fixture_attaches_table(pytester, tiny_model_path):
    pytester.makepyfile("""
        def test_parity(moe_parity):
            assert moe_parity.ok
            assert moe_parity.first_divergence is None
    """)
    res = pytester.runpytest("--moe-model", str(tiny_model_path), "--moe-candidate",
                             "numpy-f64", "-rA", "-k", "test_parity", *FAST)
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines(["*moeparity divergence table*", "*moe_ffn_out*", "*No divergence*"])


def test_save_dir_never_collides(pytester, tiny_model_path, tmp_path):
    save = tmp_path / "traces"
    args = ("--moe-model", str(tiny_model_path), "--include-heavy", "--moe-candidate", "numpy-f64",
            "--moe-save-dir", str(save), *FAST)
    pytester.runpytest(*args).assert_outcomes(passed=1)
    pytester.runpytest(*args).assert_outcomes(passed=1)
    files = sorted(p.name for p in save.glob("*.safetensors"))
    assert len(files) == 4 and len(set(files)) == 4
    from pytest_moeparity.trace import Trace

    t = Trace.load(save / files[0])
    assert "layer.3.moe_ffn_out" in t.keys()


def test_backend_from_conftest_hook(pytester, tiny_model_path):
    """Another repo plugs in its own engine; here a float64 engine with a planted scale bug at layer 3."""
    pytester.makeconftest("""
        from pytest_moeparity.backends import _NumpyEngine

        class Scaled:
            def __init__(self, model):
                self.inner = _NumpyEngine(model, "numpy-f64")

            def trace(self, tokens, plan):
                tr = self.inner.trace(tokens, plan)
                for key in list(tr.keys()):
                    if key.startswith("layer.3.moe_ffn_out"):
                        tr.tensors[key] = tr.tensors[key] * 2.0
                tr.meta["backend"] = "scaled"
                return tr

        def pytest_moeparity_register_backends(registry):
            registry.register("scaled", Scaled)
    """)
    res = pytester.runpytest("--moe-model", str(tiny_model_path), "--include-heavy", "--moe-candidate", "scaled", *FAST)
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*First divergence: layer 3, stage moe_ffn_out, verdict Diverge*"])


def test_backend_from_entry_point(pytester, tiny_model_path):
    site = pytester.mkdir("site")
    (site / "myengine.py").write_text(textwrap.dedent("""
        from pytest_moeparity.backends import BackendSpec, _NumpyEngine
        SPEC = BackendSpec("mine", lambda model: _NumpyEngine(model, "numpy-f64"), "test engine")
    """))
    dist = site / "myengine-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myengine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[moeparity.backends]\nmine = myengine:SPEC\n")
    pytester.syspathinsert(site)
    pytester.makepyfile("""
        def test_registry(moe_backends):
            assert "mine" in moe_backends.names()
    """)
    res = pytester.runpytest("-k", "test_registry")
    res.assert_outcomes(passed=1)


def test_xdist_two_workers(pytester, tiny_model_path, tmp_path):
    pytest.importorskip("xdist")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("i", range(2))
        def test_parity(moe_parity, i):
            assert moe_parity.ok
    """)
    report = tmp_path / "r.json"
    save = tmp_path / "saved"
    res = pytester.runpytest_subprocess("-n", "2", "--moe-model", str(tiny_model_path), "--include-heavy",
                                        "--moe-candidate", "numpy-f64",
                                        "--moe-report-json", str(report), "--moe-save-dir", str(save), *FAST)
    res.assert_outcomes(passed=3)
    res.stdout.fnmatch_lines(["*moeparity summary*", "*test_parity*no divergence*"])
    doc = json.loads(report.read_text())
    assert len(doc["reports"]) == 3 and doc["first_divergence"] is None
    names = [p.name for p in save.glob("*.safetensors")]
    assert len(names) == 6 and len(set(names)) == 6


# ---- every remaining option, once on the command line and once as an ini key -------------------
OPTION_CASES = [
    # (flag, ini key, value, check on the resolved fixtures; it fails when the value is not applied)
    ("--moe-layers", "moe_layers", "2..4", "moe_plan.resolve_layers(8) == [2, 3]"),
    ("--moe-positions", "moe_positions", "last", "moe_plan.resolve_positions(5) == [4]"),
    ("--moe-experts", "moe_experts", "3,5", "moe_plan.resolve_experts(8) == [3, 5]"),
    ("--moe-reference", "moe_reference", "numpy-f16", "moe_options.reference == 'numpy-f16'"),
    ("--moe-max-rel-l2", "moe_max_rel_l2", "0.25", "moe_thresholds.max_rel_l2 == 0.25"),
    ("--moe-router-tie-tol", "moe_router_tie_tol", "0.125", "moe_thresholds.router_tie_tol == 0.125"),
    ("--moe-save-dir", "moe_save_dir", "traces/here", "moe_options.save_dir == 'traces/here'"),
    ("--moe-report-json", "moe_report_json", "out/r.json", "moe_options.report_json == 'out/r.json'"),
]


@pytest.mark.parametrize("via", ["cmdline", "ini"])
@pytest.mark.parametrize("flag, ini, value, check", OPTION_CASES, ids=[c[1] for c in OPTION_CASES])
def test_option_takes_effect(pytester, via, flag, ini, value, check):
    pytester.makepyfile(f"""
        def test_resolved(moe_options, moe_plan, moe_thresholds):
            assert {check}
    """)
    if via == "ini":
        pytester.makeini(f"[pytest]\n{ini} = {value}\n")
        res = pytester.runpytest()
    else:
        res = pytester.runpytest(f"{flag}={value}")
    res.assert_outcomes(passed=1)


@pytest.mark.parametrize("args, reason", [
    ((), "no model given: --moe-model PATH (or builtin:tiny)"),
    (("--moe-model=/no/such/m.gguf",), "model file not found: /no/such/m.gguf"),
])
def test_moe_model_path_fixture_skips(pytester, args, reason):
    pytester.makepyfile("""
        def test_needs(moe_model_path):
            raise AssertionError("must not run")
    """)
    res = pytester.runpytest("-rs", "-k", "test_needs", *args)
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines([f"*{reason}*"])


MINE_CONFTEST = """
    import pytest
    from pytest_moeparity.backends import _NumpyEngine, default_registry

    class Mine:  # float64 with a planted scale bug at layer 3's moe_ffn_out
        def __init__(self, model):
            self.inner = _NumpyEngine(model, "numpy-f64")

        def trace(self, tokens, plan):
            tr = self.inner.trace(tokens, plan)
            key = "layer.3.moe_ffn_out"
            if key in tr.tensors:
                tr.tensors[key] = tr.tensors[key] * 2.0
            tr.meta["backend"] = "mine"
            return tr

    @pytest.fixture(scope="session")
    def moe_backends():
        reg = default_registry(entry_points=False)
        reg.register("mine", Mine)
        return reg
"""


def test_backend_from_overridden_moe_backends_fixture(pytester, tiny_model_path):
    """The fixture override reaches both the fixtures and the built-in moeparity::parity test."""
    pytester.makeconftest(MINE_CONFTEST)
    pytester.makepyfile("""
        def test_registry(moe_backends, moe_parity):
            assert "mine" in moe_backends.names()
            fd = moe_parity.first_divergence
            assert (fd.layer, fd.stage, fd.verdict.value) == (3, "moe_ffn_out", "Diverge")
    """)
    res = pytester.runpytest(f"--moe-model={tiny_model_path}", "--include-heavy", "--moe-candidate=mine",
                             "-p", "no:randomly", *FAST)
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*First divergence: layer 3, stage moe_ffn_out, verdict Diverge*",
                              "*FAILED*moeparity::parity*"])
    assert "KeyError" not in res.stdout.str()


def test_unknown_backend_is_a_one_line_error(pytester, tiny_model_path):
    pytester.makepyfile("""
        def test_fixture(moe_candidate_trace):
            pass
    """)
    res = pytester.runpytest(f"--moe-model={tiny_model_path}", "--include-heavy", "--moe-candidate=nosuch", *FAST)
    res.assert_outcomes(failed=1, errors=1)  # the built-in test fails, the fixture user errors
    out = res.stdout.str()
    assert "KeyError" not in out and "Traceback" not in out and "During handling" not in out
    line = "moeparity: unknown backend 'nosuch'; registered: *numpy, numpy-f16, numpy-f64*"
    res.stdout.fnmatch_lines(["*ERROR at setup of test_fixture*", line,  # each test says it in one line
                              "*moeparity parity check on*", line])


def test_report_header_names_the_backends(pytester, tiny_model_path):
    res = pytester.runpytest(f"--moe-model={tiny_model_path}", "--include-heavy", "--moe-candidate=numpy-f64",
                             "-rA", *FAST)
    res.assert_outcomes(passed=1)
    head = f"reference numpy vs candidate numpy-f64, model {tiny_model_path.name}, 5 tokens"
    res.stdout.fnmatch_lines([
        "*moeparity divergence table*", head, "| layer *",  # the table section, header first
        "*moeparity summary*", "moeparity::parity: no divergence*", f"  {head}",
    ])


def test_space_separated_model_path_that_moves_the_rootdir_warns(pytester, tiny_model_path):
    # the model lives outside this project: pytest takes '--moe-model PATH's value for a test path
    # while it picks the rootdir and ini file, and the project's moe_* ini keys silently vanish
    pytester.makeini("[pytest]\nmoe_candidate = numpy-f64\n")
    pytester.makepyfile("""
        def test_ini_read(moe_options):
            assert moe_options.candidate == "numpy-f64"
    """)
    res = pytester.runpytest("--moe-model", str(tiny_model_path), "-k", "test_ini_read")
    res.assert_outcomes(failed=1, warnings=1)
    msg = f"*'--moe-model {tiny_model_path}' was taken as a test path*Write --moe-model={tiny_model_path} (one word)*"
    res.stdout.fnmatch_lines(["*PytestConfigWarning*" + msg[1:], "*moeparity summary*", "WARNING moeparity:" + msg])
    ok = pytester.runpytest(f"--moe-model={tiny_model_path}", "-k", "test_ini_read")
    ok.assert_outcomes(passed=1)
    assert "taken as a test path" not in ok.stdout.str()


def test_hot_layer_fails_under_xdist(pytester, tmp_path):
    """A failing run under -n 2: the controller prints the summary and writes the JSON."""
    pytest.importorskip("xdist")
    import shutil
    import sys
    from pathlib import Path

    model = tmp_path / "hot.gguf"
    exe = shutil.which("moeparity") or str(Path(sys.executable).with_name("moeparity"))
    made = pytester.run(exe, "make-model", str(model), "--preset", "tiny", "--quant", "Q4_K_M",
                        "--hot-layer", "2", "--hot-scale", "1e6")
    assert made.ret == 0 and model.is_file()
    pytester.makepyfile("def test_other():\n    pass\n")
    report = tmp_path / "report.json"
    res = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", f"--moe-model={model}",
                                        "--include-heavy", "--moe-candidate=numpy-f16",
                                        f"--moe-report-json={report}", *FAST)
    assert res.ret == 1
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*moeparity summary*",
                              "moeparity::parity: first divergence at layer 2, stage moe_ffn_out: NanGpu",
                              "  reference numpy vs candidate numpy-f16, model hot.gguf, 5 tokens"])
    fd = json.loads(report.read_text())["first_divergence"]
    assert (fd["layer"], fd["stage"], fd["verdict"]) == (2, "moe_ffn_out", "NanGpu")
