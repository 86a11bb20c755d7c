"""pytest plugin: options, markers, fixtures and report hooks. The numerics live elsewhere.

Options (each also an ini key with ``-`` -> ``_``, e.g. ``moe_model``)::

    --moe-model PATH|builtin:tiny   --include-heavy
    --moe-stages  --moe-layers  --moe-positions  --moe-experts  --moe-tokens
    --moe-reference NAME  --moe-candidate NAME
    --moe-min-cosine  --moe-max-rel-l2  --moe-router-tie-tol
    --moe-save-dir DIR  --moe-report-json PATH (a heatmap PNG is written next to it)
    --moe-inject SPEC          plant faults in the candidate (pytest_moeparity.faults)
    --moe-isolated  --moe-forced-routing  --moe-no-drilldown (ini moe_drilldown = false)
                               bisection sections (pytest_moeparity.bisect)
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPORT_ATTR = "moeparity_report"  # JSON text on TestReport; survives pytest-xdist serialisation
_REPORTS = pytest.StashKey[list]()
_OPTIONS = pytest.StashKey["MoeOptions"]()

_OPTS = [
    # (name, help, ini type)
    ("moe_model", "Qwen3-MoE GGUF file to check (or builtin:tiny / builtin:small)", "string"),
    ("moe_stages", "stages to capture: all or a comma list (aliases allowed)", "string"),
    ("moe_layers", "layers: all, N, START..END (END exclusive) or a list", "string"),
    ("moe_positions", "token positions: all, last or a list", "string"),
    ("moe_experts", "experts for per-expert stages: routed, all or a list", "string"),
    ("moe_tokens", "prompt token ids, comma separated (default: a fixed 8-token prompt)", "string"),
    ("moe_reference", "reference backend name (default numpy)", "string"),
    ("moe_candidate", "candidate backend name (default cupy with a GPU, else numpy-f64)", "string"),
    ("moe_min_cosine", "Diverge below this cosine (default from contracts/verdicts.yaml)", "string"),
    ("moe_max_rel_l2", "Diverge above this relative L2 (default from contracts/verdicts.yaml)", "string"),
    ("moe_router_tie_tol", "router near-tie tolerance (default from contracts/verdicts.yaml)", "string"),
    ("moe_save_dir", "save every trace here as safetensors", "string"),
    ("moe_report_json", "write the parity report(s) as JSON here (and a heatmap PNG next to it)", "string"),
    ("moe_inject", "plant faults in the candidate only, e.g. 'nan@6:moe_ffn_out;scale=2@3:attn_out' or "
                   "'dispatch=q6_k@*:ffn_down_exps' (proves the harness on a new backend)", "string"),
]
# boolean switches: (option dest, flag, ini key, ini default, help)
_FLAGS = [
    ("moe_isolated", "--moe-isolated", "moe_isolated", False,
     "bisection: also run each layer alone from the reference's input (wrong by itself vs inherited)"),
    ("moe_forced_routing", "--moe-forced-routing", "moe_forced_routing", False,
     "bisection: also run the candidate with the reference's expert choices (routing flips vs expert math)"),
    ("moe_no_drilldown", "--moe-no-drilldown", "moe_drilldown", True,
     "turn off the automatic per-expert drill-down where moe_ffn_out diverges (ini: moe_drilldown = false)"),
]


def pytest_addhooks(pluginmanager):
    from . import hooks

    pluginmanager.add_hookspecs(hooks)


def pytest_addoption(parser):
    group = parser.getgroup("moeparity", "MoE GPU/CPU parity (pytest-moeparity)")
    for name, help_, ini_type in _OPTS:
        group.addoption("--" + name.replace("_", "-"), dest=name, default=None, help=help_)
        parser.addini(name, help_, type=ini_type, default=None)
    group.addoption("--include-heavy", dest="include_heavy", action="store_true", default=None,
                    help="run tests marked heavy (they need --moe-model)")
    parser.addini("moe_include_heavy", "run tests marked heavy", type="bool", default=False)
    for dest, flag, ini, default, help_ in _FLAGS:
        group.addoption(flag, dest=dest, action="store_true", default=None, help=help_)
        parser.addini(ini, help_, type="bool", default=default)


@dataclass(frozen=True)
class MoeOptions:
    model: str | None
    include_heavy: bool
    stages: str | None
    layers: str | None
    positions: str | None
    experts: str | None
    tokens: list[int] | None
    reference: str
    candidate: str | None
    min_cosine: float | None
    max_rel_l2: float | None
    router_tie_tol: float | None
    save_dir: str | None
    report_json: str | None
    inject: str | None = None
    isolated: bool = False
    forced_routing: bool = False
    drilldown: bool = True

    @classmethod
    def from_config(cls, config) -> "MoeOptions":
        def get(name):
            v = config.getoption(name)
            if v is None:
                v = config.getini(name)
            return v if v not in ("", None) else None

        def num(name):
            v = get(name)
            if v is None:
                return None
            try:
                return float(v)
            except ValueError:
                raise pytest.UsageError(f"--{name.replace('_', '-')}: {v!r} is not a number") from None

        tokens = get("moe_tokens")
        if tokens is not None:
            try:
                tokens = [int(t) for t in str(tokens).replace(" ", "").split(",") if t]
            except ValueError:
                raise pytest.UsageError(f"--moe-tokens: {tokens!r} is not a comma list of integers") from None
            if not tokens:
                raise pytest.UsageError("--moe-tokens: empty token list")
        heavy = config.getoption("include_heavy")
        if heavy is None:
            heavy = bool(config.getini("moe_include_heavy"))

        def flag(dest, ini):
            v = config.getoption(dest)
            return bool(config.getini(ini)) if v is None else True

        isolated = flag("moe_isolated", "moe_isolated")
        forced = flag("moe_forced_routing", "moe_forced_routing")
        drilldown = bool(config.getini("moe_drilldown")) and not config.getoption("moe_no_drilldown")
        return cls(model=get("moe_model"), include_heavy=heavy, stages=get("moe_stages"),
                   layers=get("moe_layers"), positions=get("moe_positions"), experts=get("moe_experts"),
                   tokens=tokens, reference=get("moe_reference") or "numpy", candidate=get("moe_candidate"),
                   min_cosine=num("moe_min_cosine"), max_rel_l2=num("moe_max_rel_l2"),
                   router_tie_tol=num("moe_router_tie_tol"), save_dir=get("moe_save_dir"),
                   report_json=get("moe_report_json"), inject=get("moe_inject"), isolated=isolated,
                   forced_routing=forced, drilldown=drilldown)

    def faults(self) -> list:
        from .faults import FaultError, parse_faults

        try:
            return parse_faults(self.inject)
        except FaultError as exc:
            raise pytest.UsageError(f"moeparity: --moe-inject: {exc}") from None

    def bisect_kwargs(self) -> dict:
        """Keyword arguments of :func:`pytest_moeparity.parity.run_parity` for the modes."""
        return {"faults": self.faults(), "isolated": self.isolated, "forced_routing": self.forced_routing,
                "drilldown": self.drilldown}

    def plan(self):
        from .plan import PlanError, SavePlan

        try:
            return SavePlan.parse(self.stages, self.layers, self.positions, self.experts)
        except PlanError as exc:
            raise pytest.UsageError(f"moeparity: {exc}") from None

    def thresholds(self):
        from .metrics import Thresholds

        try:
            return Thresholds.from_contract(min_cosine=self.min_cosine, max_rel_l2=self.max_rel_l2,
                                            router_tie_tol=self.router_tie_tol)
        except ValueError as exc:
            raise pytest.UsageError(f"moeparity: {exc}") from None

    def model_path(self) -> Path | None:
        """The model file, or None when none was given or it does not exist (built-ins are made)."""
        if self.model is None:
            return None
        from .builtin import BUILTIN_PREFIX, resolve_model_path

        if self.model.startswith(BUILTIN_PREFIX):
            return resolve_model_path(self.model)
        p = Path(self.model).expanduser()
        return p if p.is_file() else None


_PATH_OPTIONS = ("--moe-model", "--moe-report-json", "--moe-save-dir")
_ROOTDIR_WARNING = pytest.StashKey[str]()


def _split_path_values(args) -> list[tuple[str, str]]:
    """``(option, value)`` for each path option given as two words (``--moe-model PATH``)."""
    args = [str(a) for a in args]
    out = []
    for i, a in enumerate(args[:-1]):
        if a == "--":
            break
        if a in _PATH_OPTIONS:
            out.append((a, args[i + 1]))
    return out


def _rootdir_hijack(config) -> str | None:
    """A warning text when the value of ``--moe-model PATH`` (or --moe-report-json / --moe-save-dir)
    steered pytest's choice of rootdir and ini file.

    pytest picks them before plugins register their options, so it takes such a value for a test
    path; an existing file elsewhere (``/tmp/m.gguf``) then moves the rootdir there and the project's
    ini file (with its moe_* keys) is silently not read. ``--moe-model=PATH`` is one word and safe.
    """
    if hasattr(config, "workerinput"):  # the controller says it once
        return None
    params = config.invocation_params
    split = [(o, v) for o, v in _split_path_values(params.args) if Path(v).expanduser().exists()]
    ns = config.known_args_namespace
    if not split or getattr(ns, "inifilename", None) or getattr(ns, "rootdir", None):
        return None  # -c / --rootdir: the args play no part
    from _pytest.config.findpaths import determine_setup

    args, skip = [], False  # the invocation's args with the two-word path options left out
    for a in map(str, params.args):
        if skip:
            skip = False
            continue
        if a in _PATH_OPTIONS:
            skip = True
            continue
        args.append(a)
    kw = dict(inifile=None, args=args, rootdir_cmd_arg=None, invocation_dir=params.dir)
    try:
        try:
            rootdir, inipath, *_ = determine_setup(override_ini=None, **kw)
        except TypeError:  # pytest 8.0-8.x: no override_ini
            rootdir, inipath, *_ = determine_setup(**kw)
    except Exception:  # pragma: no cover - a pytest whose private helper differs: say nothing
        return None
    if inipath == config.inipath:
        return None
    opt, value = split[0]
    return (f"moeparity: '{opt} {value}' was taken as a test path when pytest chose its rootdir and ini "
            f"file: it used rootdir {config.rootpath} and ini file {config.inipath or '(none)'} instead of "
            f"{inipath} (rootdir {rootdir}), so that ini file's settings are not applied. "
            f"Write {opt}={value} (one word).")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: needs a real model file (--moe-model) and --include-heavy")
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA GPU; skipped where absent")
    hijack = _rootdir_hijack(config)
    if hijack:
        config.stash[_ROOTDIR_WARNING] = hijack
        config.issue_config_time_warning(pytest.PytestConfigWarning(hijack), stacklevel=2)
    opts = MoeOptions.from_config(config)
    opts.plan()
    opts.thresholds()
    opts.faults()
    config.stash[_OPTIONS] = opts
    config.stash[_REPORTS] = []


def _opts(config) -> MoeOptions:
    return config.stash[_OPTIONS]


def gpu_unavailable_reason() -> str | None:
    try:
        from .gpu import availability
    except ImportError as exc:
        return f"GPU backend not importable: {exc}"
    return availability()


def pytest_runtest_setup(item):
    opts = _opts(item.config)
    if item.get_closest_marker("heavy") is not None:
        if not opts.include_heavy:
            pytest.skip("heavy test: run with --include-heavy --moe-model PATH")
        if opts.model is None:
            pytest.skip("heavy test: no model file given (--moe-model PATH)")
        if opts.model_path() is None:
            pytest.skip(f"heavy test: model file not found: {opts.model}")
    if item.get_closest_marker("gpu") is not None:
        reason = gpu_unavailable_reason()
        if reason:
            pytest.skip(f"gpu test: {reason}")


# ---- the built-in parity test ----------------------------------------------------------------
def _builtin_parity(request):
    """Reference vs candidate on --moe-model (the built-in ``moeparity::parity`` test). It runs through
    the session's fixtures (``moe_parity_run`` -> ``moe_backends``, ``moe_model``, ...), so a conftest
    that overrides ``moe_backends`` counts here too, and tests using ``moe_parity`` share the run.
    They are requested in the call, so a backend that fails makes this test fail (not error)."""
    item, run = request.node, request.getfixturevalue("moe_parity_run")
    attach_report(item, run.report, _opts(request.config), (run.reference, run.candidate))
    item.report = run.report
    if not run.report.ok:
        raise MoeParityFailure(run.report)


NODEID = "moeparity::parity"


class MoeParityItem(pytest.Function):
    """``moeparity::parity``: reference vs candidate on --moe-model, added when that option is set.
    A Function so that it resolves fixtures (``moe_backends``, ``moe_model``) like any test."""

    def __init__(self, **kw):
        kw.setdefault("callobj", _builtin_parity)
        super().__init__(**kw)
        # the id "moeparity::parity" rather than "::moeparity::parity" (a Function takes no nodeid)
        if isinstance(getattr(self, "_id", None), str) or not hasattr(self, "_id"):
            self._nodeid = NODEID  # pytest < 9.2
        else:
            self._id = type(self._id).parse(NODEID)
        opts = _opts(self.config)
        from .builtin import BUILTIN_PREFIX

        if not (opts.model or "").startswith(BUILTIN_PREFIX):
            self.add_marker("heavy")
        self.report = None

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, MoeParityFailure):
            return "moeparity: candidate diverges from the reference\n" + excinfo.value.report.render()
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"moeparity parity check on {_opts(self.config).model}"


class MoeParityFailure(AssertionError):
    def __init__(self, report):
        super().__init__(report.render())
        self.report = report


def pytest_collection_modifyitems(session, config, items):
    opts = _opts(config)
    if opts.model is not None:
        items.append(MoeParityItem.from_parent(session, name=NODEID))


# ---- fixtures -----------------------------------------------------------------------------------
def build_registry(config):
    from .backends import default_registry

    reg = default_registry()
    config.hook.pytest_moeparity_register_backends(registry=reg)
    return reg


@pytest.fixture(scope="session")
def moe_options(pytestconfig) -> MoeOptions:
    """The parsed --moe-* options and ini keys."""
    return _opts(pytestconfig)


@pytest.fixture(scope="session")
def moe_model_path(moe_options) -> Path:
    """The model file; skips the test when none was given or it does not exist."""
    if moe_options.model is None:
        pytest.skip("no model given: --moe-model PATH (or builtin:tiny)")
    p = moe_options.model_path()
    if p is None:
        pytest.skip(f"model file not found: {moe_options.model}")
    return p


@pytest.fixture(scope="session")
def moe_model(moe_model_path):
    """The loaded GGUF model (memory-mapped, cached per session)."""
    from .model import load_model

    return load_model(moe_model_path)


@pytest.fixture(scope="session")
def moe_plan(moe_options):
    """The save plan shared by both backends."""
    return moe_options.plan()


@pytest.fixture(scope="session")
def moe_tokens(moe_options, moe_model) -> list[int]:
    from .parity import default_tokens

    toks = moe_options.tokens or default_tokens(moe_model.config.vocab)
    return moe_model.validate_tokens(toks)


@pytest.fixture(scope="session")
def moe_thresholds(moe_options):
    return moe_options.thresholds()


@pytest.fixture(scope="session")
def moe_backends(pytestconfig):
    """Backend registry: built-ins, entry points (``moeparity.backends``) and the
    ``pytest_moeparity_register_backends`` hook. Override this fixture to change it."""
    return build_registry(pytestconfig)


@pytest.fixture(scope="session")
def moe_trace(moe_backends, moe_model, moe_tokens, moe_plan, moe_options):
    """``moe_trace(name) -> Trace`` of that backend under the session's plan, cached per session."""
    from .backends import BackendUnavailable
    from .parity import run_trace

    cache = {}

    def get(name: str):
        if name not in cache:
            check_backend(moe_backends, name)
            try:
                cache[name] = run_trace(moe_backends, name, moe_model, moe_tokens, moe_plan)[0]
            except BackendUnavailable as exc:
                pytest.skip(str(exc))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def moe_reference_trace(moe_trace, moe_options):
    return moe_trace(moe_options.reference)


@pytest.fixture(scope="session")
def moe_candidate_name(moe_options, moe_backends) -> str:
    return moe_options.candidate or moe_backends.default_candidate()


@pytest.fixture(scope="session")
def moe_candidate_trace(moe_trace, moe_candidate_name, moe_options, moe_backends, moe_model, moe_tokens, moe_plan):
    """The candidate's trace under the session's plan, with the --moe-inject faults planted."""
    faults = moe_options.faults()
    if not faults:
        return moe_trace(moe_candidate_name)
    check_backend(moe_backends, moe_candidate_name)
    from .backends import BackendUnavailable, ModeUnsupported
    from .parity import run_trace

    try:
        return run_trace(moe_backends, moe_candidate_name, moe_model, moe_tokens, moe_plan, faults=faults)[0]
    except ModeUnsupported as exc:
        pytest.fail(f"moeparity: {exc}", pytrace=False)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def check_backend(registry, name: str) -> None:
    """Fail (one line, no traceback) when ``name`` is not in the registry, naming the known ones."""
    try:
        registry.get(name)
        return
    except KeyError as exc:
        msg = exc.args[0] if exc.args else f"unknown backend {name!r}"
    pytest.fail(f"moeparity: {msg}", pytrace=False)  # outside the except: no chained KeyError


def _run_parity(opts: MoeOptions, model, tokens, registry, candidate=None):
    """run_parity with the session's options; an unsupported mode fails, an unavailable backend skips."""
    from .backends import BackendUnavailable, ModeUnsupported
    from .parity import run_parity

    for name in (opts.reference, candidate or opts.candidate or registry.default_candidate()):
        check_backend(registry, name)
    try:
        return run_parity(model, tokens, opts.plan(), reference=opts.reference, candidate=candidate or opts.candidate,
                          thresholds=opts.thresholds(), registry=registry, **opts.bisect_kwargs())
    except ModeUnsupported as exc:
        failed, skipped = f"moeparity: {exc}", None
    except BackendUnavailable as exc:
        failed, skipped = None, str(exc)
    if failed:  # outside the except block: one line, no "during handling of the above exception"
        pytest.fail(failed, pytrace=False)
    pytest.skip(skipped)


@pytest.fixture(scope="session")
def moe_parity_run(moe_options, moe_model, moe_tokens, moe_backends, moe_candidate_name):
    """The session's :class:`~pytest_moeparity.parity.ParityRun`: both traces, the report and the
    bisection sections asked for (--moe-isolated, --moe-forced-routing, drill-down, --moe-inject)."""
    return _run_parity(moe_options, moe_model, moe_tokens, moe_backends, moe_candidate_name)


@pytest.fixture
def moe_parity(request, moe_parity_run, moe_thresholds, moe_options):
    """The parity report of reference vs candidate (with the bisection sections); its table is
    attached to this test's report and its JSON to --moe-report-json."""
    from .report import compare_traces

    run = moe_parity_run
    report = compare_traces(run.reference, run.candidate, moe_thresholds)
    report.bisect = run.bisect
    attach_report(request.node, report, moe_options, (run.reference, run.candidate))
    return report


def _save_tag(item) -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")[-80:]
    return f"{name}.{worker}.{os.getpid()}.{time.time_ns()}"


def attach_report(item, report, opts: MoeOptions, traces=()) -> None:
    """Put the table on the test's report (sections, junit properties, xdist-safe JSON)."""
    props = report.junit_properties()
    item.user_properties.extend(props)
    saved = []
    if opts.save_dir:
        tag = _save_tag(item)
        for role, tr in zip(("reference", "candidate"), traces):
            saved.append(str(tr.save(Path(opts.save_dir) / f"{tag}.{role}.{tr.meta.get('backend', role)}.safetensors")))
    item.stash.setdefault(_REPORTS, []).append((report, saved))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.when != "call":
        return
    entries = item.stash.get(_REPORTS, [])
    if not entries:
        return
    texts, payload = [], []
    for report, saved in entries:
        text = report.render()
        if saved:
            text += "\nsaved traces:\n" + "\n".join("  " + s for s in saved)
        texts.append(text)
        payload.append(dict(report.to_json(), test=item.nodeid, saved=saved))
    rep.sections.append(("moeparity divergence table", "\n\n".join(texts)))
    setattr(rep, REPORT_ATTR, json.dumps(payload, allow_nan=False))
    if item.config.pluginmanager.hasplugin("html") and item.config.getoption("htmlpath", None):
        _html_extras(rep, [r for r, _ in entries])  # only when an HTML report is being written


def _html_extras(rep, reports) -> None:
    """The heatmap of each report as an image in pytest-html's report (needs matplotlib)."""
    import base64

    try:
        import pytest_html
        from .heatmap import heatmap_png_bytes
    except ImportError:
        return
    images = []
    for report in reports:
        png = heatmap_png_bytes(report)
        if png is None:
            return
        images.append(pytest_html.extras.image(base64.b64encode(png).decode("ascii"), mime_type="image/png"))
    version = getattr(pytest_html, "__version__", "4")
    attr = "extras" if str(version).split(".")[0].isdigit() and int(str(version).split(".")[0]) >= 4 else "extra"
    setattr(rep, attr, list(getattr(rep, attr, None) or []) + images)


def _collect(terminalreporter) -> list[dict]:
    out = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            text = getattr(rep, REPORT_ATTR, None)
            if text and getattr(rep, "when", None) == "call":
                out.extend(json.loads(text))
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput"):
        return
    payloads = _collect(terminalreporter)
    hijack = config.stash.get(_ROOTDIR_WARNING, None)
    if not payloads and not hijack:
        return
    from .report import run_header

    tr = terminalreporter
    tr.section("moeparity summary")
    if hijack:
        tr.write_line("WARNING " + hijack, yellow=True, bold=True)
    for p in payloads:
        fd = p.get("first_divergence")
        if fd is None:
            n = len(p.get("cells", []))
            tr.write_line(f"{p['test']}: no divergence ({n} cells Match)")
        else:
            where = "model" if fd.get("layer") is None else f"layer {fd['layer']}"
            exp = "" if fd.get("expert") is None else f" expert {fd['expert']}"
            tr.write_line(f"{p['test']}: first divergence at {where}, stage {fd['stage']}{exp}: {fd['verdict']}")
        meta = p.get("meta") or {}
        head = run_header(meta.get("reference"), meta.get("candidate"))
        if head:
            tr.write_line(f"  {head}")
        iso = p.get("isolated") or {}
        if iso.get("own_layers"):
            tr.write_line(f"  isolated: wrong by itself at layer(s) {', '.join(map(str, iso['own_layers']))}")
        forced = p.get("forced_routing") or {}
        if forced.get("summary"):
            tr.write_line(f"  forced routing: {forced['summary'][0]}")
        for d in p.get("drilldown") or []:
            if d.get("expert") is not None:
                tr.write_line(f"  drill-down: layer {d['layer']} expert {d['expert']} first differs at {d['stage']} "
                              f"({d['verdict']}); ffn_gate/up/down_exps "
                              f"{'/'.join(d['quant_types'].get(w, '?') for w in ('ffn_gate_exps', 'ffn_up_exps', 'ffn_down_exps'))}")
    opts = _opts(config)
    if opts.report_json and payloads:
        path = Path(opts.report_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        first = next((p for p in payloads if p.get("first_divergence")), payloads[0])
        doc = dict(first, reports=payloads)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
        os.replace(tmp, path)
        tr.write_line(f"moeparity JSON report: {path}")
        from .heatmap import MISSING_MATPLOTLIB, png_path_for, write_heatmap

        png = write_heatmap(first, png_path_for(path))
        tr.write_line(f"moeparity heatmap: {png}" if png else f"moeparity: {MISSING_MATPLOTLIB}")
