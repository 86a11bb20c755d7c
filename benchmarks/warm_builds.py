"""Compile the GPU tests' kernel builds once, side by side, before the tests run (development aid).

On a fresh GPU machine every pytest-xdist worker compiles kernels.cu with NVRTC for the default build
and again for each variant build its tests ask for (``backend.variant("-DMP_...")``): ~40 s of one core
a build, the same build often in several workers at once, and the variant tests at the end of the run
waiting on their compiles (session 30: `tests/test_gpu.py` and `tests/test_gpu_tuning.py` took over 345 s
cold at -n 14, 101 s once the builds were in CuPy's kernel cache; session 31, first run on a GPU: 15 of
16 builds in 170 s at --jobs 8 beside the 30b-a3b model being made, 72-88 s each, then the same files in
47 s on an H200). This script finds the builds the test
files name (string literals made only of ``-DMP_NAME=VALUE`` switches that :func:`variant_options`
accepts, plus the default build), compiles each in a process of its own, all at once up to ``--jobs``,
so that CuPy's on-disk kernel cache holds them when pytest starts. A build it misses is compiled by the
test as before: nothing depends on it but time.

    python3 benchmarks/warm_builds.py            # then: python3 -m pytest -m gpu -n 14 tests/test_gpu*.py
    python3 benchmarks/warm_builds.py --list     # the builds, no GPU needed
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package first
DEFAULT_FILES = (ROOT / "tests" / "test_gpu.py",)  # (test_gpu_tuning.py compiles no variant: its switches are light tests')
_SWITCHES = re.compile(r"-DMP_\w+=\S+(?: +-DMP_\w+=\S+)*")


def test_builds(files=DEFAULT_FILES) -> list[tuple[str, ...]]:
    """The default build, ``()``, then each distinct set of switches that a string literal of ``files``
    spells out whole and that ``variant_options`` accepts (a switch kernels.py reads at import, such as
    MP_WARPS, is refused there and so never compiled as a variant), in the order first found."""
    from pytest_moeparity.gpu.kernels import variant_options

    builds: list[tuple[str, ...]] = [()]
    for path in files:
        for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SWITCHES.fullmatch(node.value):
                try:
                    opts = variant_options(node.value)
                except ValueError:
                    continue
                if opts not in builds:
                    builds.append(opts)
    return builds


def _compile(opts: tuple[str, ...]) -> tuple[tuple[str, ...], float, str]:
    t0 = time.perf_counter()
    try:
        from pytest_moeparity.gpu.kernels import CupyBackend

        CupyBackend(opts)
        err = ""
    except Exception as exc:  # reported in the table; the tests compile it again and fail there
        err = f"{type(exc).__name__}: {str(exc)[:200]}"
    return opts, time.perf_counter() - t0, err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="test files to read (default: tests/test_gpu.py)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="builds compiled at once")
    ap.add_argument("--list", action="store_true", help="print the builds and stop")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    builds = test_builds(args.files or DEFAULT_FILES)
    if args.list:
        for opts in builds:
            print(" ".join(opts) or "(default)")
        return 0
    try:
        import cupy  # noqa: F401
    except ImportError:
        raise SystemExit("warm_builds.py compiles through CuPy, which is not installed (the cuda12 / cuda13 "
                         "extras); --list needs neither")
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tabulate import tabulate

    t0 = time.perf_counter()
    rows, failed = [], 0
    # spawn: a CUDA context does not survive fork; each build in a process of its own
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(builds)), mp_context=mp.get_context("spawn")) as pool:
        for i, fut in enumerate(as_completed([pool.submit(_compile, b) for b in builds]), 1):
            opts, secs, err = fut.result()
            failed += bool(err)
            print(f"  [{i}/{len(builds)}] {' '.join(opts) or '(default)'}: {secs:.1f} s{' ' + err if err else ''}",
                  flush=True)
            rows.append({"build": " ".join(opts) or "(default)", "compile_s": round(secs, 1), "error": err})
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print(f"{len(builds)} builds in {time.perf_counter() - t0:.1f} s wall, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
