__device__ float shx(float v, int off) { return __shfl_xor_sync(0xFFFFFFFFu, v, off); }
// the halving with its levels as loop variables (version Z's form)
extern "C" __global__ void halve_loop(const float* __restrict__ k, float* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    float part[32];
#pragma unroll
    for (int c = 0; c < 32; ++c) part[c] = k[c * 32 + lane];
#pragma unroll
    for (int off = 16, n = 16; off > 0; off >>= 1, n >>= 1) {
        const bool up = (lane & off) != 0;
#pragma unroll
        for (int c = 0; c < n; ++c) {
            const float keep = up ? part[c + n] : part[c], give = up ? part[c] : part[c + n];
            part[c] = keep + shx(give, off);
        }
    }
    out[threadIdx.x] = part[0];
}
template <int N> __device__ void halve(float (&part)[32], int lane) {
    const bool up = (lane & N) != 0;
#pragma unroll
    for (int c = 0; c < N; ++c) {
        const float keep = up ? part[c + N] : part[c], give = up ? part[c] : part[c + N];
        part[c] = keep + shx(give, N);
    }
    if constexpr (N > 1) halve<N / 2>(part, lane);
}
// the same with each level a template parameter
extern "C" __global__ void halve_template(const float* __restrict__ k, float* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    float part[32];
#pragma unroll
    for (int c = 0; c < 32; ++c) part[c] = k[c * 32 + lane];
    halve<16>(part, lane);
    out[threadIdx.x] = part[0];
}
