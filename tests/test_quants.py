"""Tests of :mod:`pytest_moeparity.quants` (CPU only, a few seconds).

gguf-py's dequantizer is the reference reader: what :func:`quants.quantize` writes must
read back through ``gguf.quants.dequantize`` close to the input, and our own decoders must
agree with gguf's bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from pytest_moeparity import quants

K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)

# Relative L2 error ||gguf_dequantize(quantize(x)) - x|| / ||x|| on normal data: (low, high).
# Measured over 20 seeds x 4 shapes x 3 scales (1e-2 .. 3e2), min / mean / max:
#   F16   1.9e-4 / 2.1e-4 / 2.2e-4      Q4_0  7.7e-2 / 8.6e-2 / 9.1e-2
#   BF16  1.5e-3 / 1.7e-3 / 1.8e-3      Q4_K  6.8e-2 / 7.2e-2 / 7.6e-2
#   Q8_0  4.9e-3 / 5.3e-3 / 5.7e-3      Q5_K  3.3e-2 / 3.6e-2 / 3.8e-2
#   F32   0 (exact)                      Q6_K  1.6e-2 / 1.7e-2 / 1.8e-2
# These are at the level the formats allow (uniform rounding over a 32- or 16-value block's
# range); e.g. Q6_K's 64 levels over the +-2.1 sigma of 16 normal values cannot get below
# ~1.6e-2.  ``high`` leaves ~20-30% margin; ``low`` (about half the minimum) proves the
# value really went through the lossy format.
BOUNDS: dict[T, tuple[float, float]] = {
    T.F32: (0.0, 0.0),
    T.F16: (1e-4, 3e-4),
    T.BF16: (7e-4, 2.5e-3),
    T.Q8_0: (2.5e-3, 7e-3),
    T.Q4_0: (4e-2, 0.11),
    T.Q4_K: (3.5e-2, 9e-2),
    T.Q5_K: (1.7e-2, 4.5e-2),
    T.Q6_K: (8e-3, 2.2e-2),
}

SHAPES = [(2048,), (6, 512), (3, 4, 768)]  # 1-D, [rows, cols], [experts, rows, cols]


def _rel_l2(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm((y - x).ravel()) / np.linalg.norm(x.ravel()))


def _normal(shape, seed=0, scale=1.0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    return x.astype(np.float32)


def _gguf_readable() -> list[T]:
    """Every type gguf-py can dequantize (probed with one zero block)."""
    out = []
    for t in T:
        bs, ts = GGML_QUANT_SIZES[t]
        try:
            gq.dequantize(np.zeros((1, ts), dtype=np.uint8), t)
        except NotImplementedError:
            continue
        out.append(t)
    return out


GGUF_READABLE = _gguf_readable()


def _bits(a: np.ndarray) -> np.ndarray:
    assert a.dtype == np.float32
    return a.view(np.uint32)


# --------------------------------------------------------------------------- geometry


def test_quantizable_types_and_bounds_cover_each_other():
    assert set(quants.QUANTIZABLE) == set(BOUNDS)
    assert set(K_TYPES) <= set(quants.QUANTIZABLE)


@pytest.mark.parametrize("qtype,bs,ts", [
    (T.F32, 1, 4), (T.F16, 1, 2), (T.BF16, 1, 2), (T.Q8_0, 32, 34), (T.Q4_0, 32, 18),
    (T.Q4_K, 256, 144), (T.Q5_K, 256, 176), (T.Q6_K, 256, 210),
])
def test_block_geometry(qtype, bs, ts):
    assert quants.block_size(qtype) == bs
    assert quants.type_size(qtype) == ts
    assert quants.row_nbytes(qtype, 4 * bs) == 4 * ts
    assert quants.row_nbytes(qtype.name.lower(), 0) == 0


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("scale", [1.0, 0.02])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("qtype", quants.QUANTIZABLE, ids=lambda t: t.name)
def test_round_trip_through_gguf(qtype, shape, scale):
    seed = 10 * quants.QUANTIZABLE.index(qtype) + SHAPES.index(shape)
    x = _normal(shape, seed=seed, scale=scale)
    raw = quants.quantize(x, qtype)
    assert raw.dtype == np.uint8
    assert raw.shape == (*shape[:-1], quants.row_nbytes(qtype, shape[-1]))

    y = gq.dequantize(raw, qtype)
    assert y.shape == x.shape
    err = _rel_l2(y, x)
    low, high = BOUNDS[qtype]
    assert err <= high, f"{qtype.name}: relative L2 error {err:.3e} > {high:.1e}"
    if high > 0:
        assert err >= low, f"{qtype.name}: relative L2 error {err:.3e} suspiciously small"


def test_k_quant_error_ranks_with_bit_width():
    x = _normal((8, 1024), seed=7)
    errs = [_rel_l2(gq.dequantize(quants.quantize(x, t), t), x) for t in K_TYPES]
    assert errs[0] > 1.6 * errs[1] > 1.6 * 1.6 * errs[2], errs  # each extra bit ~halves it


def test_k_quants_beat_the_legacy_4bit_format():
    x = _normal((8, 1024), seed=8)
    e_q4_0 = _rel_l2(gq.dequantize(quants.quantize(x, T.Q4_0), T.Q4_0), x)
    e_q4_k = _rel_l2(gq.dequantize(quants.quantize(x, T.Q4_K), T.Q4_K), x)
    assert e_q4_k < 0.9 * e_q4_0


def test_f32_is_exact_and_f16_bf16_match_numpy_casts():
    x = _normal((3, 64), seed=1)
    assert np.array_equal(quants.dequantize(quants.quantize(x, T.F32), T.F32), x)
    f16 = quants.quantize(x, T.F16)
    assert np.array_equal(f16.view(np.float16), x.astype(np.float16))
    bf16 = quants.quantize(x, "bf16")
    assert np.array_equal(bf16, gq.quantize(x, T.BF16).view(np.uint8))


# --------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("qtype", quants.QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_equals_gguf_on_quantized_data(qtype):
    x = _normal((3, 2, 512), seed=2)
    raw = quants.quantize(x, qtype)
    ours, theirs = quants.dequantize(raw, qtype), gq.dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    assert np.array_equal(_bits(ours), _bits(np.asarray(theirs, dtype=np.float32)))


@pytest.mark.parametrize("qtype", GGUF_READABLE, ids=lambda t: t.name)
def test_dequantize_equals_gguf_on_random_bytes(qtype):
    """Random bytes exercise every bit of the layout (our K decoders are our own code)."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(2, 3, 4 * ts), dtype=np.uint8)
    if qtype in K_TYPES:  # keep the f16 scales finite so the comparison means something
        d_at = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}[qtype]
        blocks = raw.reshape(-1, ts)
        for off in d_at:
            d = rng.uniform(-2, 2, size=blocks.shape[0]).astype("<f2")
            blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    with np.errstate(invalid="ignore", over="ignore"):  # random f16 scales: inf/NaN
        ours = quants.dequantize(raw, qtype)
        theirs = np.asarray(gq.dequantize(raw, qtype), dtype=np.float32)
    assert ours.shape == (2, 3, 4 * bs)
    assert np.array_equal(_bits(ours), _bits(theirs))
    if qtype in K_TYPES:
        assert np.isfinite(ours).all() and np.abs(ours).max() > 0


def test_dequantize_returns_a_copy_and_accepts_float_arrays():
    x = _normal((2, 8), seed=3)
    raw = quants.quantize(x, T.F32)
    y = quants.dequantize(raw, T.F32)
    y[...] = 0
    assert np.array_equal(raw.view(np.float32), x)  # raw untouched
    h = x.astype(np.float16)
    assert np.array_equal(quants.dequantize(h, T.F16), h.astype(np.float32))


@pytest.mark.parametrize("qtype", [t for t in T if t not in GGUF_READABLE], ids=lambda t: t.name)
def test_dequantize_unsupported_type_raises(qtype):
    ts = GGML_QUANT_SIZES[qtype][1]
    with pytest.raises(ValueError, match=qtype.name):
        quants.dequantize(np.zeros((1, ts), dtype=np.uint8), qtype)


def test_dequantize_bad_byte_count_raises():
    with pytest.raises(ValueError, match="144"):
        quants.dequantize(np.zeros((2, 150), dtype=np.uint8), T.Q4_K)


# --------------------------------------------------------------------------- hard data


OUTLIER_AT = [5, 300, 600, 777]  # different sub-blocks and super-blocks of row 0
OUTLIERS = [150.0, -100.0, 120.0, -130.0]  # ~100x the row's standard deviation


@pytest.mark.parametrize("qtype", quants.QUANTIZABLE, ids=lambda t: t.name)
def test_outliers_zero_rows_and_constant_rows(qtype):
    n = 1024
    x = _normal((6, n), seed=4)
    x[0, OUTLIER_AT] = OUTLIERS
    x[1] = 0.0
    x[2] = 0.7
    x[3] = -1.3
    x[4, :256] = 0.0  # one zero super-block next to normal ones
    raw = quants.quantize(x, qtype)
    y = gq.dequantize(raw, qtype)

    assert np.isfinite(y).all()
    assert np.array_equal(quants.dequantize(raw, qtype), y)
    assert np.all(y[1] == 0) and np.all(y[4, :256] == 0), "zeros must come back as zeros"
    tol = 4e-3 if BOUNDS[qtype][1] else 0.0  # constants cost only the f16/bf16 rounding
    assert np.allclose(y[2], 0.7, rtol=tol, atol=0)
    assert np.allclose(y[3], -1.3, rtol=tol, atol=0)
    # An outlier is its block's extreme, so it comes back well.  Its block neighbours lose
    # most of their precision (the format's limit: the scale serves the outlier), so row 0
    # gets only a loose bound (measured 0.013 for Q8_0 .. 0.053 for Q4_K); other rows and
    # other blocks are unhurt.
    assert np.allclose(y[0, OUTLIER_AT], OUTLIERS, rtol=0.01)
    assert _rel_l2(y[0], x[0]) <= 0.08
    assert _rel_l2(y[5], x[5]) <= BOUNDS[qtype][1]
    assert _rel_l2(y[4, 256:], x[4, 256:]) <= BOUNDS[qtype][1]


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_positive_only_blocks(qtype):
    x = np.abs(_normal((2, 512), seed=5)) + 3.0  # all > 0: the mins clamp at 0
    y = gq.dequantize(quants.quantize(x, qtype), qtype)
    assert _rel_l2(y, x) <= BOUNDS[qtype][1]


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_tiny_values_degrade_gracefully(qtype):
    """Super-block scales are f16 (smallest subnormal 6e-8): 1e-5 weights still quantize
    well; 1e-8 ones cannot be represented, but must come back no worse than zeros."""
    x = _normal((2, 512), seed=6, scale=1e-5)
    y = gq.dequantize(quants.quantize(x, qtype), qtype)
    assert _rel_l2(y, x) <= 1.5 * BOUNDS[qtype][1]
    x = _normal((2, 512), seed=6, scale=1e-8)
    y = gq.dequantize(quants.quantize(x, qtype), qtype)
    assert np.isfinite(y).all() and _rel_l2(y, x) <= 1.0 + 1e-6


# --------------------------------------------------------------------------- chunking, dtypes


@pytest.mark.parametrize("qtype", quants.QUANTIZABLE, ids=lambda t: t.name)
def test_result_does_not_depend_on_chunking(qtype, monkeypatch):
    x = _normal((5, 1792), seed=9)  # 35 super-blocks
    whole = quants.quantize(x, qtype)
    monkeypatch.setattr(quants, "_CHUNK_VALUES", 1000)  # many chunks, a short last one
    assert np.array_equal(quants.quantize(x, qtype), whole)
    assert np.array_equal(quants.dequantize(whole, qtype), gq.dequantize(whole, qtype))


def test_input_dtypes_layouts_and_names():
    x = _normal((512, 4), seed=10)
    xt = x.T  # non-contiguous
    ref = quants.quantize(np.ascontiguousarray(xt), T.Q4_K)
    assert np.array_equal(quants.quantize(xt, T.Q4_K), ref)
    assert np.array_equal(quants.quantize(xt.astype(np.float64), "q4_k"), ref)
    assert np.array_equal(quants.quantize(xt, int(T.Q4_K)), ref)
    h = xt.astype(np.float16)
    assert np.array_equal(quants.quantize(h, T.Q6_K), quants.quantize(h.astype(np.float32), T.Q6_K))
    assert quants.quantize(np.zeros((0, 256), np.float32), T.Q5_K).shape == (0, 176)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [100, 255, 384])
def test_row_not_a_multiple_of_the_block_raises(qtype, n):
    with pytest.raises(ValueError, match="block size 256"):
        quants.quantize(np.ones((2, n), np.float32), qtype)
    with pytest.raises(ValueError, match="256"):
        quants.row_nbytes(qtype, n)


def test_row_not_a_multiple_of_32_raises_for_q8_0():
    with pytest.raises(ValueError, match="block size 32"):
        quants.quantize(np.ones(48, np.float32), T.Q8_0)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_1, T.IQ4_NL, T.Q8_K, T.I32])
def test_unsupported_quantize_type_raises(qtype):
    with pytest.raises(ValueError, match="supported: .*Q4_K") as exc:
        quants.quantize(np.ones(256, np.float32), qtype)
    assert qtype.name in str(exc.value)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="unknown GGML quantization type"):
        quants.quantize(np.ones(256, np.float32), 9999)
    with pytest.raises(ValueError, match="axis"):
        quants.quantize(np.float32(1.0), T.F32)
    with pytest.raises(TypeError):
        quants.quantize(np.ones(256, dtype=complex), T.Q4_K)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("qtype", list(T), ids=lambda t: t.name)
def test_qtype_from_name_round_trip(qtype):
    assert quants.qtype_from_name(qtype.name) is qtype
    assert quants.qtype_from_name(qtype.name.lower()) is qtype
    assert quants.qtype_from_name(f" {qtype.name.swapcase()} ") is qtype


@pytest.mark.parametrize("bad", ["q4k", "", "Q4_K_M", "float32"])
def test_qtype_from_name_error_lists_valid_names(bad):
    with pytest.raises(ValueError, match=r"valid names: .*Q4_K.*Q6_K.*BF16"):
        quants.qtype_from_name(bad)
