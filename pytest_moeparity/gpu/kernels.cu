// pytest-moeparity GPU kernels: products of float32 activations with GGUF-quantized weights
// read straight from the file's bytes, plus the small MoE helpers (router top-k, expert
// grouping offsets, weighted combination) and bfloat16 rounding.
//
// Compiled at run time by CuPy (NVRTC, C++17) through kernels.py; the template instances
// launched are listed there (NAME_EXPRESSIONS). Also compiled as plain C++ by the CPU
// emulator (emulator.py, MOEPARITY_EMULATOR defined), so: no standard headers, no CUDA
// headers, only builtins.
//
// Quant layouts are those of gguf-py's gguf/quants.py (dequantize_blocks) and llama.cpp's
// ggml-common.h / dequantize_row_*; dequantization follows gguf-py's float32 operation order
// without FMA contraction, so a dequantized weight is bit-identical to gguf's.
//
// Template parameter QT is the GGML type id (gguf.GGMLQuantizationType value):
//   F32 0, F16 1, Q4_0 2, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14, BF16 30.

#ifdef MOEPARITY_EMULATOR
#define MP_HD inline
#define MP_GLOBAL
#else
#define MP_HD __host__ __device__ __forceinline__
#define MP_GLOBAL __global__
#endif

typedef unsigned char mp_u8;
typedef unsigned short mp_u16;
typedef unsigned int mp_u32;
typedef long long mp_i64;

#define MP_WARPS 4              // warps (= weight rows) per block of the matmul kernels
#define MP_THREADS (MP_WARPS * 32)

// ---- scalar helpers -----------------------------------------------------------------------

MP_HD float mp_bits_to_float(mp_u32 u) {
#if defined(__CUDA_ARCH__)
    return __int_as_float((int)u);
#else
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
#endif
}

MP_HD mp_u32 mp_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
    return (mp_u32)__float_as_int(f);
#else
    mp_u32 u;
    __builtin_memcpy(&u, &f, 4);
    return u;
#endif
}

// Exact IEEE half -> float (subnormals, inf and NaN included), by integer arithmetic only.
MP_HD float mp_half_to_float(mp_u32 h) {
    mp_u32 sign = (h & 0x8000u) << 16;
    mp_u32 exp = (h >> 10) & 0x1Fu;
    mp_u32 mant = h & 0x3FFu;
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24 is exact in float32
        float mag = (float)mant * 5.9604644775390625e-08f;
        return sign ? -mag : mag;
    }
    if (exp == 31) return mp_bits_to_float(sign | 0x7F800000u | (mant << 13));
    return mp_bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// little-endian 16-bit load by bytes: Q6_K (210-byte) and Q8_0 (34-byte) blocks are only
// 2-byte aligned, and the fault switch reads Q4_K rows as Q6_K, so never assume more.
MP_HD mp_u32 mp_ld16(const mp_u8* p) { return (mp_u32)p[0] | ((mp_u32)p[1] << 8); }

MP_HD float mp_ldf16(const mp_u8* p) { return mp_half_to_float(mp_ld16(p)); }

MP_HD float mp_fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;  // the emulator is compiled with -ffp-contract=off
#endif
}

MP_HD float mp_fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

MP_HD float mp_fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

// 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block: llama.cpp's
// get_scale_min_k4 / gguf-py's Q4_K.get_scale_min.
//   bytes 0-3 : sc[0..3] low 6 bits, top 2 bits = bits 4-5 of sc[4..7]
//   bytes 4-7 : m[0..3]  low 6 bits, top 2 bits = bits 4-5 of m[4..7]
//   bytes 8-11: low nibble = bits 0-3 of sc[4..7], high nibble = bits 0-3 of m[4..7]
MP_HD void mp_scale_min_k4(const mp_u8* s, int j, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// ---- per-type traits and element dequantization -------------------------------------------
// mp_dq<QT>(row, k): value of column k of a row whose bytes start at `row`.

template <int QT> struct mp_traits;
template <> struct mp_traits<0>  { enum { block = 1,   tsize = 4 }; };    // F32
template <> struct mp_traits<1>  { enum { block = 1,   tsize = 2 }; };    // F16
template <> struct mp_traits<2>  { enum { block = 32,  tsize = 18 }; };   // Q4_0
template <> struct mp_traits<8>  { enum { block = 32,  tsize = 34 }; };   // Q8_0
template <> struct mp_traits<12> { enum { block = 256, tsize = 144 }; };  // Q4_K
template <> struct mp_traits<13> { enum { block = 256, tsize = 176 }; };  // Q5_K
template <> struct mp_traits<14> { enum { block = 256, tsize = 210 }; };  // Q6_K
template <> struct mp_traits<30> { enum { block = 1,   tsize = 2 }; };    // BF16

template <int QT> MP_HD float mp_dq(const mp_u8* row, int k);

// F32: 4 little-endian bytes per value
template <> MP_HD float mp_dq<0>(const mp_u8* row, int k) {
    const mp_u8* p = row + 4 * (mp_i64)k;
    return mp_bits_to_float((mp_u32)p[0] | ((mp_u32)p[1] << 8) | ((mp_u32)p[2] << 16) | ((mp_u32)p[3] << 24));
}

// F16
template <> MP_HD float mp_dq<1>(const mp_u8* row, int k) {
    return mp_ldf16(row + 2 * (mp_i64)k);
}

// BF16: the top half of a float32
template <> MP_HD float mp_dq<30>(const mp_u8* row, int k) {
    return mp_bits_to_float(mp_ld16(row + 2 * (mp_i64)k) << 16);
}

// Q4_0: 18 bytes / 32 values: f16 d, qs[16]; value i<16 = d*((qs[i]&15)-8), i>=16 = d*((qs[i-16]>>4)-8)
template <> MP_HD float mp_dq<2>(const mp_u8* row, int k) {
    const mp_u8* b = row + (mp_i64)(k >> 5) * 18;
    int i = k & 31;
    int q = (b[2 + (i & 15)] >> ((i >> 4) * 4)) & 0x0F;
    return mp_fmul(mp_ldf16(b), (float)(q - 8));
}

// Q8_0: 34 bytes / 32 values: f16 d, int8 qs[32]; value = d * q
template <> MP_HD float mp_dq<8>(const mp_u8* row, int k) {
    const mp_u8* b = row + (mp_i64)(k >> 5) * 34;
    int q = (int)(signed char)b[2 + (k & 31)];
    return mp_fmul(mp_ldf16(b), (float)q);
}

// Q4_K: 144 bytes / 256 values: f16 d @0, f16 dmin @2, scales[12] @4, qs[128] @16.
// Sub-block j (32 values) uses the low (j even) or high (j odd) nibble of qs[32*(j/2) + l].
// value = (d*sc[j]) * q - (dmin*m[j])
template <> MP_HD float mp_dq<12>(const mp_u8* row, int k) {
    const mp_u8* b = row + (mp_i64)(k >> 8) * 144;
    int i = k & 255, j = i >> 5, l = i & 31;
    int sc, m;
    mp_scale_min_k4(b + 4, j, &sc, &m);
    int q = (b[16 + 32 * (j >> 1) + l] >> (4 * (j & 1))) & 0x0F;
    float d = mp_ldf16(b), dmin = mp_ldf16(b + 2);
    return mp_fsub(mp_fmul(mp_fmul(d, (float)sc), (float)q), mp_fmul(dmin, (float)m));
}

// Q5_K: 176 bytes / 256 values: f16 d @0, f16 dmin @2, scales[12] @4, qh[32] @16, qs[128] @48.
// Low 4 bits as Q4_K (from qs); the 5th bit of value l of sub-block j is bit j of qh[l].
template <> MP_HD float mp_dq<13>(const mp_u8* row, int k) {
    const mp_u8* b = row + (mp_i64)(k >> 8) * 176;
    int i = k & 255, j = i >> 5, l = i & 31;
    int sc, m;
    mp_scale_min_k4(b + 4, j, &sc, &m);
    int lo = (b[48 + 32 * (j >> 1) + l] >> (4 * (j & 1))) & 0x0F;
    int hi = (b[16 + l] >> j) & 1;
    int q = lo | (hi << 4);
    float d = mp_ldf16(b), dmin = mp_ldf16(b + 2);
    return mp_fsub(mp_fmul(mp_fmul(d, (float)sc), (float)q), mp_fmul(dmin, (float)m));
}

// Q6_K: 210 bytes / 256 values: ql[128] @0, qh[64] @128, int8 scales[16] @192, f16 d @208.
// Value i = 128*h + r (half h, r < 128): low 4 bits = nibble (r/64) of ql[64h + r%64],
// top 2 bits = bits 2*(r/32).. of qh[32h + r%32]; q - 32 in -32..31; scale index i/16.
// value = (d*scale[i/16]) * (q - 32)
template <> MP_HD float mp_dq<14>(const mp_u8* row, int k) {
    const mp_u8* b = row + (mp_i64)(k >> 8) * 210;
    int i = k & 255, h = i >> 7, r = i & 127;
    int lo = (b[64 * h + (r & 63)] >> (4 * (r >> 6))) & 0x0F;
    int hi = (b[128 + 32 * h + (r & 31)] >> (2 * (r >> 5))) & 0x03;
    int q = (lo | (hi << 4)) - 32;
    int sc = (int)(signed char)b[192 + (i >> 4)];
    float d = mp_ldf16(b + 208);
    return mp_fmul(mp_fmul(d, (float)sc), (float)q);
}

// ---- warp reduction -------------------------------------------------------------------------

#ifdef MOEPARITY_EMULATOR
// provided by the emulator's prelude: the same xor butterfly over the 32 lanes
void mp_emu_warp_allreduce(float* v, int n);
#endif

template <int NT> MP_HD void mp_warp_allreduce(float (&v)[NT]) {
#ifdef MOEPARITY_EMULATOR
    mp_emu_warp_allreduce(v, NT);
#else
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
        for (int t = 0; t < NT; ++t) v[t] += __shfl_xor_sync(0xFFFFFFFFu, v[t], off);
    }
#endif
}

// ---- one 256-column super-block of a row, the warp's 32 lanes together --------------------------
// mp_block_dot<QT, NT>(b, lane, xp, k0, acc): columns k0 .. k0+255 of the row whose block bytes
// start at b. Generic: lane takes columns k0 + lane + 32*i (coalesced, one value at a time). The
// K-quants use llama.cpp's layout instead: lane w takes the w-th 4-byte group of the quant bytes
// (the warp reads them contiguously) and its 8 values, decoding the block header once for them.
// The arithmetic per value is exactly mp_dq's (same operations, same order): bit-identical.

template <int QT, int NT>
MP_HD void mp_block_dot(const mp_u8* __restrict__ b, int lane, const float* (&xp)[NT], int k0, float (&acc)[NT]) {
    constexpr int per = mp_traits<QT>::block;
    const mp_u8* base = b - (mp_i64)(k0 / per) * mp_traits<QT>::tsize;  // mp_dq indexes from the row
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int k = k0 + lane + 32 * i;
        const float w = mp_dq<QT>(base, k);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] = fmaf(w, xp[t][k], acc[t]);
    }
}

// Q4_K: lane w holds qs bytes 32g + l0 .. +3 (g = w/8, l0 = 4*(w%8)): low nibbles are values
// l0.. of sub-block 2g, high nibbles values l0.. of sub-block 2g+1.
template <int NT>
MP_HD void mp_q4k_block_dot(const mp_u8* __restrict__ b, int lane, const float* (&xp)[NT], int k0, float (&acc)[NT]) {
    const int g = lane >> 3, l0 = (lane & 7) << 2, j0 = 2 * g, j1 = j0 + 1;
    int sc0, m0, sc1, m1;
    mp_scale_min_k4(b + 4, j0, &sc0, &m0);
    mp_scale_min_k4(b + 4, j1, &sc1, &m1);
    const float d = mp_ldf16(b), dmin = mp_ldf16(b + 2);
    const float dsc0 = mp_fmul(d, (float)sc0), dm0 = mp_fmul(dmin, (float)m0);
    const float dsc1 = mp_fmul(d, (float)sc1), dm1 = mp_fmul(dmin, (float)m1);
    const mp_u8* q = b + 16 + 32 * g + l0;
    const int c0 = k0 + 32 * j0 + l0, c1 = k0 + 32 * j1 + l0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float w0 = mp_fsub(mp_fmul(dsc0, (float)(q[i] & 0x0F)), dm0);
        const float w1 = mp_fsub(mp_fmul(dsc1, (float)(q[i] >> 4)), dm1);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            acc[t] = fmaf(w0, xp[t][c0 + i], acc[t]);
            acc[t] = fmaf(w1, xp[t][c1 + i], acc[t]);
        }
    }
}
template <> MP_HD void mp_block_dot<12, 1>(const mp_u8* __restrict__ b, int lane, const float* (&xp)[1], int k0, float (&acc)[1]) { mp_q4k_block_dot<1>(b, lane, xp, k0, acc); }
template <> MP_HD void mp_block_dot<12, 8>(const mp_u8* __restrict__ b, int lane, const float* (&xp)[8], int k0, float (&acc)[8]) { mp_q4k_block_dot<8>(b, lane, xp, k0, acc); }

// Q5_K: as Q4_K (qs at 48), the 5th bit of value l of sub-block j is bit j of qh[l] (qh at 16)
template <int NT>
MP_HD void mp_q5k_block_dot(const mp_u8* __restrict__ b, int lane, const float* (&xp)[NT], int k0, float (&acc)[NT]) {
    const int g = lane >> 3, l0 = (lane & 7) << 2, j0 = 2 * g, j1 = j0 + 1;
    int sc0, m0, sc1, m1;
    mp_scale_min_k4(b + 4, j0, &sc0, &m0);
    mp_scale_min_k4(b + 4, j1, &sc1, &m1);
    const float d = mp_ldf16(b), dmin = mp_ldf16(b + 2);
    const float dsc0 = mp_fmul(d, (float)sc0), dm0 = mp_fmul(dmin, (float)m0);
    const float dsc1 = mp_fmul(d, (float)sc1), dm1 = mp_fmul(dmin, (float)m1);
    const mp_u8* q = b + 48 + 32 * g + l0;
    const mp_u8* qh = b + 16 + l0;
    const int c0 = k0 + 32 * j0 + l0, c1 = k0 + 32 * j1 + l0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int v0 = (q[i] & 0x0F) | (((qh[i] >> j0) & 1) << 4);
        const int v1 = (q[i] >> 4) | (((qh[i] >> j1) & 1) << 4);
        const float w0 = mp_fsub(mp_fmul(dsc0, (float)v0), dm0);
        const float w1 = mp_fsub(mp_fmul(dsc1, (float)v1), dm1);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            acc[t] = fmaf(w0, xp[t][c0 + i], acc[t]);
            acc[t] = fmaf(w1, xp[t][c1 + i], acc[t]);
        }
    }
}
template <> MP_HD void mp_block_dot<13, 1>(const mp_u8* __restrict__ b, int lane, const float* (&xp)[1], int k0, float (&acc)[1]) { mp_q5k_block_dot<1>(b, lane, xp, k0, acc); }
template <> MP_HD void mp_block_dot<13, 8>(const mp_u8* __restrict__ b, int lane, const float* (&xp)[8], int k0, float (&acc)[8]) { mp_q5k_block_dot<8>(b, lane, xp, k0, acc); }

// Q6_K: lane w holds ql bytes 64h + rr .. +3 (h = w/16, rr = 4*(w%16)): low nibbles are values
// r = rr + i of half h, high nibbles r + 64; both take their top 2 bits from qh[32h + (rr%32) + i]
// (shifts 2*(rr/32) and that + 4) and one scale each (indices (128h + rr)/16 and +4).
template <int NT>
MP_HD void mp_q6k_block_dot(const mp_u8* __restrict__ b, int lane, const float* (&xp)[NT], int k0, float (&acc)[NT]) {
    const int h = lane >> 4, rr = (lane & 15) << 2;
    const mp_u8* ql = b + 64 * h + rr;
    const mp_u8* qh = b + 128 + 32 * h + (rr & 31);
    const int sh0 = 2 * (rr >> 5), sh1 = sh0 + 4;
    const int s0 = (128 * h + rr) >> 4;
    const float d = mp_ldf16(b + 208);
    const float dsc0 = mp_fmul(d, (float)(int)(signed char)b[192 + s0]);
    const float dsc1 = mp_fmul(d, (float)(int)(signed char)b[192 + s0 + 4]);
    const int c0 = k0 + 128 * h + rr, c1 = c0 + 64;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q0 = ((ql[i] & 0x0F) | (((qh[i] >> sh0) & 0x03) << 4)) - 32;
        const int q1 = ((ql[i] >> 4) | (((qh[i] >> sh1) & 0x03) << 4)) - 32;
        const float w0 = mp_fmul(dsc0, (float)q0);
        const float w1 = mp_fmul(dsc1, (float)q1);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            acc[t] = fmaf(w0, xp[t][c0 + i], acc[t]);
            acc[t] = fmaf(w1, xp[t][c1 + i], acc[t]);
        }
    }
}
template <> MP_HD void mp_block_dot<14, 1>(const mp_u8* __restrict__ b, int lane, const float* (&xp)[1], int k0, float (&acc)[1]) { mp_q6k_block_dot<1>(b, lane, xp, k0, acc); }
template <> MP_HD void mp_block_dot<14, 8>(const mp_u8* __restrict__ b, int lane, const float* (&xp)[8], int k0, float (&acc)[8]) { mp_q6k_block_dot<8>(b, lane, xp, k0, acc); }

// ---- one weight row against up to NT activation rows ----------------------------------------
// Whole 256-column spans go through mp_block_dot (one super-block for the K-quants, 256/block
// blocks for the others); the tail (kq not a multiple of 256, possible for F32/F16/BF16/Q8_0/Q4_0)
// column by column: lane, lane+32, ... Columns >= kq contribute nothing (kq < K only under the
// test-only fault switch, where the row holds fewer whole blocks of the kernel's type).

template <int QT, int NT>
MP_HD void mp_row_partial(const mp_u8* __restrict__ row, int kq, const float* (&xp)[NT], int lane,
                          float (&acc)[NT]) {
    constexpr int span_bytes = (256 / mp_traits<QT>::block) * mp_traits<QT>::tsize;
    const int spans = kq >> 8;
    for (int c = 0; c < spans; ++c) mp_block_dot<QT, NT>(row + (mp_i64)c * span_bytes, lane, xp, c << 8, acc);
    for (int k = (spans << 8) + lane; k < kq; k += 32) {
        float w = mp_dq<QT>(row, k);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] = fmaf(w, xp[t][k], acc[t]);
    }
}

// ---- dense product: out[t, n] = sum_k x[t, k] * W[n, k] ---------------------------------------
// grid (ceil(N / MP_WARPS), ceil(T / NT)), block MP_THREADS. One warp per weight row n and
// tile of NT tokens; NT = 1 is the matvec path.

template <int QT, int NT>
MP_GLOBAL void qmm_dense(const mp_u8* __restrict__ w, mp_i64 row_bytes, int N, int kq,
                         const float* __restrict__ x, int ldx, int T,
                         float* __restrict__ out, int ldo) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * MP_WARPS + warp;
    const int t0 = blockIdx.y * NT;
    if (n >= N || t0 >= T) return;  // uniform over the warp
    const int nt = (T - t0) < NT ? (T - t0) : NT;
    const float* xp[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) xp[t] = x + (mp_i64)(t0 + (t < nt ? t : 0)) * ldx;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
    mp_row_partial<QT, NT>(w + (mp_i64)n * row_bytes, kq, xp, lane, acc);
    mp_warp_allreduce<NT>(acc);
    if (lane == 0) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
            if (t < nt) out[(mp_i64)(t0 + t) * ldo + n] = acc[t];
    }
}

// ---- grouped expert product ("mul_mat_id") ------------------------------------------------------
// w: [E, N, row_bytes] (expert e's rows start at e * expert_bytes). The (token, slot) pairs
// p = t * k + j are listed in `pairs`, sorted by expert: expert e owns
// pairs[offsets[e] .. offsets[e+1]). Pair p reads activation row p / x_div (x_div = k: rows are
// tokens; x_div = 1: rows are pairs) and writes out[p * ldo + n].
// grid (ceil(N / MP_WARPS), E), block MP_THREADS. A block of an expert without pairs exits at
// once; otherwise each warp streams its weight row once per tile of NT pairs (in practice once
// from DRAM: later tiles hit the cache).

template <int QT, int NT>
MP_GLOBAL void qmm_experts(const mp_u8* __restrict__ w, mp_i64 row_bytes, mp_i64 expert_bytes,
                           int N, int kq, const float* __restrict__ x, int ldx, int x_div,
                           const int* __restrict__ pairs, const int* __restrict__ offsets,
                           float* __restrict__ out, int ldo) {
    const int e = blockIdx.y;
    const int beg = offsets[e], end = offsets[e + 1];
    if (beg >= end) return;  // expert without tokens
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * MP_WARPS + warp;
    if (n >= N) return;  // uniform over the warp
    const mp_u8* row = w + (mp_i64)e * expert_bytes + (mp_i64)n * row_bytes;
    for (int p0 = beg; p0 < end; p0 += NT) {
        const int nt = (end - p0) < NT ? (end - p0) : NT;
        int pr[NT];
        const float* xp[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            pr[t] = pairs[p0 + (t < nt ? t : 0)];
            xp[t] = x + (mp_i64)(pr[t] / x_div) * ldx;
        }
        float acc[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
        mp_row_partial<QT, NT>(row, kq, xp, lane, acc);
        mp_warp_allreduce<NT>(acc);
        if (lane == 0) {
#pragma unroll
            for (int t = 0; t < NT; ++t)
                if (t < nt) out[(mp_i64)pr[t] * ldo + n] = acc[t];
        }
    }
}

// ---- expert offsets ------------------------------------------------------------------------------
// sorted_ids[P] ascending; offsets[e] = first index i with sorted_ids[i] >= e, for e in 0..E
// (offsets[E] = P when every id is < E). One thread per e; grid covers E + 1 threads.
extern "C" MP_GLOBAL void expert_offsets(const int* __restrict__ sorted_ids, int P, int E, int* __restrict__ offsets) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e > E) return;
    int lo = 0, hi = P;
    while (lo < hi) {
        const int mid = lo + ((hi - lo) >> 1);
        if (sorted_ids[mid] < e) lo = mid + 1;
        else hi = mid;
    }
    offsets[e] = lo;
}

// ---- router top-k ----------------------------------------------------------------------------------
// probs[T, E] -> ids[T, k] (descending probability, ties to the lower id, NaN last as in NumPy's
// argsort of -probs) and weights[T, k] = top / sum(top) (sum in slot order, float32).
// One thread per token.
extern "C" MP_GLOBAL void router_topk(const float* __restrict__ probs, int T, int E, int k,
                           int* __restrict__ ids, float* __restrict__ weights) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* p = probs + (mp_i64)t * E;
    int* id = ids + (mp_i64)t * k;
    float* wt = weights + (mp_i64)t * k;
    float sum = 0.0f;
    for (int r = 0; r < k; ++r) {
        int best = -1;
        float bv = 0.0f;
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int q = 0; q < r; ++q) taken = taken || (id[q] == e);
            if (taken) continue;
            const float v = p[e];
            const bool v_nan = !(v == v), b_nan = !(bv == bv);
            // strictly greater keeps the lower id on ties; NaN loses to any number
            if (best < 0 || (!v_nan && (b_nan || v > bv))) {
                best = e;
                bv = v;
            }
        }
        id[r] = best;
        wt[r] = bv;
        sum = mp_fadd(sum, bv);
    }
    for (int r = 0; r < k; ++r) wt[r] = wt[r] / sum;
}

// ---- weighted combination of the experts' outputs --------------------------------------------------
// out[t, n] = sum over slots j, taken in ascending expert-id order (order[t, :] = slots sorted by
// id), of w[t, j] * y[t, j, n]; product and sum rounded separately (no FMA), as the reference
// accumulates `out[tok] += w * y` expert by expert in float32.
extern "C" MP_GLOBAL void moe_combine(const float* __restrict__ y, const float* __restrict__ w,
                           const int* __restrict__ order, int T, int k, int N, float* __restrict__ out) {
    const mp_i64 total = (mp_i64)T * N;
    for (mp_i64 i = (mp_i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (mp_i64)gridDim.x * blockDim.x) {
        const int t = (int)(i / N), n = (int)(i % N);
        float acc = 0.0f;
        for (int r = 0; r < k; ++r) {
            const int j = order[(mp_i64)t * k + r];
            acc = mp_fadd(acc, mp_fmul(w[(mp_i64)t * k + j], y[((mp_i64)t * k + j) * N + n]));
        }
        out[i] = acc;
    }
}

// ---- bfloat16 rounding (activations stored as float32 holding bf16 values) ---------------------------
// Round to nearest even, NaN kept (quieted), overflow to inf: ggml_compute_fp32_to_bf16.
extern "C" MP_GLOBAL void round_bf16(float* __restrict__ x, mp_i64 n) {
    for (mp_i64 i = (mp_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (mp_i64)gridDim.x * blockDim.x) {
        mp_u32 u = mp_float_to_bits(x[i]);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
            u = (u & 0xFFFF0000u) | 0x00400000u;
        } else {
            u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
        }
        x[i] = mp_bits_to_float(u);
    }
}
