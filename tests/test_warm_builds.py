"""benchmarks/warm_builds.py's list of the GPU tests' kernel builds (what it compiles before the tests on a
cold GPU machine): every variant build tests/test_gpu.py asks for by a literal, each once, the default
first, and none that Backend.variant refuses."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _variant_literals(path: Path) -> list[str]:
    """The string arguments of every ``.variant("...")`` call and of the switches parametrizations."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "variant":
            found += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize" and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "switches"):
            found += [e.value for e in node.args[1].elts]
    return found


def test_the_builds_are_the_test_variants(tmp_path, bench_script):
    from pytest_moeparity.gpu.kernels import variant_options

    W = bench_script("warm_builds")
    builds = W.test_builds()
    assert builds[0] == () and len(builds) == len(set(builds))
    wanted = set()
    for lit in _variant_literals(ROOT / "tests" / "test_gpu.py"):
        try:
            wanted.add(variant_options(lit))
        except ValueError:  # refused by the backend (a test of that): never compiled
            assert lit not in [" ".join(b) for b in builds]
    assert len(wanted) >= 10 and wanted <= set(builds), wanted - set(builds)
    # a file of our own: a refused switch, a docstring that names switches among words, a repeat
    f = tmp_path / "test_x.py"
    f.write_text('"""Builds -DMP_ATTN_WIDE=0 and more."""\n'
                 'A = ["-DMP_ATTN_WIDE=0", "-DMP_WARPS=2", "-DMP_TOPK_REDUX=0  -DMP_ATTN_WIDE=0", "-DMP_ATTN_WIDE=0"]\n')
    assert W.test_builds([f]) == [(), ("-DMP_ATTN_WIDE=0",), ("-DMP_TOPK_REDUX=0", "-DMP_ATTN_WIDE=0")]


def test_list_needs_no_gpu(capsys, bench_script):
    assert bench_script("warm_builds").main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "(default)" and "-DMP_ATTN_CORE_WARPS=8" in lines


def test_without_cupy_it_says_so(monkeypatch, bench_script):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(SystemExit, match="CuPy"):
        bench_script("warm_builds").main([])
