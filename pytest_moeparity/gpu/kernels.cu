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

#ifndef MP_WARPS
#define MP_WARPS 4              // warps per block of the matmul and row kernels (kernels.py: WARPS)
#endif
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

// Exact IEEE half -> float (subnormals, inf and NaN included): the hardware conversion on the device
// (exact: every half is a float32; a subnormal half is a normal float32, so -ftz does not touch it),
// integer arithmetic in the emulator.
MP_HD float mp_half_to_float(mp_u32 h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(h & 0xFFFFu)));
    return f;
#else
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
#endif
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

// __byte_perm: byte n of the result is byte (s >> 4n) & 7 of the pair (a = bytes 0-3, b = bytes 4-7)
MP_HD mp_u32 mp_byte_perm(mp_u32 a, mp_u32 b, mp_u32 s) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(a, b, s);
#else
    const unsigned long long ab = (unsigned long long)a | ((unsigned long long)b << 32);
    mp_u32 r = 0;
    for (int n = 0; n < 4; ++n) r |= (mp_u32)((ab >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
    return r;
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

// The scales and mins of sub-blocks 2g and 2g + 1 (g = 0..3) from the 12 scale bytes held as three
// little-endian words (bytes 0-3, 4-7, 8-11), four bytes at a time: sub-block j < 4 takes byte j of
// w1 / w2 (low 6 bits), j >= 4 byte j - 4 of w3 (a nibble) with bits 6-7 of byte j - 4 of w1 / w2
// above it, so both of the pair sit in bytes 2 (g & 1) and 2 (g & 1) + 1 of one word. Every lane runs the
// same instructions whatever its g (lanes of one warp take different g): the form is chosen by masks.
// Byte i (0..3) of w
MP_HD mp_u32 mp_byte(mp_u32 w, mp_u32 i) { return mp_byte_perm(w, 0u, 0x4440u + i); }

// The scales (scw) and mins (mw) of sub-blocks 0-3 (hi false) or 4-7 (hi true), sub-block j's in byte j & 3
MP_HD void mp_scale_min_k4_words(mp_u32 w1, mp_u32 w2, mp_u32 w3, bool hi, mp_u32& scw, mp_u32& mw) {
    const mp_u32 keep = hi ? 0x0F0F0F0Fu : 0x3F3F3F3Fu, top = hi ? 0x30303030u : 0u;
    scw = ((hi ? w3 : w1) & keep) | ((w1 >> 2) & top);
    mw = ((hi ? (w3 >> 4) : w2) & keep) | ((w2 >> 2) & top);
}

MP_HD void mp_scale_min_k4_pair(mp_u32 w1, mp_u32 w2, mp_u32 w3, int g, int (&sc)[2], int (&m)[2]) {
    mp_u32 scw, mw;
    mp_scale_min_k4_words(w1, w2, w3, g >= 2, scw, mw);
    const mp_u32 b = 2u * (mp_u32)(g & 1);  // byte of sub-block 2g in scw / mw
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        sc[r] = (int)mp_byte(scw, b + (mp_u32)r);
        m[r] = (int)mp_byte(mw, b + (mp_u32)r);
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

// ---- warp reductions ------------------------------------------------------------------------

#ifdef MOEPARITY_EMULATOR
// provided by the emulator's prelude: the same xor butterflies over the 32 lanes
void mp_emu_warp_allreduce(float* v, int n);
void mp_emu_warp_allreduce_max(float* v, int n);
#endif

// the xor butterfly of every lane's v[0..N) with op (sum or max); every lane ends with the result
template <bool MAX, int N> MP_HD void mp_warp_butterfly(float (&v)[N]) {
#ifdef MOEPARITY_EMULATOR
    if (MAX) mp_emu_warp_allreduce_max(v, N);
    else mp_emu_warp_allreduce(v, N);
#else
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
        for (int t = 0; t < N; ++t) {
            const float o = __shfl_xor_sync(0xFFFFFFFFu, v[t], off);
            v[t] = MAX ? fmaxf(v[t], o) : v[t] + o;
        }
    }
#endif
}
template <int N> MP_HD void mp_warp_allreduce(float (&v)[N]) { mp_warp_butterfly<false, N>(v); }
#ifdef MOEPARITY_EMULATOR
float mp_emu_shfl_xor(float v, int off);
#endif
// the v of lane (this lane ^ off)
MP_HD float mp_shfl_xor(float v, int off) {
#ifdef MOEPARITY_EMULATOR
    return mp_emu_shfl_xor(v, off);
#else
    return __shfl_xor_sync(0xFFFFFFFFu, v, off);
#endif
}
template <int N> MP_HD void mp_warp_allmax(float (&v)[N]) { mp_warp_butterfly<true, N>(v); }
#ifdef MOEPARITY_EMULATOR
float mp_emu_shfl_idx(float v, int src);
#endif
// the v (an int below 2^24) of lane src (each lane its own)
MP_HD int mp_shfl_idx(int v, int src) {
#ifdef MOEPARITY_EMULATOR
    return (int)mp_emu_shfl_idx((float)v, src);
#else
    return __shfl_sync(0xFFFFFFFFu, v, src);
#endif
}

// the warp's largest (MIN: smallest) v, in every lane: one redux.sync on compute capability 8.0 and later
#ifdef MOEPARITY_EMULATOR
mp_emu_u32 mp_emu_warp_redux_u32(mp_emu_u32 v, int is_min);
#endif
template <bool MIN> MP_HD mp_u32 mp_warp_redux_u32(mp_u32 v) {
#ifdef MOEPARITY_EMULATOR
    return mp_emu_warp_redux_u32(v, MIN);
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    return MIN ? __reduce_min_sync(0xFFFFFFFFu, v) : __reduce_max_sync(0xFFFFFFFFu, v);
#elif defined(__CUDA_ARCH__)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const mp_u32 o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
        v = MIN ? (o < v ? o : v) : (o > v ? o : v);
    }
    return v;
#else
    return v;
#endif
}

MP_HD float mp_warp_sum1(float x) { float v[1] = {x}; mp_warp_allreduce<1>(v); return v[0]; }

// memory written by some lanes of a warp made visible to all of them (the emulator: a warp barrier)
MP_HD void mp_syncwarp() {
#ifdef MOEPARITY_EMULATOR
    (void)mp_warp_sum1(0.0f);
#elif defined(__CUDA_ARCH__)
    __syncwarp();
#endif
}

// block-wide barrier and shared arrays (the emulator runs a block's threads as coroutines and keeps a
// shared array as a static: its blocks run one after another)
#ifdef MOEPARITY_EMULATOR
void mp_emu_syncthreads();
#define MP_SHARED static
#else
#define MP_SHARED __shared__
#endif
MP_HD void mp_syncthreads() {
#ifdef MOEPARITY_EMULATOR
    mp_emu_syncthreads();
#elif defined(__CUDA_ARCH__)
    __syncthreads();
#endif
}
MP_HD float mp_warp_max1(float x) { float v[1] = {x}; mp_warp_allmax<1>(v); return v[0]; }

// ---- programmatic dependent launch -------------------------------------------------------------------
// kernels.py launches the kernels with CUDA's programmatic stream serialization where the driver offers
// it: a kernel's blocks may start while the kernel before it in the stream is still running (its last
// wave), and do what does not depend on it (a product's L2 prefetch of its weight rows) first. Every
// thread of every kernel then calls mp_grid_sync before it reads anything an earlier kernel wrote:
// it waits for the earlier kernels' completion and memory, and lets the next kernel start. (A kernel
// whose threads skipped the wait could complete before its predecessor, and a kernel after it would
// not wait for that one.) Launched without the attribute, both instructions do nothing.
MP_HD void mp_grid_sync() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---- wide loads ------------------------------------------------------------------------------------
// 4 little-endian bytes from any address: one 32-bit load where aligned (always, for the file's own
// types in practice), else two 16-bit or four byte loads (Q6_K / Q8_0 / Q4_0 blocks are only 2-byte
// aligned, and a planted mis-dispatch reads rows with another type's block size).
MP_HD mp_u32 mp_ld32(const mp_u8* p) {
#if defined(__CUDA_ARCH__)
    const unsigned long long a = (unsigned long long)p;
    if ((a & 3) == 0) return *(const mp_u32*)p;
    if ((a & 1) == 0) return (mp_u32)*(const mp_u16*)p | ((mp_u32)*(const mp_u16*)(p + 2) << 16);
#endif
    return (mp_u32)p[0] | ((mp_u32)p[1] << 8) | ((mp_u32)p[2] << 16) | ((mp_u32)p[3] << 24);
}

struct alignas(16) mp_f4 { float x, y, z, w; };

// 8 consecutive activations: two 16-byte loads where aligned, else one at a time.
MP_HD void mp_ldx8(const float* __restrict__ p, float (&v)[8]) {
#if defined(__CUDA_ARCH__)
    if (((unsigned long long)p & 15) == 0) {
        const mp_f4 a = *(const mp_f4*)p, b = *(const mp_f4*)(p + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        return;
    }
#endif
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = p[i];
}

// 4 little-endian bytes from a 2-byte aligned address (blocks of 210, 34 or 18 bytes): two 16-bit
// loads, the same instructions in every lane of a warp whatever the block's offset mod 4
MP_HD mp_u32 mp_ld32_a2(const mp_u8* p) {
#if defined(__CUDA_ARCH__)
    if ((((unsigned long long)p) & 1) == 0)
        return (mp_u32)*(const mp_u16*)p | ((mp_u32)*(const mp_u16*)(p + 2) << 16);
#endif
    return (mp_u32)p[0] | ((mp_u32)p[1] << 8) | ((mp_u32)p[2] << 16) | ((mp_u32)p[3] << 24);
}

// The emulator checks the alignment the GPU's wide loads need (a misaligned one is an error there, which
// a CPU would read silently): mp_aligned_load(p, n) stands for an n-byte load at p.
#ifdef MOEPARITY_EMULATOR
void mp_emu_misaligned(const void* p, int n);  // the emulator's prelude: ends the launch with an error
MP_HD void mp_aligned_load(const void* p, int n) {
    if ((((unsigned long long)p) & (unsigned long long)(n - 1)) != 0) mp_emu_misaligned(p, n);
}
#else
MP_HD void mp_aligned_load(const void*, int) {}
#endif

// Loads inside the product loops. AL (decided once per warp: its activation rows start 16-byte aligned
// and its weight rows as the type's loads need, mp_chunk<QT>::align) makes them single unconditional loads, so a chunk's loads issue together;
// without AL they take the alignment-checking paths above, correct at any address.
template <bool AL> MP_HD mp_u32 mp_h32(const mp_u8* p) {  // p 2-aligned under AL
    if (AL) mp_aligned_load(p, 2);
#if defined(__CUDA_ARCH__)
    if (AL) return (mp_u32)*(const mp_u16*)p | ((mp_u32)*(const mp_u16*)(p + 2) << 16);
#endif
    return mp_ld32_a2(p);
}
template <bool AL> MP_HD float mp_hf16(const mp_u8* p) {  // f16 at a 2-aligned p under AL
    if (AL) mp_aligned_load(p, 2);
#if defined(__CUDA_ARCH__)
    if (AL) return mp_half_to_float((mp_u32)*(const mp_u16*)p);
#endif
    return mp_ldf16(p);
}
template <bool AL> MP_HD void mp_x8(const float* __restrict__ p, float (&v)[8]) {  // p 16-aligned under AL
    if (AL) mp_aligned_load(p, 16);
#if defined(__CUDA_ARCH__)
    if (AL) {
        const mp_f4 a = *(const mp_f4*)p, b = *(const mp_f4*)(p + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        return;
    }
#endif
    mp_ldx8(p, v);
}

#ifndef MP_VECLOADS
#define MP_VECLOADS 1           // 64/128-bit weight loads where aligned (0: 32-bit words; tuning switch)
#endif
// 8 and 16 bytes as 32-bit words: one 64- / 128-bit load under AL (p 8- / 16-aligned), else words
struct alignas(8) mp_u2 { mp_u32 x, y; };
struct alignas(16) mp_u4 { mp_u32 x, y, z, w; };
template <bool AL> MP_HD void mp_w64(const mp_u8* p, mp_u32 (&v)[2]) {
    if (AL && MP_VECLOADS) mp_aligned_load(p, 8);
#if defined(__CUDA_ARCH__)
    if (AL && MP_VECLOADS) {
        const mp_u2 u = *(const mp_u2*)p;
        v[0] = u.x; v[1] = u.y;
    } else
#endif
    {
        v[0] = mp_ld32(p); v[1] = mp_ld32(p + 4);
    }
}
template <bool AL> MP_HD void mp_w128(const mp_u8* p, mp_u32 (&v)[4]) {
    if (AL && MP_VECLOADS) mp_aligned_load(p, 16);
#if defined(__CUDA_ARCH__)
    if (AL && MP_VECLOADS) {
        const mp_u4 u = *(const mp_u4*)p;
        v[0] = u.x; v[1] = u.y; v[2] = u.z; v[3] = u.w;
    } else
#endif
    {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = mp_ld32(p + 4 * i);
    }
}

// 32 bytes of 16-bit values (F16 / BF16 chunks) as 8 words: two 128-bit loads under AL, else
// 2-aligned word loads (rows of these types are only 2-byte aligned in general)
template <bool AL> MP_HD void mp_w16x2(const mp_u8* p, mp_u32 (&v)[8]) {
    if (AL && MP_VECLOADS) mp_aligned_load(p, 16);
#if defined(__CUDA_ARCH__)
    if (AL && MP_VECLOADS) {
        const mp_u4 a = *(const mp_u4*)p, b = *(const mp_u4*)(p + 16);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else
#endif
    {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = mp_ld32_a2(p + 4 * i);
    }
}

// the f16 and the 12 scale/min bytes of a Q4_K / Q5_K block header (bytes 0-15) as four words
template <bool AL>
MP_HD void mp_kquant_header(const mp_u8* blk, float* d, float* dmin, mp_u32* w1, mp_u32* w2, mp_u32* w3) {
    mp_u32 h[4];
    mp_w128<AL>(blk, h);  // blocks of 144 / 176 bytes: 16-aligned wherever the row is (AL)
    *w1 = h[1];
    *w2 = h[2];
    *w3 = h[3];
    *d = mp_half_to_float(h[0] & 0xFFFFu);
    *dmin = mp_half_to_float(h[0] >> 16);
}

// ---- 16-column chunks -------------------------------------------------------------------------------
// A row is read in chunks of 16 columns as two runs of 8 columns, a .. a+7 and b .. b+7, each run's
// weights being sc[r] * q[8r + i] - mn[r] (mn = 0 for types without mins): q are the quants as exact
// floats (the float types: the values, sc = 1). A chunk is 8 quant bytes (K-quants: two sub-blocks'
// nibbles, or nibble + high bits), half a 32-value block (Q8_0, Q4_0) or 16 values (F32, F16, BF16);
// chunks c = lane, lane + 32, ... of a row are read by consecutive lanes, so a warp reads contiguous
// bytes. sc and mn are computed with mp_dq's operations, so a one-hot activation yields mp_dq's value
// bit for bit: fmaf(sc, q, 0) then fmaf(-mn, 1, .).
// The chunks come in units of `per` chunks held in `ubytes` bytes (a block; for the float types one
// chunk): chunk c is chunk cc = c % per of unit c / per. mp_chunk<QT> has
//   enum { per, ubytes, align };  (align: what the AL loads need of a row's first byte, 16 or 2)
//   cols(cc, a, b): the first columns of the runs of chunk cc, from the unit's first column;
//   run<AL>(unit, cc, q, sc, mn): chunk cc's values from the bytes of its unit.

template <int QT> struct mp_has_min { enum { value = 0 }; };
template <> struct mp_has_min<12> { enum { value = 1 }; };
template <> struct mp_has_min<13> { enum { value = 1 }; };

// The four bytes of w (values 0..255) minus a bias, as exact floats (no I2F): one byte permute puts
// byte i under the exponent of 2^23 (0x4B0000ii = 2^23 + byte, exact), one subtraction of 2^23 + bias
// (exact too). The callers build w with a few whole-word operations (masks, shifts, the high bits
// ORed in) where the byte-at-a-time form took a shift, a mask and an OR per value.
MP_HD void mp_bytes4_to_f(mp_u32 w, float bias_plus_2p23, float* q) {
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = mp_fsub(mp_bits_to_float(mp_byte_perm(w, 0x4B000000u, 0x7540u + (mp_u32)i)), bias_plus_2p23);
}

// 8 quant bytes as 16 plain nibbles minus a bias (Q4_K, Q4_0): low nibbles to q[0..7], high to q[8..15]
MP_HD void mp_nibbles_to_f(const mp_u32 (&w)[2], float bias_plus_2p23, float (&q)[16]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mp_bytes4_to_f(w[h] & 0x0F0F0F0Fu, bias_plus_2p23, q + 4 * h);
        mp_bytes4_to_f((w[h] >> 4) & 0x0F0F0F0Fu, bias_plus_2p23, q + 8 + 4 * h);
    }
}

template <int QT> struct mp_chunk;  // ::per, ::ubytes, ::cols(cc, a, b), ::run<AL>(unit, cc, q, sc, mn)

// first columns a, b of chunk cc's two runs, shared by the types of one layout:
// Q4_K / Q5_K (sub-blocks 2g and 2g + 1, g = cc / 4, offset 8 (cc % 4) into each) and the
// 16 consecutive values of Q8_0 (half a block) and the float types
struct mp_cols_k45 {
    enum { per = 16 };
    static MP_HD void cols(int cc, int& a, int& b) {
        a = 64 * (cc >> 2) + ((cc & 3) << 3);
        b = a + 32;
    }
};
struct mp_cols_16 {
    static MP_HD void cols(int cc, int& a, int& b) {
        a = 16 * cc;
        b = a + 8;
    }
};

// Q4_K / Q5_K: scale and min of sub-blocks 2g and 2g + 1 (the chunk's two runs), as mp_dq computes them
template <bool AL> MP_HD void mp_kquant_run_scales(const mp_u8* blk, int g, float (&sc)[2], float (&mn)[2]) {
    float d, dmin;
    mp_u32 w1, w2, w3;
    mp_kquant_header<AL>(blk, &d, &dmin, &w1, &w2, &w3);
    int scale[2], m[2];
    mp_scale_min_k4_pair(w1, w2, w3, g, scale, m);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        sc[r] = mp_fmul(d, (float)scale[r]);
        mn[r] = mp_fmul(dmin, (float)m[r]);
    }
}

// Q4_K: chunk cc (0..15) of a super-block holds qs bytes 8cc .. 8cc+7: sub-block 2g (low nibbles,
// values l0..l0+7) and 2g+1 (high nibbles), g = cc/4, l0 = 8 (cc%4).
template <> struct mp_chunk<12> : mp_cols_k45 {
enum { ubytes = 144, align = 16 };
template <bool AL> static MP_HD void run(const mp_u8* __restrict__ blk, int cc, float (&q)[16], float (&sc)[2], float (&mn)[2]) {
    const int g = cc >> 2, l0 = (cc & 3) << 3;
    mp_kquant_run_scales<AL>(blk, g, sc, mn);
    mp_u32 qw[2];
    mp_w64<AL>(blk + 16 + 32 * g + l0, qw);
    mp_nibbles_to_f(qw, 8388608.0f, q);  // low nibbles: sub-block 2g, high: 2g + 1
}
};

// Q5_K: as Q4_K with qs at 48; the 5th bit of value l of sub-block j is bit j of qh[l] (qh at 16)
template <> struct mp_chunk<13> : mp_cols_k45 {
enum { ubytes = 176, align = 16 };
template <bool AL> static MP_HD void run(const mp_u8* __restrict__ blk, int cc, float (&q)[16], float (&sc)[2], float (&mn)[2]) {
    const int g = cc >> 2, l0 = (cc & 3) << 3, j0 = 2 * g, j1 = j0 + 1;
    mp_kquant_run_scales<AL>(blk, g, sc, mn);
    mp_u32 qw[2], hw[2];
    mp_w64<AL>(blk + 48 + 32 * g + l0, qw);
    mp_w64<AL>(blk + 16 + l0, hw);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // bit j of each qh byte -> bit 4 of the value
        mp_bytes4_to_f((qw[h] & 0x0F0F0F0Fu) | (((hw[h] >> j0) & 0x01010101u) << 4), 8388608.0f, q + 4 * h);
        mp_bytes4_to_f(((qw[h] >> 4) & 0x0F0F0F0Fu) | (((hw[h] >> j1) & 0x01010101u) << 4), 8388608.0f, q + 8 + 4 * h);
    }
}
};

// Q6_K: chunk cc of a super-block holds ql bytes 8cc .. 8cc+7 = half h = cc/8, offsets rr = 8 (cc%8):
// low nibbles are values r = rr + i of the half, high nibbles r + 64; top 2 bits from
// qh[32h + rr%32 + i] (shift 2 (rr/32), and + 4 for the high nibbles); scales (128h + rr)/16, + 4.
template <> struct mp_chunk<14> {
enum { per = 16, ubytes = 210, align = 2 };
static MP_HD void cols(int cc, int& a, int& b) {  // first columns of the two runs
    a = 128 * (cc >> 3) + ((cc & 7) << 3);
    b = a + 64;
}
template <bool AL> static MP_HD void run(const mp_u8* __restrict__ blk, int cc, float (&q)[16], float (&sc)[2], float (&mn)[2]) {
    const int h = cc >> 3, rr = (cc & 7) << 3;
    const mp_u32 l0 = mp_h32<AL>(blk + 64 * h + rr), l1 = mp_h32<AL>(blk + 64 * h + rr + 4);
    const mp_u32 h0 = mp_h32<AL>(blk + 128 + 32 * h + (rr & 31)), h1 = mp_h32<AL>(blk + 132 + 32 * h + (rr & 31));
    const int sh0 = 2 * (rr >> 5), sh1 = sh0 + 4, s0 = (128 * h + rr) >> 4;
    const float d = mp_hf16<AL>(blk + 208);
    sc[0] = mp_fmul(d, (float)(int)(signed char)blk[192 + s0]);
    sc[1] = mp_fmul(d, (float)(int)(signed char)blk[192 + s0 + 4]);
    mn[0] = mn[1] = 0.0f;
    const mp_u32 lw[2] = {l0, l1}, hw[2] = {h0, h1};
#pragma unroll
    for (int k = 0; k < 2; ++k) {  // 2 bits of each qh byte -> bits 4-5 of the value; - 32
        mp_bytes4_to_f((lw[k] & 0x0F0F0F0Fu) | (((hw[k] >> sh0) & 0x03030303u) << 4), 8388640.0f, q + 4 * k);
        mp_bytes4_to_f(((lw[k] >> 4) & 0x0F0F0F0Fu) | (((hw[k] >> sh1) & 0x03030303u) << 4), 8388640.0f, q + 8 + 4 * k);
    }
}
};

// Q8_0: chunk cc = half cc of a block: 16 consecutive int8 values (byte ^ 0x80 = q + 128)
template <> struct mp_chunk<8> : mp_cols_16 {
enum { per = 2, ubytes = 34, align = 2 };
template <bool AL> static MP_HD void run(const mp_u8* __restrict__ blk, int cc, float (&q)[16], float (&sc)[2], float (&mn)[2]) {
    const mp_u8* p = blk + 2 + 16 * cc;
    sc[0] = sc[1] = mp_hf16<AL>(blk);
    mn[0] = mn[1] = 0.0f;
    const mp_u32 q0 = mp_h32<AL>(p), q1 = mp_h32<AL>(p + 4), q2 = mp_h32<AL>(p + 8), q3 = mp_h32<AL>(p + 12);
    mp_bytes4_to_f(q0 ^ 0x80808080u, 8388736.0f, q);       // int8 + 128, then - 128
    mp_bytes4_to_f(q1 ^ 0x80808080u, 8388736.0f, q + 4);
    mp_bytes4_to_f(q2 ^ 0x80808080u, 8388736.0f, q + 8);
    mp_bytes4_to_f(q3 ^ 0x80808080u, 8388736.0f, q + 12);
}
};

// Q4_0: chunk cc = qs bytes 8 cc .. +7 of a block: low nibbles values 8 cc + i, high + 16
template <> struct mp_chunk<2> {
enum { per = 2, ubytes = 18, align = 2 };
static MP_HD void cols(int cc, int& a, int& b) {  // first columns of the two runs
    a = 8 * cc;
    b = a + 16;
}
template <bool AL> static MP_HD void run(const mp_u8* __restrict__ blk, int cc, float (&q)[16], float (&sc)[2], float (&mn)[2]) {
    sc[0] = sc[1] = mp_hf16<AL>(blk);
    mn[0] = mn[1] = 0.0f;
    const mp_u32 q0 = mp_h32<AL>(blk + 2 + 8 * cc), q1 = mp_h32<AL>(blk + 6 + 8 * cc);
    const mp_u32 qw[2] = {q0, q1};
    mp_nibbles_to_f(qw, 8388616.0f, q);  // - 8
}
};

// F32, F16, BF16: 16 consecutive values, scale 1
template <> struct mp_chunk<0> : mp_cols_16 {
enum { per = 1, ubytes = 64, align = 16 };
template <bool AL> static MP_HD void run(const mp_u8* __restrict__ p, int, float (&q)[16], float (&sc)[2], float (&mn)[2]) {
    // p: 16-aligned under AL
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        mp_u32 v[4];
        mp_w128<AL>(p + 16 * j, v);
#pragma unroll
        for (int i = 0; i < 4; ++i) q[4 * j + i] = mp_bits_to_float(v[i]);
    }
    sc[0] = sc[1] = 1.0f;
    mn[0] = mn[1] = 0.0f;
}
};

// F16, BF16: 16 consecutive 16-bit values, scale 1; H::lo / H::hi convert a word's low / high half
template <class H> struct mp_chunk_16bit : mp_cols_16 {
enum { per = 1, ubytes = 32, align = 16 };
template <bool AL> static MP_HD void run(const mp_u8* __restrict__ p, int, float (&q)[16], float (&sc)[2], float (&mn)[2]) {
    mp_u32 uw[8];
    mp_w16x2<AL>(p, uw);  // 16-aligned under AL
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        q[2 * i] = H::lo(uw[i]);
        q[2 * i + 1] = H::hi(uw[i]);
    }
    sc[0] = sc[1] = 1.0f;
    mn[0] = mn[1] = 0.0f;
}
};
struct mp_f16_halves {
    static MP_HD float lo(mp_u32 u) { return mp_half_to_float(u & 0xFFFFu); }
    static MP_HD float hi(mp_u32 u) { return mp_half_to_float(u >> 16); }
};
struct mp_bf16_halves {  // the top half of a float32
    static MP_HD float lo(mp_u32 u) { return mp_bits_to_float(u << 16); }
    static MP_HD float hi(mp_u32 u) { return mp_bits_to_float(u & 0xFFFF0000u); }
};
template <> struct mp_chunk<1> : mp_chunk_16bit<mp_f16_halves> {};
template <> struct mp_chunk<30> : mp_chunk_16bit<mp_bf16_halves> {};

// ---- MP_ROWS_FOR(NT) weight rows against up to NT activation rows ----------------------------------------
// Each lane takes chunks lane, lane + 32, ... of the kq columns (kq is a multiple of 16 for the
// block types; the float types' last kq % 16 columns go one at a time). Per chunk, row and token:
// sum_i x_i (sc q_i - mn) = sc * sum_i x_i q_i - mn * sum_i x_i, so a weight costs one FMA per
// token plus its decode; the activations and their run sums are loaded once for all the rows.
// acc[r * NT + t] is lane-partial: the caller reduces over the warp.
// Columns >= kq contribute nothing (kq < K only under the test-only fault switch).

#ifndef MP_ROWS
#define MP_ROWS 2               // weight rows per warp of the 1-token instances (kernels.py: ROWS)
#endif
#ifndef MP_ROWS_NT4
#define MP_ROWS_NT4 4           // of the 4-token ones (2-4 tokens; kernels.py: ROWS_NT4)
#endif
#ifndef MP_ROWS_NT8
#define MP_ROWS_NT8 4           // of the 8-token ones (longer prompts; kernels.py: ROWS_NT8)
#endif
// rows per warp by token tile: short prompts' products are latency-bound, and 4 rows' loads in flight
// per lane (128 registers, 4 blocks per SM) beat 2 rows' (80, 6); long prompts' are arithmetic-bound,
// and 4 rows share each activation load (168 registers, 3 blocks); decode (1) keeps 2
#define MP_ROWS_FOR(NT) ((NT) == 4 ? MP_ROWS_NT4 : (NT) == 8 ? MP_ROWS_NT8 : MP_ROWS)
// Resident blocks per SM the matmul kernels are compiled for (a register cap: 65536 / (128 x blocks)),
// by token tile: the accumulators (rows x NT) and activation pointers grow with NT, so decode fits
// more warps without spilling: 64, 128 (4 rows) and 168 (4 rows) registers for NT = 1, 4, 8.
#ifndef MP_MIN_BLOCKS_NT1
#define MP_MIN_BLOCKS_NT1 8
#endif
#ifndef MP_MIN_BLOCKS_NT4
#define MP_MIN_BLOCKS_NT4 4
#endif
#ifndef MP_MIN_BLOCKS
#define MP_MIN_BLOCKS 3         // NT = 8
#endif
#define MP_MIN_BLOCKS_FOR(NT) ((NT) <= 1 ? MP_MIN_BLOCKS_NT1 : (NT) <= 4 ? MP_MIN_BLOCKS_NT4 : MP_MIN_BLOCKS)
#ifdef MOEPARITY_EMULATOR
#define MP_MATMUL_GLOBAL MP_GLOBAL
#else
#define MP_MATMUL_GLOBAL __global__ __launch_bounds__(MP_THREADS, MP_MIN_BLOCKS_FOR(NT))
#endif

template <int QT, int NT, bool AL>
MP_HD void mp_rows_dot_chunks(const mp_u8* const (&rows)[MP_ROWS_FOR(NT)], int chunks, const float* const (&xp)[NT], int nt,
                              int first, int stride, float (&acc)[MP_ROWS_FOR(NT) * NT]) {
    typedef mp_chunk<QT> C;
    for (int c = first; c < chunks; c += stride) {
        // chunk cc of unit u (C::per a power of two: shifts and masks)
        const int u = c / C::per, cc = c % C::per;
        int a = 0, b = 0;
        C::cols(cc, a, b);
        a += 16 * C::per * u;
        b += 16 * C::per * u;
        float q[MP_ROWS_FOR(NT)][16], sc[MP_ROWS_FOR(NT)][2], mn[MP_ROWS_FOR(NT)][2];
#pragma unroll
        for (int r = 0; r < MP_ROWS_FOR(NT); ++r) C::template run<AL>(rows[r] + (mp_i64)u * C::ubytes, cc, q[r], sc[r], mn[r]);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t < nt) {
                float xa[8], xb[8];
                mp_x8<AL>(xp[t] + a, xa);
                mp_x8<AL>(xp[t] + b, xb);
                float xsa = 0.0f, xsb = 0.0f;
                if (mp_has_min<QT>::value) {
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        xsa = mp_fadd(xsa, xa[i]);
                        xsb = mp_fadd(xsb, xb[i]);
                    }
                }
#pragma unroll
                for (int r = 0; r < MP_ROWS_FOR(NT); ++r) {
                    float sa = 0.0f, sb = 0.0f;
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        sa = fmaf(q[r][i], xa[i], sa);
                        sb = fmaf(q[r][8 + i], xb[i], sb);
                    }
                    float s = acc[r * NT + t];
                    s = fmaf(sc[r][0], sa, s);
                    if (mp_has_min<QT>::value) s = fmaf(-mn[r][0], xsa, s);
                    s = fmaf(sc[r][1], sb, s);
                    if (mp_has_min<QT>::value) s = fmaf(-mn[r][1], xsb, s);
                    acc[r * NT + t] = s;
                }
            }
        }
    }
}


MP_HD bool mp_aligned(const void* p, int n) { return (((unsigned long long)p) & (unsigned long long)(n - 1)) == 0; }

// ---- L2 prefetch of a warp's or block's weight rows ------------------------------------------------
// A lane reads its chunks one loop iteration after another, each a dependent trip to DRAM when the
// rows are not cached; asking for all of the rows' bytes at the start turns the later trips into L2
// hits. One lane calls it: on sm_90 one cp.async.bulk.prefetch per 32 KiB (whole 16-byte units
// inside [p, p + bytes): never outside the rows), before that one prefetch.global.L2 per 128-byte line.
// A hint only: no result, no effect on the numbers. MP_PREFETCH (tuning switch) says which products ask
// for it, a mask of MP_PF_FLOAT (the float kernels: qmm_dense, qmm_dense_splitk, qmm_experts),
// MP_PF_EXPERTS_MMA (qmm_experts_mma) and MP_PF_DENSE_MMA (qmm_dense_mma's rows not staged); 7: all of
// them, as up to version AA. The tensor-core products keep enough of their own loads in flight that the
// prefetches only queue ahead of them (as step 26's did): off for them since benchmarks/NOTES.md step 75
// (H100, 8-layer 30b-a3b, bench_ab.py: the forward -4.9 % at 3 tokens and -1.1 % at 64 without any; gate /
// up alone -13 % and -3.7 %). The float kernels' (1: the F32 router, 1-token prompts) stay, since step 76
// (H100, full 30b-a3b: 1 against 0 -0.9 % at 3 tokens, every round; -0.1 % at 64, mixed; 7 +3.6 % and +0.5 %).
#ifndef MP_PREFETCH
#define MP_PREFETCH 1
#endif
#define MP_PF_FLOAT 1
#define MP_PF_EXPERTS_MMA 2
#define MP_PF_DENSE_MMA 4
MP_HD void mp_prefetch_l2(const mp_u8* p, mp_i64 bytes) {
#if defined(__CUDA_ARCH__)
    const unsigned long long a = (unsigned long long)p, lo = (a + 15) & ~15ull, hi = (a + (unsigned long long)bytes) & ~15ull;
#if __CUDA_ARCH__ >= 900
    for (unsigned long long q = lo; q < hi; q += 32768ull) {
        const unsigned n = (unsigned)(hi - q < 32768ull ? hi - q : 32768ull);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(q), "r"(n));
    }
#else
    for (unsigned long long q = lo; q < hi; q += 128ull) asm volatile("prefetch.global.L2 [%0];" ::"l"(q));
#endif
#else
    (void)p;
    (void)bytes;
#endif
}

// The rows n0 .. n0 + rows - 1 (those < N) of a weight matrix, where MP_PREFETCH holds the caller's KIND
template <int KIND>
MP_HD void mp_prefetch_rows(const mp_u8* w, mp_i64 row_bytes, int N, int n0, int rows) {
    if constexpr ((MP_PREFETCH & KIND) != 0) {
        const int n1 = n0 + rows < N ? n0 + rows : N;
        if (n1 > n0) mp_prefetch_l2(w + (mp_i64)n0 * row_bytes, (mp_i64)(n1 - n0) * row_bytes);
    } else {
        (void)w, (void)row_bytes, (void)N, (void)n0, (void)rows;
    }
}

template <int QT, int NT>
MP_HD void mp_rows_dot(const mp_u8* const (&rows)[MP_ROWS_FOR(NT)], int kq, const float* const (&xp)[NT], int nt,
                       int first, int stride, float (&acc)[MP_ROWS_FOR(NT) * NT]) {
    const int chunks = kq >> 4;
    bool al = true;  // uniform over the warp: the same rows and activation rows in every lane
#pragma unroll
    for (int r = 0; r < MP_ROWS_FOR(NT); ++r) al = al && mp_aligned(rows[r], mp_chunk<QT>::align);
#pragma unroll
    for (int t = 0; t < NT; ++t) al = al && mp_aligned(xp[t], 16);
    if (al) mp_rows_dot_chunks<QT, NT, true>(rows, chunks, xp, nt, first, stride, acc);
    else mp_rows_dot_chunks<QT, NT, false>(rows, chunks, xp, nt, first, stride, acc);
    for (int k = (chunks << 4) + first; k < kq; k += stride) {
#pragma unroll
        for (int r = 0; r < MP_ROWS_FOR(NT); ++r) {
            const float w = mp_dq<QT>(rows[r], k);
#pragma unroll
            for (int t = 0; t < NT; ++t)
                if (t < nt) acc[r * NT + t] = fmaf(w, xp[t][k], acc[r * NT + t]);
        }
    }
}

// The activation rows of a tile of nt tokens from t0 (padding slots repeat row t0): xp[t] and its row orow[t].
template <int NT>
MP_HD void mp_tile_rows(const float* __restrict__ x, int ldx, int t0, int nt, const float* (&xp)[NT], int (&orow)[NT]) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        orow[t] = t0 + (t < nt ? t : 0);
        xp[t] = x + (mp_i64)orow[t] * ldx;
    }
}

// One warp: rows n0 .. n0 + MP_ROWS_FOR(NT) - 1 (those >= N are clamped to N - 1) against the nt activation rows
// xp over chunk iterations first, first + stride, ...; acc[r * NT + t] = the warp's sum (every lane).
template <int QT, int NT>
MP_HD void mp_warp_rows_sum(const mp_u8* __restrict__ w, mp_i64 row_bytes, int N, int n0, int kq,
                            const float* const (&xp)[NT], int nt, int first, int stride, float (&acc)[MP_ROWS_FOR(NT) * NT]) {
    const mp_u8* rows[MP_ROWS_FOR(NT)];
#pragma unroll
    for (int r = 0; r < MP_ROWS_FOR(NT); ++r) rows[r] = w + (mp_i64)(n0 + r < N ? n0 + r : N - 1) * row_bytes;
#pragma unroll
    for (int i = 0; i < MP_ROWS_FOR(NT) * NT; ++i) acc[i] = 0.0f;
    mp_rows_dot<QT, NT>(rows, kq, xp, nt, first, stride, acc);
    mp_warp_allreduce<MP_ROWS_FOR(NT) * NT>(acc);
}

// One warp, all of each row: lane 0 stores out[orow[t] * ldo + n] for the rows n < N.
template <int QT, int NT>
MP_HD void mp_warp_rows(const mp_u8* __restrict__ w, mp_i64 row_bytes, int N, int n0, int kq,
                        const float* const (&xp)[NT], const int (&orow)[NT], int nt, int lane,
                        float* __restrict__ out, int ldo) {
    float acc[MP_ROWS_FOR(NT) * NT];
    mp_warp_rows_sum<QT, NT>(w, row_bytes, N, n0, kq, xp, nt, lane, 32, acc);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < MP_ROWS_FOR(NT); ++r)
#pragma unroll
            for (int t = 0; t < NT; ++t)
                if (t < nt && n0 + r < N) out[(mp_i64)orow[t] * ldo + n0 + r] = acc[r * NT + t];
    }
}

// ---- dense products: out_m[t, n] = sum_k x[t, k] * W_m[n, k] --------------------------------------
// Up to three weight matrices of one kernel type and width that read the same activations (attn_q,
// attn_k and attn_v) go in one launch: the grid's row groups run over W_0's rows, then W_1's, then
// W_2's (a matrix with N = 0 has none); out_m is [T, N_m]. One launch instead of three matters for
// short prompts, whose products are latency-bound whatever their size.

// The matrix m that row group g falls in (groups of `per` rows), its w and N; g made relative to it.
// The output pointer is chosen only where it is stored (mp_pick_out): a pointer picked at the start
// stays live across the whole row loop and costs the register-capped kernels spills.
MP_HD int mp_pick_matrix(int& g, int per, const mp_u8* w0, const mp_u8* w1, const mp_u8* w2, int N0, int N1, int N2,
                         const mp_u8*& w, int& N) {
    const int g0 = (N0 + per - 1) / per, g1 = (N1 + per - 1) / per;
    if (g < g0) { w = w0; N = N0; return 0; }
    g -= g0;
    if (g < g1) { w = w1; N = N1; return 1; }
    g -= g1;
    w = w2; N = N2;
    return 2;
}
MP_HD float* mp_pick_out(int m, float* o0, float* o1, float* o2) { return m == 0 ? o0 : m == 1 ? o1 : o2; }

// grid (row_groups * tiles), block MP_THREADS: a warp takes MP_ROWS_FOR(NT) weight rows and one tile of
// NT tokens; the tile index varies fastest, so the blocks that share weight rows run together and
// the rows come from DRAM once. NT = 1 is the matvec path.

template <int QT, int NT>
MP_MATMUL_GLOBAL void qmm_dense(const mp_u8* __restrict__ w0, const mp_u8* __restrict__ w1, const mp_u8* __restrict__ w2,
                         mp_i64 row_bytes, int N0, int N1, int N2, int kq, const float* __restrict__ x, int ldx,
                         int T, float* __restrict__ out0, float* __restrict__ out1, float* __restrict__ out2) {
    const int tiles = (T + NT - 1) / NT;
    const int tile = (int)(blockIdx.x % (unsigned)tiles);
    int group = (int)(blockIdx.x / (unsigned)tiles);
    const mp_u8* w;
    int N;
    const int m = mp_pick_matrix(group, MP_WARPS * MP_ROWS_FOR(NT), w0, w1, w2, N0, N1, N2, w, N);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = (group * MP_WARPS + warp) * MP_ROWS_FOR(NT);
    const int t0 = tile * NT;
    if (tile == 0 && lane == 0 && n0 < N) mp_prefetch_rows<MP_PF_FLOAT>(w, row_bytes, N, n0, MP_ROWS_FOR(NT));  // the weights: not written by an earlier kernel
    mp_grid_sync();
    if (n0 >= N || t0 >= T) return;  // uniform over the warp
    const int nt = (T - t0) < NT ? (T - t0) : NT;
    const float* xp[NT];
    int orow[NT];
    mp_tile_rows<NT>(x, ldx, t0, nt, xp, orow);
    mp_warp_rows<QT, NT>(w, row_bytes, N, n0, kq, xp, orow, nt, lane, mp_pick_out(m, out0, out1, out2), N);
}

// ---- dense products, K split over the warps of a block (short prompts) -----------------------------------
// The MP_WARPS warps of a block take the same MP_ROWS_FOR(NT) weight rows and tile of NT tokens; warp w reads
// chunk iterations w, w + MP_WARPS, ... of the row (a warp of qmm_dense reads all of them one after
// another, which leaves a short prompt's small products waiting on memory with few warps in flight).
// The warps' partial sums meet in shared memory and are added in warp order (deterministic).
// grid (row groups of MP_ROWS_FOR(NT) over the matrices, * tiles), block MP_THREADS.

template <int QT, int NT>
MP_MATMUL_GLOBAL void qmm_dense_splitk(const mp_u8* __restrict__ w0, const mp_u8* __restrict__ w1, const mp_u8* __restrict__ w2,
                                mp_i64 row_bytes, int N0, int N1, int N2, int kq, const float* __restrict__ x, int ldx,
                                int T, float* __restrict__ out0, float* __restrict__ out1, float* __restrict__ out2) {
    MP_SHARED float part[MP_WARPS][MP_ROWS_FOR(NT) * NT];
    const int tiles = (T + NT - 1) / NT;
    const int tile = (int)(blockIdx.x % (unsigned)tiles);
    int group = (int)(blockIdx.x / (unsigned)tiles);
    const mp_u8* w;
    int N;
    const int m = mp_pick_matrix(group, MP_ROWS_FOR(NT), w0, w1, w2, N0, N1, N2, w, N);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = group * MP_ROWS_FOR(NT), t0 = tile * NT;
    if (tile == 0 && threadIdx.x == 0) mp_prefetch_rows<MP_PF_FLOAT>(w, row_bytes, N, n0, MP_ROWS_FOR(NT));  // the weights: not written by an earlier kernel
    mp_grid_sync();
    if (n0 >= N || t0 >= T) return;  // uniform over the block
    const int nt = (T - t0) < NT ? (T - t0) : NT;
    const float* xp[NT];
    int orow[NT];
    mp_tile_rows<NT>(x, ldx, t0, nt, xp, orow);
    float acc[MP_ROWS_FOR(NT) * NT];
    mp_warp_rows_sum<QT, NT>(w, row_bytes, N, n0, kq, xp, nt, warp * 32 + lane, 32 * MP_WARPS, acc);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < MP_ROWS_FOR(NT) * NT; ++i) part[warp][i] = acc[i];
    }
    mp_syncthreads();
    if (threadIdx.x < MP_ROWS_FOR(NT) * NT) {  // one thread per (row, token)
        const int r = threadIdx.x / NT, t = threadIdx.x % NT;
        if (t < nt && n0 + r < N) {
            float s = part[0][threadIdx.x];
            for (int v = 1; v < MP_WARPS; ++v) s = mp_fadd(s, part[v][threadIdx.x]);
            mp_pick_out(m, out0, out1, out2)[(mp_i64)(t0 + t) * N + n0 + r] = s;  // t0 + t: orow[t] with a runtime t would go to local memory
        }
    }
}

// ---- grouped expert products ("mul_mat_id") --------------------------------------------------------------
// w_m: [E, N, row_bytes] (expert e's rows start at e * expert_bytes); one launch serves one or two
// such tensors of the same type and shape that read the same activations (ffn_gate_exps and
// ffn_up_exps): blocks x < groups take w_0, the next `groups` w_1 (groups = ceil(N / (MP_WARPS *
// MP_ROWS_FOR(NT)))). The (token, slot) pairs p = t * k + j are listed in `pairs`, sorted by expert: expert
// e owns pairs[offsets[e] .. offsets[e+1]); `active` lists the experts that own pairs (then -1).
// Pair p reads activation row p / x_div (x_div = k: rows are tokens; x_div = 1: rows are pairs)
// and writes out_m[p * ldo + n].
// grid (groups * matrices, min(E, pairs)), block MP_THREADS: block y serves the y-th active expert
// (no block is spent on experts without tokens); each warp streams its MP_ROWS_FOR(NT) weight rows once per
// tile of NT pairs (in practice once from DRAM: later tiles hit the cache).

template <int QT, int NT>
MP_MATMUL_GLOBAL void qmm_experts(const mp_u8* __restrict__ w0, const mp_u8* __restrict__ w1, mp_i64 row_bytes,
                           mp_i64 expert_bytes, int N, int kq, const float* __restrict__ x, int ldx, int x_div,
                           const int* __restrict__ pairs, const int* __restrict__ offsets,
                           const int* __restrict__ active, float* __restrict__ out0, float* __restrict__ out1, int ldo) {
    mp_grid_sync();  // the routing was written by the router's kernels
    const int e = active[blockIdx.y];
    if (e < 0) return;
    const int groups = (N + MP_WARPS * MP_ROWS_FOR(NT) - 1) / (MP_WARPS * MP_ROWS_FOR(NT));
    const bool second = (int)blockIdx.x >= groups;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = (((int)blockIdx.x - (second ? groups : 0)) * MP_WARPS + warp) * MP_ROWS_FOR(NT);
    if (n0 >= N) return;  // uniform over the warp
    const mp_u8* we = (second ? w1 : w0) + (mp_i64)e * expert_bytes;
    if (lane == 0) mp_prefetch_rows<MP_PF_FLOAT>(we, row_bytes, N, n0, MP_ROWS_FOR(NT));  // before the pair lists are read
    const int beg = offsets[e], end = offsets[e + 1];
    for (int p0 = beg; p0 < end; p0 += NT) {
        const int nt = (end - p0) < NT ? (end - p0) : NT;
        int pr[NT];
        const float* xp[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            pr[t] = pairs[p0 + (t < nt ? t : 0)];
            xp[t] = x + (mp_i64)(pr[t] / x_div) * ldx;
        }
        mp_warp_rows<QT, NT>(we, row_bytes, N, n0, kq, xp, pr, nt, lane, second ? out1 : out0, ldo);
    }
}

// ---- Q4_K (and Q6_K, below) expert products of 2 or more tokens on the tensor cores (compute capability 8.0+)
// The activations are first written exactly enough as integers, once per activation row (act_digits):
// with 2^E above the row's largest |x|, N_k = rint(x_k 2^(30 - E)) (|N_k| <= 2^30: an error of at most
// 2^-31 of 2^E, far below float32's rounding of the products), stored as four signed base-256 digits
// (N_k = sum_p d_pk 256^p, d_pk in -128..127), with each 32-value sub-block's float sum and the row's
// unit 2^(E - 30) (NaN for a row holding a non-finite value: its outputs are NaN). The Q4_K quants q_k of
// a sub-block are 0..15, so one mma.m16n8k32 (u8 x s8 -> s32) gives, for 16 weight rows and 8 (token,
// digit) columns, S = sum_k q_k d_pk exactly (integers: no rounding, any order). Per super-block and row,
// I = sum_j sc_j S_j is exact too (|I| < 2^25), and acc += d * I in float; the mins' term
// dmin * sum_j m_j (sum of sub-block j's x) is summed in float. A (row, token) value is then
// 2^(E - 30) * (acc_0 + 256 acc_1 + 65536 acc_2 + 2^24 acc_3) minus the mins' term: ~0.04 instructions
// per weight and token tile against ~0.28 for qmm_experts, as accurate (the tests hold both to float64
// within 1e-5). A warp takes 16 weight rows (lane 4 gid + tig: rows gid and gid + 8, quant bytes
// 8 tig .. 8 tig + 7 of every 32 in both: the mma sums over k, so k may be permuted in A and B alike, and
// the digits are read in the same order), a block MP_WARPS warps; an expert's pairs go in passes of 4
// tokens (2 n-tiles of 2 tokens x 4 digits). kernels.py uses it for Q4_K (and Q6_K) with whole super-blocks, for
// prompts of up to MMA_MAX_TOKENS tokens (each expert then has at most that many pairs: one pass).

#ifndef MP_MMA_MIN_BLOCKS
#define MP_MMA_MIN_BLOCKS 4     // resident blocks per SM qmm_experts_mma is compiled for: 128 registers, no spills (tuning switch)
#endif
// qmm_experts_mma's own (tuning switches): resident blocks per SM it is compiled for, and the most tokens a
// pass (4: two n-tiles; 2: one, so the two-tile pass is not compiled in and the kernel needs fewer registers,
// an expert's third and fourth tokens taking a pass of their own)
#ifndef MP_MMA_EXPERT_BLOCKS
#define MP_MMA_EXPERT_BLOCKS MP_MMA_MIN_BLOCKS
#endif
// MP_EXPERT_PASS8 (read by kernels.py only: experts_mma_kernel): past 4 tokens qmm_experts_mma takes an
// expert's pairs in passes of 8 (<QT,ST,1>: four n-tiles on one decode of each super-block of the rows)
// instead of 4; 0: passes of 4 (the instances are compiled either way). MP_MMA_PASS8_BLOCKS: the resident
// blocks per SM those instances are compiled for (their B fragments of four n-tiles need more registers)
#ifndef MP_EXPERT_PASS8
#define MP_EXPERT_PASS8 1
#endif
#ifndef MP_MMA_PASS8_BLOCKS
#define MP_MMA_PASS8_BLOCKS 3
#endif
// MP_MMA_PASS8_BLOCKS_Q4ST: the same for the staged Q4_K instance alone (<12,1,1>: the down projection of
// Q4_K_M's Q4_K layers), which at 3 blocks an SM spills 132 bytes, 11-25 local-memory instructions in each
// of its loops (benchmarks/sass_scan.py), and at 2 none (tuning switch; at 2 the 64-token 30b-a3b forward
// was 0.09 ms slower on an H100: benchmarks/NOTES.md step 68)
#ifndef MP_MMA_PASS8_BLOCKS_Q4ST
#define MP_MMA_PASS8_BLOCKS_Q4ST MP_MMA_PASS8_BLOCKS
#endif
#ifndef MP_MMA_PASS_TOKENS
#define MP_MMA_PASS_TOKENS 4
#endif
#ifdef MOEPARITY_EMULATOR
void mp_emu_mma_u8s8(const mp_u32* a, const mp_u32* b, int* d);  // the emulator's prelude: a warp-wide exchange
void mp_emu_mma_s8s8_k16(const mp_u32* a, const mp_u32* b, int* d);
#define MP_MMA_GLOBAL MP_GLOBAL
#define MP_MMA_GLOBAL_P8(P8) MP_GLOBAL
#else
#define MP_MMA_GLOBAL __global__ __launch_bounds__(MP_THREADS, MP_MMA_EXPERT_BLOCKS)
// (QT and ST: the template parameters of the kernel it declares)
#define MP_MMA_GLOBAL_P8(P8) __global__ __launch_bounds__(MP_THREADS, \
    (P8) ? ((QT) == 12 && (ST) ? MP_MMA_PASS8_BLOCKS_Q4ST : MP_MMA_PASS8_BLOCKS) : MP_MMA_EXPERT_BLOCKS)
#endif

// D = A B for A 16 x 32 u8 (row-major fragments a[4]), B 32 x 8 s8 (b[2]): lane 4 g + t holds
// A[g][4t..4t+3] (a0), A[g+8][4t..] (a1), A[g][16+4t..] (a2), A[g+8][16+4t..] (a3), B[4t..4t+3][g] (b0),
// B[16+4t..][g] (b1), and gets D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
MP_HD void mp_mma_u8s8(const mp_u32 (&a)[4], const mp_u32 (&b)[2], int (&d)[4]) {
#if defined(MOEPARITY_EMULATOR)
    mp_emu_mma_u8s8(a, b, d);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(0));
#else
    d[0] = d[1] = d[2] = d[3] = 0;  // never launched below compute capability 8.0 (kernels.py)
#endif
}

// acc += A B (as mp_mma_u8s8, through the mma's own accumulator): the timing probe MP_Q4_SCALE_PROBE's
MP_HD void mp_mma_u8s8_add(const mp_u32 (&a)[4], const mp_u32 (&b)[2], int (&acc)[4]) {
#if defined(MOEPARITY_EMULATOR) || !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
    int d[4];
    mp_mma_u8s8(a, b, d);
    for (int k = 0; k < 4; ++k) acc[k] += d[k];
#else
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// D = A B for A 16 x 16 s8 (a[2]), B 16 x 8 s8 (b): lane 4 g + t holds A[g][4t..4t+3] (a0), A[g+8][4t..4t+3]
// (a1), B[4t..4t+3][g] (b), and gets D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1] (as mp_mma_u8s8).
MP_HD void mp_mma_s8s8_k16(const mp_u32 (&a)[2], mp_u32 b, int (&d)[4]) {
#if defined(MOEPARITY_EMULATOR)
    const mp_u32 bw[1] = {b};
    mp_emu_mma_s8s8_k16(a, bw, d);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%7,%7,%7};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b), "r"(0));
#else
    d[0] = d[1] = d[2] = d[3] = 0;  // never launched below compute capability 8.0 (kernels.py)
#endif
}

MP_HD int mp_float_to_int_rn(float x) {  // round to nearest even, |x| < 2^31
#if defined(__CUDA_ARCH__)
    return __float2int_rn(x);
#else
    return (int)__builtin_nearbyintf(x);  // the default rounding mode: to nearest even
#endif
}

// ---- act_digits: x [R, K] (K a multiple of 32) -> xd [R, K / 32, 4, 8] words (sub-block j, digit p: the
// 32 values' digit bytes in column order), xs [R, K / 32] (each sub-block's sum: 4-value partial sums added
// over 8 lanes by xor butterfly), xunit [R] (2^(E - 30), NaN for a row with a non-finite value).
// grid R, a block of MP_DIGITS_THREADS threads per row: thread i holds the 4-value groups i, i + threads, ...
// of a slab of 4 MP_DIGITS_THREADS MP_DIGITS_GROUPS columns in registers. A row of one slab is read once;
// a wider one is read for its largest |x| and then slab by slab again (the last slab read is still
// held). A block per row, not a warp: a short prompt has a handful of rows, and a warp walking 2048
// values alone issues ~1000 instructions one after another (H100: ~10 us; Nsight: mostly waiting for
// instruction fetch), where 256 threads issue ~100 each.
#define MP_DIGITS_THREADS 256   // kernels.py: DIGITS_THREADS
#define MP_DIGITS_GROUPS 8      // 4-value groups per thread and slab: 8192 columns (kernels.py: DIGITS_SLAB)

// 4 floats at p: one 16-byte load under AL (p 16-aligned), else four
template <bool AL> MP_HD void mp_x4(const float* p, float (&v)[4]) {
    if (AL) mp_aligned_load(p, 16);
#if defined(__CUDA_ARCH__)
    if (AL) {
        const mp_f4 a = *(const mp_f4*)p;
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    } else
#endif
    {
#pragma unroll
        for (int c = 0; c < 4; ++c) v[c] = p[c];
    }
}

// |x| as its bits >> 8, exact in a float (NaN > inf > every finite value): the key whose row maximum
// sets the digits' scale
MP_HD float mp_abs_key(float x) { return (float)((mp_float_to_bits(x) & 0x7FFFFFFFu) >> 8); }

// slab `slab` of the row (groups 4-value groups in all) into v (0 past the row's end); m = max(m, the
// largest mp_abs_key); AL: the row starts 16-byte aligned. The loads are unconditional (a thread past the
// end reads the last group again), so that all of them are in flight together: a load behind a branch
// waits for the one before it.
template <bool AL, int G>
MP_HD void mp_digits_load(const float* __restrict__ row, int groups, int slab, int tid, float (&v)[G][4], float& m) {
    const int base = MP_DIGITS_THREADS * G * slab + tid;
#pragma unroll
    for (int i = 0; i < G; ++i) {
        const int g = base + MP_DIGITS_THREADS * i;
        mp_x4<AL>(row + 4 * (g < groups ? g : groups - 1), v[i]);
    }
#pragma unroll
    for (int i = 0; i < G; ++i) {
        const bool in = base + MP_DIGITS_THREADS * i < groups;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            v[i][c] = in ? v[i][c] : 0.0f;
            m = fmaxf(m, mp_abs_key(v[i][c]));
        }
    }
}

// the largest m of the block's TH threads (wmax: a shared float per warp, not read again by the block
// before its next barrier)
template <int TH = MP_DIGITS_THREADS>
MP_HD float mp_digits_block_max(float m, float* wmax, int tid) {
    float v[1] = {m};
    mp_warp_allmax<1>(v);
    if ((tid & 31) == 0) wmax[tid >> 5] = v[0];
    mp_syncthreads();
#pragma unroll
    for (int w = 0; w < TH / 32; ++w) v[0] = fmaxf(v[0], wmax[w]);
    return v[0];
}

// from the row's largest mp_abs_key m: the scale 2^(30 - E) that turns its values into digits (0 for a row
// holding a non-finite value) and writes *unit = 2^(E - 30) (NaN for such a row) where unit is not null
MP_HD float mp_digits_scale(float m, float* unit) {
    int e = (int)m >> 15;                 // the biased exponent of the largest |x|: |x| < 2^(e - 126)
    const bool bad = e == 255;
    e = e < 30 ? 30 : e;                  // (tiny or zero rows: the unit stays a normal float)
    if (unit) *unit = bad ? mp_bits_to_float(0x7FC00000u) : mp_bits_to_float((mp_u32)(e - 29) << 23);
    return bad ? 0.0f : mp_bits_to_float((mp_u32)(283 - e) << 23);  // 2^(30 - E), E = e - 126
}

// the digits (dr: the row's words) and sub-block sums (sr) of the groups a thread of TH holds in v: group
// TH G slab + tid + TH i in v[i] (0 past the row's end), scale inv. (A sub-block's 8 groups lie in 8
// consecutive lanes whatever TH, so its sum is the same.)
template <int G, int TH = MP_DIGITS_THREADS>
MP_HD void mp_digits_store(const float (&v)[G][4], int groups, int slab, int tid, float inv, mp_u32* __restrict__ dr,
                           float* __restrict__ sr) {
    const int lane = tid & 31, per = TH * G;
#pragma unroll
    for (int i = 0; i < G; ++i) {
        const int g0 = per * slab + TH * i + (tid & ~31), g = g0 + lane;
        if (g0 < groups) {  // uniform over the warp (groups is a multiple of 8, lanes 8 at a time)
            float part = 0.0f;
            if (g < groups) {
                mp_u32 n[4];
#pragma unroll
                for (int c = 0; c < 4; ++c) {  // the digits of N are the bytes of (N + 0x808080) ^ 0x808080
                    const float z = mp_fmul(v[i][c], inv);  // NaN only in a bad row (0 * inf): digits 0
                    n[c] = ((mp_u32)(z == z ? mp_float_to_int_rn(z) : 0) + 0x00808080u) ^ 0x00808080u;
                }
                const mp_u32 lo01 = mp_byte_perm(n[0], n[1], 0x5140u), lo23 = mp_byte_perm(n[2], n[3], 0x5140u);
                const mp_u32 hi01 = mp_byte_perm(n[0], n[1], 0x7362u), hi23 = mp_byte_perm(n[2], n[3], 0x7362u);
                mp_u32* dst = dr + 32 * (g >> 3) + (g & 7);
                dst[0] = mp_byte_perm(lo01, lo23, 0x5410u);   // digit 0 of the 4 values
                dst[8] = mp_byte_perm(lo01, lo23, 0x7632u);   // digit 1
                dst[16] = mp_byte_perm(hi01, hi23, 0x5410u);
                dst[24] = mp_byte_perm(hi01, hi23, 0x7632u);
                part = mp_fadd(mp_fadd(v[i][0], v[i][1]), mp_fadd(v[i][2], v[i][3]));
            }
            // the sub-block g / 8 is held by lanes 8 (lane / 8) .. + 7
            part = mp_fadd(part, mp_shfl_xor(part, 1));
            part = mp_fadd(part, mp_shfl_xor(part, 2));
            part = mp_fadd(part, mp_shfl_xor(part, 4));
            if (g < groups && (g & 7) == 0) sr[g >> 3] = part;
        }
    }
}

MP_GLOBAL void act_digits(const float* __restrict__ x, int R, int K, mp_u32* __restrict__ xd, float* __restrict__ xs,
                          float* __restrict__ xunit) {
    MP_SHARED float wmax[MP_DIGITS_THREADS / 32];
    mp_grid_sync();
    const int tid = threadIdx.x, r = (int)blockIdx.x;  // grid R: every block has a row
    const float* row = x + (mp_i64)r * K;
    const int groups = K >> 2, per = MP_DIGITS_THREADS * MP_DIGITS_GROUPS, slabs = (groups + per - 1) / per;
    const bool al = mp_aligned(x, 16);  // every row then (K a multiple of 32)
    float v[MP_DIGITS_GROUPS][4];
    float m = 0.0f;
    for (int slab = 0; slab < slabs; ++slab) {
        if (al) mp_digits_load<true>(row, groups, slab, tid, v, m);
        else mp_digits_load<false>(row, groups, slab, tid, v, m);
    }
    const float inv = mp_digits_scale(mp_digits_block_max(m, wmax, tid), tid == 0 ? xunit + r : nullptr);
    mp_u32* dr = xd + (mp_i64)r * K;
    float* sr = xs + (mp_i64)r * (K >> 5);
    for (int slab = slabs - 1; slab >= 0; --slab) {
        if (slab != slabs - 1) {
            float unused = 0.0f;
            if (al) mp_digits_load<true>(row, groups, slab, tid, v, unused);
            else mp_digits_load<false>(row, groups, slab, tid, v, unused);
        }
        mp_digits_store(v, groups, slab, tid, inv, dr, sr);
    }
}

// byte j (a constant after unrolling) of a pair of words holding bytes 0-3 and 4-7
MP_HD mp_u32 mp_byte8(const mp_u32 (&w)[2], int j) { return mp_byte(w[j >> 2], (mp_u32)(j & 3)); }

// The (row, token) values of a pass from each n-tile's per-digit sums acc[i] (D's layout: columns 2 tig,
// 2 tig + 1 of rows gid and gid + 8): this lane's part of each row is digits 0, 1 (tig even) or 2, 3 (odd);
// the pair's halves meet, then res[i] = value * unit[i] - mins[i] for the lane's own row (gid for tig
// even, gid + 8 for odd).
template <int TILES, int NB>
MP_HD void mp_mma_digits_result(const float (&acc)[TILES][4], const float (&mins)[TILES], const float (&unit)[NB],
                                int lane, float (&res)[NB]) {
    const bool own = (lane & 1) != 0;
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
        const float w0 = own ? 65536.0f : 1.0f, w1 = own ? 16777216.0f : 256.0f;
        const float p0 = mp_fadd(mp_fmul(w0, acc[i][0]), mp_fmul(w1, acc[i][1]));  // row gid
        const float p1 = mp_fadd(mp_fmul(w0, acc[i][2]), mp_fmul(w1, acc[i][3]));  // row gid + 8
        const float got = mp_shfl_xor(own ? p0 : p1, 1);   // even lanes get row gid's high half, odd row gid + 8's low
        const float v = own ? mp_fadd(got, p1) : mp_fadd(p0, got);
        res[i] = mp_fsub(mp_fmul(v, unit[i]), mins[i]);
    }
}

// a pass's start for lane 4 gid + tig: its weight rows n0 + gid and n0 + gid + 8 (clamped to N - 1), and
// zero sums
template <int TILES>
MP_HD void mp_mma_pass_start(const mp_u8* we, mp_i64 row_bytes, int N, int n0, int lane, const mp_u8* (&rows)[2],
                             float (&acc)[TILES][4], float (&mins)[TILES]) {
    const int gid = lane >> 2;
    rows[0] = we + (mp_i64)(n0 + gid < N ? n0 + gid : N - 1) * row_bytes;
    rows[1] = we + (mp_i64)(n0 + gid + 8 < N ? n0 + gid + 8 : N - 1) * row_bytes;
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
        mins[i] = 0.0f;
    }
}

// a super-block's exact integer sums ia (D's layout: rows gid, gid + 8) times their rows' d, added to acc
MP_HD void mp_mma_scale_add(const float (&d)[2], const int (&ia)[4], float (&acc)[4]) {
    acc[0] = fmaf(d[0], (float)ia[0], acc[0]);
    acc[1] = fmaf(d[0], (float)ia[1], acc[1]);
    acc[2] = fmaf(d[1], (float)ia[2], acc[2]);
    acc[3] = fmaf(d[1], (float)ia[3], acc[3]);
}

// What a pass calls at the start of each super-block s it reads: nothing (mp_no_hook), or the wait for that
// super-block's staged bytes (qmm_experts_mma under MP_STAGE_PIPE)
struct mp_no_hook {
    MP_HD void operator()(int) const {}
};

// MP_MMA_ZERO_ABSENT (tuning switch): the B columns of a token the pass does not hold (a 1-token expert's
// second token, ...) are zeros (1), or whatever the clamped row gives (0: two selects fewer an mma; those
// columns' sums belong to the absent token alone and are never stored, so the stored values are the same).
#ifndef MP_MMA_ZERO_ABSENT
#define MP_MMA_ZERO_ABSENT 1
#endif
// MP_DENSE_LONG_ZERO_ABSENT (tuning switch): the same for qmm_dense_mma<QT,1> and <QT,2> (prompts past 4 tokens) alone.
// Step 55: MP_MMA_ZERO_ABSENT=0 took ~0.19 ms off the 64-token forward while gate / up of short prompts lost
// 3 % by it; 0 here drops the selects where only long prompts go (nvcc 13.0: <12,1> then spills 8 bytes).
// Default 0 since step 58 (H100: -0.18 ms at 64 tokens with <QT,1> for every long dense product)
#ifndef MP_DENSE_LONG_ZERO_ABSENT
#define MP_DENSE_LONG_ZERO_ABSENT 0
#endif
// MP_DENSE_LONG_TOKENS (read by kernels.py only: dense_long_tokens): past 4 tokens a dense product whose row
// groups x passes of 4 tokens reach this many takes qmm_dense_mma<QT,2> (a block's warps take whole passes
// over all of K: no barrier or sums across warps a pass) instead of <QT,1>; 0: never (the instance is
// compiled either way). Default 2048 since step 58 (H100, 64 tokens: q, attn_output and the head take it,
// -1.32 ms of the forward; 1, every long dense product: -1.22)
#ifndef MP_DENSE_LONG_TOKENS
#define MP_DENSE_LONG_TOKENS 2048
#endif
// MP_SPLITK_LONG_BLOCKS (read by kernels.py only: dense_launch): past 4 tokens a float-kernel dense product
// whose token-tiled grid (qmm_dense<QT,8>) would have fewer blocks than this takes qmm_dense_splitk<QT,4>
// over the prompt's tiles of 4 tokens instead (the F32 router of 30b-a3b at 64 tokens: 64 blocks -> 512);
// 0: never
#ifndef MP_SPLITK_LONG_BLOCKS
#define MP_SPLITK_LONG_BLOCKS 264
#endif
// MP_Q4_LAYOUT_PROBE=1 (a TIMING PROBE, wrong results: benchmarks/bench_experts_ab.py only): the Q4_K pass
// of whole 16-row groups in global memory reads the same bytes as ever, but super-block s of the group as
// one 2304-byte tile, every load of a warp 128 or 256 contiguous bytes (what a repacked layout would give)
// instead of 8 rows' pieces 1152 bytes apart: how much of gate / up's time the rows' scattered loads cost.
#ifndef MP_Q4_LAYOUT_PROBE
#define MP_Q4_LAYOUT_PROBE 0
#endif
// MP_Q4_PAIR_PROBE=1 (a TIMING PROBE, wrong results, as MP_Q4_LAYOUT_PROBE): the same pass over rows of an even
// number of super-blocks reads each row's super-blocks as pairs of 288 bytes laid out [quants of the first
// (128)][quants of the second (128)][their two headers (32)], so that every 32-byte quant group of a row is
// one 32-byte sector (in the file's layout every other super-block starts 16 bytes into a sector and its
// groups straddle two): what a layout permuted within each row would give, against the layout probe's
// 16-row tiles.
#ifndef MP_Q4_PAIR_PROBE
#define MP_Q4_PAIR_PROBE 0
#endif
// MP_Q4_DIGITS_PROBE=1 (a TIMING PROBE, wrong results, as MP_Q4_LAYOUT_PROBE): every super-block of the Q4_K
// pass reads the activations' digits and sums of the warp's first one (in L1 after the first: no L2 round
// trip): how much of the time the digits' L2 round trips cost; with the layout probe, the memory side's best.
#ifndef MP_Q4_DIGITS_PROBE
#define MP_Q4_DIGITS_PROBE 0
#endif
// MP_Q4_SCALE_PROBE=1 (a TIMING PROBE, wrong results, as MP_Q4_LAYOUT_PROBE): each mma of the Q4_K pass adds
// its sums straight into the super-block's integer sums (the mma's own accumulator) instead of applying the
// sub-block's 6-bit scale (four IMADs an mma, 128 a super-block in a pass of 8 tokens): what the scales'
// products and their dependence on the mma cost at most (the bound on any exact rework of them).
#ifndef MP_Q4_SCALE_PROBE
#define MP_Q4_SCALE_PROBE 0
#endif

// One warp, one pass of up to 2 TILES tokens: rows n0 + gid and n0 + gid + 8 (clamped to N - 1) of lane
// 4 gid + tig. In n-tile i the lane's B column gid is digit gid & 3 of the token whose digits start at
// bq[i] (bon[i]: a token of the pass, else zeros), and its D columns 2 tig, 2 tig + 1 are digits
// 2 (tig & 1) + 0, 1 of the token whose sub-block sums start at sq[i] (and unit is unit[i]); it sums that
// token's mins' term for its own row (gid for tig even, gid + 8 for odd), gets the other half of its
// digits from lane ^ 1 and returns that (row, token) value over super-blocks s0, s0 + step, ... of the
// K / 256 in res[i]. Each super-block's loads (weights, digits, sums) are issued together before any is
// used.
template <bool AL, int TILES, bool ZA = MP_MMA_ZERO_ABSENT, int NB, class Hook = mp_no_hook>  // ZA: zero an absent token's B columns
MP_HD void mp_mma_q4k_pass(const mp_u8* __restrict__ we, mp_i64 row_bytes, int N, int n0, int K, int s0, int step,
                           const mp_u32* const (&bq)[NB], const bool (&bon)[NB], const float* const (&sq)[NB],
                           const float (&unit)[NB], int lane, float (&res)[NB], Hook hook = Hook()) {
    const int tig = lane & 3, own = tig & 1;
    const mp_u8* rows[2];
    float acc[TILES][4], mins[TILES];
    mp_mma_pass_start<TILES>(we, row_bytes, N, n0, lane, rows, acc, mins);
    const bool probe = MP_Q4_LAYOUT_PROBE && AL && n0 + 16 <= N && row_bytes == (mp_i64)(K >> 8) * 144;
    const bool pair_probe = MP_Q4_PAIR_PROBE && AL && (K >> 8) % 2 == 0 && row_bytes == (mp_i64)(K >> 8) * 144;
    for (int s = s0; s < (K >> 8); s += step) {
        hook(s);
        mp_u32 h[2][4], q[2][4][2], b[TILES][8][2];
        float xsv[TILES][8];
        const int sd = MP_Q4_DIGITS_PROBE ? s0 : s;  // the super-block whose digits are read (MP_Q4_DIGITS_PROBE)
        if (probe) {  // (wrong values: MP_Q4_LAYOUT_PROBE)
            const mp_u8* tile = we + (mp_i64)n0 * row_bytes + (mp_i64)s * 2304;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mp_w128<AL>(tile + 16 * ((lane >> 2) + 8 * r), h[r]);
#pragma unroll
                for (int g = 0; g < 4; ++g) mp_w64<AL>(tile + 256 + 8 * (32 * (2 * g + r) + lane), q[r][g]);
            }
        } else if (pair_probe) {  // (wrong values: MP_Q4_PAIR_PROBE)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const mp_u8* pair = rows[r] + (mp_i64)(s >> 1) * 288;
                mp_w128<AL>(pair + 256 + 16 * (s & 1), h[r]);
#pragma unroll
                for (int g = 0; g < 4; ++g) mp_w64<AL>(pair + 128 * (s & 1) + 32 * g + 8 * tig, q[r][g]);
            }
        } else {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const mp_u8* blk = rows[r] + (mp_i64)s * 144;
                mp_w128<AL>(blk, h[r]);
#pragma unroll
                for (int g = 0; g < 4; ++g) mp_w64<AL>(blk + 16 + 32 * g + 8 * tig, q[r][g]);
            }
        }
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
#pragma unroll
            for (int j = 0; j < 8; ++j) mp_w64<true>((const mp_u8*)(bq[i] + 32 * (8 * sd + j)), b[i][j]);
            mp_u32 v[4];
            mp_w128<true>((const mp_u8*)(sq[i] + 8 * sd), v);
#pragma unroll
            for (int c = 0; c < 4; ++c) xsv[i][c] = mp_bits_to_float(v[c]);
            mp_w128<true>((const mp_u8*)(sq[i] + 8 * sd + 4), v);
#pragma unroll
            for (int c = 0; c < 4; ++c) xsv[i][4 + c] = mp_bits_to_float(v[c]);
        }
        float d[2];
        mp_u32 sc[2][2], unused;  // [row][sub-blocks 0-3, 4-7]
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            d[r] = mp_half_to_float(h[r][0] & 0xFFFFu);
            mp_scale_min_k4_words(h[r][1], h[r][2], h[r][3], false, sc[r][0], unused);
            mp_scale_min_k4_words(h[r][1], h[r][2], h[r][3], true, sc[r][1], unused);
        }
        int ia[TILES][4];
#pragma unroll
        for (int i = 0; i < TILES; ++i) ia[i][0] = ia[i][1] = ia[i][2] = ia[i][3] = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // sub-block j: low nibbles of group j / 2 (even j), high (odd j)
            const int g = j >> 1, sh = 4 * (j & 1);
            const mp_u32 a[4] = {(q[0][g][0] >> sh) & 0x0F0F0F0Fu, (q[1][g][0] >> sh) & 0x0F0F0F0Fu,
                                 (q[0][g][1] >> sh) & 0x0F0F0F0Fu, (q[1][g][1] >> sh) & 0x0F0F0F0Fu};
            const int s0 = (int)mp_byte8(sc[0], j), s1 = (int)mp_byte8(sc[1], j);
#pragma unroll
            for (int i = 0; i < TILES; ++i) {
                const bool on = !ZA || bon[i];
                const mp_u32 bb[2] = {on ? b[i][j][0] : 0u, on ? b[i][j][1] : 0u};
                if (MP_Q4_SCALE_PROBE) {  // (wrong values)
                    mp_mma_u8s8_add(a, bb, ia[i]);
                    continue;
                }
                int dd[4];
                mp_mma_u8s8(a, bb, dd);
                ia[i][0] += s0 * dd[0];
                ia[i][1] += s0 * dd[1];
                ia[i][2] += s1 * dd[2];
                ia[i][3] += s1 * dd[3];
            }
        }
        // this lane's own row's mins and dmin
        const float dm = mp_half_to_float((own ? h[1][0] : h[0][0]) >> 16);
        const mp_u32 ho1 = own ? h[1][1] : h[0][1], ho2 = own ? h[1][2] : h[0][2], ho3 = own ? h[1][3] : h[0][3];
        mp_u32 mo[2];
        mp_scale_min_k4_words(ho1, ho2, ho3, false, unused, mo[0]);
        mp_scale_min_k4_words(ho1, ho2, ho3, true, unused, mo[1]);
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
            mp_mma_scale_add(d, ia[i], acc[i]);
            float ms = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j)
                ms = fmaf(mp_fsub(mp_bits_to_float(0x4B000000u | mp_byte8(mo, j)), 8388608.0f), xsv[i][j], ms);
            mins[i] = fmaf(dm, ms, mins[i]);
        }
    }
    mp_mma_digits_result<TILES>(acc, mins, unit, lane, res);
}

// The activation operands of a pass of nt (<= 4) tokens whose digit rows are row_of(0 .. nt - 1), for lane
// 4 gid + tig (as mp_mma_q4k_pass reads them): in n-tile i, B column gid is token 2 i + gid / 4's digit
// gid & 3 (bon[i]: that token is in the pass), D columns 2 tig, 2 tig + 1 belong to token 2 i + tig / 2
// (sums sq[i], unit unit[i]); tokens past the pass read token 0's rows.
template <class RowOf, int NB>
MP_HD void mp_mma_pass_inputs(int nt, RowOf row_of, int K, const mp_u32* __restrict__ xd, const float* __restrict__ xs,
                              const float* __restrict__ xunit, int lane, const mp_u32* (&bq)[NB], bool (&bon)[NB],
                              const float* (&sq)[NB], float (&unit)[NB]) {
    const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int i = 0; i < NB; ++i) {
        const int ub = 2 * i + (gid >> 2), ud = 2 * i + (tig >> 1);
        bon[i] = ub < nt;
        const int rb = row_of(ub < nt ? ub : 0), rd = row_of(ud < nt ? ud : 0);
        bq[i] = xd + (mp_i64)rb * K + 8 * (gid & 3) + 2 * tig;
        sq[i] = xs + (mp_i64)rd * (K >> 5);
        unit[i] = xunit[rd];
    }
}

// ---- Q6_K on the tensor cores ----
// A Q6_K super-block (ql[128] @0, qh[64] @128, int8 scales[16] @192, f16 d @208) holds value 128 h + 32 qd + l
// (half h, quarter qd, l < 32) as d * scales[8 h + 2 qd + l / 16] * (q - 32), q = the low (qd < 2) or high
// nibble of ql[64 h + 32 (qd & 1) + l] with bits 2 qd, 2 qd + 1 of qh[32 h + l] above it. A scale covers 16
// values, so each 16 go through one mma.m16n8k16 (s8 x s8: q - 32 fits a signed byte and needs no mins'
// term): lane 4 gid + tig takes values l = 16 u + 4 tig .. + 3 of its rows (4 bytes of ql and of qh: one
// word each) and the digit word 4 u + tig of sub-block 4 h + qd. Per super-block and row I = sum over the
// 16 scales of scale * S is exact (|S| <= 16 * 32 * 128, |I| < 2^28) and acc += d * I, as for Q4_K.

// four Q6_K quants (bytes 0..63) minus 32 as signed bytes: q ^ 32 is q - 32 in 6-bit two's complement;
// its sign bit (5) copied to bits 6 and 7
MP_HD mp_u32 mp_q6_s8(mp_u32 q) {
    const mp_u32 x = q ^ 0x20202020u, sgn = x & 0x20202020u;
    return x | (sgn << 1) | (sgn << 2);
}

// as mp_mma_q4k_pass (sq is not read: no mins); AL: the rows' super-blocks are 2-byte aligned
template <bool AL, int TILES, bool ZA = MP_MMA_ZERO_ABSENT, int NB, class Hook = mp_no_hook>
MP_HD void mp_mma_q6k_pass(const mp_u8* __restrict__ we, mp_i64 row_bytes, int N, int n0, int K, int s0, int step,
                           const mp_u32* const (&bq)[NB], const bool (&bon)[NB], const float (&unit)[NB], int lane,
                           float (&res)[NB], Hook hook = Hook()) {
    const int tig = lane & 3;
    const mp_u8* rows[2];
    float acc[TILES][4], mins[TILES];
    mp_mma_pass_start<TILES>(we, row_bytes, N, n0, lane, rows, acc, mins);
    for (int s = s0; s < (K >> 8); s += step) {
        hook(s);
        mp_u32 ql[2][8], qh[2][4], sc[2][4], b[TILES][8][2];
        float d[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const mp_u8* blk = rows[r] + (mp_i64)s * 210;
#pragma unroll
            for (int i = 0; i < 8; ++i) ql[r][i] = mp_h32<AL>(blk + 16 * i + 4 * tig);  // i = 4 h + 2 (qd & 1) + u
#pragma unroll
            for (int i = 0; i < 4; ++i) qh[r][i] = mp_h32<AL>(blk + 128 + 16 * i + 4 * tig);  // i = 2 h + u
#pragma unroll
            for (int i = 0; i < 4; ++i) sc[r][i] = mp_h32<AL>(blk + 192 + 4 * i);
            d[r] = mp_hf16<AL>(blk + 208);
        }
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
            const mp_u32* bs = bq[i] - tig + 32 * (8 * s);  // digit word 4 u + tig (bq[i]: word 2 tig)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                b[i][j][0] = bs[32 * j];
                b[i][j][1] = bs[32 * j + 4];
            }
        }
        int ia[TILES][4];
#pragma unroll
        for (int i = 0; i < TILES; ++i) ia[i][0] = ia[i][1] = ia[i][2] = ia[i][3] = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // the 32 values 32 j of the super-block: half j / 4, quarter j % 4
            const int h = j >> 2, qd = j & 3;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                mp_u32 a[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const mp_u32 lo = (ql[r][4 * h + 2 * (qd & 1) + u] >> (4 * (qd >> 1))) & 0x0F0F0F0Fu;
                    const mp_u32 hw = qh[r][2 * h + u];
                    const mp_u32 hi = (qd < 2 ? hw << (4 - 2 * qd) : hw >> (2 * qd - 4)) & 0x30303030u;
                    a[r] = mp_q6_s8(lo | hi);
                }
                const int m = 8 * h + 2 * qd + u;  // the scale of these 16 values
                const int s0v = (int)(signed char)mp_byte(sc[0][m >> 2], (mp_u32)(m & 3));
                const int s1v = (int)(signed char)mp_byte(sc[1][m >> 2], (mp_u32)(m & 3));
#pragma unroll
                for (int i = 0; i < TILES; ++i) {
                    int dd[4];
                    mp_mma_s8s8_k16(a, (!ZA || bon[i]) ? b[i][j][u] : 0u, dd);
                    ia[i][0] += s0v * dd[0];
                    ia[i][1] += s0v * dd[1];
                    ia[i][2] += s1v * dd[2];
                    ia[i][3] += s1v * dd[3];
                }
            }
        }
#pragma unroll
        for (int i = 0; i < TILES; ++i) mp_mma_scale_add(d, ia[i], acc[i]);
    }
    mp_mma_digits_result<TILES>(acc, mins, unit, lane, res);
}

// The tensor-core pass of type QT (Q4_K 12, Q6_K 14) for a pass of nt tokens (one n-tile up to 2), with the
// alignment the warp found (res[1] is left unwritten for one n-tile)
template <int QT, bool AL, int TILES, bool ZA = MP_MMA_ZERO_ABSENT, int NB, class Hook = mp_no_hook>
MP_HD void mp_mma_pass(const mp_u8* __restrict__ we, mp_i64 row_bytes, int N, int n0, int K, int s0, int step,
                       const mp_u32* const (&bq)[NB], const bool (&bon)[NB], const float* const (&sq)[NB],
                       const float (&unit)[NB], int lane, float (&res)[NB], Hook hook = Hook()) {
    if constexpr (QT == 14) mp_mma_q6k_pass<AL, TILES, ZA>(we, row_bytes, N, n0, K, s0, step, bq, bon, unit, lane, res, hook);
    else mp_mma_q4k_pass<AL, TILES, ZA>(we, row_bytes, N, n0, K, s0, step, bq, bon, sq, unit, lane, res, hook);
}
// MAXT: the most tokens a pass of the caller (2: one n-tile only; 8: four, the arrays of NB = 4 n-tiles)
template <int QT, int MAXT = 4, bool ZA = MP_MMA_ZERO_ABSENT, int NB, class Hook = mp_no_hook>
MP_HD void mp_mma_dispatch(bool al, int nt, const mp_u8* __restrict__ we, mp_i64 row_bytes, int N, int n0, int K,
                           int s0, int step, const mp_u32* const (&bq)[NB], const bool (&bon)[NB],
                           const float* const (&sq)[NB], const float (&unit)[NB], int lane, float (&res)[NB], Hook hook = Hook()) {
    if (MAXT <= 2 || nt <= 2) {
        if (al) mp_mma_pass<QT, true, 1, ZA>(we, row_bytes, N, n0, K, s0, step, bq, bon, sq, unit, lane, res, hook);
        else mp_mma_pass<QT, false, 1, ZA>(we, row_bytes, N, n0, K, s0, step, bq, bon, sq, unit, lane, res, hook);
    } else if (MAXT <= 4 || nt <= 4) {
        if constexpr (MAXT > 2) {
            if (al) mp_mma_pass<QT, true, 2, ZA>(we, row_bytes, N, n0, K, s0, step, bq, bon, sq, unit, lane, res, hook);
            else mp_mma_pass<QT, false, 2, ZA>(we, row_bytes, N, n0, K, s0, step, bq, bon, sq, unit, lane, res, hook);
        }
    } else if constexpr (MAXT > 4 && NB >= 4) {
        if (al) mp_mma_pass<QT, true, 4, ZA>(we, row_bytes, N, n0, K, s0, step, bq, bon, sq, unit, lane, res, hook);
        else mp_mma_pass<QT, false, 4, ZA>(we, row_bytes, N, n0, K, s0, step, bq, bon, sq, unit, lane, res, hook);
    }
}

// whether the weight rows at w allow the pass's aligned loads (Q4_K: 16 bytes, Q6_K: 2)
template <int QT> MP_HD bool mp_mma_aligned(const mp_u8* w, mp_i64 row_bytes) {
    const int need = QT == 14 ? 2 : 16;
    return mp_aligned(w, need) && (row_bytes % need) == 0;
}

// ---- a warp's Q6_K weight rows staged in shared memory ----
// Q6_K's 210-byte blocks are only 2-byte aligned, so the pass reads its words as pairs of 16-bit loads, and
// each such load of a warp touches 8 rows: ~8 L1 wavefronts for 64 bytes (H100, 30b-a3b's down projections:
// ~1.4 TB/s, where the Q4_K pass's 8- and 16-byte loads reach ~2.4). An expert's 16 rows are contiguous, so
// where they start 16-byte aligned and fit MP_Q6_STAGE bytes (K up to 768) the warp first copies them to
// shared memory in 16-byte pieces (cp.async: no registers, all in flight at once), and the pass reads there.
#define MP_Q6_STAGE 10240       // bytes of a warp's staged rows (16 rows of 630: K = 768)
// MP_STAGE_LDS (tuning switch, a mask: 1 qmm_experts_mma, 2 qmm_dense_mma): the passes over staged rows read
// them through a pointer to the stage itself, which nvcc compiles to shared-memory loads (LDS), and the
// unstaged rows through one to global memory (LDG); a kernel whose bit is 0 reads both through one pointer
// variable, a global or a shared address, which nvcc compiles to generic loads (LD). The passes'
// arithmetic is the same either way. 3 by default since benchmarks/NOTES.md step 76 (H100, full 30b-a3b:
// the forward -2.4 % at 64 tokens, every round; +0.2 % at 3, mixed; the down projections alone -2 % at 3
// tokens and -6 % at 64).
#ifndef MP_STAGE_LDS
#define MP_STAGE_LDS 3
#endif
#define MP_LDS_EXPERTS ((MP_STAGE_LDS & 1) != 0)
#define MP_LDS_DENSE ((MP_STAGE_LDS & 2) != 0)
#ifdef MOEPARITY_EMULATOR
void mp_emu_cp_async16(void* dst, const void* src);  // the emulator's prelude: copies that land at their wait
void mp_emu_cp_commit();
void mp_emu_cp_wait(int pending);
#endif
MP_HD void mp_cp_async16(void* smem, const void* gmem) {
    mp_aligned_load(smem, 16);
    mp_aligned_load(gmem, 16);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(smem)), "l"(gmem)
                 : "memory");
#elif defined(MOEPARITY_EMULATOR)
    mp_emu_cp_async16(smem, gmem);  // (lands at the wait for its group)
#else
    for (int i = 0; i < 16; ++i) ((mp_u8*)smem)[i] = ((const mp_u8*)gmem)[i];
#endif
}
MP_HD void mp_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#elif defined(MOEPARITY_EMULATOR)
    mp_emu_cp_commit();  // (wait_all: commit_group, then wait_group 0)
    mp_emu_cp_wait(0);
#endif
}
// thread tid of nth copies its share of `bytes` (even) from src (16-byte aligned) to dst (16-byte aligned):
// 16-byte pieces, then the tail 2 bytes a thread; the copies are complete for the thread on return (the
// caller's barrier makes them visible to the others)
// the bytes of a staging past its last whole 16-byte piece, 2 bytes a thread (plain loads and stores: complete
// for the thread on return)
MP_HD void mp_stage_tail(mp_u8* dst, const mp_u8* __restrict__ src, int bytes, int tid, int nth) {
    for (int i = 16 * (bytes >> 4) + 2 * tid; i < bytes; i += 2 * nth) *(mp_u16*)(dst + i) = *(const mp_u16*)(src + i);
}
MP_HD void mp_stage_rows_issue(mp_u8* dst, const mp_u8* __restrict__ src, int bytes, int tid, int nth) {
    const int whole = bytes >> 4;
    for (int i = tid; i < whole; i += nth) mp_cp_async16(dst + 16 * i, src + 16 * i);
    mp_stage_tail(dst, src, bytes, tid, nth);
}
// MP_STAGE_PIPE (tuning switch): qmm_experts_mma issues its staged rows in two cp.async groups, the pieces
// holding some row's first super-block, then the rest (mp_stage_rows_issue2), and its first pass waits for
// each group as it reaches the super-blocks that need it, so the first super-block's products overlap the
// later ones' copies; 0: one wait for all of the rows before the passes
#ifndef MP_STAGE_PIPE
#define MP_STAGE_PIPE 0
#endif
MP_HD void mp_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(MOEPARITY_EMULATOR)
    mp_emu_cp_commit();
#endif
}
// until at most N of this thread's committed cp.async groups are pending
template <int N> MP_HD void mp_cp_async_wait_group() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif defined(MOEPARITY_EMULATOR)
    mp_emu_cp_wait(N);
#endif
}
// as mp_stage_rows_issue for rows rows of row_bytes bytes each (16-byte aligned and contiguous from src, each
// starting with a super-block of bs bytes) in two committed groups: the 16-byte pieces holding a byte of
// some row's first super-block, then the others; row r's pieces are [g0b(r), g0b(r + 1)), its first group's
// those up to its first super-block's last byte (a piece shared with row r + 1 is that row's)
MP_HD void mp_stage_rows_issue2(mp_u8* dst, const mp_u8* __restrict__ src, int rows, int row_bytes, int bs, int tid,
                                int nth) {
    const int bytes = rows * row_bytes, whole = bytes >> 4;
    auto g0b = [&](int r) { return r < rows ? (r * row_bytes) >> 4 : whole; };
    auto g0e = [&](int r) {
        const int e = ((r * row_bytes + bs - 1) >> 4) + 1, next = g0b(r + 1);
        return e < next ? e : next;
    };
    for (int r = 0; r < rows; ++r)
        for (int i = g0b(r) + tid; i < g0e(r); i += nth) mp_cp_async16(dst + 16 * i, src + 16 * i);
    mp_cp_async_commit();
    for (int r = 0; r < rows; ++r)
        for (int i = g0e(r) + tid; i < g0b(r + 1); i += nth) mp_cp_async16(dst + 16 * i, src + 16 * i);
    mp_cp_async_commit();
    mp_stage_tail(dst, src, bytes, tid, nth);
}
MP_HD void mp_stage_rows(mp_u8* dst, const mp_u8* __restrict__ src, int bytes, int tid, int nth) {
    mp_stage_rows_issue(dst, src, bytes, tid, nth);  // (its 16-byte pieces complete at the wait)
    mp_cp_async_wait();
}

// an int from L2 (not L1): read before the programmatic-launch wait, written by an earlier kernel
MP_HD int mp_ld_l2(const int* p) {
#if defined(__CUDA_ARCH__)
    return __ldcg(p);
#else
    return *p;
#endif
}
#define MP_REC 8                // ints per expert record (mp_record_pairs)
// 8 ints at p (16-byte aligned) from L2: two 16-byte loads
MP_HD void mp_ld8_l2(const int* p, int (&v)[8]) {
    mp_aligned_load(p, 16);
#if defined(__CUDA_ARCH__)
    const int4 a = __ldcg((const int4*)p), b = __ldcg((const int4*)p + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = p[i];
#endif
}
// v[u] for u < 4 (u not known at compile time) without a local-memory array
MP_HD int mp_pick4(const int (&v)[4], int u) { return u == 0 ? v[0] : u == 1 ? v[1] : u == 2 ? v[2] : v[3]; }
// the same for u < 8
MP_HD int mp_pick8(const int (&v)[8], int u) {
    int r = v[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) r = u == i ? v[i] : r;
    return r;
}
template <int NP> MP_HD int mp_pick(const int (&v)[NP], int u) {
    if constexpr (NP == 8) return mp_pick8(v, u);
    else return mp_pick4(v, u);
}

// grid (groups * matrices, routing records: an active expert's runs of up to MP_EXPERT_CHUNK pairs) with groups =
// ceil(N / (16 MP_WARPS)), block MP_THREADS;
// arguments as qmm_experts, with the activations as act_digits wrote them (K: whole super-blocks).
// ST: a warp's 16 rows are staged in shared memory where they fit MP_Q6_STAGE bytes and start 16-byte
// aligned (Q6_K always: its rows are only 2-byte aligned; Q4_K where kernels.py picks <12,1>: the down
// projection's 432-byte rows, whose 3 super-blocks then arrive in one round instead of one after another;
// 432 = 108 words puts a warp's 8 rows on distinct banks, so they need no padding). early: the routing
// was written two or more launches before this one in the stream (kernels.py counts), so it is complete
// when this kernel starts (every block of the launch before passed its own wait, which waited for it):
// the routing is read and the rows staged or prefetched before the wait, while that launch still runs.
// P8 (MP_EXPERT_PASS8, prompts past 4 tokens): passes of up to 8 pairs, four n-tiles on each decode of the
// rows' super-blocks (a record's run of 8 pairs is one pass), the same values as passes of 4.
template <int QT, int ST = (QT == 14), int P8 = 0>
MP_MMA_GLOBAL_P8(P8) void qmm_experts_mma(const mp_u8* __restrict__ w0, const mp_u8* __restrict__ w1, mp_i64 row_bytes,
                                   mp_i64 expert_bytes, int N, int K, const mp_u32* __restrict__ xd,
                                   const float* __restrict__ xs, const float* __restrict__ xunit, int x_div,
                                   const int* __restrict__ pairs, const int* __restrict__ records,
                                   float* __restrict__ out0, float* __restrict__ out1, int ldo, int early) {
    MP_SHARED mp_u4 stage[ST ? MP_WARPS : 1][ST ? MP_Q6_STAGE / 16 : 1];  // the staged rows
    const int groups = (N + MP_WARPS * 16 - 1) / (MP_WARPS * 16);
    const bool second = (int)blockIdx.x >= groups;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int n0 = (((int)blockIdx.x - (second ? groups : 0)) * MP_WARPS + warp) * 16;
    constexpr int NB = P8 ? 4 : 2, NP = 2 * NB;  // n-tiles of a pass (2 tokens each); pairs pp holds
    int e = -1, beg = 0, end = 0, pp[NP] = {};  // pp: the pairs of the pass starting at beg
    const mp_u8* we = nullptr;
    int wN = N, wn0 = n0;  // the pass's rows: we's rows n0 .. (clamped to N - 1)
    bool staged = false;
    auto pass_pairs = [&](int p0) {
#pragma unroll
        for (int u = 0; u < NP; ++u) pp[u] = mp_ld_l2(pairs + (p0 + u < end ? p0 + u : end - 1));
    };
    auto prepare = [&]() {  // uniform over the warp: the expert's record (mp_record_pairs), its rows
        int rec[MP_REC];
        mp_ld8_l2(records + (mp_i64)MP_REC * blockIdx.y, rec);
        e = rec[0];
        if (e < 0 || n0 >= N) return;
        we = (second ? w1 : w0) + (mp_i64)e * expert_bytes;
        if (ST && 16 * row_bytes <= MP_Q6_STAGE && mp_aligned(we + (mp_i64)n0 * row_bytes, 16)) {
            wN = N - n0 < 16 ? N - n0 : 16;
            mp_u8* st = (mp_u8*)stage[ST ? warp : 0];
            if (MP_STAGE_PIPE)
                mp_stage_rows_issue2(st, we + (mp_i64)n0 * row_bytes, wN, (int)row_bytes, mp_traits<QT>::tsize, lane, 32);
            else
                mp_stage_rows_issue(st, we + (mp_i64)n0 * row_bytes, (int)(wN * row_bytes), lane, 32);
            if (!MP_LDS_EXPERTS) {  // (else the passes read the stage by its own pointer, sw)
                we = st;
                wn0 = 0;
            }
            staged = true;
        } else if (lane == 0) {
            mp_prefetch_rows<MP_PF_EXPERTS_MMA>(we, row_bytes, N, n0, 16);
        }
        beg = rec[1];
        end = rec[2];
        if constexpr (P8) {
            pass_pairs(beg);  // the record holds the first 4
        } else {
#pragma unroll
            for (int u = 0; u < 4; ++u) pp[u] = rec[4 + u];
        }
    };
    if (early) prepare();
    mp_grid_sync();  // the digits were written by the launch before (the routing too, unless early)
    if (!early) prepare();
    if (e < 0 || n0 >= N) return;  // uniform over the warp
    if (staged && !MP_STAGE_PIPE) {
        mp_cp_async_wait();
        mp_syncwarp();
    }
    const bool al = mp_mma_aligned<QT>(we, row_bytes);  // uniform over the warp
    float* out = second ? out1 : out0;
    constexpr int PT = P8 ? 8 : MP_MMA_PASS_TOKENS <= 2 ? 2 : 4;  // tokens a pass
    // the staged rows through a pointer nvcc sees is shared (ld.shared; through `we`, a global or a shared
    // address, they would be generic loads): MP_STAGE_LDS bit 1
    const mp_u8* sw = (const mp_u8*)stage[ST ? warp : 0];
#if MP_STAGE_PIPE
    bool pending = staged;  // the first pass waits for the staged rows' groups as it reaches their super-blocks
    auto wait_staged = [&](int s) {
        if (pending && s <= 1) {  // (uniform over the warp)
            if (s == 0) mp_cp_async_wait_group<1>();
            else mp_cp_async_wait_group<0>();
            mp_syncwarp();
        }
    };
#else
    bool pending = false;
    const mp_no_hook wait_staged;
#endif
    for (int p0 = beg; p0 < end; p0 += PT) {  // pp[h] ..: this pass's pairs (pp holds p0 - h .. p0 - h + NP - 1)
        const int nt = (end - p0) < PT ? (end - p0) : PT, h = PT >= 4 ? 0 : (p0 - beg) & 3;
        const mp_u32* bq[NB];
        const float* sq[NB];
        bool bon[NB];
        float unit[NB];
        int opair[NB];
#pragma unroll
        for (int i = 0; i < NB; ++i) {
            const int ud = 2 * i + (tig >> 1);
            opair[i] = ud < nt ? mp_pick(pp, h + ud) : -1;
        }
        mp_mma_pass_inputs(nt, [&](int u) { return mp_pick(pp, h + u) / x_div; }, K, xd, xs, xunit, lane, bq, bon, sq, unit);
        float res[NB];
        if (MP_LDS_EXPERTS && ST && staged)  // (aligned: the stage is 16-byte aligned, and so are its rows)
            mp_mma_dispatch<QT, PT>(true, nt, sw, row_bytes, wN, 0, K, 0, 1, bq, bon, sq, unit, lane, res, wait_staged);
        else
            mp_mma_dispatch<QT, PT>(al, nt, we, row_bytes, wN, wn0, K, 0, 1, bq, bon, sq, unit, lane, res, wait_staged);
        pending = false;
        const int n = n0 + gid + 8 * (tig & 1);
#pragma unroll
        for (int i = 0; i < NB; ++i)
            if (opair[i] >= 0 && n < N) out[(mp_i64)opair[i] * ldo + n] = res[i];
        if ((PT >= 4 || ((p0 + PT - beg) & 3) == 0) && p0 + PT < end) pass_pairs(p0 + PT);
    }
}

// ---- Q4_K and Q6_K dense products on the tensor cores -----------------------------------------------------
// qmm_dense's product with the activations as act_digits wrote them (out_m[t, n] as in qmm_dense_splitk).
// A block's warps (blockDim.x / 32 of them, up to MP_MMA_DENSE_WARPS) take the same 16 weight rows and
// the tokens in passes of up to 4 (a longer prompt's passes one after another over the same rows, staged
// or in L1 / L2 after the first), warp w super-blocks w, w + warps, ... of the row: every warp has its
// loads in flight at once (a warp of qmm_experts_mma walks its row alone, which suits an expert's many
// small matrices but leaves a dense matrix of a few hundred row groups waiting on memory). The warps'
// values meet in shared memory and are added in warp order (deterministic).
// grid (row groups of 16 over the matrices), block 32 x warps.

#define MP_MMA_DENSE_WARPS 8    // the most warps per block of qmm_dense_mma (kernels.py: MMA_DENSE_WARPS)
#define MP_DENSE_PASS8_WARPS 4  // the most of qmm_dense_mma<QT,3> (kernels.py: DENSE_PASS8_WARPS)
// MP_DENSE_PASS8 (read by kernels.py only: dense_pass8): a long prompt's dense product that splits its passes
// over the warps (MP_DENSE_LONG_TOKENS) takes them 8 tokens at a time (<QT,3>: four n-tiles on each decode
// of the rows, up to MP_DENSE_PASS8_WARPS warps a block, MP_MMA_PASS8_BLOCKS blocks an SM); 0: passes of 4
#ifndef MP_DENSE_PASS8
#define MP_DENSE_PASS8 1
#endif
#ifdef MOEPARITY_EMULATOR
#define MP_MMA_DENSE_GLOBAL MP_GLOBAL
#define MP_MMA_DENSE_GLOBAL_L(LONG) MP_GLOBAL
#else
// the register cap of qmm_experts_mma (128) for blocks of up to MP_MMA_DENSE_WARPS warps
#define MP_MMA_DENSE_GLOBAL __global__ __launch_bounds__(32 * MP_MMA_DENSE_WARPS, MP_MMA_MIN_BLOCKS * MP_WARPS / MP_MMA_DENSE_WARPS)
// LONG 3 (passes of 8 over the warps): blocks of up to MP_DENSE_PASS8_WARPS warps, MP_MMA_PASS8_BLOCKS an SM
#define MP_MMA_DENSE_GLOBAL_L(LONG) __global__ __launch_bounds__((LONG) == 3 ? 32 * MP_DENSE_PASS8_WARPS : 32 * MP_MMA_DENSE_WARPS, \
    (LONG) == 3 ? MP_MMA_PASS8_BLOCKS : MP_MMA_MIN_BLOCKS * MP_WARPS / MP_MMA_DENSE_WARPS)
#endif

#define MP_Q6_DENSE_STAGE 26880 // bytes of a qmm_dense_mma block's staged Q6_K rows (16 rows of 1680: K = 2048)
// Q4_K rows are staged too, before the programmatic-launch wait, so that after it only the digits come from
// L2: 16 rows of up to K = 4096 (2304 bytes), each MP_Q4_PAD bytes further on than the last (the rows' 8-
// and 16-byte loads of a warp then fall in different banks: 2304 and 1152 are multiples of 128).
// MP_STAGE_Q4_DENSE=0 prefetches them to L2 instead (tuning switch).
#ifndef MP_STAGE_Q4_DENSE
#define MP_STAGE_Q4_DENSE 1
#endif
#define MP_Q4_PAD 32
#define MP_Q4_DENSE_STAGE (16 * (2304 + MP_Q4_PAD))
// thread tid of nth copies rows rows of `bytes` (a multiple of 16) each from src (16-byte aligned, rows
// contiguous) to dst (16-byte aligned), row r at dst + r * stride (a multiple of 16); complete for the
// thread on return (the caller's barrier makes them visible to the others)
MP_HD void mp_stage_rows_strided(mp_u8* dst, const mp_u8* __restrict__ src, int rows, int bytes, int stride, int tid,
                                 int nth) {
    const int per = bytes >> 4;
    for (int i = tid; i < rows * per; i += nth) {
        const int r = i / per, c = i - r * per;
        mp_cp_async16(dst + r * stride + 16 * c, src + (mp_i64)r * bytes + 16 * c);
    }
    mp_cp_async_wait();
}
// qmm_dense_mma's pass over tokens t0 .. t0 + nt - 1 (nt <= 4): each warp's super-blocks of the block's 16
// rows, the warps' values added in shared memory (part) in warp order and stored
template <int QT, bool ZA = MP_MMA_ZERO_ABSENT>
MP_HD void mp_dense_mma_tokens(int t0, int nt, const mp_u8* __restrict__ w, mp_i64 row_bytes, int wN, int wn0, int N, int n0,
                               int K, const mp_u32* __restrict__ xd, const float* __restrict__ xs,
                               const float* __restrict__ xunit, int warp, int warps, int lane, int m, float* out0,
                               float* out1, float* out2, float (*part)[2][32]) {
    const mp_u32* bq[2];
    const float* sq[2];
    bool bon[2];
    float unit[2];
    mp_mma_pass_inputs(nt, [t0](int u) { return t0 + u; }, K, xd, xs, xunit, lane, bq, bon, sq, unit);
    const bool al = mp_mma_aligned<QT>(w, row_bytes);  // uniform over the block
    float res[2] = {0.0f, 0.0f};  // res[1]: no second n-tile up to 2 tokens
    mp_mma_dispatch<QT, 4, ZA>(al, nt, w, row_bytes, wN, wn0, K, warp, warps, bq, bon, sq, unit, lane, res);
    part[warp][0][lane] = res[0];
    part[warp][1][lane] = res[1];
    mp_syncthreads();
    for (int j = threadIdx.x; j < 64; j += (int)blockDim.x) {  // j = 32 i + l: lane l's (row, token) of n-tile i
        const int i = j >> 5, l = j & 31, t = 2 * i + ((l & 3) >> 1), n = n0 + (l >> 2) + 8 * (l & 1);
        if (t < nt && n < N) {
            float v = part[0][i][l];
            for (int u = 1; u < warps; ++u) v = mp_fadd(v, part[u][i][l]);
            mp_pick_out(m, out0, out1, out2)[(mp_i64)(t0 + t) * N + n] = v;
        }
    }
}
// LONG: 0 one pass of up to 4 tokens; 1 passes of 4 one after another, the block's warps splitting K (their
// values met in shared memory); 2 (MP_DENSE_LONG_TOKENS) the passes split over the warps, each over all of K;
// 3 (MP_DENSE_PASS8) as 2 with passes of 8 (kernels.py gives a block a multiple of 2 warps' passes of 4)
template <int QT, int LONG = 0>
MP_MMA_DENSE_GLOBAL_L(LONG) void qmm_dense_mma(const mp_u8* __restrict__ w0, const mp_u8* __restrict__ w1, const mp_u8* __restrict__ w2,
                                       mp_i64 row_bytes, int N0, int N1, int N2, int K, const mp_u32* __restrict__ xd,
                                       const float* __restrict__ xs, const float* __restrict__ xunit, int T,
                                       float* __restrict__ out0, float* __restrict__ out1, float* __restrict__ out2) {
    MP_SHARED float part[MP_MMA_DENSE_WARPS][2][32];
    // the block's rows (see mp_stage_rows): Q6_K, and Q4_K unless MP_STAGE_Q4_DENSE is 0
    MP_SHARED mp_u4 stage[QT == 14 ? MP_Q6_DENSE_STAGE / 16 : QT == 12 && MP_STAGE_Q4_DENSE ? MP_Q4_DENSE_STAGE / 16 : 1];
    int group = (int)blockIdx.x;
    const mp_u8* w;
    int N;
    const int m = mp_pick_matrix(group, 16, w0, w1, w2, N0, N1, N2, w, N);
    const int warps = (int)(blockDim.x >> 5), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = group * 16;
    int wN = N, wn0 = n0;  // the pass's rows: w's rows n0 .. (clamped to N - 1)
    bool staged = false;
    mp_i64 srb = row_bytes;  // the staged rows' stride
    // the weights were not written by an earlier kernel: staged or prefetched before the wait
    if (QT == 14 && n0 < N && 16 * row_bytes <= MP_Q6_DENSE_STAGE && mp_aligned(w + (mp_i64)n0 * row_bytes, 16)) {
        wN = N - n0 < 16 ? N - n0 : 16;  // uniform over the block
        mp_stage_rows((mp_u8*)stage, w + (mp_i64)n0 * row_bytes, (int)(wN * row_bytes), (int)threadIdx.x, (int)blockDim.x);
        mp_syncthreads();
        staged = true;
        if (!MP_LDS_DENSE) {  // the passes read the stage through w (else by its own pointer: run_passes)
            w = (const mp_u8*)stage;
            wn0 = 0;
        }
    } else if (QT == 12 && MP_STAGE_Q4_DENSE && n0 < N && 16 * (row_bytes + MP_Q4_PAD) <= MP_Q4_DENSE_STAGE
               && mp_aligned(w + (mp_i64)n0 * row_bytes, 16)) {  // (row_bytes: a multiple of 144, so of 16)
        wN = N - n0 < 16 ? N - n0 : 16;  // uniform over the block
        const int stride = (int)row_bytes + MP_Q4_PAD;
        mp_stage_rows_strided((mp_u8*)stage, w + (mp_i64)n0 * row_bytes, wN, (int)row_bytes, stride, (int)threadIdx.x,
                              (int)blockDim.x);
        mp_syncthreads();
        staged = true;
        srb = stride;
        if (!MP_LDS_DENSE) {
            w = (const mp_u8*)stage;
            wn0 = 0;
            row_bytes = stride;
        }
    } else if (threadIdx.x == 0 && n0 < N) {
        mp_prefetch_rows<MP_PF_DENSE_MMA>(w, row_bytes, N, n0, 16);
    }
    mp_grid_sync();  // the digits were
    if (n0 >= N) return;  // uniform over the block
    // the passes over rows w (row_bytes apart, the pass's rows wn0 ..): the stage's rows are read through a
    // pointer nvcc sees is shared (MP_STAGE_LDS bit 2), else through one global or shared (generic loads)
    auto run_passes = [&](const mp_u8* w, mp_i64 row_bytes, int wn0) {
        if (!LONG) {  // one pass of up to 4 tokens
            mp_dense_mma_tokens<QT>(0, T < 4 ? T : 4, w, row_bytes, wN, wn0, N, n0, K, xd, xs, xunit, warp, warps, lane, m,
                                    out0, out1, out2, part);
            return;
        }
        // passes of 4 over the same (staged) rows: block y of gridDim.y takes passes y P .. y P + P - 1 of the
        // prompt's ceil(T / 4) (kernels.py: dense_mma_pass_groups; a few row groups, e.g. attn_v's 32, would
        // otherwise leave the GPU waiting on one block's passes one after another)
        const int passes = (T + 3) >> 2, per = (passes + (int)gridDim.y - 1) / (int)gridDim.y;
        const int tb = 4 * per * (int)blockIdx.y, te = tb + 4 * per < T ? tb + 4 * per : T;
        if (LONG >= 2) {  // each warp whole passes over all of K, written from its registers (no barrier, no sums)
            constexpr int PT = LONG == 3 ? 8 : 4, NB = PT / 2;  // tokens a pass, its n-tiles
            const bool al = mp_mma_aligned<QT>(w, row_bytes);  // uniform over the block
            for (int t0 = tb + PT * warp; t0 < te; t0 += PT * warps) {
                const int nt = te - t0 < PT ? te - t0 : PT;
                const mp_u32* bq[NB];
                const float* sq[NB];
                bool bon[NB];
                float unit[NB], res[NB] = {};
                mp_mma_pass_inputs(nt, [t0](int u) { return t0 + u; }, K, xd, xs, xunit, lane, bq, bon, sq, unit);
                mp_mma_dispatch<QT, PT, MP_DENSE_LONG_ZERO_ABSENT>(al, nt, w, row_bytes, wN, wn0, K, 0, 1, bq, bon, sq,
                                                                   unit, lane, res);
                const int n = n0 + (lane >> 2) + 8 * (lane & 1);
#pragma unroll
                for (int i = 0; i < NB; ++i) {
                    const int t = 2 * i + ((lane & 3) >> 1);
                    if (t < nt && n < N) mp_pick_out(m, out0, out1, out2)[(mp_i64)(t0 + t) * N + n] = res[i];
                }
            }
            return;
        }
        for (int t0 = tb; t0 < te; t0 += 4) {
            if (t0 != tb) mp_syncthreads();  // the last pass's values are read
            mp_dense_mma_tokens<QT, MP_DENSE_LONG_ZERO_ABSENT>(t0, te - t0 < 4 ? te - t0 : 4, w, row_bytes, wN, wn0, N, n0, K,
                                                               xd, xs, xunit, warp, warps, lane, m, out0, out1, out2, part);
        }
    };
    if (MP_LDS_DENSE && staged) run_passes((const mp_u8*)stage, srb, 0);
    else run_passes(w, row_bytes, wn0);
}

// ---- grouping of (token, slot) pairs by expert ------------------------------------------------------
// One block of MP_THREADS threads, a stable counting sort: ids[T, k] -> pairs (p = t * k + j sorted by
// (expert, p)), offsets[E + 1], active[n_active] (experts owning pairs, ascending, then -1 up to
// n_act_len), and order[T, k] (token t's slots in ascending expert-id order, ties by slot: the order
// of the reference's `for e in unique(ids)` accumulation). Counts by shared-memory atomics, offsets
// and the active list by a block scan (thread i owns experts i*per .. i*per + per - 1; scans within the
// warps by xor exchanges, then the warps' totals), placement in rounds of MP_THREADS pairs, each pair ranked
// among the round's earlier pairs of its expert; up to MP_GROUP_IDS pairs read their ids from a copy in
// shared memory (moe_route writes them in the same launch: a global read-back would be an L2 round trip).
// Ids outside 0..E-1 are left out (the host validates them). Every thread of the block must call it.

#define MP_MAX_EXPERTS 512      // kernels.py: MAX_EXPERTS

MP_HD void mp_atomic_add_shared(int* a, int v) {
#if defined(__CUDA_ARCH__)
    atomicAdd(a, v);
#else
    *a += v;  // the emulator switches threads only at barriers and warp reductions
#endif
}

#define MP_GROUP_IDS 1024        // prompts of up to this many pairs have their ids copied to shared memory first
// MP_EXPERT_CHUNK: the most pairs of one record (qmm_experts_mma: a block row of gridDim.y each). An expert
// holding more pairs than this gets several records, its pairs in runs of MP_EXPERT_CHUNK, so that a busy
// expert's passes of 4 run side by side in several blocks instead of one after another in one warp (a long
// prompt's routing is skewed: one expert may hold every token). 0: one record an expert. Read by kernels.py
// too (expert_chunk: the records' count). At least MP_WARPS, so that moe_route's one-warp grouping (up to
// MP_WARPS tokens, an expert at most one pair a token) never needs a second record.
#ifndef MP_EXPERT_CHUNK
#define MP_EXPERT_CHUNK 8
#endif
static_assert(MP_EXPERT_CHUNK == 0 || MP_EXPERT_CHUNK >= MP_WARPS, "MP_EXPERT_CHUNK: 0 or at least MP_WARPS");
// records for an expert of c pairs
MP_HD int mp_expert_chunks(int c) { return MP_EXPERT_CHUNK ? (c + MP_EXPERT_CHUNK - 1) / MP_EXPERT_CHUNK : c > 0; }
struct mp_group_smem {  // the kernel's shared memory (a __shared__ variable cannot live in an MP_HD function)
    int next[MP_MAX_EXPERTS];  // pairs per expert, then the expert's next free position
    int warp_n[MP_WARPS], warp_a[MP_WARPS], warp_c[MP_WARPS], round_ids[MP_THREADS];
    int ids[MP_GROUP_IDS];
};

// inclusive prefix sums over a warp's lanes of (n, a) by xor exchanges (each lane adds the totals of the
// lower halves it meets); tn / ta: the warp's totals. Integers below 2^24 (exact as floats).
MP_HD void mp_warp_scan2(int& n, int& a, int& tn, int& ta, int lane) {
    float pn = (float)n, pa = (float)a, sn = pn, sa = pa;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const float on = mp_shfl_xor(sn, off), oa = mp_shfl_xor(sa, off);
        if (lane & off) {
            pn += on;
            pa += oa;
        }
        sn += on;
        sa += oa;
    }
    n = (int)pn;
    a = (int)pa;
    tn = (int)sn;
    ta = (int)sa;
}

// records [n_rec_len, MP_REC]: per run of up to MP_EXPERT_CHUNK pairs of an active expert (the experts
// ascending, an expert's runs in order; one run an expert where MP_EXPERT_CHUNK is 0), {expert, the run's
// first pair's place, one past its last, 0, its first 4 pairs (the last one repeated past its count)};
// past the runs {-1, 0, 0, 0, -1 x 4}. What qmm_experts_mma reads first: one 32-byte record where active ->
// offsets -> pairs were three reads one after another.
MP_HD void mp_record_pairs(int* __restrict__ rec, int e, int beg, int end, const int* __restrict__ pairs) {
    rec[0] = e;
    rec[1] = beg;
    rec[2] = end;
    rec[3] = 0;
#pragma unroll
    for (int u = 0; u < 4; ++u) rec[4 + u] = e < 0 ? -1 : pairs[beg + u < end ? beg + u : end - 1];
}

MP_HD void mp_group_pairs(const int* ids, int T, int k, int E, int* __restrict__ pairs,
                          int* __restrict__ offsets, int* __restrict__ active, int n_act_len, int* __restrict__ order,
                          int* __restrict__ records, int n_rec_len, mp_group_smem& sm) {
    int* next = sm.next;
    int* round_ids = sm.round_ids;
    const int tid = threadIdx.x, P = T * k, lane = tid & 31, warp = tid >> 5;
    for (int e = tid; e < E; e += MP_THREADS) next[e] = 0;
    if (P <= MP_GROUP_IDS)  // read below from shared memory (ids may have been written in this launch)
        for (int p = tid; p < P; p += MP_THREADS) sm.ids[p] = ids[p];
    mp_syncthreads();
    const int* src = P <= MP_GROUP_IDS ? sm.ids : ids;
    for (int p = tid; p < P; p += MP_THREADS) {
        const int id = src[p];
        if (id >= 0 && id < E) mp_atomic_add_shared(&next[id], 1);
    }
    mp_syncthreads();
    const int per = (E + MP_THREADS - 1) / MP_THREADS, e_lo = tid * per;
    int mine = 0, mine_active = 0, mine_runs = 0;
    for (int q = 0; q < per && e_lo + q < E; ++q) {
        mine += next[e_lo + q];
        mine_active += next[e_lo + q] > 0;
        mine_runs += mp_expert_chunks(next[e_lo + q]);
    }
    // inclusive scans: in the warp, then over the warps
    int inc_n = mine, inc_a = mine_active, inc_c = mine_runs, tot_n, tot_a, tot_c, none = 0, tot_none;
    mp_warp_scan2(inc_n, inc_a, tot_n, tot_a, lane);
    mp_warp_scan2(inc_c, none, tot_c, tot_none, lane);
    if (lane == 0) {
        sm.warp_n[warp] = tot_n;
        sm.warp_a[warp] = tot_a;
        sm.warp_c[warp] = tot_c;
    }
    mp_syncthreads();
    int n_active = 0, n_total = 0, n_runs = 0;
#pragma unroll
    for (int w = 0; w < MP_WARPS; ++w) {
        if (w < warp) {
            inc_n += sm.warp_n[w];
            inc_a += sm.warp_a[w];
            inc_c += sm.warp_c[w];
        }
        n_total += sm.warp_n[w];
        n_active += sm.warp_a[w];
        n_runs += sm.warp_c[w];
    }
    int pos = inc_n - mine, act = inc_a - mine_active, run = inc_c - mine_runs;
    for (int q = 0; q < per && e_lo + q < E; ++q) {
        const int e = e_lo + q, c = next[e];
        offsets[e] = pos;
        if (c > 0) active[act++] = e;
        for (int j = 0, step = MP_EXPERT_CHUNK ? MP_EXPERT_CHUNK : c; j < mp_expert_chunks(c); ++j, ++run) {
            if (run >= n_rec_len) break;  // (kernels.py sizes the records for every run: never)
            int* rec = records + (mp_i64)MP_REC * run;  // the run's head; its pairs once they are placed
            rec[0] = e;
            rec[1] = pos + j * step;
            rec[2] = pos + (c < (j + 1) * step ? c : (j + 1) * step);
        }
        next[e] = pos;
        pos += c;
    }
    if (tid == MP_THREADS - 1) offsets[E] = n_total;  // every pair of an id in 0..E-1
    for (int i = n_active + tid; i < n_act_len; i += MP_THREADS) active[i] = -1;
    mp_syncthreads();
    for (int r0 = 0; r0 < P; r0 += MP_THREADS) {  // stable placement, a round of MP_THREADS pairs at a time
        const int p = r0 + tid;
        const int id = p < P ? src[p] : -1;
        const bool valid = id >= 0 && id < E;
        round_ids[tid] = valid ? id : -1;
        mp_syncthreads();
        if (valid) {
            int rank = 0;
            for (int i = 0; i < tid; ++i) rank += round_ids[i] == id;
            pairs[next[id] + rank] = p;
        }
        mp_syncthreads();
        if (valid) mp_atomic_add_shared(&next[id], 1);
        mp_syncthreads();
    }
    for (int p = tid; p < P; p += MP_THREADS) {  // one thread per slot j of token t
        const int t = p / k, j = p - t * k;
        const int* it = src + (mp_i64)t * k;
        const int idj = it[j];
        int rank = 0;  // slots with a smaller id, or the same id earlier
        for (int q = 0; q < k; ++q) {
            const int idq = it[q];
            rank += (idq < idj) || (idq == idj && q < j);
        }
        order[(mp_i64)t * k + rank] = j;
    }
    mp_syncthreads();  // pairs and the runs' heads written (by this block: visible to it after the barrier)
    for (int i = tid; i < n_rec_len; i += MP_THREADS) {
        int* rec = records + (mp_i64)MP_REC * i;
        if (i < n_runs) mp_record_pairs(rec, rec[0], rec[1], rec[2], pairs);
        else mp_record_pairs(rec, -1, 0, 0, pairs);
    }
}

// mp_group_pairs by one warp, for up to 32 pairs (lane p holds pair p) and MP_GROUP_WARP_EXPERTS experts
// (lane l owns experts 4 l .. 4 l + 3), ids in shared memory: the same outputs without a block barrier
// or a shared-memory atomic (moe_route of a short prompt: ~30 % of its chain was mp_group_pairs' barriers).
// Only for prompts of up to MP_WARPS tokens (moe_route's one block): an expert then holds at most
// MP_WARPS <= MP_EXPERT_CHUNK pairs, one record. Every lane of the warp must call it.
#define MP_GROUP_WARP_EXPERTS 128
MP_HD void mp_group_pairs_warp(const int* ids, int T, int k, int E, int* __restrict__ pairs, int* __restrict__ offsets,
                               int* __restrict__ active, int n_act_len, int* __restrict__ order, int* __restrict__ records,
                               int n_rec_len, int lane) {
    const int P = T * k, p = lane;
    const int idp = p < P ? ids[p] : -1;
    int cnt[4] = {0, 0, 0, 0}, pos = 0;  // pairs of the lane's experts; pair p's place among the valid pairs
    for (int q = 0; q < P; ++q) {
        const int iq = ids[q];
        pos += iq >= 0 && iq < E && (iq < idp || (iq == idp && q < p));
#pragma unroll
        for (int j = 0; j < 4; ++j) cnt[j] += iq == 4 * lane + j;
    }
    if (idp >= 0 && idp < E) pairs[pos] = p;
    int mine = 0, mine_active = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if (4 * lane + j < E) {
            mine += cnt[j];
            mine_active += cnt[j] > 0;
        }
    }
    int inc_n = mine, inc_a = mine_active, tot_n, tot_a;
    mp_warp_scan2(inc_n, inc_a, tot_n, tot_a, lane);
    int off = inc_n - mine, act = inc_a - mine_active;
    int offj[4], slotj[4];  // the lane's experts' first places and active slots (for the records)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int e = 4 * lane + j;
        offj[j] = off;
        slotj[j] = act;
        if (e < E) {
            offsets[e] = off;
            if (cnt[j] > 0) {
                int* rec = records + (mp_i64)MP_REC * act;
                rec[0] = e;
                rec[1] = off;
                rec[2] = off + cnt[j];
                rec[3] = 0;
                active[act++] = e;
            }
            off += cnt[j];
        }
    }
    if (lane == 0) offsets[E] = tot_n;
    for (int i = tot_a + lane; i < n_act_len; i += 32) active[i] = -1;
    for (int i = tot_a + lane; i < n_rec_len; i += 32) mp_record_pairs(records + (mp_i64)MP_REC * i, -1, 0, 0, pairs);
    // pair p's expert idp: its first place, slot and pair count from the lane owning it, then the record's
    // pair entries (the expert's last pair also fills those past its count)
    int eo = 0, es = 0, ec = 0;
    const bool valid = idp >= 0 && idp < E;
    const int src = valid ? idp >> 2 : 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int o = mp_shfl_idx(offj[j], src), sl = mp_shfl_idx(slotj[j], src), c = mp_shfl_idx(cnt[j], src);
        if ((idp & 3) == j) {
            eo = o;
            es = sl;
            ec = c;
        }
    }
    if (valid) {
        const int r = pos - eo;
        int* rec = records + (mp_i64)MP_REC * es + 4;
        if (r < 4) rec[r] = p;
        if (r == ec - 1)
            for (int u = r + 1; u < 4; ++u) rec[u] = p;
    }
    if (p < P) {  // token t's slots in ascending expert-id order
        const int t = p / k, j = p - t * k;
        int rank = 0;
        for (int q = 0; q < k; ++q) {
            const int idq = ids[t * k + q];
            rank += (idq < idp) || (idq == idp && q < j);
        }
        order[t * k + rank] = j;
    }
}

extern "C" MP_GLOBAL void expert_group(const int* __restrict__ ids, int T, int k, int E,
                                       int* __restrict__ pairs, int* __restrict__ offsets,
                                       int* __restrict__ active, int n_act_len, int* __restrict__ order,
                                       int* __restrict__ records, int n_rec_len) {
    mp_grid_sync();
    MP_SHARED mp_group_smem sm;
    mp_group_pairs(ids, T, k, E, pairs, offsets, active, n_act_len, order, records, n_rec_len, sm);
}

// ---- router top-k ----------------------------------------------------------------------------------
// probs[T, E] -> ids[T, k] (descending probability, ties to the lower id, NaN after every number
// as in NumPy's stable argsort of -probs) and weights[T, k] = top / sum(top) (sum in slot order).
// One warp per token (block MP_THREADS: MP_WARPS tokens); lane l holds experts l, l + 32, ...
// Each round: the warp's largest untaken non-NaN value (or, when only NaN are left, NaN), then
// the lowest id holding it.

// (p, and ids in mp_group_pairs, are not __restrict__: moe_route writes them in the same launch)
// The first REGS values of each lane (E <= 32 REGS) are read once into registers; a larger E reads the rest
// from p in every round. mp_topk_row takes REGS = 4 up to 128 experts, else MP_TOPK_REGS (the slots past
// E are skipped either way: the same candidates in the same order, so the same result). A round is two
// warp maxima: the largest untaken number (NaN, which fmaxf passes over, where the lane has none; NaN
// overall when only NaN are left), then the lowest id holding it (or, when only NaN are left, the lowest
// untaken NaN id).
#define MP_TOPK_REGS 8
// MP_TOPK_REDUX=1: a round's two warp maxima are two redux.sync on an order key (mp_topk_key) and the id,
// one instruction each where a float butterfly is 5 dependent exchanges; the same winners (0: the
// butterflies, tuning switch)
#ifndef MP_TOPK_REDUX
#define MP_TOPK_REDUX 1
#endif
// a candidate's place in the top-k order as an unsigned key: numbers above NaN above none (0), a larger
// number above a smaller, +0 and -0 alike (they compare equal: the lower id wins the tie)
MP_HD mp_u32 mp_topk_key(float v) {
    if (!(v == v)) return 1u;
    const mp_u32 b = mp_float_to_bits(v == 0.0f ? 0.0f : v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // -inf: 0x007FFFFF, above NaN's 1
}
// a lane's candidate e with value v, its ids taken in ascending order: the first NaN, the largest number
MP_HD void mp_topk_consider(float v, int e, float& best, int& best_e, int& nan_e) {
    if (!(v == v)) {
        if (nan_e < 0) nan_e = e;
    } else if (best_e < 0 || v > best) {
        best = v;
        best_e = e;
    }
}
// one round of the top-k over the lane's untaken candidates (bit q of taken: expert lane + 32 q is chosen;
// pv: the first REGS values, held): the winner's id (every lane), marked taken by its lane, and its value
// v, bit for bit p[win]'s (MP_TOPK_REDUX: two redux.sync on the candidates' mp_topk_key and the id)
template <int REGS>
MP_HD int mp_topk_round_redux(const float (&pv)[REGS], const float* p, int E, unsigned long long& taken, int lane,
                              float& v) {
    mp_u32 key = 0u;  // the lane's best untaken key, the lowest id among equals
    int key_e = -1;
#pragma unroll
    for (int q = 0; q < REGS; ++q) {
        const int e = lane + 32 * q;
        const mp_u32 kq = e < E && !((taken >> q) & 1ull) ? mp_topk_key(pv[q]) : 0u;
        if (kq > key) key = kq, key_e = e;
    }
    for (int e = lane + 32 * REGS, q = REGS; e < E; e += 32, ++q) {
        const mp_u32 kq = !((taken >> q) & 1ull) ? mp_topk_key(p[e]) : 0u;
        if (kq > key) key = kq, key_e = e;
    }
    const mp_u32 m = mp_warp_redux_u32<false>(key);
    const int win = (int)mp_warp_redux_u32<true>(key == m ? (mp_u32)key_e : 0xFFFFFFFFu);
    if ((win & 31) == lane) taken |= 1ull << (win >> 5);
    // the winner's value from its key, unless it is a zero (the key does not keep the sign) or NaN
    v = m > 0x80000000u ? mp_bits_to_float(m & 0x7FFFFFFFu) : m > 1u && m < 0x80000000u ? mp_bits_to_float(~m) : p[win];
    return win;
}
// the same round by two float warp maxima (MP_TOPK_REDUX=0)
template <int REGS>
MP_HD int mp_topk_round_float(const float (&pv)[REGS], const float* p, int E, unsigned long long& taken, int lane,
                              float& v) {
    const float NEG_INF = mp_bits_to_float(0xFF800000u), QNAN = mp_bits_to_float(0x7FC00000u);
    // best untaken value of this lane: numbers first, then NaN; lowest id among equals
    float best = NEG_INF;
    int best_e = -1, nan_e = -1;
#pragma unroll
    for (int q = 0; q < REGS; ++q) {
        const int e = lane + 32 * q;
        if (e < E && !((taken >> q) & 1ull)) mp_topk_consider(pv[q], e, best, best_e, nan_e);
    }
    for (int e = lane + 32 * REGS, q = REGS; e < E; e += 32, ++q)
        if (!((taken >> q) & 1ull)) mp_topk_consider(p[e], e, best, best_e, nan_e);
    const float m = mp_warp_max1(best_e >= 0 ? best : QNAN);  // NaN: no number is left
    const bool num = m == m, mine = num ? (best_e >= 0 && best == m) : nan_e >= 0;
    const int win = (int)(-mp_warp_max1(mine ? -(float)(num ? best_e : nan_e) : NEG_INF));
    if ((win & 31) == lane) taken |= 1ull << (win >> 5);
    // the winner's value: m itself, bit for bit, unless it is a zero (+0 and -0 compare equal) or NaN
    v = num && m != 0.0f ? m : p[win];
    return win;
}
// pv: the lane's first REGS values of p, already read (moe_route: from its softmax's registers); id2, where
// not null, gets the ids too (moe_route: shared memory, for its grouping)
template <int REGS>
MP_HD void mp_topk_row_held(const float (&pv)[REGS], const float* p, int E, int k, int* __restrict__ id,
                            float* __restrict__ wt, int* id2, int lane) {
    unsigned long long taken = 0ull;  // bit q: expert lane + 32 q is chosen (E <= 2048)
    float sum = 0.0f;
    for (int r = 0; r < k; ++r) {
        float v;
        const int win = MP_TOPK_REDUX ? mp_topk_round_redux<REGS>(pv, p, E, taken, lane, v)
                                      : mp_topk_round_float<REGS>(pv, p, E, taken, lane, v);
        if (lane == 0) {
            id[r] = win;
            if (id2) id2[r] = win;
            wt[r] = v;
        }
        sum = mp_fadd(sum, v);
    }
    if (lane == 0)
        for (int r = 0; r < k; ++r) wt[r] = wt[r] / sum;
}
template <int REGS>
MP_HD void mp_topk_row_regs(const float* p, int E, int k, int* __restrict__ id, float* __restrict__ wt, int lane) {
    float pv[REGS];
#pragma unroll
    for (int q = 0; q < REGS; ++q) pv[q] = lane + 32 * q < E ? p[lane + 32 * q] : 0.0f;
    mp_topk_row_held<REGS>(pv, p, E, k, id, wt, nullptr, lane);
}
MP_HD void mp_topk_row(const float* p, int E, int k, int* __restrict__ id, float* __restrict__ wt, int lane) {
    if (E <= 128) mp_topk_row_regs<4>(p, E, k, id, wt, lane);
    else mp_topk_row_regs<MP_TOPK_REGS>(p, E, k, id, wt, lane);
}

extern "C" MP_GLOBAL void router_topk(const float* __restrict__ probs, int T, int E, int k,
                                      int* __restrict__ ids, float* __restrict__ weights) {
    mp_grid_sync();
    const int t = blockIdx.x * MP_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (t >= T) return;  // uniform over the warp
    mp_topk_row(probs + (mp_i64)t * E, E, k, ids + (mp_i64)t * k, weights + (mp_i64)t * k, lane);
}

// ---- weighted combination of the experts' outputs --------------------------------------------------
// out[t, n] = sum over slots j, taken in ascending expert-id order (order[t, :], from
// expert_group), of w[t, j] * y[t, j, n]; product and sum rounded separately (no FMA), as the
// reference accumulates `out[tok] += w * y` expert by expert in float32.
// With `residual` non-zero it also writes res_out = x + out (add_f32's sum: the post-FFN residual in
// the same launch); otherwise x and res_out are not read.
extern "C" MP_GLOBAL void moe_combine(const float* __restrict__ y, const float* __restrict__ w,
                           const int* __restrict__ order, int T, int k, int N, float* __restrict__ out,
                           int residual, const float* __restrict__ x, float* __restrict__ res_out) {
    mp_grid_sync();
    const mp_i64 total = (mp_i64)T * N;
    for (mp_i64 i = (mp_i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (mp_i64)gridDim.x * blockDim.x) {
        const int t = (int)(i / N), n = (int)(i % N);
        float acc = 0.0f;
        for (int r = 0; r < k; ++r) {
            const int j = order[(mp_i64)t * k + r];
            acc = mp_fadd(acc, mp_fmul(w[(mp_i64)t * k + j], y[((mp_i64)t * k + j) * N + n]));
        }
        out[i] = acc;
        if (residual) res_out[i] = mp_fadd(x[i], acc);
    }
}

// ---- fused row operations (one warp per row; block MP_THREADS) -------------------------------------
// The reference's formulas, operation for operation; only the order of the row sums differs.

#define MP_RMS_REGS 64          // rms_norm: values per lane held in registers (rows up to 2048)
// q / k norm + RoPE of head rows of 64, 128 or 256 values rotated in registers (MP_ROPE_REGS=0: through the
// normalised row in memory, tuning switch)
#ifndef MP_ROPE_REGS
#define MP_ROPE_REGS 1
#endif
// the same inside norm_rope_attention (short prompts): off, it made that kernel ~3 us a layer slower at 3
// tokens on an H100 (17.3 against 14.2 us, NOTES step 45), where qk_norm_rope at 64 tokens gained
#ifndef MP_ROPE_REGS_FUSED
#define MP_ROPE_REGS_FUSED 0
#endif

// RMSNorm: out = x / sqrt(mean(x * x) + eps) * weight[i % n]
// one row xr[0..n) into o by the lanes of a warp. REGS < MP_RMS_REGS (fewer registers, for large blocks)
// gives the same result for rows of up to 32 REGS values: the values past them add 0 * 0 to the parts.
// mp_rms_norm_row's values for a row of up to 32 REGS values, held in registers: y[j] is column lane + 32 j's
// (0 past n)
template <int REGS>
MP_HD void mp_rms_norm_regs(const float* xr, int n, const float* __restrict__ weight, float eps, int lane,
                            float (&y)[REGS]) {
    // the row and its weights: one burst of independent loads (the row costs one memory round trip), sums
    // of squares in 8 partial sums
    float v[REGS], wv[REGS], part[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) part[j] = 0.0f;
#pragma unroll
    for (int j = 0; j < REGS; ++j) {
        const int i = lane + 32 * j;
        v[j] = i < n ? xr[i] : 0.0f;
        wv[j] = i < n ? weight[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < REGS; ++j) part[j & 7] = mp_fadd(part[j & 7], mp_fmul(v[j], v[j]));
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) ss = mp_fadd(ss, part[j]);
    ss = mp_warp_sum1(ss);
    // x * (1 / s) instead of x / s: one division per row, not per value (within 1 ulp of x / s)
    const float inv = 1.0f / sqrtf(mp_fadd(ss / (float)n, eps));
#pragma unroll
    for (int j = 0; j < REGS; ++j) y[j] = mp_fmul(mp_fmul(v[j], inv), wv[j]);
}

// one row xr[0..n) into o by the lanes of a warp. REGS < MP_RMS_REGS (fewer registers, for large blocks)
// gives the same result for rows of up to 32 REGS values: the values past them add 0 * 0 to the parts.
template <int REGS = MP_RMS_REGS>
MP_HD void mp_rms_norm_row(const float* xr, int n, const float* __restrict__ weight, float eps,
                           float* __restrict__ o, int lane, float* __restrict__ o2 = nullptr) {  // o2: a copy, or null
    if (n <= 32 * REGS) {  // in registers (mp_rms_norm_regs)
        float y[REGS];
        mp_rms_norm_regs<REGS>(xr, n, weight, eps, lane, y);
#pragma unroll
        for (int j = 0; j < REGS; ++j) {
            const int i = lane + 32 * j;
            if (i < n) {
                o[i] = y[j];
                if (o2) o2[i] = y[j];
            }
        }
        return;
    }
    float part[8];  // as mp_rms_norm_regs, the row read twice: its squares into part[0], then its values
#pragma unroll
    for (int j = 0; j < 8; ++j) part[j] = 0.0f;
    for (int i = lane; i < n; i += 32) part[0] = mp_fadd(part[0], mp_fmul(xr[i], xr[i]));
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) ss = mp_fadd(ss, part[j]);
    ss = mp_warp_sum1(ss);
    const float inv = 1.0f / sqrtf(mp_fadd(ss / (float)n, eps));
    for (int k = lane; k < n; k += 32) {
        const float y = mp_fmul(mp_fmul(xr[k], inv), weight[k]);
        o[k] = y;
        if (o2) o2[k] = y;
    }
}

extern "C" MP_GLOBAL void rms_norm(const float* __restrict__ x, int rows, int n, const float* __restrict__ weight,
                                   float eps, float* __restrict__ out) {
    mp_grid_sync();
    const int row = blockIdx.x * MP_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    mp_rms_norm_row(x + (mp_i64)row * n, n, weight, eps, out + (mp_i64)row * n, lane);
}

// softmax over each row of n; causal > 0: row r belongs to query position r / causal and its
// columns beyond that position are masked (probability 0), the reference's where(mask, x, -inf).
// softmax of one row xr[0..n) into o by the lanes of a warp (lane i % 32 reads and writes column i);
// columns >= valid are masked (probability 0).
MP_HD void mp_softmax_row(const float* xr, int n, int valid, float* __restrict__ o, int lane) {
    const float NEG_INF = mp_bits_to_float(0xFF800000u);
    float m = NEG_INF, any_nan = 0.0f;
    for (int i = lane; i < valid; i += 32) {
        const float v = xr[i];
        if (v == v) m = fmaxf(m, v);
        else any_nan = 1.0f;
    }
    m = mp_warp_max1(m);
    if (mp_warp_max1(any_nan) > 0.0f) m = mp_bits_to_float(0x7FC00000u);  // NumPy's max propagates NaN
    float sum = 0.0f;
    for (int i = lane; i < valid; i += 32) sum = mp_fadd(sum, expf(mp_fsub(xr[i], m)));
    sum = mp_warp_sum1(sum);
    // masked columns: 0 / sum, so a row whose sum is NaN is NaN throughout, as NumPy's exp(-inf - m) / sum
    for (int i = lane; i < n; i += 32) o[i] = (i < valid ? expf(mp_fsub(xr[i], m)) : 0.0f) / sum;
}

extern "C" MP_GLOBAL void softmax_rows(const float* __restrict__ x, int rows, int n, int causal, float* __restrict__ out) {
    mp_grid_sync();
    const int row = blockIdx.x * MP_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    mp_softmax_row(x + (mp_i64)row * n, n, causal > 0 ? row / causal + 1 : n, out + (mp_i64)row * n, lane);
}

// A residual add and the RMSNorm of its result in one launch (the post-attention residual and
// ffn_norm): sum = a + b as add_f32 computes it, then out = rms_norm(sum) as rms_norm does.
extern "C" MP_GLOBAL void add_rms_norm(const float* __restrict__ a, const float* __restrict__ b, int rows, int n,
                                       const float* __restrict__ weight, float eps, float* sum,
                                       float* __restrict__ out) {
    mp_grid_sync();
    const int row = blockIdx.x * MP_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const mp_i64 off = (mp_i64)row * n;
    for (int i = lane; i < n; i += 32) sum[off + i] = mp_fadd(a[off + i], b[off + i]);
    mp_syncwarp();  // the norm's lanes read what the others summed
    mp_rms_norm_row(sum + off, n, weight, eps, out + off, lane);
}

// ---- row kernels that also write their output's digits (prompts of 2 or more tokens on the tensor cores) ---
// The tensor-core products read their input's digits (act_digits); where the kernel that writes the input
// row writes them too, act_digits' launch is saved. A block of MP_DIGITS_THREADS threads per row, thread
// tid holding the row's 4-value groups tid + MP_DIGITS_THREADS i as act_digits' threads do, for rows of up
// to MP_ROW_BLOCK_COLS columns (a multiple of 32): bit for bit the separate kernels' outputs and digits.
#define MP_ROW_GROUPS 2                                            // 4-value groups per thread
#define MP_ROW_BLOCK_COLS (4 * MP_DIGITS_THREADS * MP_ROW_GROUPS)  // 2048 (kernels.py: ROW_BLOCK_COLS)
static_assert(MP_ROW_BLOCK_COLS <= 32 * MP_RMS_REGS, "norm_digits follows mp_rms_norm_row's in-register order");

// 4 floats to p: one 16-byte store under AL (p 16-aligned), else four
template <bool AL> MP_HD void mp_st4(float* p, const float (&v)[4]) {
    if (AL) mp_aligned_load(p, 16);
#if defined(__CUDA_ARCH__)
    if (AL) {
        mp_f4 a;
        a.x = v[0]; a.y = v[1]; a.z = v[2]; a.w = v[3];
        *(mp_f4*)p = a;
    } else
#endif
    {
#pragma unroll
        for (int c = 0; c < 4; ++c) p[c] = v[c];
    }
}

// the groups of the row at p that thread tid holds (clamped: every load issued, those past the end read
// the last group again; mp_row_keep zeroes them)
template <bool AL> MP_HD void mp_row_groups(const float* __restrict__ p, int groups, int tid, float (&v)[MP_ROW_GROUPS][4]) {
#pragma unroll
    for (int i = 0; i < MP_ROW_GROUPS; ++i) {
        const int g = tid + MP_DIGITS_THREADS * i;
        mp_x4<AL>(p + 4 * (g < groups ? g : groups - 1), v[i]);
    }
}

// out (the row's output): the groups thread tid holds, those past the end zeroed; then the row's digits
// (dr, sr, *unit) as act_digits writes them
template <bool AL>
MP_HD void mp_row_out_digits(float (&v)[MP_ROW_GROUPS][4], int groups, int tid, float* __restrict__ out, mp_u32* __restrict__ dr,
                             float* __restrict__ sr, float* unit, float* wmax) {
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < MP_ROW_GROUPS; ++i) {
        const int g = tid + MP_DIGITS_THREADS * i;
        if (g < groups) mp_st4<AL>(out + 4 * g, v[i]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            v[i][c] = g < groups ? v[i][c] : 0.0f;
            m = fmaxf(m, mp_abs_key(v[i][c]));
        }
    }
    const float inv = mp_digits_scale(mp_digits_block_max(m, wmax, tid), tid == 0 ? unit : nullptr);
    mp_digits_store(v, groups, 0, tid, inv, dr, sr);
}

template <bool AL>
MP_HD void mp_norm_digits_tail(float (&v)[MP_ROW_GROUPS][4], const float (&w)[MP_ROW_GROUPS][4], int n, float eps,
                               float* __restrict__ out, mp_u32* __restrict__ dr, float* __restrict__ sr, float* unit,
                               int tid, float* sq, float* wmax, float* sinv);

// RMSNorm of a row (a + b where add: the residual add written to sum as add_f32 does) in rms_norm's
// operations and order: mp_rms_norm_row's lane l adds the squares of columns l + 32 j into part[j & 7] in
// order of j, then its parts in order, then the warp's butterfly; here the squares meet in shared memory
// (sq) and warp 0 adds them so.
template <bool AL>
MP_HD void mp_norm_digits_row(const float* __restrict__ a, const float* __restrict__ b, bool add, int n,
                              const float* __restrict__ weight, float eps, float* __restrict__ sum, float* __restrict__ out,
                              mp_u32* __restrict__ dr, float* __restrict__ sr, float* unit, int tid, float* sq, float* wmax,
                              float* sinv) {
    const int groups = n >> 2;
    float v[MP_ROW_GROUPS][4], w[MP_ROW_GROUPS][4], t[MP_ROW_GROUPS][4];
    mp_row_groups<AL>(a, groups, tid, v);
    mp_row_groups<AL>(weight, groups, tid, w);
    if (add) {
        mp_row_groups<AL>(b, groups, tid, t);
#pragma unroll
        for (int i = 0; i < MP_ROW_GROUPS; ++i) {
#pragma unroll
            for (int c = 0; c < 4; ++c) v[i][c] = mp_fadd(v[i][c], t[i][c]);
        }
    }
#pragma unroll
    for (int i = 0; i < MP_ROW_GROUPS; ++i) {
        const int g = tid + MP_DIGITS_THREADS * i;
        if (add && g < groups) mp_st4<AL>(sum + 4 * g, v[i]);
    }
    mp_norm_digits_tail<AL>(v, w, n, eps, out, dr, sr, unit, tid, sq, wmax, sinv);
}

// the RMSNorm with weights w (thread tid's groups, as in v) of the row whose groups thread tid holds in v,
// into out, then its digits
template <bool AL>
MP_HD void mp_norm_digits_tail(float (&v)[MP_ROW_GROUPS][4], const float (&w)[MP_ROW_GROUPS][4], int n, float eps,
                               float* __restrict__ out, mp_u32* __restrict__ dr, float* __restrict__ sr, float* unit,
                               int tid, float* sq, float* wmax, float* sinv) {
    const int groups = n >> 2, lane = tid & 31;
#pragma unroll
    for (int i = 0; i < MP_ROW_GROUPS; ++i) {
        const int g = tid + MP_DIGITS_THREADS * i;
        if (g < groups) {
#pragma unroll
            for (int c = 0; c < 4; ++c) sq[4 * g + c] = mp_fmul(v[i][c], v[i][c]);
        }
    }
    mp_syncthreads();
    if (tid < 32) {  // warp 0 (every lane of it)
        float part[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) part[j] = 0.0f;
#pragma unroll
        for (int j = 0; j < MP_ROW_BLOCK_COLS / 32; ++j) {  // columns past n: rms_norm adds 0 * 0 there
            const int i = lane + 32 * j;
            if (i < n) part[j & 7] = mp_fadd(part[j & 7], sq[i]);
        }
        float ss = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) ss = mp_fadd(ss, part[j]);
        ss = mp_warp_sum1(ss);
        if (lane == 0) *sinv = 1.0f / sqrtf(mp_fadd(ss / (float)n, eps));
    }
    mp_syncthreads();
    const float inv = *sinv;
#pragma unroll
    for (int i = 0; i < MP_ROW_GROUPS; ++i) {
#pragma unroll
        for (int c = 0; c < 4; ++c) v[i][c] = mp_fmul(mp_fmul(v[i][c], inv), w[i][c]);
    }
    mp_row_out_digits<AL>(v, groups, tid, out, dr, sr, unit, wmax);
}

// rms_norm (add = 0) or add_rms_norm (add = 1: sum = a + b, then its norm) of `rows` rows of n columns (n a
// multiple of 32, at most MP_ROW_BLOCK_COLS), a block per row, and the digits of out: bit for bit those
// kernels' outputs and act_digits(out). Without add, b and sum are not read or written.
extern "C" MP_GLOBAL void norm_digits(const float* __restrict__ a, const float* __restrict__ b, int add, int rows, int n,
                                      const float* __restrict__ weight, float eps, float* __restrict__ sum,
                                      float* __restrict__ out, mp_u32* __restrict__ xd, float* __restrict__ xs,
                                      float* __restrict__ xunit) {
    MP_SHARED float sq[MP_ROW_BLOCK_COLS];
    MP_SHARED float wmax[MP_DIGITS_THREADS / 32];
    MP_SHARED float sinv[1];
    mp_grid_sync();
    const int tid = threadIdx.x, r = (int)blockIdx.x;  // grid rows: every block has a row
    const mp_i64 off = (mp_i64)r * n;
    const bool al = mp_aligned(a, 16) && mp_aligned(b, 16) && mp_aligned(weight, 16) && mp_aligned(sum, 16)
                    && mp_aligned(out, 16);  // every row then (n a multiple of 32)
    if (al) mp_norm_digits_row<true>(a + off, b + off, add != 0, n, weight, eps, sum + off, out + off, xd + off,
                                     xs + off / 32, xunit + r, tid, sq, wmax, sinv);
    else mp_norm_digits_row<false>(a + off, b + off, add != 0, n, weight, eps, sum + off, out + off, xd + off,
                                   xs + off / 32, xunit + r, tid, sq, wmax, sinv);
}

// ---- the layer boundary in one launch (tensor-core prompts): the experts' combination, the residual, the next norm
// Block t (grid T, MP_DIGITS_THREADS threads) for a row of n columns (a multiple of 32, at most
// MP_ROW_BLOCK_COLS): out = moe_combine's row t (slots in `order`, each product and sum rounded as there;
// a chunk of MP_COMBINE_SLOTS slots' loads issued together), res = x + out (its residual), then normed =
// the RMSNorm of res with `weight` (the next layer's attn_norm or the output norm) and its digits, as
// norm_digits: bit for bit moe_combine(residual) then rms_norm and act_digits. One launch instead of two
// at every layer boundary.
#define MP_COMBINE_SLOTS 8       // every slot of a top-8 router in one chunk: the rows' loads behind one read of `order`
// the slots of token t's chunk starting at r0 (past k: the last slot again, not added)
MP_HD void mp_combine_chunk(const int* __restrict__ order, int t, int k, int r0, int (&js)[MP_COMBINE_SLOTS]) {
#pragma unroll
    for (int c = 0; c < MP_COMBINE_SLOTS; ++c) js[c] = mp_ld_l2(order + (mp_i64)t * k + (r0 + c < k ? r0 + c : k - 1));
}
// first: the first chunk's slots (mp_combine_chunk at r0 = 0)
template <bool AL>
MP_HD void mp_combine_row(const float* __restrict__ y, const float* __restrict__ w, const int* __restrict__ order, int t,
                          int k, int n, int tid, const int (&first)[MP_COMBINE_SLOTS], float (&acc)[MP_ROW_GROUPS][4]) {
    const int groups = n >> 2;
#pragma unroll
    for (int i = 0; i < MP_ROW_GROUPS; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    for (int r0 = 0; r0 < k; r0 += MP_COMBINE_SLOTS) {
        float wj[MP_COMBINE_SLOTS], yv[MP_COMBINE_SLOTS][MP_ROW_GROUPS][4];
        int js[MP_COMBINE_SLOTS];
        if (r0 == 0) {
#pragma unroll
            for (int c = 0; c < MP_COMBINE_SLOTS; ++c) js[c] = first[c];
        } else {
            mp_combine_chunk(order, t, k, r0, js);
        }
#pragma unroll
        for (int c = 0; c < MP_COMBINE_SLOTS; ++c) {
            const int j = js[c];
            wj[c] = w[(mp_i64)t * k + j];
            mp_row_groups<AL>(y + ((mp_i64)t * k + j) * n, groups, tid, yv[c]);
        }
#pragma unroll
        for (int c = 0; c < MP_COMBINE_SLOTS; ++c) {
            if (r0 + c < k) {
#pragma unroll
                for (int i = 0; i < MP_ROW_GROUPS; ++i) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][e] = mp_fadd(acc[i][e], mp_fmul(wj[c], yv[c][i][e]));
                }
            }
        }
    }
}

extern "C" MP_GLOBAL void combine_norm_digits(const float* __restrict__ y, const float* __restrict__ w,
                                              const int* __restrict__ order, int T, int k, int n,
                                              const float* __restrict__ x, const float* __restrict__ weight, float eps,
                                              float* __restrict__ out, float* __restrict__ res, float* __restrict__ normed,
                                              mp_u32* __restrict__ xd, float* __restrict__ xs, float* __restrict__ xunit,
                                              int early) {
    MP_SHARED float sq[MP_ROW_BLOCK_COLS];
    MP_SHARED float wmax[MP_DIGITS_THREADS / 32];
    MP_SHARED float sinv[1];
    const int tid = threadIdx.x, t = (int)blockIdx.x, groups = n >> 2;  // grid T: every block has a row
    const mp_i64 off = (mp_i64)t * n;
    const bool al = mp_aligned(y, 16) && mp_aligned(x, 16) && mp_aligned(weight, 16) && mp_aligned(out, 16)
                    && mp_aligned(res, 16) && mp_aligned(normed, 16);  // every row then (n a multiple of 32)
    float v[MP_ROW_GROUPS][4], xv[MP_ROW_GROUPS][4], wv[MP_ROW_GROUPS][4];
    int first[MP_COMBINE_SLOTS];
    // the norm's weights were written by no kernel; early: `order` was written two or more launches back
    // (see qmm_experts_mma), so the rows' loads after the wait do not wait for it
    if (al) mp_row_groups<true>(weight, groups, tid, wv);
    else mp_row_groups<false>(weight, groups, tid, wv);
    if (early) mp_combine_chunk(order, t, k, 0, first);
    mp_grid_sync();
    if (!early) mp_combine_chunk(order, t, k, 0, first);
    if (al) {
        mp_row_groups<true>(x + off, groups, tid, xv);
        mp_combine_row<true>(y, w, order, t, k, n, tid, first, v);
    } else {
        mp_row_groups<false>(x + off, groups, tid, xv);
        mp_combine_row<false>(y, w, order, t, k, n, tid, first, v);
    }
#pragma unroll
    for (int i = 0; i < MP_ROW_GROUPS; ++i) {
        const int g = tid + MP_DIGITS_THREADS * i;
        if (g < groups) {
            if (al) mp_st4<true>(out + off + 4 * g, v[i]);
            else mp_st4<false>(out + off + 4 * g, v[i]);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) v[i][e] = mp_fadd(xv[i][e], v[i][e]);
        if (g < groups) {
            if (al) mp_st4<true>(res + off + 4 * g, v[i]);
            else mp_st4<false>(res + off + 4 * g, v[i]);
        }
    }
    if (al) mp_norm_digits_tail<true>(v, wv, n, eps, normed + off, xd + off, xs + off / 32, xunit + t, tid, sq, wmax, sinv);
    else mp_norm_digits_tail<false>(v, wv, n, eps, normed + off, xd + off, xs + off / 32, xunit + t, tid, sq, wmax, sinv);
}

// ---- the router in one launch: softmax, top-k and (one block) the grouping ----------------------------
// Warp w of block b takes token t = b * MP_WARPS + w: the softmax of its logits row into probs (as
// softmax_rows), then its top-k (as router_topk). When the grid is one block (T <= MP_WARPS, short
// prompts) the block then meets at a barrier and groups the pairs by expert (as expert_group);
// with more blocks `group` is 0 and expert_group runs after. Bit for bit the separate kernels' results.
// Up to 128 experts a warp keeps its row in registers from the logits to the top-k, and up to 32 pairs
// warp 0 alone groups them (mp_group_pairs_warp).

// mp_softmax_row of a row of E <= 128 values, 4 a lane (x[q]: column lane + 32 q), into o and, in place, x
MP_HD void mp_softmax_regs4(float (&x)[4], int E, float* __restrict__ o, int lane) {
    const float NEG_INF = mp_bits_to_float(0xFF800000u);
    float mv[2] = {NEG_INF, 0.0f};  // the largest number; whether there is a NaN
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if (lane + 32 * q < E) {
            if (x[q] == x[q]) mv[0] = fmaxf(mv[0], x[q]);
            else mv[1] = 1.0f;
        }
    }
    mp_warp_allmax<2>(mv);
    const float m = mv[1] > 0.0f ? mp_bits_to_float(0x7FC00000u) : mv[0];  // NumPy's max propagates NaN
    float ex[4], sum = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        ex[q] = expf(mp_fsub(x[q], m));
        if (lane + 32 * q < E) sum = mp_fadd(sum, ex[q]);
    }
    sum = mp_warp_sum1(sum);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int i = lane + 32 * q;
        x[q] = ex[q] / sum;
        if (i < E) o[i] = x[q];
    }
}

extern "C" MP_GLOBAL void moe_route(const float* __restrict__ logits, int T, int E, int k, float* probs,
                                    int* ids, float* __restrict__ weights, int group,
                                    int* __restrict__ pairs, int* __restrict__ offsets, int* __restrict__ active,
                                    int n_act_len, int* __restrict__ order, int* __restrict__ records, int n_rec_len) {
    MP_SHARED mp_group_smem sm;
    mp_grid_sync();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = blockIdx.x * MP_WARPS + warp;
    const bool quick = group && T * k <= 32 && E <= MP_GROUP_WARP_EXPERTS;  // uniform over the block
    if (t < T) {  // no early return: the whole block meets at the barrier below
        float* pr = probs + (mp_i64)t * E;
        if (E <= 128) {
            const float* lr = logits + (mp_i64)t * E;
            float x[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) x[q] = lr[lane + 32 * q < E ? lane + 32 * q : 0];
            mp_softmax_regs4(x, E, pr, lane);
            mp_syncwarp();  // a zero or NaN winner's value is read back from pr
            mp_topk_row_held<4>(x, pr, E, k, ids + (mp_i64)t * k, weights + (mp_i64)t * k, quick ? sm.ids + t * k : nullptr,
                                lane);
        } else {
            mp_softmax_row(logits + (mp_i64)t * E, E, E, pr, lane);
            mp_syncwarp();  // a lane's top-k scan reads columns other lanes wrote
            mp_topk_row(pr, E, k, ids + (mp_i64)t * k, weights + (mp_i64)t * k, lane);
        }
    }
    if (group) {
        mp_syncthreads();  // every token's ids written and visible to the block
        if (quick) {
            if (warp == 0)
                mp_group_pairs_warp(sm.ids, T, k, E, pairs, offsets, active, n_act_len, order, records, n_rec_len, lane);
        } else {
            mp_group_pairs(ids, T, k, E, pairs, offsets, active, n_act_len, order, records, n_rec_len, sm);
        }
    }
}

// ---- attention core ---------------------------------------------------------------------------------------
// The reference's scores -> causal softmax -> context of one layer in one launch, one warp per (t, h)
// row (row = t * nh + h; query head h reads kv head h / (nh / nkv)):
//   scores[t, h, s] = (sum_d q[t, h, d] k[s, g, d]) / sqrt_hd   for every s (the reference taps them all)
//   probs[t, h, :]  = softmax of the row with the columns s > t masked (mp_softmax_row)
//   ctx[t, h*hd + d] = sum_s probs[t, h, s] v[s, g, d]          over every s, as p @ v (0 * NaN is NaN)
// q [T, nh, hd], k and v [T, nkv, hd], all contiguous float32.
// one (t, head) row of attention by a warp: q row qr [hd]; kb and vb the kv head's row of key position 0,
// the next position's kstride / vstride floats on (k and v [T, nkv, hd]: kv head g at kb = k + g hd, kstride
// nkv hd); the scores into sr [T], the probabilities into pr [T], the context into cr [hd] (cr may be qr: a
// lane writes the columns it read)
// The scores go MP_ATTN_CHUNK key positions at a time (their dot products share one warp reduction, each
// its own butterfly: the sums of one at a time), and the context's loads of a chunk are issued together.
#define MP_ATTN_CHUNK 4
// attention_core takes mp_attention_row_wide for head rows of up to 256 (MP_ATTN_WIDE=0: mp_attention_row, tuning switch)
#ifndef MP_ATTN_WIDE
#define MP_ATTN_WIDE 1
#endif
MP_HD void mp_attention_row(const float* qr, const float* kb, mp_i64 kstride, const float* __restrict__ vb, mp_i64 vstride,
                            int T, int hd, int t, float sqrt_hd, float* sr, float* pr, float* cr, int lane) {
    for (int s0 = 0; s0 < T; s0 += MP_ATTN_CHUNK) {
        const float* kr = kb + (mp_i64)s0 * kstride;
        int last = T - 1 - s0;  // chunk positions past T read the last one again (a copy, not stored)
        last = last < MP_ATTN_CHUNK - 1 ? last : MP_ATTN_CHUNK - 1;
        float part[MP_ATTN_CHUNK];
#pragma unroll
        for (int c = 0; c < MP_ATTN_CHUNK; ++c) part[c] = 0.0f;
        for (int d = lane; d < hd; d += 32) {
            const float qv = qr[d];
#pragma unroll
            for (int c = 0; c < MP_ATTN_CHUNK; ++c) part[c] = fmaf(qv, kr[(c < last ? c : last) * kstride + d], part[c]);
        }
        mp_warp_allreduce<MP_ATTN_CHUNK>(part);
#pragma unroll
        for (int c = 0; c < MP_ATTN_CHUNK; ++c)
            if (s0 + c < T && lane == ((s0 + c) & 31)) sr[s0 + c] = part[c] / sqrt_hd;  // the lane reading it in the softmax
    }
    mp_softmax_row(sr, T, t + 1, pr, lane);
    mp_syncwarp();  // every lane reads every column of the probabilities below
    for (int d = lane; d < hd; d += 32) {
        float acc = 0.0f;
        for (int s0 = 0; s0 < T; s0 += MP_ATTN_CHUNK) {
            float pv[MP_ATTN_CHUNK], vv[MP_ATTN_CHUNK];
#pragma unroll
            for (int c = 0; c < MP_ATTN_CHUNK; ++c) {
                const int s = s0 + c < T ? s0 + c : T - 1;
                pv[c] = pr[s];
                vv[c] = vb[s * vstride + d];
            }
#pragma unroll
            for (int c = 0; c < MP_ATTN_CHUNK; ++c)
                if (s0 + c < T) acc = fmaf(pv[c], vv[c], acc);
        }
        cr[d] = acc;
    }
}

// mp_attention_row for rows of up to 32 REGS columns, bit for bit, with fewer steps one after another (a
// long prompt's attention_core: ~70 us a layer at 64 tokens with mp_attention_row's chunks of 4 positions,
// each a 5-step butterfly of 4 sums, and its context one column at a time): the scores go 32 positions at
// a time, their 32 warp sums by recursive halving (lane L keeps half of its sums and adds its partner's
// copy of them, 16 + 8 + 4 + 2 + 1 exchanges; a position's partial sums meet in the pairs and order of its
// own xor butterfly, so each sum is the butterfly's bit for bit) and lane j ends with position s0 + j's;
// the context takes the lane's REGS columns together, a position's probability read once for them and
// each column's sum over the positions in the same order as before.
// One level of the recursive halving of the 32 sums part[0..2 N) a lane holds, and the levels below it:
// lane L keeps half of them (the upper half where bit N of L is set) and adds its partner's (lane L ^ N) copy
// of that half, giving away the other. A template level, so that every index is a constant: with the level a
// loop variable (off, n = 16, 8, ...) nvcc 13.0 kept the first two levels as loops over a runtime index and
// read and wrote part[] through chains of selects over its 32 registers (~2100 of attention_core's ~4500
// instructions a chunk of 32 positions).
template <int N>
MP_HD void mp_attention_halve(float (&part)[32], int lane) {
    const bool up = (lane & N) != 0;
#pragma unroll
    for (int c = 0; c < N; ++c) {
        const float keep = up ? part[c + N] : part[c], give = up ? part[c] : part[c + N];
        part[c] = keep + mp_shfl_xor(give, N);
    }
    if constexpr (N > 1) mp_attention_halve<N / 2>(part, lane);
}
// The score of position s0 + lane (its q . k sum, before the scaling) of the 32 key rows at kr (the next
// position's kstride floats on; rows past `last` read row `last` again), q's columns lane + 32 i in qv.
template <int REGS>
MP_HD float mp_attention_scores32(const float (&qv)[REGS], const float* kr, mp_i64 kstride, int last, int hd,
                                  int lane) {
    float part[32];
#pragma unroll
    for (int c = 0; c < 32; ++c) {  // each sum over q's columns in ascending order, as the butterfly rows'
        const float* kc = kr + (mp_i64)(c < last ? c : last) * kstride + lane;  // one address a key row
        part[c] = 0.0f;
#pragma unroll
        for (int i = 0; i < REGS; ++i)
            if (lane + 32 * i < hd) part[c] = fmaf(qv[i], kc[32 * i], part[c]);
    }
    mp_attention_halve<16>(part, lane);  // after level n part[c]: position s0 + (lane & ~(2 n - 1) & 31) + c
    return part[0];
}

// The context's positions s0 .. s0 + CH - 1 (those below T; the loads of later ones read position T - 1
// again), their probabilities in pv: acc[i] += pv[c] v[s][lane + 32 i], the positions in order.
template <int REGS, int CH>
MP_HD void mp_attention_context(const float (&pv)[CH], const float* __restrict__ vb, mp_i64 vstride, int s0, int T,
                                int hd, int lane, float (&acc)[REGS]) {
    float vv[CH][REGS];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int s = s0 + c < T ? s0 + c : T - 1;
#pragma unroll
        for (int i = 0; i < REGS; ++i) vv[c][i] = lane + 32 * i < hd ? vb[s * vstride + lane + 32 * i] : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        if (s0 + c < T) {
#pragma unroll
            for (int i = 0; i < REGS; ++i) acc[i] = fmaf(pv[c], vv[c][i], acc[i]);
        }
    }
}

template <int REGS>
MP_HD void mp_attention_row_wide(const float* qr, const float* kb, mp_i64 kstride, const float* __restrict__ vb,
                                 mp_i64 vstride, int T, int hd, int t, float sqrt_hd, float* sr, float* pr, float* cr,
                                 int lane) {
    constexpr int CH = 32 / REGS;  // positions of the context whose loads are issued together
    float qv[REGS];
#pragma unroll
    for (int i = 0; i < REGS; ++i) qv[i] = lane + 32 * i < hd ? qr[lane + 32 * i] : 0.0f;
    for (int s0 = 0; s0 < T; s0 += 32) {
        const int last = T - 1 - s0 < 31 ? T - 1 - s0 : 31;  // positions past T read the last one again (not stored)
        const float sc = mp_attention_scores32<REGS>(qv, kb + (mp_i64)s0 * kstride, kstride, last, hd, lane);
        if (s0 + lane < T) sr[s0 + lane] = sc / sqrt_hd;  // the lane reading it in the softmax
    }
    mp_softmax_row(sr, T, t + 1, pr, lane);
    mp_syncwarp();  // every lane reads every column of the probabilities below
    float acc[REGS];
#pragma unroll
    for (int i = 0; i < REGS; ++i) acc[i] = 0.0f;
    for (int s0 = 0; s0 < T; s0 += CH) {
        float pv[CH];
#pragma unroll
        for (int c = 0; c < CH; ++c) pv[c] = pr[s0 + c < T ? s0 + c : T - 1];
        mp_attention_context<REGS, CH>(pv, vb, vstride, s0, T, hd, lane, acc);
    }
#pragma unroll
    for (int i = 0; i < REGS; ++i)
        if (lane + 32 * i < hd) cr[lane + 32 * i] = acc[i];
}

// MP_ATTN_CORE_WARPS (read by kernels.py too, through the backend's switch()): the rows (warps)
// of an attention_core block, consecutive heads of one position, so that the query heads of a kv head
// (8 at 30b-a3b) read its keys and values through one SM's L1 when a block holds all of them (tuning
// switch: 4, each kv head's keys read by two blocks; 8 with 2 blocks an SM keeps the 128 registers; on an
// H100 at 64 tokens 8 was 0.13 ms slower a forward and 2 0.03 ms faster: benchmarks/NOTES.md step 68)
#ifndef MP_ATTN_CORE_WARPS
#define MP_ATTN_CORE_WARPS 4
#endif
#ifdef MOEPARITY_EMULATOR
#define MP_ATTN_CORE_GLOBAL MP_GLOBAL
#else
// 16 warps an SM (128 registers): the wide rows' 32 sums and hoisted loads would otherwise take ~160
#define MP_ATTN_CORE_GLOBAL __global__ __launch_bounds__(32 * MP_ATTN_CORE_WARPS, 16 / MP_ATTN_CORE_WARPS)
#endif
extern "C" MP_ATTN_CORE_GLOBAL void attention_core(const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, int T, int nh, int nkv, int hd, float sqrt_hd,
                                         float* __restrict__ scores, float* __restrict__ probs, float* __restrict__ ctx) {
    mp_grid_sync();
    const int row = blockIdx.x * MP_ATTN_CORE_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= T * nh) return;  // uniform over the warp
    const int t = row / nh, h = row % nh;
    const mp_i64 g = h / (nh / nkv), stride = (mp_i64)nkv * hd;
    const float* qr = q + (mp_i64)row * hd;
    float *sr = scores + (mp_i64)row * T, *pr = probs + (mp_i64)row * T, *cr = ctx + (mp_i64)row * hd;  // ctx [T, nh * hd]
    if (MP_ATTN_WIDE && hd <= 128)
        mp_attention_row_wide<4>(qr, k + g * hd, stride, v + g * hd, stride, T, hd, t, sqrt_hd, sr, pr, cr, lane);
    else if (MP_ATTN_WIDE && hd <= 256)
        mp_attention_row_wide<8>(qr, k + g * hd, stride, v + g * hd, stride, T, hd, t, sqrt_hd, sr, pr, cr, lane);
    else
        mp_attention_row(qr, k + g * hd, stride, v + g * hd, stride, T, hd, t, sqrt_hd, sr, pr, cr, lane);
}

// ---- elementwise ----------------------------------------------------------------------------------------

// NEOX RoPE of column j of a head's row xr[0..2 half) with that position's cos/sin[0..half):
// first half x1*cos - x2*sin, second x2*cos + x1*sin
MP_HD float mp_rope_value(const float* xr, int j, int half, const float* __restrict__ c,
                          const float* __restrict__ s) {
    const int f = j < half ? j : j - half;
    const float x1 = xr[f], x2 = xr[half + f];
    return j < half ? mp_fsub(mp_fmul(x1, c[f]), mp_fmul(x2, s[f])) : mp_fadd(mp_fmul(x2, c[f]), mp_fmul(x1, s[f]));
}

// NEOX RoPE on x[T, heads, hd] with cos/sin[T, hd/2]
extern "C" MP_GLOBAL void rope_neox(const float* __restrict__ x, int T, int heads, int hd,
                                    const float* __restrict__ cosv, const float* __restrict__ sinv,
                                    float* __restrict__ out) {
    mp_grid_sync();
    const mp_i64 total = (mp_i64)T * heads * hd;
    const int half = hd / 2;
    for (mp_i64 i = (mp_i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (mp_i64)gridDim.x * blockDim.x) {
        const int j = (int)(i % hd), t = (int)(i / ((mp_i64)heads * hd));
        const mp_i64 base = i - j;
        out[i] = mp_rope_value(x + base, j, half, cosv + (mp_i64)t * half, sinv + (mp_i64)t * half);
    }
}

// ---- q/k RMSNorm + RoPE in one launch (short prompts: four launches of a few us each become one) -------
// One warp per row of q [T, nh, hd] (rows 0 .. T*nh - 1), then of k [T, nkv, hd]: the row is normalised
// as rms_norm does (mp_rms_norm_row, weights wq / wk) into qn / kn, which the captures of q_norm /
// k_norm read, then rotated as rope_neox does (mp_rope_value) into qr / kr: bit for bit the two-kernel
// results.

// one head row x [hd] (hd <= 32 REGS) by a warp: normalised into nr and, where not null, n2, then rotated
// (c / s: its position's cos / sin, read from nr) into rr and, where not null, rr2; rr may be nr (the
// rotated row is held in registers first)
// (hd = 64 H: a column and its RoPE partner, half = 32 H columns on, are in the same lane's registers j and
// j + H) mp_norm_rope_row without the round trip through nr: the same values, written in the same places
template <int H>
MP_HD void mp_norm_rope_regs(const float* x, const float* __restrict__ w, float eps, const float* __restrict__ c,
                             const float* __restrict__ s, float* nr, float* n2, float* rr, float* rr2, int lane) {
    constexpr int hd = 64 * H, half = 32 * H;
    float y[2 * H];
    mp_rms_norm_regs<2 * H>(x, hd, w, eps, lane, y);  // (mp_rms_norm_row's values for any REGS >= 2 H)
#pragma unroll
    for (int j = 0; j < 2 * H; ++j) {  // as mp_rope_value on the row y
        const int i = lane + 32 * j, f = j < H ? i : i - half;
        const float x1 = y[j < H ? j : j - H], x2 = y[j < H ? j + H : j];
        const float r = j < H ? mp_fsub(mp_fmul(x1, c[f]), mp_fmul(x2, s[f])) : mp_fadd(mp_fmul(x2, c[f]), mp_fmul(x1, s[f]));
        nr[i] = y[j];
        if (n2) n2[i] = y[j];
        rr[i] = r;  // after nr[i]: rr may be nr
        if (rr2) rr2[i] = r;
    }
}

template <int REGS, bool ROT = MP_ROPE_REGS>  // ROT: rotate head rows of 64, 128, 256 in registers
MP_HD void mp_norm_rope_row(const float* x, int hd, const float* __restrict__ w, float eps, const float* __restrict__ c,
                            const float* __restrict__ s, float* nr, float* n2, float* rr, float* rr2, int lane) {
    if (ROT && REGS >= 2 && hd == 64) return mp_norm_rope_regs<1>(x, w, eps, c, s, nr, n2, rr, rr2, lane);
    if (ROT && REGS >= 4 && hd == 128) return mp_norm_rope_regs<2>(x, w, eps, c, s, nr, n2, rr, rr2, lane);
    if (ROT && REGS >= 8 && hd == 256) return mp_norm_rope_regs<4>(x, w, eps, c, s, nr, n2, rr, rr2, lane);
    mp_rms_norm_row<REGS>(x, hd, w, eps, nr, lane, n2);
    mp_syncwarp();  // a lane rotates columns that other lanes normalised
    const int half = hd / 2;
    float r[REGS];
#pragma unroll
    for (int i = 0; i < REGS; ++i) {
        const int j = lane + 32 * i;
        r[i] = j < hd ? mp_rope_value(nr, j, half, c, s) : 0.0f;
    }
    mp_syncwarp();  // every lane has read nr
#pragma unroll
    for (int i = 0; i < REGS; ++i) {
        const int j = lane + 32 * i;
        if (j < hd) {
            rr[j] = r[i];
            if (rr2) rr2[j] = r[i];
        }
    }
}

extern "C" MP_GLOBAL void qk_norm_rope(const float* __restrict__ q, const float* __restrict__ k, int T, int nh, int nkv,
                                       int hd, const float* __restrict__ wq, const float* __restrict__ wk, float eps,
                                       const float* __restrict__ cosv, const float* __restrict__ sinv,
                                       float* __restrict__ qn, float* __restrict__ kn, float* __restrict__ qr,
                                       float* __restrict__ kr) {
    mp_grid_sync();
    const int row = blockIdx.x * MP_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const int qrows = T * nh;
    if (row >= qrows + T * nkv) return;  // uniform over the warp
    const bool isq = row < qrows;
    const int r = isq ? row : row - qrows, t = r / (isq ? nh : nkv), half = hd / 2;
    const mp_i64 off = (mp_i64)r * hd;
    mp_norm_rope_row<MP_RMS_REGS>((isq ? q : k) + off, hd, isq ? wq : wk, eps, cosv + (mp_i64)t * half,
                                  sinv + (mp_i64)t * half, (isq ? qn : kn) + off, nullptr, (isq ? qr : kr) + off, nullptr,
                                  lane);
}

// ---- q/k norm + RoPE, attention and the digits of its output in one launch (short prompts) -------------
// Block b = t nkv + g (grid T nkv) of MP_ATTN_THREADS threads takes token t's q heads of kv head g (heads
// g gs .. g gs + gs - 1, gs = nh / nkv), for the tensor-core attn_output product:
//   1. warp w normalises and rotates rows w, w + warps, ... of those q heads (into qn / qr and shared
//      memory) and of every token's k head g (into shared memory; token t's also into kn / kr), as
//      qk_norm_rope does;
//   2. warp w computes the attention of the block's heads w, w + warps, ... as attention_core does (scores
//      and probs into their captures, the context into shared memory over the head's q row), and the block
//      writes its gs hd context columns to ctx;
//   3. the last of token t's nkv blocks to get there (a count per token in sync, which that block sets back
//      to 0 for the next launch) reads the whole context row back from L2 and writes its digits as
//      act_digits does.
// Bit for bit qk_norm_rope, attention_core and act_digits(ctx). Three launches of a few us each (their
// latency chains, not their work) become one, spread over T nkv SMs: a block per token had every warp of
// one SM walk 1-2 head rows' norms and attention, the SM's issue slots the limit (~11 us at 3 tokens).
// Sizes (kernels.py checks): hd even and at most 32 MP_ATTN_NORM_REGS, nh hd at most MP_ATTN_COLS and a
// multiple of 32, T hd at most MP_ATTN_KV, T at most MP_ATTN_MAX_T. The rows the steps pass on stay in
// shared memory (a global write read back is an L2 round trip in the middle of a warp's chain); the
// captures are written besides.
#define MP_ATTN_THREADS 512     // kernels.py: ATTN_THREADS
#define MP_ATTN_WARPS (MP_ATTN_THREADS / 32)
#define MP_ATTN_COLS 4096       // kernels.py: ATTN_COLS
#define MP_ATTN_KV 4096         // kernels.py: ATTN_KV
#define MP_ATTN_NORM_REGS 8     // head rows of up to 256 (kernels.py: ATTN_HEAD_DIM)
#ifdef MOEPARITY_EMULATOR
#define MP_ATTN_GLOBAL MP_GLOBAL
#else
#define MP_ATTN_GLOBAL __global__ __launch_bounds__(MP_ATTN_THREADS, 1)  // 1: else ptxas caps it at 64 registers and spills
#endif

#define MP_ATTN_MAX_T 32         // the most tokens (kernels.py: ATTN_MAX_T): a warp's scores and probabilities in shared memory

MP_HD int mp_atomic_add_global(int* a, int v) {
#if defined(__CUDA_ARCH__)
    return atomicAdd(a, v);
#else
    const int old = *a;  // the emulator runs one block at a time
    *a = old + v;
    return old;
#endif
}
MP_HD void mp_fence() {  // this thread's global writes seen device-wide before its later ones
#if defined(__CUDA_ARCH__)
    __threadfence();
#endif
}
// 4 floats at p from L2 (written by another block of this launch): one 16-byte load under AL
template <bool AL> MP_HD void mp_x4_l2(const float* p, float (&v)[4]) {
#if defined(__CUDA_ARCH__)
    if (AL) {
        const float4 a = __ldcg((const float4*)p);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        return;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) v[c] = __ldcg(p + c);
#else
    mp_x4<false>(p, v);
#endif
}

// whether this block is the last of `of` blocks sharing the count *cnt to get here (every thread's global
// writes before the call are then visible to it); that block sets the count back to 0. Every thread of
// the block calls it; flag: a shared int.
MP_HD bool mp_last_block(int* cnt, int of, int* flag) {
    mp_fence();
    mp_syncthreads();
    if (threadIdx.x == 0) {
        *flag = mp_atomic_add_global(cnt, 1) == of - 1;
        if (*flag) {
            mp_fence();
            *cnt = 0;
        }
    }
    mp_syncthreads();
    return *flag != 0;
}

// step 1 for rows of up to 32 REGS: the block's q heads (token t, kv head g) normalised into qs (and qn)
// and rotated in place (and into qr); every token's k head g likewise into ks (token t's also into kn and kr)
template <int REGS>
MP_HD void mp_nra_norms(const float* __restrict__ q, const float* __restrict__ k, int T, int t, int g, int nh, int nkv,
                        int hd, const float* __restrict__ wq, const float* __restrict__ wk, float eps,
                        const float* __restrict__ cosv, const float* __restrict__ sinv, float* __restrict__ qn,
                        float* __restrict__ kn, float* __restrict__ qr, float* __restrict__ kr, float* qs, float* ks,
                        int warp, int lane) {
    const int half = hd / 2, gs = nh / nkv;
    for (int r = warp; r < gs + T; r += MP_ATTN_WARPS) {
        if (r < gs) {
            const mp_i64 off = ((mp_i64)t * nh + g * gs + r) * hd;
            float* own = qs + r * hd;
            mp_norm_rope_row<REGS, MP_ROPE_REGS_FUSED>(q + off, hd, wq, eps, cosv + (mp_i64)t * half,
                                                       sinv + (mp_i64)t * half, own, qn + off, own, qr + off, lane);
        } else {
            const int s = r - gs;
            const mp_i64 off = ((mp_i64)s * nkv + g) * hd;
            float* own = ks + s * hd;
            mp_norm_rope_row<REGS, MP_ROPE_REGS_FUSED>(k + off, hd, wk, eps, cosv + (mp_i64)s * half,
                                                       sinv + (mp_i64)s * half, own, s == t ? kn + off : nullptr, own,
                                                       s == t ? kr + off : nullptr, lane);
        }
    }
}

extern "C" MP_ATTN_GLOBAL void norm_rope_attention(const float* __restrict__ q, const float* __restrict__ k,
        const float* __restrict__ v, int T, int nh, int nkv, int hd, const float* __restrict__ wq,
        const float* __restrict__ wk, float eps, const float* __restrict__ cosv, const float* __restrict__ sinv,
        float sqrt_hd, float* __restrict__ qn, float* __restrict__ kn, float* __restrict__ qr, float* __restrict__ kr,
        float* __restrict__ scores, float* __restrict__ probs, float* ctx, mp_u32* __restrict__ xd,
        float* __restrict__ xs, float* __restrict__ xunit, int* sync) {
    MP_SHARED float qs[MP_ATTN_COLS];  // the block's rotated q rows [gs, hd], then their context
    MP_SHARED float ks[MP_ATTN_KV];    // every token's rotated k row of kv head g [T, hd]
    MP_SHARED float sp[MP_ATTN_WARPS][2][MP_ATTN_MAX_T];  // a warp's scores and probabilities
    MP_SHARED float wmax[MP_ATTN_WARPS];
    MP_SHARED int last;
    mp_grid_sync();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int t = (int)blockIdx.x / nkv, g = (int)blockIdx.x - t * nkv, gs = nh / nkv;
    const int cols = nh * hd;
    // 1. norms and RoPE (everything the attention reads is in shared memory, every capture written besides)
    if (hd <= 128) mp_nra_norms<4>(q, k, T, t, g, nh, nkv, hd, wq, wk, eps, cosv, sinv, qn, kn, qr, kr, qs, ks, warp, lane);
    else mp_nra_norms<MP_ATTN_NORM_REGS>(q, k, T, t, g, nh, nkv, hd, wq, wk, eps, cosv, sinv, qn, kn, qr, kr, qs, ks,
                                          warp, lane);
    mp_syncthreads();
    for (int j = warp; j < gs; j += MP_ATTN_WARPS) {  // 2. attention (the context over the q row)
        const mp_i64 row = (mp_i64)t * nh + g * gs + j;
        mp_attention_row(qs + j * hd, ks, hd, v + (mp_i64)g * hd, (mp_i64)nkv * hd, T, hd, t, sqrt_hd, sp[warp][0],
                         sp[warp][1], qs + j * hd, lane);
        for (int s = lane; s < T; s += 32) {  // the captures (a lane wrote its own columns of both)
            scores[row * T + s] = sp[warp][0][s];
            probs[row * T + s] = sp[warp][1][s];
        }
        mp_syncwarp();  // the next head's row reuses the warp's scores and probabilities
    }
    mp_syncthreads();
    float* cr = ctx + (mp_i64)t * cols;
    for (int i = tid; i < gs * hd; i += MP_ATTN_THREADS) cr[g * gs * hd + i] = qs[i];
    if (!mp_last_block(sync + t, nkv, &last)) return;  // uniform over the block
    const int groups = cols >> 2;  // 3. the whole context row and its digits
    float cv[MP_ATTN_COLS / 4 / MP_ATTN_THREADS][4];
    float m = 0.0f;
    const bool al = mp_aligned(ctx, 16);  // every row then (cols a multiple of 32)
#pragma unroll
    for (int i = 0; i < MP_ATTN_COLS / 4 / MP_ATTN_THREADS; ++i) {
        const int gi = tid + MP_ATTN_THREADS * i, gc = gi < groups ? gi : groups - 1;
        if (al) mp_x4_l2<true>(cr + 4 * gc, cv[i]);
        else mp_x4_l2<false>(cr + 4 * gc, cv[i]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            cv[i][c] = gi < groups ? cv[i][c] : 0.0f;
            m = fmaxf(m, mp_abs_key(cv[i][c]));
        }
    }
    const float inv = mp_digits_scale(mp_digits_block_max<MP_ATTN_THREADS>(m, wmax, tid), tid == 0 ? xunit + t : nullptr);
    mp_digits_store<MP_ATTN_COLS / 4 / MP_ATTN_THREADS, MP_ATTN_THREADS>(cv, groups, 0, tid, inv, xd + (mp_i64)t * cols,
                                                                        xs + (mp_i64)t * (cols >> 5));
}

// SwiGLU: out = g / (1 + exp(-g)) * u
MP_HD float mp_swiglu(float g, float u) { return mp_fmul(g / mp_fadd(1.0f, expf(-g)), u); }

extern "C" MP_GLOBAL void swiglu(const float* __restrict__ g, const float* __restrict__ u, mp_i64 n,
                                 float* __restrict__ out) {
    mp_grid_sync();
    for (mp_i64 i = (mp_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (mp_i64)gridDim.x * blockDim.x)
        out[i] = mp_swiglu(g[i], u[i]);
}

// swiglu of `rows` rows of n columns (a multiple of 32, at most MP_ROW_BLOCK_COLS), a block per row, and
// the digits of out (the down projection's input): bit for bit swiglu and act_digits(out)
template <bool AL>
MP_HD void mp_swiglu_digits_row(const float* __restrict__ g, const float* __restrict__ u, int n, float* __restrict__ out,
                                mp_u32* __restrict__ dr, float* __restrict__ sr, float* unit, int tid, float* wmax) {
    const int groups = n >> 2;
    float v[MP_ROW_GROUPS][4], w[MP_ROW_GROUPS][4];
    mp_row_groups<AL>(g, groups, tid, v);
    mp_row_groups<AL>(u, groups, tid, w);
#pragma unroll
    for (int i = 0; i < MP_ROW_GROUPS; ++i) {
#pragma unroll
        for (int c = 0; c < 4; ++c) v[i][c] = mp_swiglu(v[i][c], w[i][c]);
    }
    mp_row_out_digits<AL>(v, groups, tid, out, dr, sr, unit, wmax);
}

extern "C" MP_GLOBAL void swiglu_digits(const float* __restrict__ g, const float* __restrict__ u, int rows, int n,
                                        float* __restrict__ out, mp_u32* __restrict__ xd, float* __restrict__ xs,
                                        float* __restrict__ xunit) {
    MP_SHARED float wmax[MP_DIGITS_THREADS / 32];
    mp_grid_sync();
    const int tid = threadIdx.x, r = (int)blockIdx.x;  // grid rows
    const mp_i64 off = (mp_i64)r * n;
    if (mp_aligned(g, 16) && mp_aligned(u, 16) && mp_aligned(out, 16))
        mp_swiglu_digits_row<true>(g + off, u + off, n, out + off, xd + off, xs + off / 32, xunit + r, tid, wmax);
    else mp_swiglu_digits_row<false>(g + off, u + off, n, out + off, xd + off, xs + off / 32, xunit + r, tid, wmax);
}

// residual add: out = a + b
extern "C" MP_GLOBAL void add_f32(const float* __restrict__ a, const float* __restrict__ b, mp_i64 n,
                                  float* __restrict__ out) {
    mp_grid_sync();
    for (mp_i64 i = (mp_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (mp_i64)gridDim.x * blockDim.x)
        out[i] = mp_fadd(a[i], b[i]);
}

// ---- bfloat16 rounding (activations stored as float32 holding bf16 values) ---------------------------
// Round to nearest even, NaN kept (quieted), overflow to inf: ggml_compute_fp32_to_bf16.
extern "C" MP_GLOBAL void round_bf16(float* __restrict__ x, mp_i64 n) {
    mp_grid_sync();
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
