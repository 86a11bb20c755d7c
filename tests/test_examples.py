"""The examples do what their READMEs say: each README's commands run on a copy of the example."""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def readme_commands(example: str, program: str) -> list[list[str]]:
    """The ``program ...`` lines of the bash blocks of an example's README, split into words."""
    text = (EXAMPLES / example / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == program:
                out.append(words[1:])
    return out


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    """A model cache holding builtin:tiny, made once for this module."""
    from pytest_moeparity.builtin import builtin_path

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEPARITY_CACHE", str(cache))
        return cache, builtin_path("tiny")


def check_passes(res, pytester):
    """plug_in_backend, command 1: the engine registered by the example's conftest.py matches."""
    assert res.ret == 0
    res.assert_outcomes(passed=3)  # the example's two tests and the built-in moeparity::parity
    res.stdout.fnmatch_lines(["*moeparity summary*", "moeparity::parity: no divergence*",
                              "  reference numpy vs candidate mine, model tiny-*.gguf, 8 tokens"])


def check_planted_bug_named(res, pytester):
    """command 2: a planted scale bug at layer 3 is named; isolated mode calls layer 3 wrong by itself."""
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    res.assert_outcomes(failed=3)
    res.stdout.fnmatch_lines(["*First divergence: layer 3, stage attn_out, verdict Diverge*",
                              "*layer 3: wrong by itself (isolated Diverge at attn_out)*",
                              "*layers 4-7: inherit (isolated Match)*",
                              "moeparity::parity: first divergence at layer 3, stage attn_out: Diverge"])


def check_model_file_and_json(res, pytester):
    """command 3: a model file with --include-heavy, and the JSON report."""
    assert res.ret == 0
    res.assert_outcomes(passed=3)
    doc = json.loads((pytester.path / "report.json").read_text())
    assert doc["first_divergence"] is None and doc["ok"] is True
    assert doc["meta"]["candidate"]["backend"] == "mine" and doc["meta"]["candidate"]["model"] == "m.gguf"
    assert len(doc["reports"]) == 3 and all(r["ok"] for r in doc["reports"])


PLUG_IN_CHECKS = [check_passes, check_planted_bug_named, check_model_file_and_json]


def test_plug_in_backend_readme_lists_the_checked_commands():
    commands = readme_commands("plug_in_backend", "pytest")
    assert len(commands) == len(PLUG_IN_CHECKS), commands
    assert "--moe-inject" in commands[1] and "--moe-report-json" in commands[2]


@pytest.mark.parametrize("index", range(len(PLUG_IN_CHECKS)), ids=[c.__name__[6:] for c in PLUG_IN_CHECKS])
def test_plug_in_backend_readme_command(pytester, builtin_cache, monkeypatch, index):
    """Copy examples/plug_in_backend, run the README's command ``index`` there, check its outcome."""
    cache, tiny = builtin_cache
    monkeypatch.setenv("MOEPARITY_CACHE", str(cache))
    shutil.copytree(EXAMPLES / "plug_in_backend", pytester.path, dirs_exist_ok=True)
    shutil.copyfile(tiny, pytester.path / "m.gguf")  # the README's stand-in for a real model file
    command = readme_commands("plug_in_backend", "pytest")[index]
    PLUG_IN_CHECKS[index](pytester.runpytest("-p", "no:cacheprovider", *command), pytester)
