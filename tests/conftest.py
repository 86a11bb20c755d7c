"""Shared fixtures for pytest-moeparity's own tests: small random GGUF models made once per session, and
the development scripts of benchmarks/ loaded as modules."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pytest_moeparity.make_model import PRESETS, make_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """The tiny preset at Q4_K_M (8 layers, 8 experts top-2; ffn_down_exps mixes Q6_K and Q4_K)."""
    path = tmp_path_factory.mktemp("models") / "tiny-q4km.gguf"
    make_model(path, PRESETS["tiny"], quant="Q4_K_M", seed=0)
    return path


@pytest.fixture(scope="session")
def hot_model_path(tmp_path_factory):
    """Tiny Q4_K_M with layer 2's expert down-projections scaled by 1e6 (overflows float16 there)."""
    path = tmp_path_factory.mktemp("models") / "tiny-hot2.gguf"
    make_model(path, PRESETS["tiny"], quant="Q4_K_M", seed=0, hot_layer=2, hot_scale=1e6)
    return path


@pytest.fixture(scope="session")
def bench_script():
    """``bench_script("sass_scan")``: benchmarks/sass_scan.py as a module, loaded once (registered in
    sys.modules before it runs: a dataclass there looks its module up)."""
    def load(name: str):
        if name not in sys.modules:
            path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(name, path)
            sys.modules[name] = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(sys.modules[name])
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]
    return load
