"""Light tests (no GPU, no compiler) of the GPU backend's launch-geometry choices in kernels.py: which
token-tile instance a product uses, and the tuning overrides read from MOEPARITY_NVRTC_OPTIONS, which
must set the Python launch geometry and the compiled kernels' defines together."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from pytest_moeparity.gpu import kernels as K


@pytest.mark.parametrize("T,nt", [(1, 1), (2, 4), (3, 4), (4, 4), (5, 8), (8, 8), (9, 8), (64, 8), (1000, 8)])
def test_token_tile_is_smallest_instance_holding_T(T, nt):
    assert K._token_tile(T) == nt
    for kernel in ("qmm_dense", "qmm_experts"):
        for q in K.KERNEL_QTYPES.values():
            assert f"{kernel}<{q},{nt}>" in K.NAME_EXPRESSIONS


@pytest.mark.parametrize("N,T,kernel", [
    (4096, 3, "qmm_dense_splitk<12,4>"),            # attn_q of 30b-a3b: 512 row groups, split
    (128, 1, "qmm_dense_splitk<12,1>"),             # the router, decode
    (151936, 3, "qmm_dense<12,4>"),                 # the output head: 18992 row groups fill the GPU
    (151936, 1, "qmm_dense<12,1>"),
    (4096, 5, "qmm_dense<12,8>"),                   # 5 tokens: no split instance
])
def test_dense_launch_splits_only_short_prompts_on_small_grids(N, T, kernel):
    name, grid = K.dense_launch(12, (N,), T)
    assert name == kernel
    rows = K.rows_for(K._token_tile(T))
    if "splitk" in name:
        assert grid == (K._cdiv(N, rows), 1, 1)   # a block per MP_ROWS_FOR(NT) rows
    else:
        assert grid == (K._cdiv(N, K.WARPS * rows) * K._cdiv(T, K._token_tile(T)), 1, 1)
    assert name in K.NAME_EXPRESSIONS


@pytest.mark.parametrize("N,T,long_split,kernel", [
    (128, 64, 264, "qmm_dense_splitk<0,4>"),   # the F32 router of a 64-token prompt: 64 tiled blocks
    (128, 64, 64, "qmm_dense<0,8>"),           # the limit is a strict bound
    (128, 64, 0, "qmm_dense<0,8>"),            # 0: never
    (4096, 64, 264, "qmm_dense<0,8>"),         # 2048 tiled blocks fill the GPU
    (40, 5, 264, "qmm_dense_splitk<0,4>"),     # 5 tokens: two tiles of 4, the second short
])
def test_dense_launch_splits_a_long_prompt_only_on_small_grids(N, T, long_split, kernel):
    name, grid = K.dense_launch(0, (N,), T, long_split)
    assert name == kernel and name in K.NAME_EXPRESSIONS
    if "splitk" in name:  # a block per (4 rows, 4 tokens)
        assert grid == (K._cdiv(N, K.rows_for(4)) * K._cdiv(T, 4), 1, 1)
    else:
        assert grid == (K._cdiv(N, K.WARPS * K.rows_for(8)) * K._cdiv(T, 8), 1, 1)


@pytest.mark.parametrize("T", [1, 2])  # tiles of 1 and 4 tokens: 2 and 4 rows per warp
def test_splitk_limit_is_the_boundary(T):
    rows = K.rows_for(K._token_tile(T))
    limit_rows = K.SPLITK_MAX_GROUPS * K.WARPS * rows
    assert "splitk" in K.dense_launch(14, (limit_rows,), T)[0]
    assert "splitk" not in K.dense_launch(14, (limit_rows + 1,), T)[0]
    # matrices sharing a launch count together
    assert "splitk" not in K.dense_launch(14, (limit_rows - 8 * rows * K.WARPS, 16 * rows * K.WARPS), T)[0]


def test_rows_per_warp_by_token_tile():
    """4 weight rows per warp for the 4- and 8-token instances (prompts of 2 tokens and more), 2 for
    decode; the experts' grid follows the same rule."""
    assert (K.rows_for(1), K.rows_for(4), K.rows_for(8)) == (K.ROWS, K.ROWS_NT4, K.ROWS_NT8) == (2, 4, 4)


def test_dense_launch_of_shared_input_matrices_covers_each_matrix_row_groups():
    # attn_q / attn_k / attn_v of 30b-a3b at 3 tokens: one split launch, a block per MP_ROWS rows of each
    name, grid = K.dense_launch(12, (4096, 512, 512), 3)
    assert name == "qmm_dense_splitk<12,4>" and grid == ((4096 + 512 + 512) // K.rows_for(4), 1, 1)
    # 64 tokens: row groups of each matrix (rounded up separately) times the token tiles
    name, grid = K.dense_launch(12, (37, 5), 64)
    assert name == "qmm_dense<12,8>"
    assert grid == ((K._cdiv(37, K.WARPS * K.rows_for(8)) + K._cdiv(5, K.WARPS * K.rows_for(8))) * 8, 1, 1)


def test_tuning_define_reads_only_its_own_option(monkeypatch):
    monkeypatch.setenv(K.NVRTC_OPTIONS_ENV, "-DMP_ROWSX=9 -DMP_MIN_BLOCKS=6 -DMP_ROWS=4")
    assert K._tuning_define("MP_ROWS", 2) == 4
    assert K._tuning_define("MP_WARPS", 4) == 4
    monkeypatch.delenv(K.NVRTC_OPTIONS_ENV)
    assert K._tuning_define("MP_ROWS", 2) == 2


def test_tuning_options_set_launch_geometry_and_compile_defines():
    code = ("import json; from pytest_moeparity.gpu import kernels as K; "
            "print(json.dumps([K.ROWS, K.ROWS_NT4, K.ROWS_NT8, K.WARPS, K.THREADS, list(K.compile_options())]))")
    env = dict(os.environ, **{K.NVRTC_OPTIONS_ENV: "-DMP_ROWS=4 -DMP_ROWS_NT4=8 -DMP_ROWS_NT8=3 -DMP_WARPS=2"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    rows, rows4, rows8, warps, threads, options = json.loads(out.stdout)
    assert (rows, rows4, rows8, warps, threads) == (4, 8, 3, 2, 64)
    for opt in ("-DMP_ROWS=4", "-DMP_ROWS_NT4=8", "-DMP_ROWS_NT8=3", "-DMP_WARPS=2"):
        assert opt in options


def test_records_len_bounds_every_routing():
    """kernels.py sizes a routing's records before the device splits the experts' pairs into runs of up to
    MP_EXPERT_CHUNK: records_len must hold the runs of every way of spreading P pairs over E experts, and
    the bound is reached (every expert active, the rest of the pairs on one expert); short prompts whose
    experts hold at most a chunk keep one record an expert."""
    rng = np.random.default_rng(5)
    for E, P, chunk in [(128, 512, 4), (128, 512, 8), (8, 70, 5), (128, 24, 4), (6, 36, 4), (512, 40, 4), (3, 3, 4)]:
        bound = K.records_len(P, E, chunk)
        for _ in range(200):
            active = rng.integers(1, min(E, P) + 1)
            counts = np.ones(active, int)
            np.add.at(counts, rng.integers(0, active, P - active), 1)
            assert int(np.ceil(counts / chunk).sum()) <= bound, (E, P, chunk, counts)
        n_act = min(E, P)
        worst = np.ones(n_act, int)
        worst[0] += P - n_act
        assert int(np.ceil(worst / chunk).sum()) == bound, (E, P, chunk)
        assert K.records_len(P, E, 0) == n_act  # one record an expert
    assert K.records_len(24, 128, 4) == 24 and K.records_len(512, 128, 4) == 128 + 96


class Opts(K.Backend):
    """A backend of the given -D options alone (Backend.switch reads nothing else)."""

    def __init__(self, extra):
        self.extra_options = tuple(extra)


def test_backend_switch_reads_options_then_the_source_default():
    """Backend.switch: a switch's value in a backend's kernels, from its own -D options (the last one)
    or kernels.cu's #ifndef default; MP_EXPERT_CHUNK is read by both the device and kernels.py."""
    default = int(re.search(r"#define MP_EXPERT_CHUNK (\d+)", K.kernel_source()).group(1))
    assert K.expert_chunk(Opts(())) == default >= K.WARPS
    assert K.expert_chunk(Opts(("-DMP_EXPERT_CHUNK=0",))) == 0
    assert K.expert_chunk(Opts(("-DMP_EXPERT_CHUNK=8", "-DMP_EXPERT_CHUNK=16"))) == 16
    with pytest.raises(K.KernelError, match="no switch MP_NO_SUCH"):
        Opts(()).switch("MP_NO_SUCH")


def test_expert_passes_of_8_past_4_tokens():
    """experts_mma_kernel / expert_pass8: past 4 tokens (MP_EXPERT_PASS8, read from the backend's own
    options) the <QT,ST,1> instances, staged as their passes-of-4 counterparts; every name is compiled."""
    q4, q6 = K.KERNEL_QTYPES[Q.Q4_K], K.KERNEL_QTYPES[Q.Q6_K]
    on, off = Opts(()), Opts(("-DMP_EXPERT_PASS8=0",))
    assert [K.expert_pass8(on, T) for T in (1, 4, 5, 64)] == [False, False, True, True]
    assert not K.expert_pass8(off, 64)
    for code, row_bytes, staged in ((q4, 432, K.STAGE_Q4_EXPERTS), (q4, 1152, 0), (q6, 630, 1)):
        short, long = K.experts_mma_kernel(code, row_bytes), K.experts_mma_kernel(code, row_bytes, True)
        assert long == f"qmm_experts_mma<{code},{int(bool(staged))},1>"
        assert short in K.NAME_EXPRESSIONS and long in K.NAME_EXPRESSIONS


def test_kernels_py_block_sizes_are_the_sources():
    """The block sizes kernels.py launches with are the ones kernels.cu compiles for."""
    src = K.kernel_source()
    for name, value in (("MP_MMA_DENSE_WARPS", K.MMA_DENSE_WARPS), ("MP_DENSE_PASS8_WARPS", K.DENSE_PASS8_WARPS)):
        assert int(re.search(rf"#define {name} (\d+)", src).group(1)) == value, name


def test_dense_passes_of_8_only_where_the_passes_split_over_the_warps():
    q4 = K.KERNEL_QTYPES[Q.Q4_K]
    assert K.dense_pass8(Opts(()), True) and not K.dense_pass8(Opts(()), False)
    assert not K.dense_pass8(Opts(("-DMP_DENSE_PASS8=0",)), True)
    assert [K.dense_mma_kernel(q4, 64, by, p8) for by, p8 in ((False, False), (True, False), (True, True))] == [
        f"qmm_dense_mma<{q4},1>", f"qmm_dense_mma<{q4},2>", f"qmm_dense_mma<{q4},3>"]
    assert K.dense_mma_kernel(q4, 3, True, True) == f"qmm_dense_mma<{q4}>"
    assert all(K.dense_mma_kernel(q, 64, True, True) in K.NAME_EXPRESSIONS for q in K.MMA_QTYPES)


def test_variant_options_take_only_kernel_switches():
    """A backend variant (one process, two kernel builds sharing the weights) may change only the
    #ifndef switches of kernels.cu that kernels.py does not read itself: a launch-geometry switch, an
    unknown name (a typo would time the same kernels twice) and a non-define option are refused."""
    assert K.variant_options("-DMP_TOPK_REDUX=0 -DMP_ATTN_WIDE=0") == ("-DMP_TOPK_REDUX=0", "-DMP_ATTN_WIDE=0")
    assert K.variant_options(["-DMP_ROPE_REGS=0"]) == ("-DMP_ROPE_REGS=0",)
    assert K.variant_options("") == ()
    with pytest.raises(ValueError, match="reads MP_WARPS at import"):
        K.variant_options("-DMP_WARPS=2")
    with pytest.raises(ValueError, match="reads MP_DENSE_LONG_BLOCKS at import"):
        K.variant_options("-DMP_DENSE_LONG_BLOCKS=0")  # a grid size kernels.py computes
    with pytest.raises(ValueError, match=r"no switch MP_TOPK_REDUXX .*known: .*MP_TOPK_REDUX\b"):
        K.variant_options("-DMP_TOPK_REDUXX=0")
    with pytest.raises(ValueError, match="only -DNAME=VALUE"):
        K.variant_options("-O3")
