"""NumPy quantizers and dequantizers for the GGML types used to write test GGUF models.

``gguf`` (gguf-py) dequantizes every GGML type but quantizes only BF16, Q4_0, Q4_1, Q5_0,
Q5_1 and Q8_0.  This module adds vectorized quantizers for the k-quants **Q4_K, Q5_K and
Q6_K** whose bytes follow llama.cpp's block layouts (``block_q4_K`` & co. in ggml-common.h),
so ``gguf.quants.dequantize(quantize(x, t), t)`` and llama.cpp itself read them back.  The
values chosen need not match llama.cpp's ``quantize_row_*_ref`` bit for bit (its search is
different), only the format does.

Public API
----------
``quantize(values, qtype)``
    float array ``[..., n]`` -> uint8 array ``[..., n // block_size * type_size]``.
``dequantize(raw, qtype)``
    uint8 array ``[..., nbytes]`` -> float32 array ``[..., n]``, for every type gguf reads.
``block_size(qtype)``, ``type_size(qtype)``, ``row_nbytes(qtype, n)``
    Geometry from :data:`gguf.constants.GGML_QUANT_SIZES`.
``QUANTIZABLE``
    The types :func:`quantize` writes.
``qtype_from_name(name)``
    ``"q4_k"`` / ``"Q8_0"`` / ``"bf16"`` ... -> :class:`GGMLQuantizationType`.

Each quant type is one class holding ``quantize_blocks`` and ``dequantize_blocks`` side by
side, so the byte layout is written down once in each direction.  All work is vectorized
over blocks; the public functions feed the classes chunks of blocks (2 MiB of float32)
with reused work buffers, so the chunk loop neither pays NumPy's per-call overhead too
often nor page-faults on fresh temporaries.  One core quantizes ~30-40 M values/s for
each k-quant (normal data, 64 M values).

Quality (relative L2 error on normal data): Q4_K 0.072, Q5_K 0.036, Q6_K 0.017 -- the
level uniform rounding over a 32/16-value block's range allows.  All-zero blocks come back
as zeros, constant blocks to f16 precision.  The super-block scales are float16, so
magnitudes below ~1e-6 lose precision (they come back no worse than zeros) and above ~1e7
overflow.  Non-finite inputs are not supported: they make the block's scales NaN/inf,
which shows up as NaN/inf when the block is read back.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import quants as _gq
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

__all__ = [
    "QUANTIZABLE",
    "block_size",
    "dequantize",
    "qtype_from_name",
    "quantize",
    "row_nbytes",
    "type_size",
]

_QT = GGMLQuantizationType

# Values handed to one ``quantize_blocks`` call (2 MiB of float32).  Bigger chunks amortize
# the per-call overhead of the ~100 NumPy calls a chunk takes; past ~1 Mi values the
# temporaries fall out of cache.
_CHUNK_VALUES = 1 << 19

_F32 = np.float32
_U8 = np.uint8


# --------------------------------------------------------------------------- helpers


class _Scratch:
    """Work buffers reused across the chunks of one :func:`quantize` call.

    Allocating the big per-chunk temporaries afresh makes glibc hand memory back to the
    kernel and fault it in again, chunk after chunk; that cost about a third of the run
    time, so the quantizers put every chunk-sized temporary in one of these buffers.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self._bufs.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._bufs[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


def _f16_ceil(a: np.ndarray) -> np.ndarray:
    """Non-negative ``a`` rounded *up* to a float16, returned as float32 (what a reader sees).

    Rounding the super-block scale up keeps ``a / d`` within the 6/8-bit code range (no
    clipping of the largest sub-block scale) and keeps ``d > 0`` whenever ``a > 0``, also
    where ``a`` is below float16's smallest subnormal (tiny weights degrade, not vanish).
    """
    h = a.astype(np.float16)
    h = np.where(h.astype(_F32) < a, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(_F32)


def _safe_recip(a: np.ndarray) -> np.ndarray:
    """``1 / a`` where ``a != 0``, else 0 (so zero scales give zero quants, never NaN)."""
    out = np.zeros_like(a)
    np.divide(1, a, out=out, where=a != 0)
    return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den != 0``, else 0."""
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=_F32)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _rowsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis.  A BLAS matrix-vector product with ones is 3-5x faster than
    ``a.sum(-1)`` for the short (16/32) sub-block rows reduced here."""
    return a @ np.ones(a.shape[-1], dtype=a.dtype)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product over the last axis."""
    return np.einsum("...i,...i->...", a, b)


def _round_clip(q: np.ndarray, lo: float, hi: float) -> None:
    """In place: round half to even, then clamp to ``[lo, hi]``."""
    np.rint(q, out=q)
    np.clip(q, _F32(lo), _F32(hi), out=q)


def _to_u8(q: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Integral float32 ``q`` in ``0..255`` -> uint8, written to ``buf``."""
    np.copyto(buf, q, casting="unsafe")
    return buf


def _put_f16(out: np.ndarray, offset: int, value: np.ndarray) -> None:
    """Store float32 ``value`` (one per block) as little-endian float16 at byte ``offset``."""
    out[:, offset:offset + 2] = value.astype("<f2").view(_U8).reshape(-1, 2)


def _get_f16(raw: np.ndarray, offset: int) -> np.ndarray:
    """Read one little-endian float16 per block at byte ``offset``, as float32 ``[B, 1]``."""
    return np.ascontiguousarray(raw[:, offset:offset + 2]).view("<f2").astype(_F32)


def _pack_nibbles(q: np.ndarray, dst: np.ndarray, s: _Scratch) -> None:
    """4-bit ``q`` uint8 ``[B, 8, 32]`` -> the 128 ``qs`` bytes of Q4_K/Q5_K, ``dst [B, 128]``.

    Byte ``l`` of 32-byte group ``g`` holds value ``l`` of sub-block ``2g`` in its low nibble
    and value ``l`` of sub-block ``2g + 1`` in its high nibble.
    """
    nb = q.shape[0]
    q = q.reshape(nb, 4, 2, 32)
    high = np.left_shift(q[:, :, 1], 4, out=s("nib", (nb, 4, 32), _U8))
    np.bitwise_or(q[:, :, 0], high, out=dst.reshape(nb, 4, 32))


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_nibbles`: ``[B, 128]`` bytes -> uint8 ``[B, 8, 32]``."""
    nib = (qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=_U8).reshape(1, 1, 2, 1)) & 0x0F
    return nib.reshape(-1, 8, 32)


# --------------------------------------------------------------------------- base class


class _Quant:
    """One GGML type: ``quantize_blocks`` and ``dequantize_blocks`` over ``[B, ...]`` blocks.

    ``quantize_blocks(x, out, s)``: ``x`` float32 ``[B, block_size]`` -> writes ``out``
    uint8 ``[B, type_size]``; ``s`` is the call's :class:`_Scratch`.
    ``dequantize_blocks(raw)``: uint8 ``[B, type_size]`` -> float32 ``[B, block_size]``.
    ``own_dequantize`` says whether :func:`dequantize` uses this class (True) or hands the
    bytes to ``gguf.quants.dequantize`` (False).
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    own_dequantize: ClassVar[bool] = False

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kw) -> None:
        super().__init_subclass__(**kw)
        if qtype is None:  # an intermediate base class
            return
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        assert qtype not in _CODECS, qtype
        _CODECS[qtype] = cls

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, out: np.ndarray, s: _Scratch) -> None:
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:
        # Whole chunk as one row: gguf groups rows, so one long row is one vectorized call.
        vals = _gq.dequantize(raw.reshape(1, -1), cls.qtype)
        return np.asarray(vals, dtype=_F32).reshape(raw.shape[0], cls.block_size)


_CODECS: dict[GGMLQuantizationType, type[_Quant]] = {}


# --------------------------------------------------------------------------- thin entries


class F32(_Quant, qtype=_QT.F32):
    """IEEE float32, stored as its 4 little-endian bytes."""

    @classmethod
    def quantize_blocks(cls, x, out, s):
        out[...] = x.astype("<f4", copy=False).view(_U8)


class F16(_Quant, qtype=_QT.F16):
    """IEEE float16 (round to nearest even), stored as its 2 little-endian bytes."""

    @classmethod
    def quantize_blocks(cls, x, out, s):
        out[...] = x.astype("<f2").view(_U8)


class _ViaGguf(_Quant):
    """Types gguf-py already quantizes: hand it the chunk as one long row."""

    @classmethod
    def quantize_blocks(cls, x, out, s):
        out[...] = _gq.quantize(x.reshape(1, -1), cls.qtype).reshape(out.shape)


class BF16(_ViaGguf, qtype=_QT.BF16):
    """bfloat16 (top half of the float32, round to nearest even)."""


class Q8_0(_ViaGguf, qtype=_QT.Q8_0):
    """32 values: f16 d, 32 x int8 q; value = d * q."""


class Q4_0(_ViaGguf, qtype=_QT.Q4_0):
    """32 values: f16 d, 16 bytes of 4-bit q; value = d * (q - 8)."""


# --------------------------------------------------------------------------- Q4_K / Q5_K


class _KWithMin(_Quant):
    """Shared code of Q4_K and Q5_K: affine k-quants with a per-sub-block scale and min.

    A super-block of 256 values is 8 sub-blocks of 32.  Value ``l`` of sub-block ``j`` is
    ``d * sc[j] * q - dmin * m[j]`` with f16 ``d``/``dmin``, 6-bit ``sc[j]``/``m[j]`` and
    ``q`` in ``0..NMAX``.  Bytes: ``d`` (2), ``dmin`` (2), packed scales/mins (12), then
    the type's quant bytes (:meth:`_pack_q` / :meth:`_unpack_q`).

    Quantizing: per sub-block, try the grid steps ``(NMAX + delta) / (max - min)`` for each
    ``delta`` in :attr:`DELTAS` (``min`` clamped to <= 0, as llama.cpp does), refit scale and
    offset of each candidate by least squares in closed form (from row sums, no extra pass),
    keep the best; then quantize the 8 scales and 8 mins to 6 bits against the f16 ``d`` and
    ``dmin`` actually stored, and recompute ``q`` with those final values.
    """

    NMAX: ClassVar[int]
    N_SUB: ClassVar[int] = 8
    SUB: ClassVar[int] = 32
    # Offsets tried around the min/max grid: ~4% lower RMS error than plain min/max (on
    # normal data); a 17-point grid would gain only ~1% more, at 4x the cost.
    DELTAS: ClassVar[tuple[float, ...]] = (-1.0, -0.5, 0.0, 0.5)
    own_dequantize = True

    # ---- 6-bit scales/mins, 12 bytes (get_scale_min_k4 in ggml-quants.c):
    #  bytes 0-3 : sc[0..3]  low 6 bits | sc[4..7] bits 4-5 in the top 2 bits
    #  bytes 4-7 : m[0..3]   low 6 bits | m[4..7]  bits 4-5 in the top 2 bits
    #  bytes 8-11: sc[4..7] bits 0-3    | m[4..7]  bits 0-3 in the high nibble

    @staticmethod
    def _pack_scales(sc: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
        lo_sc, hi_sc = sc[:, :4], sc[:, 4:]
        lo_m, hi_m = m[:, :4], m[:, 4:]
        out[:, 0:4] = lo_sc | ((hi_sc >> 4) << 6)
        out[:, 4:8] = lo_m | ((hi_m >> 4) << 6)
        out[:, 8:12] = (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4)

    @staticmethod
    def _unpack_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
        sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1)
        m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1)
        return sc, m

    # ---- quant bytes: type-specific
    @classmethod
    def _pack_q(cls, q: np.ndarray, out: np.ndarray, s: _Scratch) -> None:
        """``q`` uint8 ``[B, 8, 32]`` -> the quant bytes ``out[:, 16:]``."""
        raise NotImplementedError

    @classmethod
    def _unpack_q(cls, raw: np.ndarray) -> np.ndarray:
        """The quant bytes ``raw[:, 16:]`` -> float32 ``q`` ``[B, 8, 32]``."""
        raise NotImplementedError

    @classmethod
    def _subblock_fit(cls, x: np.ndarray, s: _Scratch) -> tuple[np.ndarray, np.ndarray]:
        """Per sub-block scale ``a >= 0`` and offset ``b <= 0`` with ``x ~ a * q + b``."""
        n, nmax = _F32(cls.SUB), _F32(cls.NMAX)
        lo = np.minimum(x.min(axis=-1), _F32(0))
        inv_span = _safe_recip(x.max(axis=-1) - lo)
        xs = np.subtract(x, lo[..., None], out=s("xs", x.shape))  # >= 0
        sx = _rowsum(x)

        best_a = best_b = best_gain = None
        q = s("q", x.shape)
        for delta in cls.DELTAS:
            np.multiply(xs, ((nmax + _F32(delta)) * inv_span)[..., None], out=q)
            np.rint(q, out=q)
            if delta > 0:  # only a grid finer than min..max can overshoot NMAX
                np.minimum(q, nmax, out=q)
            sq, sqq, sqx = _rowsum(q), _rowdot(q, q), _rowdot(q, x)
            # Least squares x ~ a q + b; if it wants b > 0, refit with b = 0 (mins are >= 0).
            det = n * sqq - sq * sq  # exact: small integers
            a = _safe_div(n * sqx - sq * sx, det)
            b = (sx - a * sq) / n
            pos = b > 0
            a = np.where(pos, _safe_div(sqx, sqq), a)
            b = np.where(pos, _F32(0), b)
            # Drop of the squared error from sum(x^2) (the error of all zeros): larger wins.
            gain = 2 * (a * sqx + b * sx) - a * a * sqq - 2 * a * b * sq - n * b * b
            if best_gain is None:
                best_a, best_b, best_gain = a, b, gain
            else:
                better = gain > best_gain
                best_a = np.where(better, a, best_a)
                best_b = np.where(better, b, best_b)
                best_gain = np.where(better, gain, best_gain)
        return np.maximum(best_a, _F32(0)), np.minimum(best_b, _F32(0))

    @classmethod
    def quantize_blocks(cls, x, out, s):
        nb = x.shape[0]
        x = x.reshape(nb, cls.N_SUB, cls.SUB)
        a, b = cls._subblock_fit(x, s)
        # Super-block scales as the f16 that will be stored; 6-bit codes against them.
        d = _f16_ceil(a.max(axis=1) / _F32(63))
        sc = np.clip(np.rint(a * _safe_recip(d)[:, None]), 0, 63)
        # A sub-block whose scale code is 0 (constant, or far narrower than its neighbours)
        # is all offset: the best offset is then its mean (clamped <= 0), not its minimum.
        mean = _rowsum(x) / _F32(cls.SUB)
        mins = np.where(sc == 0, np.maximum(-mean, _F32(0)), -b)
        dmin = _f16_ceil(mins.max(axis=1) / _F32(63))
        m = np.clip(np.rint(mins * _safe_recip(dmin)[:, None]), 0, 63)
        step = d[:, None] * sc  # what the reader computes
        offset = dmin[:, None] * m
        q = np.add(x, offset[..., None], out=s("q", x.shape))
        q *= _safe_recip(step)[..., None]
        _round_clip(q, 0, cls.NMAX)

        _put_f16(out, 0, d)
        _put_f16(out, 2, dmin)
        cls._pack_scales(sc.astype(_U8), m.astype(_U8), out[:, 4:16])
        cls._pack_q(_to_u8(q, s("qi", x.shape, _U8)), out, s)

    @classmethod
    def dequantize_blocks(cls, raw):
        # Same float32 operation order as gguf-py, so the result is bit-identical to it.
        nb = raw.shape[0]
        d, dmin = _get_f16(raw, 0), _get_f16(raw, 2)
        sc, m = cls._unpack_scales(raw[:, 4:16])
        step = (d * sc.astype(_F32)).reshape(nb, cls.N_SUB, 1)
        offset = (dmin * m.astype(_F32)).reshape(nb, cls.N_SUB, 1)
        return (step * cls._unpack_q(raw) - offset).reshape(nb, QK_K)


class Q4_K(_KWithMin, qtype=_QT.Q4_K):
    """Q4_K, 144 bytes / 256 values: d, dmin, 12 scale bytes, 128 bytes ``qs``.

    ``qs`` is 4 groups of 32 bytes; byte ``l`` of group ``g`` holds value ``l`` of sub-block
    ``2g`` in its low nibble and value ``l`` of sub-block ``2g + 1`` in its high nibble
    (:func:`_pack_nibbles`).
    """

    NMAX = 15

    @classmethod
    def _pack_q(cls, q, out, s):
        _pack_nibbles(q, out[:, 16:144], s)

    @classmethod
    def _unpack_q(cls, raw):
        return _unpack_nibbles(raw[:, 16:144]).astype(_F32)


class Q5_K(_KWithMin, qtype=_QT.Q5_K):
    """Q5_K, 176 bytes / 256 values: d, dmin, 12 scale bytes, 32 bytes ``qh``, 128 ``qs``.

    ``qs`` holds the low 4 bits exactly as Q4_K; bit ``j`` of ``qh[l]`` is the 5th bit of
    value ``l`` of sub-block ``j``.
    """

    NMAX = 31

    @classmethod
    def _pack_q(cls, q, out, s):
        nb = q.shape[0]
        hi = np.right_shift(q, 4, out=s("hi", q.shape, _U8))  # [B, 8, 32], 0 or 1
        qh = out[:, 16:48]
        qh[...] = hi[:, 0]
        bit = s("bit", (nb, 32), _U8)
        for j in range(1, 8):
            np.bitwise_or(qh, np.left_shift(hi[:, j], j, out=bit), out=qh)
        _pack_nibbles(np.bitwise_and(q, 0x0F, out=q), out[:, 48:176], s)

    @classmethod
    def _unpack_q(cls, raw):
        lo = _unpack_nibbles(raw[:, 48:176])
        qh = raw[:, 16:48].reshape(-1, 1, 32)
        hi = (qh >> np.arange(8, dtype=_U8).reshape(1, 8, 1)) & 0x01
        return (lo | (hi << 4)).astype(_F32)


# --------------------------------------------------------------------------- Q6_K


class Q6_K(_Quant, qtype=_QT.Q6_K):
    """Q6_K, 210 bytes / 256 values: 128 bytes ``ql``, 64 ``qh``, 16 int8 scales, f16 d.

    16 sub-blocks of 16 values; value = ``d * scale[j] * (q - 32)`` with ``q`` in ``0..63``.
    The 256 values are two halves of 128.  In half ``h``: ``ql[64h + i]`` holds value ``i``
    (low nibble) and value ``64 + i`` (high nibble), ``i < 64``; ``qh[32h + l]`` holds the top
    2 bits of values ``l, 32 + l, 64 + l, 96 + l`` in bits 0-1, 2-3, 4-5, 6-7.

    Quantizing: per sub-block, try scales ``-(32 + delta) / v`` with ``v`` the value of
    largest magnitude (so it lands near -32, using the extra negative level), refit each
    candidate's scale by least squares, keep the best; then int8 scales against the f16
    ``d`` actually stored, and ``q`` recomputed with them.
    """

    N_SUB = 16
    SUB = 16
    # ~7% lower RMS error than the plain max grid (delta = 0 alone), on normal data.
    DELTAS: ClassVar[tuple[float, ...]] = (-2.0, -1.0, -0.5, 0.0)
    own_dequantize = True

    @classmethod
    def _subblock_fit(cls, x: np.ndarray, s: _Scratch) -> np.ndarray:
        """Per sub-block signed scale ``a`` with ``x ~ a * q``, ``q`` in ``-32..31``."""
        hi, lo = x.max(axis=-1), x.min(axis=-1)
        vmax = np.where(-lo > hi, lo, hi)  # signed value of largest magnitude
        inv = -_safe_recip(vmax)

        best_a = best_gain = None
        q = s("q", x.shape)
        for delta in cls.DELTAS:
            np.multiply(x, ((_F32(32) + _F32(delta)) * inv)[..., None], out=q)
            _round_clip(q, -32, 31)
            sqq, sqx = _rowdot(q, q), _rowdot(q, x)
            a = _safe_div(sqx, sqq)
            gain = a * sqx  # = sqx^2 / sqq, the drop of the squared error
            if best_gain is None:
                best_a, best_gain = a, gain
            else:
                better = gain > best_gain
                best_a = np.where(better, a, best_a)
                best_gain = np.where(better, gain, best_gain)
        return best_a

    @classmethod
    def quantize_blocks(cls, x, out, s):
        nb = x.shape[0]
        x = x.reshape(nb, cls.N_SUB, cls.SUB)
        a = cls._subblock_fit(x, s)
        d = _f16_ceil(np.abs(a).max(axis=1) / _F32(127))
        sc = np.clip(np.rint(a * _safe_recip(d)[:, None]), -127, 127)
        step = d[:, None] * sc  # what the reader computes
        q = np.multiply(x, _safe_recip(step)[..., None], out=s("q", x.shape))
        _round_clip(q, -32, 31)
        q += _F32(32)
        q = _to_u8(q, s("qi", x.shape, _U8)).reshape(nb, 2, 2, 64)  # [B, half, nibble, i]

        # ql: low 4 bits; values i and 64 + i of a half share byte i.
        ql = out[:, 0:128].reshape(nb, 2, 64)
        np.bitwise_and(q[:, :, 0], 0x0F, out=ql)
        tmp = s("tmp", (nb, 2, 64), _U8)
        np.bitwise_or(ql, np.left_shift(q[:, :, 1], 4, out=tmp), out=ql)
        # qh: top 2 bits; values l, 32 + l, 64 + l, 96 + l of a half share byte l.
        top = np.right_shift(q, 4, out=q).reshape(nb, 2, 4, 32)  # [B, half, quarter, l]
        qh = out[:, 128:192].reshape(nb, 2, 32)
        qh[...] = top[:, :, 0]
        tmp = tmp.reshape(-1)[: nb * 64].reshape(nb, 2, 32)
        for k in range(1, 4):
            np.bitwise_or(qh, np.left_shift(top[:, :, k], 2 * k, out=tmp), out=qh)
        out[:, 192:208] = sc.astype(np.int8).view(_U8)
        _put_f16(out, 208, d)

    @classmethod
    def dequantize_blocks(cls, raw):
        # Same float32 operation order as gguf-py, so the result is bit-identical to it.
        nb = raw.shape[0]
        ql = raw[:, 0:128].reshape(nb, 2, 1, 64)
        qh = raw[:, 128:192].reshape(nb, 2, 1, 32)
        scales = np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(_F32)
        d = _get_f16(raw, 208)
        low = (ql >> np.array([0, 4], dtype=_U8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh >> np.array([0, 2, 4, 6], dtype=_U8).reshape(1, 1, 4, 1)) & 0x03
        q = (low.reshape(nb, 8, 32) | (high.reshape(nb, 8, 32) << 4)).astype(np.int8) - np.int8(32)
        step = (d * scales).reshape(nb, cls.N_SUB, 1)
        return (step * q.reshape(nb, cls.N_SUB, cls.SUB).astype(_F32)).reshape(nb, QK_K)


# --------------------------------------------------------------------------- public API

QUANTIZABLE: tuple[GGMLQuantizationType, ...] = tuple(_CODECS)
"""The types :func:`quantize` writes."""


def _qtype(qtype: GGMLQuantizationType | int | str) -> GGMLQuantizationType:
    if isinstance(qtype, str):
        return qtype_from_name(qtype)
    try:
        return _QT(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per block (1 for F32/F16/BF16, 32 for Q8_0/Q4_0, 256 for the k-quants)."""
    return GGML_QUANT_SIZES[_qtype(qtype)][0]


def type_size(qtype: GGMLQuantizationType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[_qtype(qtype)][1]


def row_nbytes(qtype: GGMLQuantizationType, n: int) -> int:
    """Bytes of a row of ``n`` values; ``ValueError`` unless ``n`` is a multiple of the block."""
    qt = _qtype(qtype)
    bs, ts = GGML_QUANT_SIZES[qt]
    _check_row(qt, n, bs)
    return n // bs * ts


def _check_row(qt: GGMLQuantizationType, n: int, bs: int) -> None:
    if n % bs:
        raise ValueError(
            f"{qt.name}: row length {n} is not a multiple of the block size {bs}")


def _names(types) -> str:
    return ", ".join(t.name for t in types)


def qtype_from_name(name: str) -> GGMLQuantizationType:
    """``"q4_k"``, ``"Q8_0"``, ``"bf16"`` ... -> the type (case-insensitive)."""
    key = name.strip().upper() if isinstance(name, str) else None
    if key in _QT.__members__:
        return _QT[key]
    raise ValueError(
        f"unknown GGML quantization type name {name!r}; valid names: {_names(_QT)}")


def quantize(values: np.ndarray, qtype: GGMLQuantizationType | str) -> np.ndarray:
    """Quantize float ``values[..., n]`` to uint8 ``[..., n // block_size * type_size]``.

    The last axis is the row (``n`` a multiple of :func:`block_size`); leading axes are kept.
    F32/F16/BF16 give the bytes of the little-endian floats.  ``qtype`` may be a name.
    """
    qt = _qtype(qtype)
    codec = _CODECS.get(qt)
    if codec is None:
        raise ValueError(
            f"quantizing to {qt.name} is not supported; supported: {_names(QUANTIZABLE)}")
    values = np.asarray(values)
    if values.ndim == 0:
        raise ValueError("quantize needs an array with at least one axis (the row)")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise TypeError(f"quantize needs real numbers, got dtype {values.dtype}")
    bs, ts = codec.block_size, codec.type_size
    _check_row(qt, values.shape[-1], bs)
    out_shape = (*values.shape[:-1], values.shape[-1] // bs * ts)

    blocks = values.reshape(-1, bs)
    out = np.empty((blocks.shape[0], ts), dtype=_U8)
    step = max(1, _CHUNK_VALUES // bs)
    scratch = _Scratch()
    for i in range(0, blocks.shape[0], step):
        chunk = np.ascontiguousarray(blocks[i:i + step], dtype=_F32)
        codec.quantize_blocks(chunk, out[i:i + step], scratch)
    return out.reshape(out_shape)


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType | str) -> np.ndarray:
    """Dequantize uint8 ``raw[..., nbytes]`` of ``qtype`` to float32 ``[..., n]``.

    Works for every type ``gguf.quants.dequantize`` supports (Q4_K/Q5_K/Q6_K decoded here,
    bit-identical to gguf's).  An array of another dtype is taken as its bytes (so a
    float16 ``[..., n]`` array is read as ``[..., 2n]`` bytes).  Always returns a new array.
    """
    qt = _qtype(qtype)
    raw = np.ascontiguousarray(raw)
    if raw.ndim == 0:
        raise ValueError("dequantize needs an array with at least one axis (the row bytes)")
    raw = raw.view(_U8)
    bs, ts = GGML_QUANT_SIZES[qt]
    if raw.shape[-1] % ts:
        raise ValueError(
            f"{qt.name}: row of {raw.shape[-1]} bytes is not a multiple of the type size {ts}")
    out_shape = (*raw.shape[:-1], raw.shape[-1] // ts * bs)
    codec = _CODECS.get(qt)

    if codec is not None and codec.own_dequantize:
        blocks = raw.reshape(-1, ts)
        out = np.empty((blocks.shape[0], bs), dtype=_F32)
        step = max(1, _CHUNK_VALUES // bs)
        for i in range(0, blocks.shape[0], step):
            out[i:i + step] = codec.dequantize_blocks(blocks[i:i + step])
        return out.reshape(out_shape)

    try:
        vals = _gq.dequantize(raw, qt)
    except NotImplementedError:
        raise ValueError(f"dequantizing {qt.name} is not supported (gguf-py cannot read it)") from None
    # np.array copies: gguf returns a view of ``raw`` for F32.
    return np.array(vals, dtype=_F32).reshape(out_shape)
