"""Tests of the CuPy GPU backend (pytest_moeparity.gpu): kernels against host references, then the
traced forward against the NumPy reference.

Every test takes the ``backend`` fixture:

- ``cupy``: marked ``gpu``; skipped cleanly where CuPy is not importable or no CUDA device is
  visible (CI). Launches run in debug mode (synchronise + check after every kernel), so a
  device fault is reported by the kernel that caused it.
- with ``MOEPARITY_TEST_EMULATOR=1`` the same tests run instead on the CPU emulator: the same
  ``kernels.cu`` compiled as C++ (bit-identical arithmetic, out-of-bounds and warp-divergence
  checks; needs g++). A developer's aid for kernel work without a GPU; the GPU run is what counts.

Order of the file = order of diagnosis: compilation, dequantization layouts (bit-exact), products,
expert grouping, router helpers, the fault switch, then whole forwards, precision modes, memory.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES

from pytest_moeparity.contract import S
from pytest_moeparity.metrics import Thresholds, Verdict
from pytest_moeparity.plan import SavePlan
from pytest_moeparity.reference import BACKENDS as NUMPY_BACKENDS
from pytest_moeparity.reference import NumpyForward

EMULATOR_ENV = "MOEPARITY_TEST_EMULATOR"
KERNEL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
# byte offsets of the f16 scale fields in each block (random-byte tests keep them finite)
F16_FIELDS = {Q.Q4_0: (0,), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
FORWARD_QUANTS = ["F32", "Q8_0", "Q5_K_M", "Q4_K_M"]
EXPERT_STAGES = {S.moe_expert_gate, S.moe_expert_up, S.moe_expert_swiglu, S.moe_expert_out}
POST_ROUTER_STAGES = EXPERT_STAGES | {S.moe_router_indices, S.moe_ffn_out, S.post_ffn_residual}


# ---- fixtures ------------------------------------------------------------------------------------
def _cupy_backend():
    pytest.importorskip("cupy")
    from pytest_moeparity.gpu import availability

    reason = availability()
    if reason:
        pytest.skip(f"no GPU: {reason}")
    from pytest_moeparity.gpu import kernels

    kernels.set_debug(True)
    return kernels.get_backend()


def _emulator_backend():
    from pytest_moeparity.gpu.emulator import EmulatorBackend, EmulatorUnavailable

    try:
        return EmulatorBackend()
    except EmulatorUnavailable as exc:  # asked for by name: a build failure must not pass as skips
        pytest.fail(f"{EMULATOR_ENV} is set but the emulator is unavailable: {exc}", pytrace=False)


_USE_EMULATOR = os.environ.get(EMULATOR_ENV, "") not in ("", "0")


@pytest.fixture(scope="session", params=[
    pytest.param("emulator", id="emulator") if _USE_EMULATOR else pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)])
def backend(request):
    return _emulator_backend() if request.param == "emulator" else _cupy_backend()


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """(preset, quant) -> GGUFModel, each file made once per session."""
    from pytest_moeparity.make_model import PRESETS, make_model
    from pytest_moeparity.model import load_model

    root = tmp_path_factory.mktemp("gpu-models")
    made = {}

    def get(preset: str, quant: str):
        key = (preset, quant)
        if key not in made:
            path = root / f"{preset}-{quant.lower()}.gguf"
            make_model(path, PRESETS[preset], quant=quant, seed=0, progress=False)
            made[key] = path
        return load_model(made[key])

    return get


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _dev(backend, a):
    return backend.to_device(np.ascontiguousarray(a))


def _host(backend, a) -> np.ndarray:
    return backend.asnumpy(a)


def _poisoned(backend, shape):
    return _dev(backend, np.full(shape, np.nan, dtype=np.float32))


def _device_tensor(backend, raw: np.ndarray, qtype: Q, shape):
    from pytest_moeparity.gpu.kernels import DeviceTensor

    return DeviceTensor(f"test-{qtype.name}", qtype, tuple(shape), _dev(backend, raw), qtype)


def _random_raw(rng, qtype: Q, rows: int, k: int) -> np.ndarray:
    """Row bytes of ``qtype``: random normal values for float types, random bytes (every bit
    pattern of scales and quants) with finite f16 scale fields for block types."""
    if qtype in FLOAT_TYPES:
        from pytest_moeparity.quants import quantize

        return quantize(rng.standard_normal((rows, k)).astype(np.float32), qtype)
    block, tsize = GGML_QUANT_SIZES[qtype]
    nb = k // block
    raw = rng.integers(0, 256, size=(rows, nb, tsize), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(0.01, 0.5, size=(rows, nb)).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * tsize)


def _quantized(rng, qtype: Q, shape):
    from pytest_moeparity.quants import quantize

    return quantize(rng.standard_normal(shape).astype(np.float32), qtype)


def _deq(raw: np.ndarray, qtype: Q, shape) -> np.ndarray:
    return np.asarray(gq.dequantize(np.ascontiguousarray(raw), qtype), dtype=np.float32).reshape(shape)


def _assert_written(out: np.ndarray, what: str) -> None:
    bad = np.argwhere(np.isnan(out))
    assert bad.size == 0, (f"{what}: {len(bad)} of {out.size} outputs never written (still the NaN poison), "
                           f"first at index {bad[:5].tolist()}")


def _assert_close(got: np.ndarray, ref: np.ndarray, what: str, tol: float = 1e-5, ref_abs: np.ndarray | None = None) -> None:
    """Relative L2 error < tol. ``ref_abs`` (the products' sums of |terms|) rescues ill-conditioned
    cases (a single output of a few near-cancelling sums, as with N = T = 1): float32 accumulation
    error is bounded by ~K eps sum|terms|, so an error below tol/10 of ||ref_abs|| also passes."""
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    err = np.linalg.norm(got64 - ref64)
    rel = err / max(np.linalg.norm(ref64), 1e-30)
    if ref_abs is not None and err < 0.1 * tol * np.linalg.norm(ref_abs):
        return
    if not rel < tol:
        err = np.abs(got64 - ref64).reshape(-1, ref64.shape[-1])
        worst = np.unravel_index(np.argmax(err), err.shape)
        per_col = np.linalg.norm(got64 - ref64, axis=tuple(range(got.ndim - 1))) / np.maximum(
            np.linalg.norm(ref64, axis=tuple(range(got.ndim - 1))), 1e-30)
        bad_cols = np.nonzero(per_col > tol)[0]
        pytest.fail(f"{what}: relative L2 {rel:.3g} >= {tol:g}; worst element {worst} got {got.reshape(err.shape)[worst]!r} "
                    f"want {ref.reshape(err.shape)[worst]!r}; {len(bad_cols)} of {per_col.size} output columns "
                    f"(weight rows) off, first {bad_cols[:10].tolist()}")


# ---- no GPU needed ----------------------------------------------------------------------------------
def test_cpu_import_does_not_import_cupy():
    code = ("import sys, pytest_moeparity.gpu, pytest_moeparity.gpu.kernels, pytest_moeparity.gpu.weights, "
            "pytest_moeparity.gpu.forward, pytest_moeparity.backends; print('cupy' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False", res.stdout + res.stderr


def test_cpu_availability_never_raises():
    from pytest_moeparity.gpu import availability

    reason = availability()
    assert reason is None or (isinstance(reason, str) and reason)


def test_cpu_kernel_signatures_parse():
    from pytest_moeparity.gpu import kernels as K

    sigs = K.signatures()
    for expr in K.NAME_EXPRESSIONS:
        assert expr.split("<", 1)[0] in sigs, expr
    assert [p.ctype for p in sigs["qmm_dense"]][:4] == ["const mp_u8*"] * 3 + ["mp_i64"]
    z = np.zeros(3, np.int32)
    with pytest.raises(K.KernelError, match="numpy int32 scalar"):
        K.check_args("expert_group", (z, 3, np.int32(1), np.int32(2), z, z, z, np.int32(1), z, z, np.int32(1)),
                     lambda a: isinstance(a, np.ndarray))
    for name in K.WARP_KERNELS:
        assert name in sigs, name


# ---- compilation ---------------------------------------------------------------------------------------
def test_kernels_compile_and_load(backend):
    """Every template instance compiles (NVRTC) and loads; fails first if kernels.cu is broken."""
    from pytest_moeparity.gpu import kernels as K

    if backend.name == "cupy":
        for expr in K.NAME_EXPRESSIONS:
            backend.function(expr)
    assert set(K.KERNEL_QTYPES) == set(KERNEL_TYPES)


# ---- dequantization layouts, bit-exact --------------------------------------------------------------------
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_dequant_layout_bit_exact(backend, qtype):
    """x = identity: out[c, n] is exactly the kernel's dequantized W[n, c]; compared bit for bit with
    gguf-py on random bytes (every scale/min/quant bit pattern). A failure names the block and the
    position inside it, which points at the layout field read wrongly."""
    from pytest_moeparity.gpu import kernels as K

    block, tsize = GGML_QUANT_SIZES[qtype]
    k = 768 if block == 256 else 96
    n = 7
    raw = _random_raw(_rng("layout", qtype.name), qtype, n, k)
    want = _deq(raw, qtype, (n, k))
    wt = _device_tensor(backend, raw, qtype, (n, k))
    x = _dev(backend, np.eye(k, dtype=np.float32))
    out = _poisoned(backend, (k, n))
    K.qmatmul(x, wt, out=out, backend=backend)
    got = _host(backend, out).T  # [n, k]
    _assert_written(got, f"{qtype.name} identity product")
    diff = np.argwhere(got != want)  # exact equality (the sum over lanes turns -0.0 into +0.0)
    if diff.size:
        r, c = diff[0]
        pos = c % block
        pytest.fail(f"{qtype.name}: {len(diff)} of {got.size} dequantized values differ from gguf-py; first at "
                    f"row {r} column {c} = block {c // block} position {pos} (32-value group {pos // 32}, "
                    f"16-value group {pos // 16}, lane {pos % 32}): got {got[r, c]!r} want {want[r, c]!r}")
    # the matvec path (T == 1) on one-hot rows picks single columns, again exactly
    for c in (0, 1, 31, 33, k // 2 + 17, k - 1):
        onehot = np.zeros((1, k), np.float32)
        onehot[0, c] = 1.0
        out1 = K.qmatmul(_dev(backend, onehot), wt, backend=backend)
        got1 = _host(backend, out1)[0]
        assert np.array_equal(got1, want[:, c]), \
            f"{qtype.name} matvec path, column {c}: got {got1} want {want[:, c]}"


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16], ids=lambda q: q.name)
def test_half_types_every_bit_pattern(backend, qtype):
    """All 65536 16-bit patterns (subnormals, infinities, NaNs) as a [65536, 1] weight times 1.0."""
    from pytest_moeparity.gpu import kernels as K

    raw = np.arange(65536, dtype=np.uint32).astype("<u2").view(np.uint8).reshape(65536, 2)
    want = _deq(raw, qtype, (65536, 1))[:, 0]
    if backend.name == "cupy":
        # CuPy compiles every RawModule with -ftz=true (appended by cupy.cuda.compiler, not optional):
        # float32 subnormals flush to zero in arithmetic. Only BF16 has subnormal float32 values
        # (|x| < 2**-126); they come out as exactly 0. Everything else must be bit-exact.
        want = np.where(np.abs(want) < np.finfo(np.float32).tiny, np.float32(0), want)
    out = K.qmatmul(_dev(backend, np.ones((1, 1), np.float32)), _device_tensor(backend, raw, qtype, (65536, 1)),
                    backend=backend)
    got = _host(backend, out)[0]
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{qtype.name}: NaN patterns differ at {np.nonzero(np.isnan(got) != nan)[0][:10]}"
    bad = np.nonzero(got[~nan] != want[~nan])[0]
    assert bad.size == 0, f"{qtype.name}: {bad.size} bit patterns convert wrongly, first {np.arange(65536)[~nan][bad[:10]]}"


# ---- dense products --------------------------------------------------------------------------------------------
SHAPES = [(37, 256), (130, 512), (5, 768), (1, 1024)]  # (N, K): N not a multiple of the 4 rows per block


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 3, 4, 5, 17, 64])  # NT instances 1, 4 (partial, full), 8 (partial, tiles)
@pytest.mark.parametrize("N,K", SHAPES, ids=[f"N{n}xK{k}" for n, k in SHAPES])
def test_qmatmul_matches_host(backend, qtype, T, N, K):
    from pytest_moeparity.gpu import kernels as Kn

    rng = _rng("qmm", qtype.name, T, N, K)
    raw = _quantized(rng, qtype, (N, K))
    w = _deq(raw, qtype, (N, K)).astype(np.float64)
    x = rng.standard_normal((T, K)).astype(np.float32)
    want = x.astype(np.float64) @ w.T
    out = _poisoned(backend, (T, N))
    res = Kn.qmatmul(_dev(backend, x), _device_tensor(backend, raw, qtype, (N, K)), out=out, backend=backend)
    assert res is out
    if hasattr(backend, "launches"):  # the emulator records its launches: short prompts and small grids split K
        code = Kn.KERNEL_QTYPES[qtype]  # (Q4_K, Q6_K: the tensor cores)
        want_kernel = ("qmm_dense_mma<" if Kn.use_mma(backend, code, K, K, T) else "qmm_dense_splitk<" if T <= 4
                       else Kn.dense_launch(code, (N,), T, backend.switch("MP_SPLITK_LONG_BLOCKS"))[0])
        assert backend.launches[-1].startswith(want_kernel), backend.launches[-1]
    got = _host(backend, out)
    _assert_written(got, f"qmatmul {qtype.name} T={T} N={N} K={K}")
    _assert_close(got, want, f"qmatmul {qtype.name} T={T} N={N} K={K} ({'matvec' if T == 1 else 'tiled'} path)",
                  ref_abs=np.abs(x.astype(np.float64)) @ np.abs(w.T))


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 3, 4])
def test_qmatmul_short_prompt_on_a_large_matrix_is_not_split(backend, qtype, T, monkeypatch):
    """Past SPLITK_MAX_GROUPS row groups (the output head) short prompts take the unsplit NT = 1 / 4
    instances; lowering the limit to 0 sends a small matrix there (the tensor-core path off), checked
    against float64 as above."""
    from pytest_moeparity.gpu import kernels as Kn

    monkeypatch.setattr(Kn, "SPLITK_MAX_GROUPS", 0)
    monkeypatch.setattr(Kn, "MMA", 0)
    N, K = 37, 512
    rng = _rng("qmm-unsplit", qtype.name, T, N, K)
    raw = _quantized(rng, qtype, (N, K))
    w = _deq(raw, qtype, (N, K)).astype(np.float64)
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = _poisoned(backend, (T, N))
    Kn.qmatmul(_dev(backend, x), _device_tensor(backend, raw, qtype, (N, K)), out=out, backend=backend)
    if hasattr(backend, "launches"):
        assert backend.launches[-1] == f"qmm_dense<{Kn.KERNEL_QTYPES[qtype]},{1 if T == 1 else 4}>", backend.launches[-1]
    got = _host(backend, out)
    _assert_written(got, f"unsplit qmatmul {qtype.name} T={T}")
    _assert_close(got, x.astype(np.float64) @ w.T, f"unsplit qmatmul {qtype.name} T={T}",
                  ref_abs=np.abs(x.astype(np.float64)) @ np.abs(w.T))


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [5, 64])
def test_qmatmul_long_prompt_on_a_small_matrix_splits_k(backend, qtype, T, monkeypatch):
    """Past 4 tokens a float-kernel product whose token-tiled grid has fewer blocks than the backend's
    MP_SPLITK_LONG_BLOCKS (the F32 router of a long prompt) takes the split-K kernel over tiles of 4
    tokens: every output written (the last tile short but for 4), within float64's bound; a build with
    the switch at 0 takes the token-tiled kernel (qmm_dense<QT,8>, which the small matrices of the other
    product tests no longer reach), and both agree to float64 alike."""
    from pytest_moeparity.gpu import kernels as Kn

    N, K = 40, 768  # 40 rows: row groups of the split tile (4 rows) and of the token tile (16) with a tail
    rng = _rng("qmm-long-split", qtype.name, T)
    raw = _quantized(rng, qtype, (N, K))
    w = _deq(raw, qtype, (N, K)).astype(np.float64)
    x = rng.standard_normal((T, K)).astype(np.float32)
    want = x.astype(np.float64) @ w.T
    monkeypatch.setattr(Kn, "MMA", 0)  # the quantized types take the float kernels here
    for be, kernel in ((backend, "qmm_dense_splitk"), (backend.variant("-DMP_SPLITK_LONG_BLOCKS=0"), "qmm_dense")):
        n0 = len(getattr(be, "launches", []))
        out = _poisoned(be, (T, N))
        Kn.qmatmul(_dev(be, x), _device_tensor(be, raw, qtype, (N, K)), out=out, backend=be)
        if hasattr(be, "launches"):
            code = Kn.KERNEL_QTYPES[qtype]
            tile = 4 if kernel == "qmm_dense_splitk" else 8
            assert be.launches[n0:] == [f"{kernel}<{code},{tile}>"], be.launches[n0:]
        got = _host(be, out)
        _assert_written(got, f"{kernel} {qtype.name} T={T}")
        _assert_close(got, want, f"{kernel} {qtype.name} T={T}", ref_abs=np.abs(x.astype(np.float64)) @ np.abs(w.T))


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 3, 9])
@pytest.mark.parametrize("K_cols", [40, 1001])
def test_qmatmul_float_types_odd_columns(backend, qtype, T, K_cols):
    """Rows of the float types need not hold whole 16-column chunks (the tail path), and activation
    rows of 1001 floats are not 16-byte aligned (the scalar activation loads)."""
    from pytest_moeparity.gpu import kernels as Kn

    rng = _rng("odd", qtype, T, K_cols)
    N = 7
    raw = _random_raw(rng, qtype, N, K_cols)
    x = rng.standard_normal((T, K_cols)).astype(np.float32)
    want = x.astype(np.float64) @ _deq(raw, qtype, (N, K_cols)).astype(np.float64).T
    out = _poisoned(backend, (T, N))
    got = _host(backend, Kn.qmatmul(_dev(backend, x), _device_tensor(backend, raw, qtype, (N, K_cols)), out=out,
                                    backend=backend))
    _assert_written(got, f"qmatmul {qtype.name} K={K_cols}")
    _assert_close(got, want, f"qmatmul {qtype.name} T={T} K={K_cols}", ref_abs=np.abs(x) @ np.abs(_deq(raw, qtype, (N, K_cols))).T)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 3, 9])
def test_qmatmul_unaligned_activations_match_aligned(backend, qtype, T):
    """Activation rows 4 bytes off a 16-byte boundary take the alignment-checking loads (every type,
    Q6_K's 630-byte rows included, whose aligned path asks only 2-byte rows): the same sums, in the
    same order, as the aligned path, bit for bit, and float64's within 1e-5."""
    from pytest_moeparity.gpu import kernels as Kn

    N, K = 45, 768
    rng = _rng("unaligned", qtype.name, T)
    raw = _quantized(rng, qtype, (N, K))
    wt = _device_tensor(backend, raw, qtype, (N, K))
    x = rng.standard_normal((T, K)).astype(np.float32)
    aligned = _host(backend, Kn.qmatmul(_dev(backend, x), wt, backend=backend))
    flat = _dev(backend, np.concatenate([[np.float32(7.0)], x.reshape(-1)]))
    x_off = flat[1:].reshape(T, K)  # C-contiguous, first byte at 4 mod 16
    got = _host(backend, Kn.qmatmul(x_off, wt, out=_poisoned(backend, (T, N)), backend=backend))
    _assert_written(got, f"unaligned qmatmul {qtype.name} T={T}")
    assert np.array_equal(got.view(np.uint32), aligned.view(np.uint32)), \
        f"{qtype.name} T={T}: unaligned and aligned paths differ, max {np.abs(got - aligned).max()}"
    w = _deq(raw, qtype, (N, K)).astype(np.float64)
    _assert_close(got, x.astype(np.float64) @ w.T, f"unaligned qmatmul {qtype.name} T={T}",
                  ref_abs=np.abs(x.astype(np.float64)) @ np.abs(w.T))


SHARED_INPUT_TYPES = [(Q.Q4_K, Q.Q4_K, Q.Q4_K), (Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.Q8_0, Q.Q4_K, Q.Q8_0)]


@pytest.mark.parametrize("qtypes", SHARED_INPUT_TYPES, ids=lambda qs: "-".join(q.name for q in qs))
@pytest.mark.parametrize("T", [1, 3, 17])
def test_qmatmul_shared_input_matches_single_products(backend, qtypes, T):
    """q / k / v style: three matrices of one input; those of one type share a launch (one launch for
    three Q4_K, two when v is Q6_K, three when the types alternate), and each result is qmatmul's
    alone, bit for bit, and float64's within 1e-5; every output element is written."""
    from pytest_moeparity.gpu import kernels as Kn

    Kc, Ns = 512, (37, 5, 130)
    rng = _rng("shared-input", tuple(q.name for q in qtypes), T)
    raws = [_quantized(rng, q, (n, Kc)) for q, n in zip(qtypes, Ns)]
    wts = [_device_tensor(backend, r, q, (n, Kc)) for r, q, n in zip(raws, qtypes, Ns)]
    x = rng.standard_normal((T, Kc)).astype(np.float32)
    xd = _dev(backend, x)
    outs = [_poisoned(backend, (T, n)) for n in Ns]
    n_before = len(getattr(backend, "launches", []))
    res = Kn.qmatmul_shared_input(xd, wts, outs=outs, backend=backend)
    if hasattr(backend, "launches"):
        runs = 1 + sum(a != b for a, b in zip(qtypes, qtypes[1:]))
        products = [n for n in backend.launches[n_before:] if n.startswith("qmm_dense")]  # (act_digits aside)
        assert len(products) == runs, backend.launches[n_before:]
        assert backend.launches[n_before:].count("act_digits") <= 1, backend.launches[n_before:]
    for i, (r, q, n, wt, out) in enumerate(zip(raws, qtypes, Ns, wts, outs)):
        assert res[i] is out
        got = _host(backend, out)
        what = f"shared-input product {i} ({q.name}, N={n}) T={T}"
        _assert_written(got, what)
        alone = _host(backend, Kn.qmatmul(xd, wt, backend=backend))
        assert np.array_equal(got, alone), what + ": differs from the product alone"
        w = _deq(r, q, (n, Kc)).astype(np.float64)
        _assert_close(got, x.astype(np.float64) @ w.T, what, ref_abs=np.abs(x.astype(np.float64)) @ np.abs(w.T))


def test_qmatmul_shared_input_rejects_mismatched_matrices(backend):
    from pytest_moeparity.gpu import kernels as Kn

    a = _device_tensor(backend, _quantized(_rng("mm-a"), Q.Q8_0, (4, 64)), Q.Q8_0, (4, 64))
    b = _device_tensor(backend, _quantized(_rng("mm-b"), Q.Q8_0, (4, 96)), Q.Q8_0, (4, 96))
    x = _dev(backend, np.ones((2, 64), np.float32))
    with pytest.raises(Kn.KernelError, match="96 columns, the first matrix 64"):
        Kn.qmatmul_shared_input(x, [a, b], backend=backend)
    with pytest.raises(Kn.KernelError, match="2 matrices, 1 outputs"):
        Kn.qmatmul_shared_input(x, [a, a], outs=[None], backend=backend)


def test_qmatmul_rejects_bad_input(backend):
    from pytest_moeparity.gpu import kernels as K

    raw = _quantized(_rng("bad"), Q.Q8_0, (4, 64))
    wt = _device_tensor(backend, raw, Q.Q8_0, (4, 64))
    with pytest.raises(K.KernelError, match="columns"):
        K.qmatmul(_dev(backend, np.zeros((2, 32), np.float32)), wt, backend=backend)
    with pytest.raises(K.KernelError, match="float32"):
        K.qmatmul(_dev(backend, np.zeros((2, 64), np.float64)), wt, backend=backend)
    wrong = K.DeviceTensor("mislabelled", Q.Q4_K, (4, 256), wt.raw, Q.Q4_K)  # 68-byte rows are not Q4_K
    with pytest.raises(K.KernelError, match="needs"):
        K.qmatmul(_dev(backend, np.zeros((2, 256), np.float32)), wrong, backend=backend)


# ---- grouped expert products -----------------------------------------------------------------------------------
def _routing_ids(rng, T: int, k: int, E: int) -> np.ndarray:
    """Random ids leaving the last two experts unused, one expert chosen twice by token 0, and (for
    larger T) one expert chosen by more than a tile of tokens."""
    ids = rng.integers(0, E - 2, size=(T, k)).astype(np.int32)
    ids[0, :] = 1
    if T > 10:
        ids[:, 0] = 0
    return ids


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 3, 4, 5, 17, 64])
def test_qmatmul_experts_matches_host(backend, qtype, T):
    from pytest_moeparity.gpu import kernels as K

    E, N, Kc, k = 6, 37, 512, 3
    rng = _rng("experts", qtype.name, T)
    raw = _quantized(rng, qtype, (E, N, Kc))
    w = _deq(raw, qtype, (E, N, Kc)).astype(np.float64)
    ids = _routing_ids(rng, T, k, E)
    wt3 = _device_tensor(backend, raw, qtype, (E, N, Kc))
    routing = K.expert_routing(_dev(backend, ids), E, backend=backend)
    what = f"qmatmul_experts {qtype.name} T={T}"

    # rows by token (gate / up)
    x = rng.standard_normal((T, Kc)).astype(np.float32)
    out = _poisoned(backend, (T, k, N))
    K.qmatmul_experts(_dev(backend, x), wt3, routing, out=out, backend=backend)
    got = _host(backend, out)
    _assert_written(got, what + " (token rows)")
    _assert_close(got, np.einsum("tc,tjnc->tjn", x.astype(np.float64), w[ids]), what + " (token rows)",
                  ref_abs=np.einsum("tc,tjnc->tjn", np.abs(x.astype(np.float64)), np.abs(w[ids])))

    # rows by (token, slot) pair (down)
    xp_ = rng.standard_normal((T, k, Kc)).astype(np.float32)
    out2 = _poisoned(backend, (T, k, N))
    K.qmatmul_experts(_dev(backend, xp_), wt3, routing, out=out2, x_per_pair=True, backend=backend)
    got2 = _host(backend, out2)
    _assert_written(got2, what + " (pair rows)")
    _assert_close(got2, np.einsum("tjc,tjnc->tjn", xp_.astype(np.float64), w[ids]), what + " (pair rows)",
                  ref_abs=np.einsum("tjc,tjnc->tjn", np.abs(xp_.astype(np.float64)), np.abs(w[ids])))

    # ids instead of a prepared routing
    got3 = _host(backend, K.qmatmul_experts(_dev(backend, x), wt3, _dev(backend, ids), backend=backend))
    assert np.array_equal(got3, got), what + ": result differs when the routing is built inside"


# (type, K): the shapes of the 30b-a3b experts (Q4_K gate/up at K = 2048, Q6_K down's 630-byte rows at
# K = 768, only 2-byte aligned) and wide float / Q8_0 rows
STAGE_CASES = [(Q.Q4_K, 2048), (Q.Q6_K, 768), (Q.F16, 1024), (Q.Q8_0, 2048), (Q.F32, 1024)]


@pytest.mark.parametrize("qtype,Kc", STAGE_CASES, ids=[f"{q.name}-K{k}" for q, k in STAGE_CASES])
@pytest.mark.parametrize("T", [3, 17])
def test_qmatmul_experts_model_shapes(backend, qtype, Kc, T):
    """Expert products at the model's row sizes: float64's products within 1e-5, every output
    written, the last block's partial rows (N = 45) included."""
    from pytest_moeparity.gpu import kernels as K

    E, N, k = 5, 45, 4
    rng = _rng("experts-shapes", qtype.name, Kc, T)
    raw = _quantized(rng, qtype, (E, N, Kc))
    w = _deq(raw, qtype, (E, N, Kc)).astype(np.float64)
    ids = _routing_ids(rng, T, k, E)
    x = rng.standard_normal((T, Kc)).astype(np.float32)
    out = _poisoned(backend, (T, k, N))
    K.qmatmul_experts(_dev(backend, x), _device_tensor(backend, raw, qtype, (E, N, Kc)), _dev(backend, ids), out=out,
                      backend=backend)
    got = _host(backend, out)
    what = f"qmatmul_experts {qtype.name} K={Kc} T={T}"
    _assert_written(got, what)
    _assert_close(got, np.einsum("tc,tjnc->tjn", x.astype(np.float64), w[ids]), what,
                  ref_abs=np.einsum("tc,tjnc->tjn", np.abs(x.astype(np.float64)), np.abs(w[ids])))


@pytest.mark.parametrize("qtypes", [(Q.Q4_K, Q.Q4_K), (Q.Q5_K, Q.Q6_K)], ids=["same", "mixed"])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_qmatmul_experts_shared_input_matches_single_products(backend, qtypes, T):
    """gate / up style: two expert tensors read the same token rows; of one type they share a launch
    (blocks of the second take its rows), of two types they take one each; each result equals
    qmatmul_experts alone, bit for bit, and float64 within 1e-5."""
    from pytest_moeparity.gpu import kernels as Kn

    E, N, Kc, k = 6, 37, 512, 3
    rng = _rng("experts-shared", tuple(q.name for q in qtypes), T)
    raws = [_quantized(rng, q, (E, N, Kc)) for q in qtypes]
    wts = [_device_tensor(backend, r, q, (E, N, Kc)) for r, q in zip(raws, qtypes)]
    ids = _routing_ids(rng, T, k, E)
    routing = Kn.expert_routing(_dev(backend, ids), E, backend=backend)
    x = rng.standard_normal((T, Kc)).astype(np.float32)
    xd = _dev(backend, x)
    outs = [_poisoned(backend, (T, k, N)) for _ in qtypes]
    n_before = len(getattr(backend, "launches", []))
    Kn.qmatmul_experts_shared_input(xd, wts, routing, outs=outs, backend=backend)
    if hasattr(backend, "launches"):
        products = [n for n in backend.launches[n_before:] if n.startswith("qmm_experts")]  # (act_digits aside)
        assert len(products) == (1 if qtypes[0] == qtypes[1] else 2), backend.launches[n_before:]
    for i, (r, q, wt, out) in enumerate(zip(raws, qtypes, wts, outs)):
        got = _host(backend, out)
        what = f"shared-input experts {i} ({q.name}) T={T}"
        _assert_written(got, what)
        assert np.array_equal(got, _host(backend, Kn.qmatmul_experts(xd, wt, routing, backend=backend))), what
        w = _deq(r, q, (E, N, Kc)).astype(np.float64)
        _assert_close(got, np.einsum("tc,tjnc->tjn", x.astype(np.float64), w[ids]), what,
                      ref_abs=np.einsum("tc,tjnc->tjn", np.abs(x.astype(np.float64)), np.abs(w[ids])))


@pytest.mark.parametrize("Kc", [1312, 17696])  # 41 sub-blocks (the last lanes of a warp's last round hold none);
def test_act_digits_are_the_exact_integer_form(backend, Kc):  # 553: three slabs of 8192, the last partial
    """act_digits (the input of the tensor-core products): per row, the four signed base-256
    digits give back rint(x 2^(30 - E)) with 2^E the power of two above the row's largest |x|, the
    sub-block sums are float64's within float32 rounding, the unit is 2^(E - 30); a row holding a NaN or an
    infinity gets a NaN unit. Rows span 2^-60 .. 2^60 and hold outliers, zeros and one all-zero row; rows
    wider than a slab (DIGITS_SLAB columns) have their largest |x| and their non-finite values in any slab."""
    from pytest_moeparity.gpu import kernels as Kn

    rng = _rng("act-digits", Kc)
    R = 8
    x = (rng.standard_normal((R, Kc)) * np.exp2(rng.integers(-60, 60, size=(R, 1)))).astype(np.float32)
    x[1, 5] *= 3e4   # an outlier in the first slab
    x[2, ::3] = 0.0
    x[3] = 0.0
    x[4, 17] = np.nan
    x[5, Kc - 1 - 200] = -np.inf
    x[6, Kc - 3] *= 3e4  # an outlier in the last slab
    with pytest.raises(Kn.KernelError, match="multiple of 32"):
        Kn.act_digits(_dev(backend, np.ones((2, 48), np.float32)), backend=backend)
    xd, xs, unit = (_host(backend, a) for a in Kn.act_digits(_dev(backend, x), backend=backend))
    assert xd.shape == (R, Kc) and xs.shape == (R, Kc // 32) and unit.shape == (R,)
    digits = xd.view(np.int8).reshape(R, Kc // 32, 4, 32).astype(np.int64)  # [row, sub-block, digit, value]
    n = (digits * (256 ** np.arange(4))[None, None, :, None]).sum(axis=2).reshape(R, Kc)
    for r in range(R):
        if r in (4, 5):
            assert np.isnan(unit[r]), f"row {r} holds a non-finite value: its unit must be NaN, got {unit[r]}"
            continue
        amax = np.abs(x[r].astype(np.float64)).max()
        e = max(int(np.floor(np.log2(amax))) + 1 if amax > 0 else -96, -96)  # 2^(e-1) <= amax < 2^e
        assert unit[r] == np.float32(2.0 ** (e - 30)), f"row {r}: unit {unit[r]!r}, want 2^{e - 30}"
        want = np.rint(x[r].astype(np.float64) * 2.0 ** (30 - e)).astype(np.int64)
        assert np.array_equal(n[r], want), f"row {r}: digits give {n[r][:4]}, want {want[:4]}"
        assert np.abs(n[r]).max() <= 2 ** 30
        sub = x[r].astype(np.float64).reshape(-1, 32)
        np.testing.assert_allclose(xs[r], sub.sum(1), rtol=0, atol=1e-6 * np.abs(sub).sum(1).max(),
                                   err_msg=f"row {r}: sub-block sums")
    # rows 4 bytes off a 16-byte boundary (the alignment-checking loads): the same words, bit for bit
    flat = _dev(backend, np.concatenate([[np.float32(7.0)], x.reshape(-1)]))
    got = [_host(backend, a) for a in Kn.act_digits(flat[1:].reshape(R, Kc), backend=backend)]
    for name, a, b in zip(("digits", "sums", "units"), got, (xd, xs, unit)):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"unaligned rows: {name} differ"


@pytest.mark.parametrize("T", [2, 3, 4, 11])  # 11: a long prompt (MMA_MAX_TOKENS raised), experts of many passes
@pytest.mark.parametrize("qt,Kc", [(Q.Q4_K, 768), (Q.Q4_K, 2048), (Q.Q6_K, 768), (Q.Q6_K, 2048)],
                         ids=["Q4_K-staged", "Q4_K", "Q6_K", "Q6_K-long"])  # Q6_K: 630- / 1680-byte rows, 2-byte aligned
def test_experts_tensor_core_path(backend, T, qt, Kc, monkeypatch):
    """Q4_K and Q6_K expert products run on the tensor-core kernel (exact integer digits of the
    activations) where the device has it: float64's products within 1e-5 on rows with a wide dynamic
    range, the same within 1e-5 as the float kernel (MP_MMA off), and a token with a non-finite
    activation gives NaN in its own products only. Expert 1 has 5 or more pairs: passes of 4 one after
    another, each walking the rows again (at 11 tokens every expert has several, taken in passes of 8)."""
    from pytest_moeparity.gpu import kernels as Kn

    if not backend.mma:
        pytest.skip("the device has no int8 mma (compute capability below 8.0)")
    monkeypatch.setattr(Kn, "MMA_MAX_TOKENS", max(Kn.MMA_MAX_TOKENS, T))
    E, N, k = 5, 70, 3  # N = 70: a last row group of 6 rows
    rng = _rng("experts-mma", T, qt.name, Kc)
    raw = _quantized(rng, qt, (E, N, Kc))
    w = _deq(raw, qt, (E, N, Kc)).astype(np.float64)
    wt3 = _device_tensor(backend, raw, qt, (E, N, Kc))
    ids = _routing_ids(rng, T, k, E)
    ids[1, :2] = 1
    routing = Kn.expert_routing(_dev(backend, ids), E, backend=backend)
    x = (rng.standard_normal((T, Kc)) * np.exp2(rng.integers(-8, 8, size=(T, Kc)))).astype(np.float32)
    n_before = len(getattr(backend, "launches", []))
    out = _poisoned(backend, (T, k, N))
    Kn.qmatmul_experts(_dev(backend, x), wt3, routing, out=out, backend=backend)
    if hasattr(backend, "launches"):
        # K = 768: a warp's 16 rows are staged in shared memory (Q4_K: 432-byte rows, the <12,1> instance;
        # Q6_K's 630-byte rows by <14>); K = 2048 (Q4_K 1152-, Q6_K 1680-byte rows): read where they lie
        # (past 4 tokens passes of 8: the <QT,ST,1> instances)
        pass8 = Kn.expert_pass8(backend, T)
        want = ["act_digits", Kn.experts_mma_kernel(Kn.KERNEL_QTYPES[qt], int(raw.shape[-1]), pass8)]
        staged = qt == Q.Q4_K and Kc == 768 and Kn.STAGE_Q4_EXPERTS
        assert pass8 == (T > 4)
        if pass8:
            assert want[1] == f"qmm_experts_mma<{Kn.KERNEL_QTYPES[qt]},{int(staged or qt == Q.Q6_K)},1>"
        else:
            assert want[1] == f"qmm_experts_mma<{Kn.KERNEL_QTYPES[qt]}" + (",1>" if staged else ">")
        assert backend.launches[n_before:] == want, backend.launches[n_before:]
    got = _host(backend, out)
    what = f"tensor-core {qt.name} K={Kc} experts T={T}"
    _assert_written(got, what)
    ref = np.einsum("tc,tjnc->tjn", x.astype(np.float64), w[ids])
    _assert_close(got, ref, what, ref_abs=np.einsum("tc,tjnc->tjn", np.abs(x.astype(np.float64)), np.abs(w[ids])))
    old = backend.mma
    backend.mma = False
    try:
        flt = _host(backend, Kn.qmatmul_experts(_dev(backend, x), wt3, routing, backend=backend))
    finally:
        backend.mma = old
    _assert_close(got, flt.astype(np.float64), what + " vs the float kernel")
    # per pair rows (the down projection's input), one of them non-finite
    xp_ = rng.standard_normal((T * k, Kc)).astype(np.float32)
    bad = T * k - 1
    xp_[bad, 100] = np.inf
    got2 = _host(backend, Kn.qmatmul_experts(_dev(backend, xp_), wt3, routing, x_per_pair=True, backend=backend))
    got2 = got2.reshape(T * k, N)
    assert np.isnan(got2[bad]).all(), "a pair row holding inf must give NaN products"
    good = np.arange(T * k) != bad
    assert np.isfinite(got2[good]).all()
    ref2 = np.einsum("pc,pnc->pn", xp_.astype(np.float64), w[ids.reshape(-1)])
    _assert_close(got2[good], ref2[good], what + " (pair rows)")


@pytest.mark.parametrize("switches", ["-DMP_MMA_ZERO_ABSENT=0", "-DMP_DENSE_LONG_ZERO_ABSENT=1",
                                      "-DMP_MMA_PASS_TOKENS=2 -DMP_MMA_EXPERT_BLOCKS=5", "-DMP_EXPERT_CHUNK=0",
                                      "-DMP_EXPERT_PASS8=0", "-DMP_EXPERT_CHUNK=0 -DMP_EXPERT_PASS8=0",
                                      "-DMP_MMA_PASS8_BLOCKS_Q4ST=2", "-DMP_PREFETCH=7", "-DMP_STAGE_LDS=0",
                                      "-DMP_STAGE_PIPE=1"],
                         ids=["zero-absent-off", "long-dense-zero-absent-on", "2-token-passes", "one-record-an-expert",
                              "passes-of-4", "one-record-passes-of-4", "staged-q4-passes-of-8-at-2-blocks",
                              "l2-prefetches-on", "staged-rows-by-generic-loads",
                              "staged-rows-in-two-groups"])
def test_expert_switches_keep_the_products(backend, switches):
    """Builds whose tensor-core products are the default build's bit for bit (Q4_K staged and not, Q6_K;
    1 to 9 tokens an expert, token rows and pair rows; dense products of 3 and 9 tokens too):
    MP_MMA_ZERO_ABSENT=0 leaves the mma's B columns of a token the pass does not hold as the clamped row
    gives them, not zeros (those columns' sums are the absent token's alone and never stored);
    MP_DENSE_LONG_ZERO_ABSENT=1 zeroes them in the dense products past 4 tokens (<QT,1>), where the
    default leaves them;
    MP_MMA_PASS_TOKENS=2 makes qmm_experts_mma's passes one n-tile of 2 tokens (fewer registers, so
    MP_MMA_EXPERT_BLOCKS=5 blocks an SM fit without spills); MP_EXPERT_CHUNK=0 gives a busy expert one
    record (its passes one after another in one warp) where the default splits its pairs over several
    blocks; MP_MMA_PASS8_BLOCKS_Q4ST=2 compiles the staged Q4_K passes of 8 for 2 blocks an SM (no
    spills); MP_PREFETCH=7 has every product ask for its weight rows in L2 at its start (a hint, by
    default only the float kernels); MP_STAGE_LDS=0 reads the staged rows (Q6_K, Q4_K's <12,1> and the dense
    rows) by generic loads, not shared-memory ones; MP_STAGE_PIPE=1 stages the expert rows in two groups (the
    pieces of each row's first super-block first), the first pass waiting for each as it needs it: a token's
    value is computed the same way whichever pass, column, block or build it takes."""
    from pytest_moeparity.gpu import kernels as Kn

    if not backend.mma:
        pytest.skip("the device has no int8 mma (compute capability below 8.0)")
    var = backend.variant(switches)
    E, T, k = 6, 9, 4
    rng = _rng("expert-switches", switches)
    ids = _routing_ids(rng, T, k, E)
    ids[:, 0] = 2  # expert 2 holds all 9 tokens (passes 4 + 4 + 1, or 2 + 2 + 2 + 2 + 1), expert 3 five of them
    ids[:5, 1] = 3
    runs = []
    # K = 768: Q4_K's staged <12,1>; N = 87: a last row group of 7 rows (Q6_K: a stage with a 12-byte tail) and
    # Q6_K experts 1-3 starting unaligned (unstaged), where at N = 80 every Q6_K expert is staged
    for qt, Kc, N in ((Q.Q4_K, 512, 87), (Q.Q4_K, 768, 87), (Q.Q6_K, 512, 80), (Q.Q6_K, 512, 87)):
        raw = _quantized(rng, qt, (E, N, Kc))
        x = rng.standard_normal((T, Kc)).astype(np.float32)
        xp_ = rng.standard_normal((T * k, Kc)).astype(np.float32)
        got = []
        for be in (backend, var):
            wt3 = _device_tensor(be, raw, qt, (E, N, Kc))
            routing = Kn.expert_routing(_dev(be, ids), E, backend=be)
            runs.append(_assert_records(be, routing))
            got.append([_host(be, Kn.qmatmul_experts(_dev(be, x), wt3, routing, backend=be)),
                        _host(be, Kn.qmatmul_experts(_dev(be, xp_), wt3, routing, x_per_pair=True, backend=be)),
                        _host(be, Kn.qmatmul(_dev(be, x[:3]), _device_tensor(be, raw[0], qt, (N, Kc)), backend=be)),
                        _host(be, Kn.qmatmul(_dev(be, x), _device_tensor(be, raw[1], qt, (N, Kc)), backend=be))])
        for a, b in zip(*got):
            assert np.isfinite(a).all() and np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{qt.name} K={Kc} N={N}"
    if "MP_EXPERT_CHUNK" in switches:  # the default build split the busy experts, the variant did not
        assert Kn.expert_chunk(var) == 0 and runs[0] > runs[1] == len(np.unique(ids))


@pytest.mark.parametrize("qt,Kc", [(Q.Q4_K, 768), (Q.Q4_K, 2048), (Q.Q6_K, 768)], ids=["Q4_K-staged", "Q4_K", "Q6_K"])
def test_settled_routing_is_read_early(backend, qt, Kc):
    """A routing written two or more launches back is read (and the expert's rows staged) before the
    programmatic-launch wait: the launch counts say when, per stream, and the products and the layer
    boundary's combination are bit for bit those of the same routing read after the wait; one launch
    back, or not known, it is read after."""
    from dataclasses import replace

    from pytest_moeparity.gpu import kernels as Kn

    if not backend.mma:
        pytest.skip("the device has no int8 mma (compute capability below 8.0)")
    E, N, T, k = 6, 96, 3, 4  # N: a multiple of 32 (the boundary's digits), a block with idle warps
    rng = _rng("experts-early", qt.name, Kc)
    raw = _quantized(rng, qt, (E, N, Kc))
    wt3 = _device_tensor(backend, raw, qt, (E, N, Kc))
    logits = _dev(backend, rng.standard_normal((T, E)).astype(np.float32))
    x = _dev(backend, rng.standard_normal((T * k, Kc)).astype(np.float32))
    _, ids, _, routing = Kn.route_experts(logits, k, backend=backend)
    assert routing.written_at == backend.launch_mark()
    assert not Kn._written_two_back(routing, backend)  # the next launch is the one right after
    digits = Kn.act_digits(x, backend=backend)             # one launch between
    assert Kn._written_two_back(routing, backend) == bool(Kn.EXPERTS_EARLY)  # (MP_EXPERTS_EARLY=0: never)
    assert not Kn._written_two_back(replace(routing, written_at=None), backend)
    early = _host(backend, Kn.qmatmul_experts(x, wt3, routing, x_per_pair=True, digits=digits, backend=backend))
    late = _host(backend, Kn.qmatmul_experts(x, wt3, replace(routing, written_at=None), x_per_pair=True,
                                             digits=digits, backend=backend))
    assert np.isfinite(early).all()
    assert np.array_equal(early.view(np.uint32), late.view(np.uint32))
    w = _deq(raw, qt, (E, N, Kc)).astype(np.float64)
    ref = np.einsum("pc,pnc->pn", _host(backend, x).astype(np.float64), w[_host(backend, ids).reshape(-1)])
    _assert_close(early.reshape(T * k, N), ref, f"{qt.name} K={Kc} early routing")
    y = _dev(backend, early.reshape(T, k, N))
    rw = _dev(backend, rng.random((T, k)).astype(np.float32))
    resid = _dev(backend, rng.standard_normal((T, N)).astype(np.float32))
    nw = _dev(backend, rng.standard_normal(N).astype(np.float32))
    got = [Kn.moe_combine_norm(y, rw, r, resid, nw, 1e-6, backend=backend)
           for r in (routing, replace(routing, written_at=None))]
    for a, b in zip(got[0][:3] + got[0][3], got[1][:3] + got[1][3]):
        assert np.array_equal(_host(backend, a), _host(backend, b), equal_nan=True)
    if backend.name == "cupy":  # launch counts are per stream: a routing of another stream is not early
        import cupy

        with cupy.cuda.Stream():
            assert not Kn._written_two_back(routing, backend)
            Kn.act_digits(x, backend=backend)
            Kn.act_digits(x, backend=backend)
            assert not Kn._written_two_back(routing, backend)


@pytest.mark.parametrize("T", [2, 3, 4, 6, 13])  # 6, 13: long prompts (MMA_MAX_TOKENS raised), passes of 4 then 2 / 1
@pytest.mark.parametrize("Kc", [2048, 4352])  # 8 super-blocks (4 warps of 2), 17 (8 warps, uneven)
def test_dense_tensor_core_path(backend, T, Kc, monkeypatch):
    """Q4_K dense products (q / k / v style: three matrices of one input, one launch) run on the
    tensor-core kernel, a block's warps splitting each row's super-blocks and taking the tokens in passes
    of up to 4: float64's products within 1e-5 on rows with a wide dynamic range, each matrix's result bit
    for bit the product alone, within 1e-5 of the float kernel (MP_MMA off); a Q6_K matrix in the call
    takes its own tensor-core launch on the same digits; a token with a non-finite activation gives NaN
    in its own row only."""
    from pytest_moeparity.gpu import kernels as Kn

    if not backend.mma:
        pytest.skip("the device has no int8 mma (compute capability below 8.0)")
    monkeypatch.setattr(Kn, "MMA_MAX_TOKENS", max(Kn.MMA_MAX_TOKENS, T))
    rng = _rng("dense-mma", T, Kc)
    qtypes, Ns = (Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q4_K), (48, 70, 21, 16)  # 70: a partial row group
    raws = [_quantized(rng, q, (n, Kc)) for q, n in zip(qtypes, Ns)]
    wts = [_device_tensor(backend, r, q, (n, Kc)) for r, q, n in zip(raws, qtypes, Ns)]
    x = (rng.standard_normal((T, Kc)) * np.exp2(rng.integers(-8, 8, size=(T, Kc)))).astype(np.float32)
    xd = _dev(backend, x)
    outs = [_poisoned(backend, (T, n)) for n in Ns]
    n_before = len(getattr(backend, "launches", []))
    Kn.qmatmul_shared_input(xd, wts, outs=outs, backend=backend)
    if hasattr(backend, "launches"):
        want = [Kn.dense_mma_kernel(c, T) for c in (12, 14, 12)]
        assert want[0] == ("qmm_dense_mma<12>" if T <= 4 else "qmm_dense_mma<12,1>")
        assert backend.launches[n_before:] == ["act_digits", *want], backend.launches[n_before:]
    old = backend.mma
    backend.mma = False
    try:
        flts = [_host(backend, Kn.qmatmul(xd, wt, backend=backend)) for wt in wts]
    finally:
        backend.mma = old
    for i, (r, q, n, wt, out, flt) in enumerate(zip(raws, qtypes, Ns, wts, outs, flts)):
        got = _host(backend, out)
        what = f"tensor-core dense product {i} ({q.name}, N={n}, K={Kc}) T={T}"
        _assert_written(got, what)
        assert np.array_equal(got, _host(backend, Kn.qmatmul(xd, wt, backend=backend))), what + ": differs alone"
        w = _deq(r, q, (n, Kc)).astype(np.float64)
        _assert_close(got, x.astype(np.float64) @ w.T, what, ref_abs=np.abs(x.astype(np.float64)) @ np.abs(w.T))
        _assert_close(got, flt.astype(np.float64), what + " vs the float kernel")
    bad = T - 1 if T <= 4 else 5  # a long prompt: a token of the second pass
    x[bad, Kc // 2 + 3] = np.inf
    got = _host(backend, Kn.qmatmul(_dev(backend, x), wts[1], backend=backend))
    assert np.isnan(got[bad]).all(), "a token holding inf must give NaN products"
    rest = np.arange(T) != bad
    assert np.array_equal(got[rest], _host(backend, outs[1])[rest]), "the other tokens' products must not change"


@pytest.mark.parametrize("long", [1, 2, 3], ids=["K-over-warps", "passes-over-warps", "passes-of-8-over-warps"])
@pytest.mark.parametrize("T", [9, 13, 30])  # 3, 4 and 8 passes of 4 tokens (the last one short but for 4)
def test_dense_long_prompt_pass_groups(backend, T, long, monkeypatch):
    """Past 4 tokens qmm_dense_mma<QT,1> spreads the passes of 4 tokens over gridDim.y (dense_mma_pass_groups):
    every split (a pass a block, two, uneven, none) gives the one-block-all-passes products bit for bit,
    every output written, within 1e-5 of float64. The same for qmm_dense_mma<QT,2> (MP_DENSE_LONG_TOKENS:
    the block's warps share its passes, each over all of K), whose blocks take a multiple of the warps' passes,
    and <QT,3> (MP_DENSE_PASS8: passes of 8 tokens, up to DENSE_PASS8_WARPS warps), a multiple of twice theirs."""
    from pytest_moeparity.gpu import kernels as Kn

    if not backend.mma:
        pytest.skip("the device has no int8 mma (compute capability below 8.0)")
    by_tokens = long >= 2
    monkeypatch.setattr(Kn, "MMA_MAX_TOKENS", max(Kn.MMA_MAX_TOKENS, T))
    monkeypatch.setattr(Kn, "dense_long_tokens", lambda be, blocks, T: by_tokens and T > 4)
    monkeypatch.setattr(Kn, "dense_pass8", lambda be, by: by and long == 3)
    rng = _rng("dense-pass-groups", T)
    Kc = 2048
    mats = [(Q.Q4_K, 40), (Q.Q6_K, 24)]
    raws = [_quantized(rng, q, (n, Kc)) for q, n in mats]
    wts = [_device_tensor(backend, r, q, (n, Kc)) for r, (q, n) in zip(raws, mats)]
    x = (rng.standard_normal((T, Kc)) * np.exp2(rng.integers(-6, 6, size=(T, Kc)))).astype(np.float32)
    xd = _dev(backend, x)
    passes = -(-T // 4)

    def run(target):
        monkeypatch.setattr(Kn, "DENSE_LONG_BLOCKS", target)
        return [_host(backend, Kn.qmatmul(xd, wt, out=_poisoned(backend, (T, n)), backend=backend))
                for wt, (q, n) in zip(wts, mats)]

    n_before = len(getattr(backend, "launches", []))
    whole = run(0)
    if hasattr(backend, "launches"):
        assert backend.launches[n_before:] == ["act_digits", f"qmm_dense_mma<12,{long}>", "act_digits",
                                               f"qmm_dense_mma<14,{long}>"], backend.launches[n_before:]
    for (q, n), raw, got in zip(mats, raws, whole):
        w = _deq(raw, q, (n, Kc)).astype(np.float64)
        _assert_written(got, f"{q.name} T={T}")
        _assert_close(got, x.astype(np.float64) @ w.T, f"{q.name} T={T}", ref_abs=np.abs(x.astype(np.float64)) @ np.abs(w.T))
    # the 40-row matrix is 3 row groups: a pass a block; 2 a block where 12 blocks are asked for (T = 30);
    # 2 then 1 for 3 passes and 4 blocks asked for; all in one block
    warps = Kn.dense_mma_warps(Kc) if long < 3 else 2 * min(Kn.dense_mma_warps(Kc), Kn.DENSE_PASS8_WARPS)
    for target, per in ((1 << 20, 1), (12, max(1, 3 * passes // 12)), (4, max(1, 3 * passes // 4)), (3, passes)):
        monkeypatch.setattr(Kn, "DENSE_LONG_BLOCKS", target)
        assert Kn.dense_mma_pass_groups(3, T) == -(-passes // min(per, passes))
        per_w = min(passes, warps * -(-min(per, passes) // warps))  # <QT,2|3>: whole rounds of the warps' passes
        assert Kn.dense_mma_pass_groups(3, T, warps) == -(-passes // per_w)
        for (q, n), want, got in zip(mats, whole, run(target)):
            _assert_written(got, f"{q.name} T={T} target {target}")
            assert np.array_equal(got, want), f"{q.name} T={T}: passes split for {target} blocks differ"
    assert Kn.dense_mma_pass_groups(10 ** 6, T) == 1 and Kn.dense_mma_pass_groups(3, 4) == 1


def _assert_records(backend, r) -> int:
    """r.records against its pairs / offsets / active: per run of up to MP_EXPERT_CHUNK pairs of an active
    expert (one run an expert for 0) {expert, first place, one past the last, 0, the first 4 pairs with the
    last repeated}, {-1, 0, 0, 0, -1 x 4} after them, as many rows as records_len's bound. Returns the runs."""
    from pytest_moeparity.gpu import kernels as K

    chunk = K.expert_chunk(backend)
    pairs, offsets, active = (_host(backend, a) for a in (r.pairs, r.offsets, r.active))
    runs = []
    for e in active[active >= 0]:
        beg, end = int(offsets[e]), int(offsets[e + 1])
        step = chunk or end - beg
        runs += [(e, b, min(b + step, end)) for b in range(beg, end, step)]
    n = K.records_len(r.n_tokens * r.k, r.n_experts, chunk)
    assert len(runs) <= n
    want = np.tile(np.array([-1, 0, 0, 0, -1, -1, -1, -1], np.int32), (n, 1))
    for i, (e, beg, end) in enumerate(runs):
        want[i, :4] = (e, beg, end, 0)
        want[i, 4:] = pairs[np.minimum(np.arange(beg, beg + 4), end - 1)]
    got = _host(backend, r.records)
    assert got.shape == want.shape and np.array_equal(got, want), f"records (chunk {chunk})\n{got}\nwant\n{want}"
    return len(runs)


def test_expert_routing_groups_pairs(backend):
    from pytest_moeparity.gpu import kernels as K

    E, T, k = 9, 23, 4
    ids = _routing_ids(_rng("routing"), T, k, E)
    r = K.expert_routing(_dev(backend, ids), E, backend=backend)
    pairs, offsets = _host(backend, r.pairs), _host(backend, r.offsets)
    flat = ids.reshape(-1)
    want_pairs = np.lexsort((np.arange(flat.size), flat))
    assert pairs.tolist() == want_pairs.tolist()
    counts = np.bincount(flat, minlength=E)
    assert offsets.tolist() == [0] + np.cumsum(counts).tolist(), f"offsets {offsets} for counts {counts}"
    assert counts[E - 1] == 0 and counts[E - 2] == 0
    used = np.nonzero(counts)[0]
    active = _host(backend, r.active)
    assert active.tolist() == used.tolist() + [-1] * (min(E, T * k) - len(used))
    assert _host(backend, r.order).tolist() == np.argsort(ids, axis=1, kind="stable").tolist()
    _assert_records(backend, r)


@pytest.mark.parametrize("E", [8, 128, 160, 512])
def test_expert_routing_many_experts(backend, E):
    """Expert counts that leave lanes empty (8), fill them evenly (128), unevenly (160), at the limit
    (512); prompts with more pairs than experts, and repeated ids within a token (forced routing)."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("routing-many", E)
    T, k = 70, 8
    ids = rng.integers(0, E, size=(T, k)).astype(np.int32)
    ids[0] = ids[0, 0]  # one token sends every slot to one expert
    r = K.expert_routing(_dev(backend, ids), E, backend=backend)
    flat = ids.reshape(-1)
    assert _host(backend, r.pairs).tolist() == np.lexsort((np.arange(flat.size), flat)).tolist()
    counts = np.bincount(flat, minlength=E)
    assert _host(backend, r.offsets).tolist() == [0] + np.cumsum(counts).tolist()
    used = np.nonzero(counts)[0].tolist()
    assert _host(backend, r.active).tolist() == used + [-1] * (min(E, T * k) - len(used))
    assert _host(backend, r.order).tolist() == np.argsort(ids, axis=1, kind="stable").tolist()
    runs = _assert_records(backend, r)  # (token 0's expert: 8 pairs or more, over several records)
    if K.expert_chunk(backend):
        assert runs > len(used), "a busy expert's pairs must be split over several records"


# ---- router, combination, bf16 rounding ------------------------------------------------------------------------
def test_router_topk_matches_numpy(backend):
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("topk")
    T, E, k = 19, 16, 4
    probs = rng.random((T, E)).astype(np.float32)
    probs[1, :] = 1.0 / E                 # all tied: lowest ids win
    probs[2, [3, 9, 12]] = probs[2].max()  # ties at the top
    probs[3, 5] = np.nan                   # NaN sorts last, as in numpy
    probs[4, :] = np.nan
    ids, w = K.router_topk(_dev(backend, probs), k, backend=backend)
    ids, w = _host(backend, ids), _host(backend, w)
    want = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    assert ids.dtype == np.int32
    assert np.array_equal(ids, want), f"top-k ids differ in rows {np.nonzero((ids != want).any(1))[0]}: {ids} vs {want}"
    top = np.take_along_axis(probs, want, -1)
    ok = ~np.isnan(top).any(1)
    np.testing.assert_allclose(w[ok], (top / top.sum(-1, keepdims=True))[ok], rtol=1e-6)


@pytest.mark.parametrize("T", [1, 3, 4, 5, 9])  # one block (grouped in the launch) or more (grouped after)
@pytest.mark.parametrize("E,k", [(128, 8), (60, 4), (160, 9)])
def test_route_experts_is_softmax_topk_grouping(backend, T, E, k):
    """The one-launch router gives softmax's, router_topk's and expert_routing's results bit for bit,
    with a tie and a NaN row among the tokens: rows of up to 128 experts held in registers and up to 32
    pairs grouped by one warp, or (160 experts, 4 tokens x 9) through memory and the block."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("route", T, E, k)
    logits = rng.standard_normal((T, E)).astype(np.float32) * 2
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie for first place: the lower id first
    if T > 2:
        logits[2, 7] = np.nan
    dl = _dev(backend, logits)
    n_before = len(getattr(backend, "launches", []))
    probs, ids, weights, routing = K.route_experts(dl, k, backend=backend)
    if hasattr(backend, "launches"):
        assert backend.launches[n_before:] == (["moe_route"] if T <= K.WARPS else ["moe_route", "expert_group"])
    want_p = K.softmax(dl, backend=backend)
    want_ids, want_w = K.router_topk(want_p, k, backend=backend)
    want_r = K.expert_routing(want_ids, E, backend=backend)
    assert np.array_equal(_host(backend, probs), _host(backend, want_p), equal_nan=True)
    assert np.array_equal(_host(backend, ids), _host(backend, want_ids))
    assert np.array_equal(_host(backend, weights), _host(backend, want_w), equal_nan=True)
    assert _host(backend, ids)[0, :2].tolist() == [5, 9]
    for f in ("pairs", "offsets", "active", "order", "records"):
        assert np.array_equal(_host(backend, getattr(routing, f)), _host(backend, getattr(want_r, f))), f
    _assert_records(backend, routing)


def test_moe_combine_bit_exact(backend):
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("combine")
    T, k, N = 11, 4, 45
    y = rng.standard_normal((T, k, N)).astype(np.float32)
    w = rng.random((T, k)).astype(np.float32)
    ids = np.stack([rng.permutation(10)[:k] for _ in range(T)]).astype(np.int32)
    routing = K.expert_routing(_dev(backend, ids), 10, backend=backend)
    got = _host(backend, K.moe_combine(_dev(backend, y), _dev(backend, w), routing, backend=backend))
    want = np.zeros((T, N), np.float32)
    for t in range(T):
        for j in np.argsort(ids[t]):  # the reference adds experts in ascending id order
            want[t] = want[t] + (w[t, j] * y[t, j]).astype(np.float32)
    assert np.array_equal(got, want), f"max diff {np.abs(got - want).max()}"
    # with the residual: the same combination and x + out from the one launch
    x = rng.standard_normal((T, N)).astype(np.float32)
    out, res = K.moe_combine(_dev(backend, y), _dev(backend, w), routing, residual=_dev(backend, x), backend=backend)
    assert np.array_equal(_host(backend, out), want)
    assert np.array_equal(_host(backend, res), x + want)


@pytest.mark.parametrize("T,k,N", [(3, 8, 2048), (4, 3, 768), (2, 6, 96), (3, 4, 4096)])  # 4096: past one block
def test_moe_combine_norm_is_combine_then_norm(backend, T, k, N):
    """The layer boundary in one launch (the experts' combination, the residual, the next norm and its
    digits; a block per token) gives moe_combine's (with the residual), rms_norm's and act_digits' results
    bit for bit (the combination checked against float32 step by step above), with slot counts that leave
    a partial chunk of loads, a NaN staying in its own token's rows; rows past one block take those
    kernels."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("combine-norm", T, k, N)
    E = 2 * k + 1
    y = (rng.standard_normal((T, k, N)) * np.exp2(rng.integers(-6, 6, size=(T, k, N)))).astype(np.float32)
    w = rng.random((T, k)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    x = (rng.standard_normal((T, N)) * 4).astype(np.float32)
    y[T - 1, k - 1, N // 2] = np.nan
    nw = rng.uniform(0.5, 1.5, N).astype(np.float32)
    routing = K.expert_routing(_dev(backend, ids), E, backend=backend)
    dy, dw, dx, dnw = (_dev(backend, a) for a in (y, w, x, nw))
    n_before = len(getattr(backend, "launches", []))
    out, res, normed, digits = K.moe_combine_norm(dy, dw, routing, dx, dnw, 1e-6, backend=backend)
    if hasattr(backend, "launches"):
        want_l = ["combine_norm_digits"] if N <= K.ROW_BLOCK_COLS else ["moe_combine", "rms_norm", "act_digits"]
        assert backend.launches[n_before:] == want_l, backend.launches[n_before:]
    w_out, w_res = K.moe_combine(dy, dw, routing, residual=dx, backend=backend)
    w_normed = K.rms_norm(w_res, dnw, 1e-6, backend=backend)
    for name, g, want in (("out", out, w_out), ("res", res, w_res), ("normed", normed, w_normed)):
        g, want = _host(backend, g), _host(backend, want)
        assert np.array_equal(g, want, equal_nan=True), f"{name} (T={T}, k={k}, N={N}) differs from the kernels'"
    _assert_same_digits(backend, digits, K.act_digits(w_normed, backend=backend), f"normed digits T={T} k={k} N={N}")
    nrm = _host(backend, normed)
    assert np.isnan(nrm[T - 1]).all() and np.isfinite(nrm[:T - 1]).all()
    assert np.isnan(_host(backend, digits[2])[T - 1]) and np.isfinite(_host(backend, digits[2])[:T - 1]).all()


@pytest.mark.parametrize("E", [128, 300, 2048])
def test_router_topk_many_experts(backend, E):
    """128 experts, top-8 (Qwen3-30B-A3B's router): several values per lane, exact ties across lanes;
    300 and 2048: lanes whose later values are read from memory every round (beyond the registers).
    Signed zeros tie as equals, -inf ranks above NaN, and the weights are bit for bit float32's."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("topk-many", E)
    T, k = 37, 8
    probs = rng.random((T, E)).astype(np.float32)
    probs[0, [5, 37, 69, 101]] = 2.0       # a four-way tie at the top, one per lane position
    probs[1, 96:] = np.nan
    probs[2, :] = -rng.random(E).astype(np.float32)  # zeros on top: -0 at id 3, +0 at 40 and 70
    probs[2, [3, 40, 70]] = [-0.0, 0.0, 0.0]
    probs[3, :] = np.nan                   # -inf before NaN, then NaN by id
    probs[3, [E - 1, 33]] = -np.inf
    probs[4, E - 3:] = 7.0                 # the top sits in the last lanes' last values
    ids, w = K.router_topk(_dev(backend, probs), k, backend=backend)
    ids, w = _host(backend, ids), _host(backend, w)
    want = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    assert np.array_equal(ids, want), f"rows {np.nonzero((ids != want).any(1))[0]} differ"
    assert ids[2, :3].tolist() == [3, 40, 70] and ids[3, :3].tolist() == [33, E - 1, 0]
    top = np.take_along_axis(probs, want, -1)
    total = np.zeros(T, np.float32)
    for j in range(k):  # the kernel's sum, in slot order, in float32
        total = (total + top[:, j]).astype(np.float32)
    want_w = (top / total[:, None]).astype(np.float32)
    bits, want_bits = w.view(np.uint32), want_w.view(np.uint32)
    ok = ~np.isnan(want_w)  # NaN weights: NaN, payload aside
    assert np.array_equal(bits[ok], want_bits[ok]) and np.isnan(w[~ok]).all(), \
        f"weights differ in rows {np.nonzero((bits != want_bits).any(1))[0]}"
    assert np.signbit(w[2, :3]).tolist() == [False, True, True], "zeros keep their signs: -0 / sum < 0 is +0"


# ---- fused row and elementwise kernels: against float64 NumPy on random data ------------------------------
def test_rms_norm_matches_float64(backend):
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("rms")
    for shape in [(3, 2048), (5, 4, 128), (2, 45)]:
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        w = rng.standard_normal(shape[-1]).astype(np.float32)
        got = _host(backend, K.rms_norm(_dev(backend, x), _dev(backend, w), 1e-6, backend=backend))
        x64 = x.astype(np.float64)
        want = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6) * w
        _assert_close(got, want, f"rms_norm {shape}", tol=1e-6)


def _attention64(q, k, v, nh: int, nkv: int):
    """float64 causal GQA attention, written as the reference's math: scores, masked softmax, p @ v."""
    T, _, hd = q.shape
    kk = np.repeat(k.reshape(T, nkv, hd).astype(np.float64), nh // nkv, axis=1)
    vv = np.repeat(v.reshape(T, nkv, hd).astype(np.float64), nh // nkv, axis=1)
    scores = np.einsum("thd,shd->ths", q.astype(np.float64), kk) / np.sqrt(hd)
    masked = np.where(np.tril(np.ones((T, T), bool))[:, None, :], scores, -np.inf)
    e = np.exp(masked - masked.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    return scores, probs, np.einsum("ths,shd->thd", probs, vv).reshape(T, nh * hd)


@pytest.mark.parametrize("T,nh,nkv,hd", [(1, 4, 1, 64), (3, 32, 4, 128), (17, 6, 3, 40), (40, 8, 2, 32),
                                      (70, 4, 2, 160), (33, 2, 1, 300)])  # 3 chunks of 32 positions; 8 and 10 columns a lane
def test_attention_core_matches_float64(backend, T, nh, nkv, hd):
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("attn", T, nh, nkv, hd)
    q = rng.standard_normal((T, nh, hd)).astype(np.float32)
    k = rng.standard_normal((T, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((T, nkv * hd)).astype(np.float32)
    out = (_poisoned(backend, (T, nh, T)), _poisoned(backend, (T, nh, T)), _poisoned(backend, (T, nh * hd)))
    res = K.attention_core(_dev(backend, q), _dev(backend, k), _dev(backend, v), out=out, backend=backend)
    assert all(r is o for r, o in zip(res, out))
    want = _attention64(q, k, v, nh, nkv)
    for name, got, ref in zip(("scores", "probs", "ctx"), res, want):
        got = _host(backend, got)
        _assert_written(got, f"attention_core {name} T={T}")
        _assert_close(got, ref, f"attention_core {name} T={T} nh={nh} nkv={nkv} hd={hd}")
    probs = _host(backend, res[1])
    assert np.all(probs[np.broadcast_to(~np.tril(np.ones((T, T), bool))[:, None, :], probs.shape)] == 0)


@pytest.mark.parametrize("T,hd", [(1, 128), (3, 128), (33, 40), (64, 128), (70, 96), (129, 64), (40, 160), (64, 256)])
def test_attention_core_builds_agree(backend, T, hd):
    """attention_core's wide rows (32 positions a round, their sums by recursive halving: the default), the
    same in blocks of MP_ATTN_CORE_WARPS = 8 rows (a block the 8 query heads of a kv head at 30b-a3b), and
    the narrow rows (MP_ATTN_WIDE=0: chunks of 4 positions, each sum a xor butterfly) give the same scores,
    probabilities and context bit for bit, also where T * nh rows are not a multiple of 8 (odd T); every
    output written (the outputs start as NaN poison and their NaN pattern is NumPy's, with NaN keys and
    values spreading)."""
    from pytest_moeparity.gpu import kernels as K

    nh, nkv = 4, 2
    rng = _rng("attn-builds", T, hd)
    q = rng.standard_normal((T, nh, hd)).astype(np.float32)
    k = rng.standard_normal((T, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((T, nkv * hd)).astype(np.float32)
    if T > 3:
        k[T // 2, 1, 3] = np.nan  # rows t >= T // 2 of heads 2, 3: NaN scores and probabilities
        v[T - 2, 5] = np.nan      # dim 5 of heads 0, 1: NaN context (0 * NaN)
    builds = {"default": backend, "blocks of 8 rows": backend.variant("-DMP_ATTN_CORE_WARPS=8"),
              "narrow rows": backend.variant("-DMP_ATTN_WIDE=0")}
    got = {}
    for build, be in builds.items():
        out = (_poisoned(be, (T, nh, T)), _poisoned(be, (T, nh, T)), _poisoned(be, (T, nh * hd)))
        K.attention_core(_dev(be, q), _dev(be, k), _dev(be, v), out=out, backend=be)
        got[build] = [_host(be, a) for a in out]
    for build in ("blocks of 8 rows", "narrow rows"):
        for name, a, b in zip(("scores", "probs", "ctx"), got["default"], got[build]):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{name} T={T} hd={hd}: {build}"
    with np.errstate(invalid="ignore"):
        want = _attention64(q, k, v, nh, nkv)
    for name, a, w in zip(("scores", "probs", "ctx"), got["default"], want):
        assert np.isfinite(a).any(), name
        assert np.array_equal(np.isnan(a), np.isnan(w)), f"{name}: NaN pattern differs from NumPy's"
        _assert_close(np.nan_to_num(a), np.nan_to_num(w), f"{name} T={T} hd={hd} (finite part)")


def test_attention_core_nan_spreads_as_in_numpy(backend):
    from pytest_moeparity.gpu import kernels as K

    T, nh, nkv, hd = 6, 4, 2, 32
    rng = _rng("attn-nan")
    q = rng.standard_normal((T, nh, hd)).astype(np.float32)
    k = rng.standard_normal((T, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((T, nkv * hd)).astype(np.float32)
    k[3, 1, 5] = np.nan   # key 3 of kv head 1: rows t >= 3 of heads 2, 3 are NaN; earlier rows mask it
    v[4, 7] = np.nan      # value 4 of kv head 0, dim 7: 0 * NaN, so dim 7 of every context row of heads 0, 1 is NaN
    got = [_host(backend, a) for a in K.attention_core(_dev(backend, q), _dev(backend, k), _dev(backend, v),
                                                       backend=backend)]
    with np.errstate(invalid="ignore"):
        want = _attention64(q, k, v, nh, nkv)
    for name, g, w in zip(("scores", "probs", "ctx"), got, want):
        assert np.array_equal(np.isnan(g), np.isnan(w)), f"{name}: NaN pattern differs from NumPy's"
        _assert_close(np.nan_to_num(g), np.nan_to_num(w), f"{name} (finite part)")
    assert np.isnan(got[1][3:, 2:]).all() and np.isfinite(got[1][:3]).all()
    ctx = got[2].reshape(T, nh, hd)
    assert np.isnan(ctx[:, :2, 7]).all() and np.isfinite(np.delete(ctx[:3], 7, axis=2)).all()


def test_softmax_matches_float64_with_causal_mask_and_nan(backend):
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("softmax")
    x = (rng.standard_normal((6, 150)) * 4).astype(np.float32)
    got = _host(backend, K.softmax(_dev(backend, x), backend=backend))
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    _assert_close(got, e / e.sum(-1, keepdims=True), "softmax", tol=1e-6)
    T, nh = 5, 3
    s = (rng.standard_normal((T, nh, T)) * 2).astype(np.float32)
    got = _host(backend, K.softmax(_dev(backend, s), causal_period=nh, backend=backend))
    masked = np.where(np.tril(np.ones((T, T), bool))[:, None, :], s.astype(np.float64), -np.inf)
    e = np.exp(masked - masked.max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True)
    _assert_close(got, want, "causal softmax", tol=1e-6)
    assert np.all(got[np.broadcast_to(~np.tril(np.ones((T, T), bool))[:, None, :], got.shape)] == 0)
    x[2, 7] = np.nan
    x[3, 0] = np.inf
    got = _host(backend, K.softmax(_dev(backend, x), backend=backend))
    assert np.isnan(got[2]).all() and np.isnan(got[3]).all(), "NaN / inf in a row make the row NaN, as in NumPy"
    assert np.isfinite(got[[0, 1, 4, 5]]).all()
    s[4, 1, 2] = np.nan  # a NaN in a causal row: NumPy's row is NaN in its masked columns too
    got = _host(backend, K.softmax(_dev(backend, s), causal_period=nh, backend=backend))
    assert np.isnan(got[4, 1]).all() and np.isfinite(got[4, 0]).all() and np.isfinite(got[3]).all()


def test_rope_swiglu_add_match_reference(backend):
    from pytest_moeparity.gpu import kernels as K
    from pytest_moeparity.reference import rope_neox, silu

    rng = _rng("rope")
    T, heads, hd = 7, 3, 64
    x = rng.standard_normal((T, heads, hd)).astype(np.float32)
    half = hd // 2
    ang = np.arange(T)[:, None] * (1e6 ** (-np.arange(half) * 2.0 / hd))[None, :]
    got = _host(backend, K.rope_neox(_dev(backend, x), _dev(backend, np.cos(ang).astype(np.float32)),
                                     _dev(backend, np.sin(ang).astype(np.float32)), backend=backend))
    want = rope_neox(x, np.arange(T), 1e6)  # the reference's float32 arithmetic: bit for bit
    assert np.array_equal(got, want), f"max diff {np.abs(got - want).max()}"
    g, u = rng.standard_normal((2, 3, 8, 96)).astype(np.float32) * 4
    got = _host(backend, K.swiglu(_dev(backend, g), _dev(backend, u), backend=backend))
    _assert_close(got, silu(g.astype(np.float64)) * u, "swiglu", tol=1e-6)
    got = _host(backend, K.add(_dev(backend, g), _dev(backend, u), backend=backend))
    assert np.array_equal(got, g + u)


@pytest.mark.parametrize("T,nh,nkv,hd", [(1, 4, 1, 64), (3, 32, 4, 128), (9, 6, 3, 40), (2, 4, 2, 256)])
def test_qk_norm_rope_is_norm_then_rope(backend, T, nh, nkv, hd):
    """The fused q/k RMSNorm + RoPE gives rms_norm's and rope_neox's results bit for bit (each checked
    against float64 / the reference above), a NaN staying in its own head's rows."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("qk-norm-rope", T, nh, nkv, hd)
    q = (rng.standard_normal((T, nh, hd)) * 3).astype(np.float32)
    k = (rng.standard_normal((T, nkv, hd)) * 3).astype(np.float32)
    q[T - 1, nh - 1, 0] = np.nan
    wq, wk = (rng.uniform(0.5, 1.5, hd).astype(np.float32) for _ in range(2))
    half = hd // 2
    ang = np.arange(T)[:, None] * (1e6 ** (-np.arange(half) * 2.0 / hd))[None, :]
    cos, sin = (_dev(backend, f(ang).astype(np.float32)) for f in (np.cos, np.sin))
    dq, dk, dwq, dwk = (_dev(backend, a) for a in (q, k, wq, wk))
    qn, kn, qr, kr = (_host(backend, a) for a in K.qk_norm_rope(dq, dk, dwq, dwk, 1e-6, cos, sin, backend=backend))
    want_qn = K.rms_norm(dq, dwq, 1e-6, backend=backend)
    want_kn = K.rms_norm(dk, dwk, 1e-6, backend=backend)
    for got, want, what in ((qn, want_qn, "q_norm"), (kn, want_kn, "k_norm"),
                            (qr, K.rope_neox(want_qn, cos, sin, backend=backend), "q rope"),
                            (kr, K.rope_neox(want_kn, cos, sin, backend=backend), "k rope")):
        assert np.array_equal(got, _host(backend, want), equal_nan=True), what
    assert np.isnan(qr[T - 1, nh - 1]).all() and not np.isnan(qr[:, :nh - 1]).any() and not np.isnan(kr).any()
    x64 = q.astype(np.float64)
    ref = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6) * wq
    ok = ~np.isnan(ref)
    _assert_close(qn[ok], ref[ok], "q_norm vs float64", tol=1e-6)


@pytest.mark.parametrize("T,nh,nkv,hd", [(3, 32, 4, 128), (4, 32, 8, 128), (2, 4, 2, 64), (1, 6, 3, 32), (3, 8, 2, 256),
                                         (6, 8, 2, 64), (32, 4, 1, 64),  # key chunks of 4 and 2; the most tokens
                                         (9, 32, 4, 128), (5, 16, 16, 128),  # 9 tokens; a q head per kv head
                                         (17, 2, 1, 256), (2, 4, 1, 512), (33, 4, 1, 64)])  # the last three: too large
def test_norm_rope_attention_is_the_three_kernels(backend, T, nh, nkv, hd):
    """The q/k norms + RoPE, attention and the context's digits in one launch (a block per token and kv
    head, the last of a token's blocks writing its digits) give qk_norm_rope's, attention_core's and
    act_digits' results bit for bit (each checked against float64 above), with a NaN in one token's q
    staying in that token's rows, and leave their per-token counts at 0 for the next launch (run twice on
    the same counts); sizes past one block take the three kernels."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("norm-rope-attention", T, nh, nkv, hd)
    q = (rng.standard_normal((T, nh, hd)) * 3).astype(np.float32)
    k = (rng.standard_normal((T, nkv, hd)) * 3).astype(np.float32)
    v = (rng.standard_normal((T, nkv * hd)) * np.exp2(rng.integers(-8, 8, size=(T, nkv * hd)))).astype(np.float32)
    if T > 1:
        q[T - 2, nh - 1, 3] = np.nan
    wq, wk = (rng.uniform(0.5, 1.5, hd).astype(np.float32) for _ in range(2))
    half = hd // 2
    ang = np.arange(T)[:, None] * (1e6 ** (-np.arange(half) * 2.0 / hd))[None, :]
    cos, sin = (_dev(backend, f(ang).astype(np.float32)) for f in (np.cos, np.sin))
    dq, dk, dv, dwq, dwk = (_dev(backend, a) for a in (q, k, v, wq, wk))
    fused = T * hd <= K.ATTN_KV and hd <= K.ATTN_HEAD_DIM and T <= K.ATTN_MAX_T
    sync = K.counter_buffer(backend=backend)
    n_before = len(getattr(backend, "launches", []))
    first = K.norm_rope_attention(dq, dk, dv, dwq, dwk, 1e-6, cos, sin, sync=sync, backend=backend)
    if hasattr(backend, "launches"):
        want_l = ["norm_rope_attention"] if fused else ["qk_norm_rope", "attention_core", "act_digits"]
        assert backend.launches[n_before:] == want_l, backend.launches[n_before:]
    assert not _host(backend, sync).any(), "the per-token counts were not set back to 0"
    got = K.norm_rope_attention(dq, dk, dv, dwq, dwk, 1e-6, cos, sin, sync=sync, backend=backend)  # the counts reused
    _assert_same_digits(backend, first[7], got[7], f"context digits of the first call T={T}")
    qn, kn, qr, kr = K.qk_norm_rope(dq, dk, dwq, dwk, 1e-6, cos, sin, backend=backend)
    scores, probs, ctx = K.attention_core(qr, kr, dv, backend=backend)
    want = (qn, kn, qr, kr, scores, probs, ctx)
    for name, g, w in zip(("q_norm", "k_norm", "q rope", "k rope", "scores", "probs", "ctx"), got[:7], want):
        g, w = _host(backend, g), _host(backend, w)
        assert g.shape == w.shape, f"{name}: shape {g.shape}, want {w.shape}"
        assert np.array_equal(g, w, equal_nan=True), f"{name} (T={T}, nh={nh}, nkv={nkv}, hd={hd}) differs from the kernel's"
    _assert_same_digits(backend, got[7], K.act_digits(ctx, backend=backend), f"context digits T={T}")
    c = _host(backend, got[6])
    if T > 1:  # a NaN in token T - 2's q: its scores row, so its context; later tokens' keys are not its
        assert np.isnan(c[T - 2]).any() and not np.isnan(np.delete(c, T - 2, axis=0)).any()
        assert np.isnan(_host(backend, got[7][2])[T - 2])
    else:
        assert np.isfinite(c).all()


def test_add_rms_norm_is_add_then_rms_norm(backend):
    """The fused residual add + RMSNorm gives add's and rms_norm's results bit for bit, a NaN staying
    in its own row."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("add-rms")
    a, b = (rng.standard_normal((5, 2048)).astype(np.float32) * 3 for _ in range(2))
    a[3, 7] = np.nan
    w = rng.uniform(0.5, 1.5, 2048).astype(np.float32)
    da, db, dw = (_dev(backend, v) for v in (a, b, w))
    s, n = (_host(backend, v) for v in K.add_rms_norm(da, db, dw, 1e-6, backend=backend))
    want_s = K.add(da, db, backend=backend)
    assert np.array_equal(s, _host(backend, want_s), equal_nan=True)
    assert np.array_equal(n, _host(backend, K.rms_norm(want_s, dw, 1e-6, backend=backend)), equal_nan=True)
    assert np.isnan(n[3]).all() and not np.isnan(np.delete(n, 3, axis=0)).any()
    with pytest.raises(K.KernelError, match="differ"):
        K.add_rms_norm(da, db[:4], dw, 1e-6, backend=backend)


def _digit_rows(rng, rows: int, n: int) -> np.ndarray:
    """Rows of wide dynamic range (2^-40 .. 2^40 between rows, 2^+-6 within), one with an outlier."""
    x = rng.standard_normal((rows, n)) * np.exp2(rng.integers(-6, 6, size=(rows, n)))
    x *= np.exp2(rng.integers(-40, 40, size=(rows, 1)))
    x[0, n // 3] *= 1e4
    return x.astype(np.float32)


def _assert_same_digits(backend, got, want, what: str) -> None:
    for name, a, b in zip(("digits", "sub-block sums", "units"), got, want):
        a, b = _host(backend, a), _host(backend, b)
        assert a.shape == b.shape, f"{what}: {name} shapes {a.shape} vs {b.shape}"
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), (
            f"{what}: {name} differ from act_digits' at {np.argwhere(a.view(np.uint32) != b.view(np.uint32))[:5].tolist()}")


def test_reads_digits_follows_the_products_paths(backend):
    """reads_digits (whether the kernel writing a product's input should write its digits) says yes exactly
    where the product takes the tensor cores: Q4_K or Q6_K over whole super-blocks, MMA_MIN_TOKENS to
    MMA_MAX_TOKENS tokens (2 and up by default), not re-read
    as another type by a planted dispatch fault (nor a Q8_0 matrix)."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("reads-digits")
    q4k = _device_tensor(backend, _quantized(rng, Q.Q4_K, (16, 512)), Q.Q4_K, (16, 512))
    q6k = _device_tensor(backend, _quantized(rng, Q.Q6_K, (16, 512)), Q.Q6_K, (16, 512))
    q4k3 = _device_tensor(backend, _quantized(rng, Q.Q4_K, (2, 16, 512)), Q.Q4_K, (2, 16, 512))
    q80 = _device_tensor(backend, _quantized(rng, Q.Q8_0, (16, 512)), Q.Q8_0, (16, 512))
    on = bool(backend.mma and K.MMA)
    for T in range(1, 10):
        short = on and K.MMA_MIN_TOKENS <= T <= K.MMA_MAX_TOKENS
        assert K.reads_digits(T, [q4k], backend=backend) is short, T
        assert K.reads_digits(T, [q4k3], backend=backend) is short, T
        assert K.reads_digits(T, [q80, q4k], backend=backend) is short, T
        assert K.reads_digits(T, [q6k], backend=backend) is (short and bool(K.MMA_Q6K)), T
        assert K.reads_digits(T, [q80], backend=backend) is False, T
        assert K.reads_digits(T, [q4k], [Q.Q6_K], backend=backend) is False, T  # 288-byte rows: 1 Q6_K block

@pytest.mark.parametrize("n", [2048, 768, 128, 4096])  # 4096: wider than a block's row (rms_norm, then act_digits)
def test_norms_write_their_digits(backend, n):
    """rms_norm and add_rms_norm asked for their output's digits (the tensor-core products' input) give,
    in one launch where the rows fit a block, their plain results and act_digits(out) bit for bit, on
    rows of wide dynamic range, a NaN row and an inf row staying in their rows (NaN unit); outputs and
    digit buffers poisoned first are written whole."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("norm-digits", n)
    R = 24  # many rows: a sum of squares added in another order moves the norm's last bit in a few of them
    a, b = _digit_rows(rng, R, n), _digit_rows(rng, R, n)
    a[2, 7] = np.nan
    b[3, n - 1] = np.inf
    w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    da, db, dw = (_dev(backend, v) for v in (a, b, w))
    n_before = len(getattr(backend, "launches", []))
    out, dig = K.rms_norm(da, dw, 1e-6, digits=True, backend=backend)
    s2, out2, dig2 = K.add_rms_norm(da, db, dw, 1e-6, digits=True, backend=backend)
    if hasattr(backend, "launches"):
        want = ["norm_digits"] * 2 if n <= K.ROW_BLOCK_COLS else ["rms_norm", "act_digits", "add_rms_norm", "act_digits"]
        assert backend.launches[n_before:] == want, backend.launches[n_before:]
    plain = K.rms_norm(da, dw, 1e-6, backend=backend)
    s_plain, out2_plain = K.add_rms_norm(da, db, dw, 1e-6, backend=backend)
    for what, got, ref in (("rms_norm", out, plain), ("add_rms_norm sum", s2, s_plain), ("add_rms_norm", out2, out2_plain)):
        got = _host(backend, got)
        assert np.array_equal(got, _host(backend, ref), equal_nan=True), f"{what} with digits differs from {what} (n={n})"
    _assert_same_digits(backend, dig, K.act_digits(plain, backend=backend), f"rms_norm n={n}")
    _assert_same_digits(backend, dig2, K.act_digits(out2_plain, backend=backend), f"add_rms_norm n={n}")
    assert np.isnan(_host(backend, dig[2])[2]) and not np.isnan(np.delete(_host(backend, dig[2]), 2)).any()
    assert np.isnan(_host(backend, dig2[2])[[2, 3]]).all()
    ref = a.astype(np.float64) / np.sqrt((a.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    ok = [r for r in range(R) if r != 2]
    _assert_close(_host(backend, out)[ok], ref[ok], f"rms_norm n={n} vs float64", tol=1e-6)
    # poisoned buffers: the fused kernel writes every output and digit word
    if n <= K.ROW_BLOCK_COLS:
        outp = _poisoned(backend, (R, n))
        digp = (_dev(backend, np.full((R, n), 0xFFFFFFFF, np.uint32)), _poisoned(backend, (R, n // 32)),
                _poisoned(backend, (R,)))
        backend.launch("norm_digits", (R, 1, 1), (K.DIGITS_THREADS, 1, 1),
                       (da, da, np.int32(0), np.int32(R), np.int32(n), dw, np.float32(1e-6), outp, outp, *digp))
        assert np.array_equal(_host(backend, outp), _host(backend, out), equal_nan=True)
        _assert_same_digits(backend, digp, dig, f"norm_digits on poisoned buffers n={n}")
    with pytest.raises(K.KernelError, match="multiple of 32"):
        K.rms_norm(_dev(backend, np.ones((2, 48), np.float32)), _dev(backend, np.ones(48, np.float32)), 1e-6,
                   digits=True, backend=backend)


@pytest.mark.parametrize("n", [768, 2048, 96])
def test_swiglu_writes_its_digits(backend, n):
    """swiglu asked for its output's digits (the down projection's input, a row per (token, slot)
    pair): swiglu's result and act_digits(out) bit for bit, in one launch; a pair row holding inf gets a
    NaN unit; the result is float64's SwiGLU within float32 rounding."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("swiglu-digits", n)
    T, k = 3, 8
    g = (rng.standard_normal((T, k, n)) * 4).astype(np.float32)
    u = _digit_rows(rng, T * k, n).reshape(T, k, n)
    u[2, 5, 9] = np.inf
    dg, du = _dev(backend, g), _dev(backend, u)
    n_before = len(getattr(backend, "launches", []))
    out, dig = K.swiglu(dg, du, digits=True, backend=backend)
    if hasattr(backend, "launches"):
        assert backend.launches[n_before:] == ["swiglu_digits"], backend.launches[n_before:]
    plain = K.swiglu(dg, du, backend=backend)
    assert np.array_equal(_host(backend, out), _host(backend, plain), equal_nan=True)
    _assert_same_digits(backend, dig, K.act_digits(plain.reshape(T * k, n), backend=backend), f"swiglu n={n}")
    unit = _host(backend, dig[2])
    assert np.isnan(unit[2 * k + 5]) and np.isfinite(np.delete(unit, 2 * k + 5)).all()
    g64 = g.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u.astype(np.float64)
    ok = np.isfinite(ref)
    np.testing.assert_allclose(_host(backend, out)[ok], ref[ok], rtol=1e-5, atol=0)
    wt = _device_tensor(backend, _quantized(rng, Q.Q4_K, (16, 256)), Q.Q4_K, (16, 256))
    with pytest.raises(K.KernelError, match="do not belong"):  # digits of other rows than the product's
        K.qmatmul_shared_input(_dev(backend, np.ones((T, 256), np.float32)), (wt,), digits=dig, backend=backend)


def _bf16_numpy(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), r)


def test_round_bf16_bit_exact(backend):
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("bf16")
    x = (rng.standard_normal(100_003) * np.exp(rng.uniform(-85, 85, 100_003))).astype(np.float32)
    x[:8] = [np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -0.0, 1.0 + 2.0**-8]
    got = _host(backend, K.round_bf16_(_dev(backend, x), backend=backend))
    want = _bf16_numpy(x)
    assert np.isnan(got[0])
    assert np.array_equal(got[1:].view(np.uint32), want[1:].view(np.uint32))


# ---- the test-only fault switch at kernel level -------------------------------------------------------------------
@pytest.mark.parametrize("K_cols", [256, 768, 1024])
def test_fault_q4k_read_as_q6k(backend, K_cols):
    """as_qtype=Q6_K on Q4_K bytes: whole 210-byte Q6_K blocks inside each row are read, the remaining
    columns give 0, nothing outside the row is touched (the emulator checks the bounds)."""
    from pytest_moeparity.gpu import kernels as K

    rng = _rng("fault", K_cols)
    E, N, T, k = 3, 9, 5, 2
    raw = _quantized(rng, Q.Q4_K, (E, N, K_cols))
    row_bytes = raw.shape[-1]
    nb6 = row_bytes // 210
    x = rng.standard_normal((T * k, K_cols)).astype(np.float32)
    ids = np.array([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]], np.int32)
    wt3 = _device_tensor(backend, raw, Q.Q4_K, (E, N, K_cols))
    faulty = _host(backend, K.qmatmul_experts(_dev(backend, x), wt3, _dev(backend, ids), x_per_pair=True,
                                              as_qtype=Q.Q6_K, backend=backend))
    right = _host(backend, K.qmatmul_experts(_dev(backend, x), wt3, _dev(backend, ids), x_per_pair=True, backend=backend))
    # expected garbage: each row's first nb6*210 bytes as Q6_K
    w6 = np.zeros((E, N, K_cols), np.float64)
    if nb6:
        w6[..., :nb6 * 256] = _deq(raw[..., :nb6 * 210].reshape(E * N, nb6 * 210), Q.Q6_K, (E, N, nb6 * 256))
    want = np.einsum("tjc,tjnc->tjn", x.reshape(T, k, K_cols).astype(np.float64), w6[ids])
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(faulty), finite), "non-finite pattern of the faulty product differs from the host model"
    if finite.any():
        _assert_close(np.where(finite, faulty, 0), np.where(finite, want, 0), f"Q4_K read as Q6_K, K={K_cols}", 1e-4)
    assert not np.allclose(faulty, right, equal_nan=False), "the fault switch did not change the Q4_K product"
    # the switch is harmless on real Q6_K bytes
    raw6 = _quantized(rng, Q.Q6_K, (E, N, K_cols))
    wt6 = _device_tensor(backend, raw6, Q.Q6_K, (E, N, K_cols))
    a = _host(backend, K.qmatmul_experts(_dev(backend, x), wt6, _dev(backend, ids), x_per_pair=True, backend=backend))
    b = _host(backend, K.qmatmul_experts(_dev(backend, x), wt6, _dev(backend, ids), x_per_pair=True,
                                         as_qtype=Q.Q6_K, backend=backend))
    assert np.array_equal(a, b)


# ---- whole forwards --------------------------------------------------------------------------------------------------
def _tokens(model, n: int = 12) -> list[int]:
    from pytest_moeparity.parity import default_tokens

    return default_tokens(model.config.vocab, n)


def _engine(model, backend, **kw):
    from pytest_moeparity.gpu import CupyEngine

    return CupyEngine(model, backend=backend, **kw)


def _compare(ref, cand, th: Thresholds | None = None):
    from pytest_moeparity.report import compare_traces

    return compare_traces(ref, cand, th)


def _explain(report) -> str:
    fd = report.first_divergence
    head = "all Match" if fd is None else f"first divergence: {fd.label()} -> {fd.result.verdict}: {fd.result.reason}"
    return f"{head}\ncounts {report.counts()}\n{report.render()}"


def _assert_parity_or_routing_cascade(report, what: str) -> None:
    """All cells Match, except downstream of a routing flip (two precisions may legitimately choose
    different experts where the top-k margin is below their rounding noise). Everything before the
    first layer whose chosen experts differ must Match, including that layer's router logits and
    probabilities."""
    if report.ok:
        return
    fd = report.first_divergence
    flips = sorted(c.layer for c in report.cells if c.stage == S.moe_router_indices
                   and (c.result.metrics.get("mismatched_positions") or 0) > 0)
    ok = (fd is not None and fd.layer is not None and flips
          and (fd.layer > flips[0] or (fd.layer == flips[0] and fd.stage in POST_ROUTER_STAGES)))
    assert ok, f"{what}: divergence not explained by a routing flip (flip layers {flips})\n{_explain(report)}"


def _skip_slow_emulator(backend, preset):
    if backend.name == "emulator" and preset != "tiny" and not os.environ.get("MOEPARITY_TEST_EMULATOR_ALL"):
        pytest.skip("emulator: tiny preset only (MOEPARITY_TEST_EMULATOR_ALL=1 runs all)")


@pytest.mark.parametrize("quant", FORWARD_QUANTS)
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_forward_matches_reference(backend, model_factory, preset, quant):
    """Every stage, every position, every layer (and every routed expert) Matches the NumPy reference."""
    _skip_slow_emulator(backend, preset)
    model = model_factory(preset, quant)
    tokens = _tokens(model)
    plan = SavePlan.parse()
    ref = NumpyForward(model).run(tokens, plan).trace
    res = _engine(model, backend).run(tokens, plan)
    report = _compare(ref, res.trace)
    assert report.ok, f"{preset} {quant}: cupy vs numpy\n{_explain(report)}"
    assert set(res.trace.keys()) == set(ref.keys())
    assert res.logits.shape == (len(tokens), model.config.vocab) and res.logits.dtype == np.float32


@pytest.mark.parametrize("n_tokens", [2, 3, 4])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_short_prompt_forward_on_tensor_cores(backend, model_factory, preset, n_tokens, monkeypatch):
    """A Q4_K_M model's short prompt takes the tensor-core products (dense and expert, Q4_K and Q6_K, the
    head too; their inputs' digits written once per input, by the kernels that write the inputs: the
    norms, the one-launch attention, SwiGLU): every stage, position and layer Matches the NumPy
    reference, and the trace is bit for bit the one with every input's digits written by act_digits."""
    _skip_slow_emulator(backend, preset)
    from pytest_moeparity.gpu import kernels as Kn

    model = model_factory(preset, "Q4_K_M")
    tokens = _tokens(model, n_tokens)
    plan = SavePlan.parse()
    ref = NumpyForward(model).run(tokens, plan).trace
    engine = _engine(model, backend)
    res = engine.run(tokens, plan)
    report = _compare(ref, res.trace)
    assert report.ok, f"{preset} Q4_K_M, {n_tokens} tokens: cupy vs numpy\n{_explain(report)}"
    if hasattr(backend, "launches") and backend.mma and Kn.MMA:
        n_before = len(backend.launches)
        engine.run(tokens, SavePlan.empty())  # the forward alone (captured per-expert stages add products)
        launched = backend.launches[n_before:]
        n_layers = model.config.n_layers
        # (the tiny and small presets' Q4_K expert rows are short enough to be staged: <12,1>)
        for name in ("qmm_dense_mma<12>", "qmm_experts_mma<12,1>", "qmm_dense_mma<14>", "qmm_experts_mma<14>"):
            assert name in launched, f"{name} not launched: {sorted(set(launched))}"
        # each product input's digits once, however many products read it, by the kernel writing the input:
        # per layer attn_norm (q / k / v) and ffn_norm (gate / up) by their norms, the context (attn_output)
        # by the one-launch norms + RoPE + attention, SwiGLU's (ffn_down_exps, Q4_K or Q6_K) by SwiGLU; the
        # final norm's (the Q6_K head) by the last layer's boundary launch
        assert {model.layer(L, "ffn_down_exps").type_name for L in range(n_layers)} == {"Q4_K", "Q6_K"}
        assert model.output.type_name == "Q6_K"
        # (the attn_norm after a layer and the final norm by the layer boundary's one launch with the combination)
        assert launched.count("norm_digits") == n_layers + 1, sorted(set(launched))
        assert launched.count("combine_norm_digits") == n_layers, sorted(set(launched))
        assert launched.count("norm_rope_attention") == n_layers, sorted(set(launched))
        assert launched.count("swiglu_digits") == n_layers, sorted(set(launched))
        assert "moe_combine" not in launched, sorted(set(launched))
        assert "act_digits" not in launched and "qk_norm_rope" not in launched, sorted(set(launched))
    if backend.mma and Kn.MMA:  # the same trace with every input's digits from act_digits in the products
        monkeypatch.setattr(Kn, "reads_digits", lambda *a, **k: False)
        plain = engine.run(tokens, plan)
        assert set(res.trace.keys()) == set(plain.trace.keys())
        for name in res.trace.keys():
            assert np.array_equal(res.trace[name], plain.trace[name], equal_nan=True), f"{name}: digits written by the producer differ"
        assert np.array_equal(res.logits, plain.logits)


@pytest.mark.parametrize("n_tokens", [11, 37])  # 37: past the one-launch attention's 32 tokens
def test_long_prompt_forward_on_tensor_cores(backend, model_factory, n_tokens, monkeypatch):
    """With MMA_MAX_TOKENS raised, a long prompt's Q4_K and Q6_K products (dense, experts, the head) take
    the tensor cores in passes of 4 tokens (pairs): every stage, position and layer of a Q4_K_M model
    Matches the NumPy reference, no float Q4_K / Q6_K product is launched, and the logits are within the
    comparison's tolerance of the float kernels' forward (MMA_MAX_TOKENS 4)."""
    from pytest_moeparity.gpu import kernels as Kn
    from pytest_moeparity.metrics import compare_float

    if not (backend.mma and Kn.MMA):
        pytest.skip("the device has no int8 mma (compute capability below 8.0), or MP_MMA=0")
    model = model_factory("tiny", "Q4_K_M")
    tokens = _tokens(model, n_tokens)
    plan = SavePlan.parse()
    ref = NumpyForward(model).run(tokens, plan)
    monkeypatch.setattr(Kn, "MMA_MAX_TOKENS", 4)
    flt = _engine(model, backend).run(tokens, SavePlan.empty()).logits
    monkeypatch.setattr(Kn, "MMA_MAX_TOKENS", 4096)
    engine = _engine(model, backend)
    n_before = len(getattr(backend, "launches", []))
    res = engine.run(tokens, plan)
    report = _compare(ref.trace, res.trace)
    assert report.ok, f"tiny Q4_K_M, {n_tokens} tokens on the tensor cores: cupy vs numpy\n{_explain(report)}"
    r = compare_float(flt, res.logits)
    assert r.verdict is Verdict.Match, r.reason
    assert not np.array_equal(flt, res.logits)  # (the float kernels' sums are another order)
    if hasattr(backend, "launches"):
        launched = backend.launches[n_before:]
        experts = (("qmm_experts_mma<12,1,1>", "qmm_experts_mma<14,1,1>") if Kn.expert_pass8(backend, n_tokens)
                   else ("qmm_experts_mma<12,1>", "qmm_experts_mma<14>"))  # passes of 8 past 4 tokens
        for name in ("qmm_dense_mma<12,1>", "qmm_dense_mma<14,1>", *experts):
            assert name in launched, f"{name} not launched: {sorted(set(launched))}"
        assert "qmm_dense_mma<12>" not in launched and "qmm_dense_mma<14>" not in launched
        floats = [n for n in launched if n.startswith(("qmm_dense<12", "qmm_dense<14", "qmm_experts<12", "qmm_experts<14"))]
        assert not floats, floats
        assert ("norm_rope_attention" in launched) == (n_tokens <= Kn.ATTN_MAX_T), sorted(set(launched))


def test_forward_all_experts_and_partial_plans(backend, model_factory):
    model = model_factory("tiny", "Q4_K_M")
    tokens = _tokens(model, 9)
    for plan in (SavePlan.parse(experts="all"),
                 SavePlan.parse(stages="router,experts,moe_ffn_out", layers="2..4", positions="-1,0"),
                 SavePlan.parse(stages="lm_head,embedding,attn_softmax", positions="last")):
        ref = NumpyForward(model).run(tokens, plan).trace
        cand = _engine(model, backend).trace(tokens, plan)
        assert set(cand.keys()) == set(ref.keys()), f"{plan.describe()}: keys differ: {set(cand.keys()) ^ set(ref.keys())}"
        assert cand.positions == ref.positions
        report = _compare(ref, cand)
        assert report.ok, f"{plan.describe()}\n{_explain(report)}"


def test_empty_plan_captures_nothing(backend, model_factory):
    from pytest_moeparity.metrics import compare_float

    model = model_factory("tiny", "Q8_0")
    tokens = _tokens(model, 5)
    res = _engine(model, backend).run(tokens, SavePlan.empty())
    assert not res.trace.tensors
    ref = NumpyForward(model).run(tokens).logits
    r = compare_float(ref, res.logits)
    assert r.verdict is Verdict.Match, r.reason


def test_single_token_forward(backend, model_factory):
    """T == 1: the matvec kernels and the NT=1 expert kernel."""
    model = model_factory("tiny", "Q4_K_M")
    tokens = _tokens(model, 1)
    plan = SavePlan.parse()
    report = _compare(NumpyForward(model).run(tokens, plan).trace, _engine(model, backend).trace(tokens, plan))
    assert report.ok, _explain(report)


# ---- the planted historical bug ------------------------------------------------------------------------------------
def test_planted_fault_found_at_first_q4k_down_layer(backend, model_factory):
    model = model_factory("tiny", "Q4_K_M")
    down_types = [model.layer(L, "ffn_down_exps").qtype for L in range(model.config.n_layers)]
    assert Q.Q6_K in down_types and Q.Q4_K in down_types, f"the Q4_K_M mix should mix Q4_K and Q6_K: {down_types}"
    first_q4k = down_types.index(Q.Q4_K)
    tokens = _tokens(model)
    plan = SavePlan.parse()
    ref = NumpyForward(model).run(tokens, plan).trace
    cand = _engine(model, backend, fault="q4k-as-q6k").trace(tokens, plan)
    report = _compare(ref, cand)
    fd = report.first_divergence
    assert fd is not None, "the planted fault was not detected:\n" + _explain(report)
    assert fd.layer == first_q4k and (fd.stage == S.moe_ffn_out or fd.stage in EXPERT_STAGES), (
        f"expected the first divergence at layer {first_q4k} (first Q4_K ffn_down_exps; types {[t.name for t in down_types]}) "
        f"in moe_ffn_out or moe_expert_*\n{_explain(report)}")
    # every layer before it is clean, including the router of the faulty layer
    before = [c for c in report.cells if c.layer is not None and c.layer < first_q4k]
    assert before and all(c.verdict is Verdict.Match for c in before)
    assert cand.meta.get("fault") == "q4k-as-q6k"


def test_fault_switch_is_harmless_without_q4k(backend, model_factory):
    """On a file whose ffn_down_exps are all Q6_K the switch changes nothing, bit for bit."""
    model = model_factory("tiny", "Q6_K")
    assert all(model.layer(L, "ffn_down_exps").qtype == Q.Q6_K for L in range(model.config.n_layers))
    tokens = _tokens(model, 6)
    plan = SavePlan.parse(stages="moe_ffn_out,experts,lm_head")
    a = _engine(model, backend).trace(tokens, plan)
    b = _engine(model, backend, fault="q4k-as-q6k").trace(tokens, plan)
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        assert np.array_equal(a[key], b[key]), key


def test_fault_switch_rejects_unknown_names(backend, model_factory):
    with pytest.raises(ValueError, match="q4k-as-q6k"):
        _engine(model_factory("tiny", "Q8_0"), backend, fault="q6k-as-q4k")


# ---- precision modes --------------------------------------------------------------------------------------------------
def test_f16_matches_numpy_f16(backend, model_factory):
    """cupy-f16 vs numpy-f16 (the same float16 rounding after every op) under the default thresholds."""
    model = model_factory("tiny", "Q4_K_M")
    tokens = _tokens(model)
    plan = SavePlan.parse()
    ref = NumpyForward(model, name="numpy-f16", **NUMPY_BACKENDS["numpy-f16"]).run(tokens, plan).trace
    cand = _engine(model, backend, act_dtype="float16").trace(tokens, plan)
    assert cand.meta["act_dtype"] == "float16" and cand.meta["backend"] == "cupy-f16"
    _assert_parity_or_routing_cascade(_compare(ref, cand), "cupy-f16 vs numpy-f16")


class _NumpyBf16(NumpyForward):
    """The NumPy reference with activations rounded to bfloat16 (RNE) after every op."""

    def _a(self, x):
        return _bf16_numpy(x)


# bf16 vs float32. bfloat16 keeps 8 significand bits: unit roundoff u = 2**-9 ~ 2e-3. With the
# activations rounded after every op a stage's relative error is a few u and grows slowly with
# depth (on these models 2e-3 at layer 0 to ~1.5e-2 by the last layers, before any routing flip).
# max_rel_l2 0.05 (~25 u) keeps 3x margin over that; cosine 0.998 corresponds to ~6 % error.
# Router probabilities carry ~1 % relative noise (~2e-3 absolute near 0.2), so a swap of experts
# within 0.02 probability counts as a near-tie. Divergence downstream of a routing flip is allowed.
BF16_VS_F32 = dict(min_cosine=0.998, max_rel_l2=0.05, router_tie_tol=0.02)


def test_bf16_matches_numpy_bf16_emulation(backend, model_factory):
    """cupy-bf16 vs the NumPy reference rounding to bf16 the same way. Both round after every op,
    so layer 0 up to the router agrees to the default thresholds (in practice bit for bit); later,
    the two pipelines' float32 differences flip roundings and the noise is that of bf16 (see
    BF16_VS_F32)."""
    model = model_factory("tiny", "Q4_K_M")
    tokens = _tokens(model)
    plan = SavePlan.parse()
    ref = _NumpyBf16(model, name="numpy-bf16-emulated").run(tokens, plan).trace
    cand = _engine(model, backend, act_dtype="bfloat16").trace(tokens, plan)
    for key in cand.keys():
        v = cand[key]
        if v.dtype == np.float32:
            assert np.array_equal(_bf16_numpy(v).view(np.uint32), v.view(np.uint32)), f"{key} holds non-bf16 values"
    strict = _compare(ref, cand)
    layer0 = [c for c in strict.cells if c.layer in (None, 0) and c.stage not in POST_ROUTER_STAGES
              and c.stage not in (S.final_norm, S.lm_head)]
    assert layer0 and all(c.verdict is Verdict.Match for c in layer0), _explain(strict)
    report = _compare(ref, cand, Thresholds.from_contract(**BF16_VS_F32))
    _assert_parity_or_routing_cascade(report, "cupy-bf16 vs numpy with bf16 activations (bf16 thresholds)")


def test_bf16_close_to_numpy_f32(backend, model_factory):
    model = model_factory("tiny", "Q4_K_M")
    tokens = _tokens(model)
    plan = SavePlan.parse()
    ref = NumpyForward(model).run(tokens, plan).trace
    cand = _engine(model, backend, act_dtype="bfloat16").trace(tokens, plan)
    report = _compare(ref, cand, Thresholds.from_contract(**BF16_VS_F32))
    _assert_parity_or_routing_cascade(report, "cupy-bf16 vs numpy float32 (bf16 thresholds)")
    layer0 = [c for c in report.cells if c.layer == 0 and c.stage not in POST_ROUTER_STAGES]
    assert layer0 and all(c.verdict is Verdict.Match for c in layer0), _explain(report)


# ---- weights: cache, streaming, memory errors ---------------------------------------------------------------------------
def test_weights_uploaded_once_per_model(backend, model_factory):
    from pytest_moeparity.gpu import upload_stats

    model = model_factory("tiny", "Q5_K_M")
    tokens = _tokens(model, 4)
    e1 = _engine(model, backend)
    e1.trace(tokens, SavePlan.empty())
    assert e1.weights.uploads > 0 and e1.weights.mode == "resident"
    before = upload_stats()
    e2 = _engine(model, backend, act_dtype="float16")
    e2.trace(tokens, SavePlan.parse(stages="lm_head"))
    e1.trace(tokens, SavePlan.empty())
    assert upload_stats() == before, f"a second engine re-uploaded weights: {before} -> {upload_stats()}"
    assert e2.weights is e1.weights


@pytest.mark.parametrize("n_tokens", [7, 3])  # 3: resident, the layer boundaries' launches write the next norms
def test_streaming_mode_gives_identical_traces(backend, model_factory, tmp_path, monkeypatch, n_tokens):
    """Streaming (layer by layer, the head in chunks) gives the resident forward's trace bit for bit; at 3
    tokens the resident forward folds each layer boundary into one launch and the head's chunks share one
    set of digits, the streaming one does neither."""
    from pytest_moeparity.gpu import weights as W
    from pytest_moeparity.model import load_model

    src = model_factory("tiny", "Q4_K_M")
    copy = tmp_path / "stream-copy.gguf"
    shutil.copy(src.path, copy)  # another file: its own cache entry
    model = load_model(copy)
    monkeypatch.setattr(W, "LM_HEAD_CHUNK_BYTES", 40_000)  # several output chunks
    tokens = _tokens(model, n_tokens)
    plan = SavePlan.parse(experts="all")
    resident = _engine(src, backend).trace(tokens, plan)
    eng = _engine(model, backend, streaming=True)
    streamed = eng.trace(tokens, plan)
    assert eng.weights.mode == "streaming" and streamed.meta["weights_mode"] == "streaming"
    assert not any(n.startswith("blk.") for n in eng.weights.tensors), "streaming kept layer tensors after the forward"
    assert set(resident.keys()) == set(streamed.keys())
    for key in resident.keys():
        assert np.array_equal(resident[key], streamed[key]), key


def test_out_of_memory_is_a_clear_error(backend, model_factory, tmp_path):
    from pytest_moeparity.gpu import GpuMemoryError
    from pytest_moeparity.gpu import weights as W
    from pytest_moeparity.model import load_model

    copy = tmp_path / "oom-copy.gguf"
    shutil.copy(model_factory("tiny", "Q8_0").path, copy)
    model = load_model(copy)
    if backend.name == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        old = pool.get_limit()
        pool.set_limit(size=256 * 1024)
        try:
            with pytest.raises(GpuMemoryError) as info:
                _engine(model, backend).trace(_tokens(model, 4), SavePlan.empty())
        finally:
            pool.set_limit(size=old)
    else:
        class _Tight(type(backend)):
            def to_device(self, host):
                if np.asarray(host).nbytes > 100_000:
                    raise MemoryError(f"emulated OOM allocating {np.asarray(host).nbytes} bytes")
                return super().to_device(host)

        tight = _Tight()
        with pytest.raises(GpuMemoryError) as info:
            _engine(model, tight).trace(_tokens(model, 4), SavePlan.empty())
    msg = str(info.value)
    assert "MiB" in msg and "free" in msg and "need" in msg, msg
    W.clear_cache()


def test_type_without_kernel_falls_back_to_host_f32(backend, model_factory):
    """A tensor of a type without a kernel (here Q4_1) is dequantized on the host and uploaded as F32,
    with one RuntimeWarning per type."""
    from pytest_moeparity.gpu import kernels as K
    from pytest_moeparity.gpu import weights as W
    from pytest_moeparity.model import QTensor

    assert Q.Q4_1 not in K.KERNEL_QTYPES
    rng = _rng("fallback")
    vals = rng.standard_normal((11, 64)).astype(np.float32)
    raw = np.asarray(gq.quantize(vals, Q.Q4_1), dtype=np.uint8)
    qt = QTensor("blk.0.fake_q4_1.weight", Q.Q4_1, (11, 64), raw)
    dw = W.DeviceWeights(model_factory("tiny", "Q8_0"), backend, streaming=False)
    W._WARNED.discard(Q.Q4_1)
    with pytest.warns(RuntimeWarning, match="Q4_1"):
        dt = dw._upload(qt)
    assert dt.qtype == Q.F32 and dt.source_qtype == Q.Q4_1 and dt.shape == (11, 64)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    got = _host(backend, K.qmatmul(_dev(backend, x), dt, backend=backend))
    want = x.astype(np.float64) @ _deq(raw, Q.Q4_1, (11, 64)).astype(np.float64).T
    _assert_close(got, want, "Q4_1 via host F32 fallback")


# ---- engine protocol modes: planted faults, forced routing, isolated layers --------------------------------
def _assert_same_verdicts_as_reference(report, what: str) -> None:
    """Match everywhere, except cells where both sides carry the same planted non-finite values."""
    bad = []
    for c in report.cells:
        m = c.result.metrics
        same_nonfinite = (c.verdict is Verdict.NanBoth and m.get("ref_nan") == m.get("cand_nan")
                          and m.get("ref_inf") == m.get("cand_inf"))
        if c.verdict is not Verdict.Match and not same_nonfinite:
            bad.append(c)
    assert not bad, f"{what}: {len(bad)} cells differ, first {bad[0].label()}: {bad[0].result.reason}\n{_explain(report)}"


FAULT_SPECS = [
    "nan@3:moe_ffn_out",
    "scale=2@2:attn_out;inf@5:moe_expert_out#1;zero@1:moe_expert_gate",
    "add=0.5@embedding;scale=-1@6:moe_expert_swiglu",
    "scale=3@2:attn_scores;add=0.01@4:attn_softmax",  # these layers leave the one-launch attention
    "scale=1.5@1:q_norm;add=0.02@3:k_norm",  # and these the one-launch q/k norm + RoPE
    "add=0.3@2:moe_router_probs",             # and this the one-launch router
    "add=0.5@1:post_attn_residual",           # and this the residual add + ffn_norm launch (not scale: RMSNorm ignores it)
    "dispatch=q6_k@*:ffn_down_exps",
    "dispatch=q8_0@2:attn_q;dispatch=bf16@3:ffn_gate_inp;dispatch=q8_0@4:attn_norm",
    # inputs of the tensor-core products (short prompts): the digits must be those of the faulted value
    "add=0.5@1:attn_norm;add=0.25@3:ffn_norm;scale=-2@2:moe_expert_swiglu#3;scale=3@4:moe_expert_swiglu",
]


@pytest.mark.parametrize("n_tokens", [3, 8])  # 3: the tensor-core products (Q4_K, 2-4 tokens)
@pytest.mark.parametrize("spec", FAULT_SPECS)
def test_planted_faults_like_reference(backend, model_factory, spec, n_tokens):
    """--moe-inject faults (faults.py) act on the GPU forward exactly as on the reference."""
    from pytest_moeparity.faults import parse_faults

    model = model_factory("tiny", "Q4_K_M")
    faults = parse_faults(spec)
    tokens = _tokens(model, n_tokens)
    plan = SavePlan.parse()
    ref = NumpyForward(model).run(tokens, plan, faults=faults).trace
    cand = _engine(model, backend).trace(tokens, plan, faults=faults)
    assert cand.meta.get("faults") == ref.meta.get("faults")
    _assert_same_verdicts_as_reference(_compare(ref, cand), f"faults {spec}")


def test_forced_routing_like_reference(backend, model_factory):
    model = model_factory("tiny", "Q4_K_M")
    E = model.config.n_experts
    tokens = _tokens(model, 8)
    plan = SavePlan.parse()
    base = NumpyForward(model).run(tokens, plan).trace
    forced = {L: (base[f"layer.{L}.moe_router_indices"] + L) % E for L in (0, 2, 5)}  # layer 0: unchanged
    ref = NumpyForward(model).run(tokens, plan, forced_routing=forced).trace
    cand = _engine(model, backend).trace(tokens, plan, forced_routing=forced)
    assert cand.meta.get("forced_routing") == "reference"
    for L, ids in forced.items():
        assert np.array_equal(cand[f"layer.{L}.moe_router_indices"], ids.astype(np.int32))
    report = _compare(ref, cand)
    assert report.ok, _explain(report)


def test_isolated_layers_like_reference(backend, model_factory):
    model = model_factory("tiny", "Q5_K_M")
    tokens = _tokens(model, 8)
    plan = SavePlan.parse()
    base = NumpyForward(model).run(tokens, plan).trace
    inputs = {L: base[f"layer.{L - 1}.post_ffn_residual"] for L in (1, 6)}
    ref = NumpyForward(model).run(tokens, plan, layer_inputs=inputs)
    res = _engine(model, backend).run(tokens, plan, layer_inputs=inputs)
    assert res.trace.meta.get("mode") == "isolated" and res.logits.shape == (len(tokens), 0)
    assert {k.split(".")[1] for k in res.trace.keys()} == {"1", "6"}
    report = _compare(ref.trace, res.trace)
    assert report.ok, _explain(report)


def test_engine_supports_every_protocol_mode(backend, model_factory):
    from pytest_moeparity.backends import MODES, supported_modes

    assert supported_modes(_engine(model_factory("tiny", "Q8_0"), backend)) == frozenset(MODES)


def test_programmatic_dependent_launch_changes_no_bit(backend, model_factory):
    """Kernels launched with programmatic dependent launch (each may start during its predecessor's
    last wave and waits in mp_grid_sync) give the ordinary launches' logits bit for bit, eager and
    replayed from a CUDA graph, and it is on by default on an sm_90 GPU."""
    if backend.name != "cupy":
        pytest.skip("programmatic dependent launch needs the CuPy backend")
    import os

    from pytest_moeparity.gpu import CupyEngine
    from pytest_moeparity.gpu import kernels as K
    from pytest_moeparity.gpu.pdl import PDL_ENV

    import cupy

    cc = int(cupy.cuda.Device().compute_capability)
    if cc >= 90 and os.environ.get(PDL_ENV, "1") != "0":
        assert backend.pdl, f"PDL is off on an sm_{cc} GPU: {backend.pdl_off}"
    model = model_factory("small", "Q4_K_M")
    tokens = [5, 17, 3, 99, 250, 7, 11]
    old_debug, old_pdl = K.set_debug(False), backend.pdl
    results = {}
    try:
        for on in (True, False):
            backend.set_pdl(on)
            eng = CupyEngine(model, backend=backend)
            eager = eng.run(tokens).logits
            g = eng.graphed(tokens[:3])
            g.logits.fill(np.nan)
            g.replay()
            g.stream.synchronize()
            results[on] = (np.asarray(eager), backend.asnumpy(g.logits))
    finally:
        backend.set_pdl(old_pdl)
        K.set_debug(old_debug)
    for a, b, what in zip(results[True], results[False], ("eager", "graph")):
        assert np.isfinite(a).all(), what
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{what}: max diff {np.abs(a - b).max()}"


def test_backend_variant_shares_the_weights_and_runs_its_own_kernels(backend, model_factory):
    """backend.variant(switches): the kernels built again with kernels.cu switches added, the device
    weights shared (one upload serves both: benchmarks/bench_ab.py times the two builds in one process).
    The top-k's float warp maxima (MP_TOPK_REDUX=0) and the attention's narrow rows give the default
    build's forward bit for bit, launched through the variant alone."""
    from pytest_moeparity.gpu import CupyEngine
    from pytest_moeparity.gpu import kernels as K

    model = model_factory("tiny", "Q4_K_M")
    tokens = [5, 17, 3, 99, 250, 7]
    var = backend.variant("-DMP_TOPK_REDUX=0 -DMP_ATTN_WIDE=0")
    assert var.extra_options == backend.extra_options + ("-DMP_TOPK_REDUX=0", "-DMP_ATTN_WIDE=0")
    assert var.weights_owner is backend.weights_owner and var is not backend
    assert (var.lib is not backend.lib) if backend.name == "emulator" else (var.module is not backend.module)
    base_eng, var_eng = CupyEngine(model, backend=backend), CupyEngine(model, backend=var)
    assert var_eng.weights is base_eng.weights  # no second upload
    want = backend.asnumpy(base_eng.run(tokens).logits)
    n_base = len(getattr(backend, "launches", []))
    got = var.asnumpy(var_eng.run(tokens).logits)
    if backend.name == "emulator":  # every launch of the variant's forward went through its own library
        assert len(backend.launches) == n_base and "moe_route" in var.launches
    assert np.isfinite(got).all()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"max diff {np.abs(got - want).max()}"
    with pytest.raises(ValueError, match="reads MP_WARPS at import"):
        backend.variant("-DMP_WARPS=2")


def test_graphed_forward_replays_the_eager_forward(backend, model_factory):
    """The CUDA-graph path (used to time kernels without launch overhead) computes the same logits."""
    if backend.name != "cupy":
        pytest.skip("CUDA graphs need the CuPy backend")
    from pytest_moeparity.gpu import CupyEngine
    from pytest_moeparity.gpu import kernels as K

    model = model_factory("tiny", "Q4_K_M")
    tokens = [5, 17, 3, 99, 250, 7]
    old = K.set_debug(False)
    try:
        eng = CupyEngine(model, backend=backend)
        eager = eng.run(tokens).logits
        g = eng.graphed(tokens)
        g.logits.fill(np.nan)  # poisoned: the replay must rewrite every element
        for _ in range(3):
            g.replay()
        g.stream.synchronize()
        got = backend.asnumpy(g.logits)
    finally:
        K.set_debug(old)
    assert np.isfinite(got).all()
    rel = np.linalg.norm(got - eager) / np.linalg.norm(eager)
    assert rel < 1e-6, rel
