"""What a dependent launch costs by itself on this GPU: chains of small kernels captured in a CUDA graph,
with and without programmatic dependent launch (PDL), the way the forward's short-prompt layers run.

A 3-token layer of the 30b-a3b forward is 10 dependent launches, and most of them are short. This measures
the floor such a chain sits on, so that a change which trades launches for a longer chain inside one kernel
(benchmarks/NOTES.md steps 33 and 34) or a persistent per-layer kernel can be judged before it is built.
Kernels (each starts with the forward's own wait, `griddepcontrol.wait` then `launch_dependents`):
  noop   nothing after the wait;
  touch  thread 0 of each block reads and writes one float its predecessor wrote (an L2 round trip);
  row    a block per row of 2048 floats (256 threads): load, block sum through shared memory, scale,
         store (a row kernel like norm_digits, on rows the previous launch wrote).
Each chain is --launches launches long (default 480: 48 layers x 10); the table gives the graph replay's
median time per launch. A second table gives what a persistent kernel would pay instead: one launch whose
blocks (all resident at once; the occupancy API checks) cross --launches grid-wide barriers (each block's
thread 0 adds to a count in global memory and spins on an acquire load until every block has), the median
microseconds per barrier. Needs CuPy and a GPU (sm_90 for PDL).

    python benchmarks/bench_launch_floor.py [--launches 480] [--repeat 20] [--out PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from _common import write_result  # noqa: E402

import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

SOURCE = r"""
__device__ __forceinline__ void grid_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
extern "C" __global__ void noop(float* buf, int n) { grid_sync(); }
extern "C" __global__ void touch(float* buf, int n) {
    grid_sync();
    if (threadIdx.x == 0) buf[blockIdx.x] = buf[blockIdx.x] + 1.0f;
}
// a persistent grid crossing `rounds` grid-wide barriers (count zeroed before the launch)
extern "C" __global__ void barriers(unsigned int* count, int rounds) {
    for (int r = 1; r <= rounds; ++r) {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(count, 1u);
            const unsigned int target = (unsigned int)r * gridDim.x;
            unsigned int seen;
            do {
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(count) : "memory");
            } while (seen < target);
        }
        __syncthreads();
    }
}
extern "C" __global__ void row(float* buf, int n) {  // block b: row b of n floats, in place
    __shared__ float part[8];
    grid_sync();
    float* r = buf + (long long)blockIdx.x * n;
    float v[8], s = 0.0f;
    for (int i = 0; i < 8; ++i) {
        const int c = threadIdx.x + 256 * i;
        v[i] = c < n ? r[c] : 0.0f;
        s += v[i] * v[i];
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    s = 0.0f;
    for (int w = 0; w < 8; ++w) s += part[w];
    const float inv = rsqrtf(s / n + 1e-6f);
    for (int i = 0; i < 8; ++i) {
        const int c = threadIdx.x + 256 * i;
        if (c < n) r[c] = v[i] * inv;
    }
}
"""

# (kernel, grid, block): the shapes of the forward's short kernels at 3 tokens, and of a product's grid
CASES = [("noop", 1, 128), ("noop", 3, 256), ("noop", 528, 128), ("touch", 3, 256), ("touch", 528, 128),
         ("row", 3, 256), ("row", 32, 256)]


def _chain_ms(cp, fn, grid: int, block: int, buf, launches: int, pdl, repeat: int) -> float:
    """Median graph replay time of `launches` dependent launches of fn, in ms."""
    args = (buf, np.int32(2048))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for _ in range(launches):
            if pdl is not None:
                pdl.launch(int(getattr(fn, "kernel", fn).ptr), (grid, 1, 1), (block, 1, 1), stream.ptr, args)
            else:
                fn((grid,), (block,), args)
        graph = stream.end_capture()
        graph.launch(stream)  # warm-up
        stream.synchronize()
        times = []
        for _ in range(repeat):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


BARRIER_GRIDS = [(132, 128), (264, 128), (528, 128)]  # a block per SM, 2 and 4 (the product kernels' residency)


def _resident_blocks(fn, block: int) -> int:
    """Blocks of fn (a cupy.RawKernel) that fit on the whole GPU at once, from its registers and shared
    memory (the occupancy rule of compute capability 9.0: 2048 threads, 32 blocks, 64 K registers allocated
    per warp in units of 256, 228 KB of shared memory, 1 KB of it reserved per block, a multiprocessor)."""
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    warps = -(-block // 32)
    regs_per_warp = -(-fn.num_regs * 32 // 256) * 256
    limits = [32, props.get("maxThreadsPerMultiProcessor", 2048) // block,
              props.get("regsPerMultiprocessor", 65536) // max(regs_per_warp * warps, 1)]
    if fn.shared_size_bytes:
        limits.append(props.get("sharedMemPerMultiprocessor", 233472) // (fn.shared_size_bytes + 1024))
    return min(limits) * props["multiProcessorCount"]


def _barrier_us(cp, fn, grid: int, block: int, rounds: int, repeat: int) -> float:
    """Median microseconds per grid-wide barrier of one persistent launch crossing `rounds` of them."""
    count = cp.zeros(1, dtype=np.uint32)
    stream = cp.cuda.Stream(non_blocking=True)
    times = []
    with stream:
        for i in range(repeat + 1):
            count.fill(0)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            fn((grid,), (block,), (count, np.int32(rounds)))
            end.record(stream)
            end.synchronize()
            if i:  # the first launch is a warm-up
                times.append(cp.cuda.get_elapsed_time(start, end))
    if int(count.get()[0]) != rounds * grid:
        raise RuntimeError(f"barrier count {int(count.get()[0])}, expected {rounds * grid}")
    return 1000.0 * statistics.median(times) / rounds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=480, help="launches per chain (48 layers x 10 by default)")
    ap.add_argument("--repeat", type=int, default=20, help="graph replays timed per case")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/launch-floor.json)")
    args = ap.parse_args(argv)
    if args.launches < 1 or args.repeat < 1:
        ap.error("--launches and --repeat must be at least 1")
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - any import or driver failure means no GPU here
        print(f"bench_launch_floor: needs CuPy and a GPU ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    from pytest_moeparity.gpu.pdl import pdl_launcher

    dev = cp.cuda.Device()
    cc = int(dev.compute_capability)
    pdl, why_not = pdl_launcher(cc)
    module = cp.RawModule(code=SOURCE, options=("-std=c++17",))
    buf = cp.zeros(528 * 2048, dtype=np.float32)
    rows = []
    for name, grid, block in CASES:
        fn = module.get_function(name)
        row = {"kernel": name, "grid": grid, "block": block}
        for label, launcher in (("plain", None), ("pdl", pdl)):
            if label == "pdl" and launcher is None:
                row["pdl_us_per_launch"] = None
                continue
            ms = _chain_ms(cp, fn, grid, block, buf, args.launches, launcher, args.repeat)
            row[f"{label}_us_per_launch"] = round(1000.0 * ms / args.launches, 3)
        rows.append(row)
    print(f"{args.launches} dependent launches per chain, graph replay, median of {args.repeat}"
          + ("" if pdl is not None else f" (PDL unavailable: {why_not})"))
    print(tabulate(rows, headers="keys", tablefmt="github"))
    bfn = module.get_function("barriers")
    barrier_rows = []
    for grid, block in BARRIER_GRIDS:
        fits = _resident_blocks(bfn, block)
        row = {"grid": grid, "block": block, "resident_blocks": fits}
        # a grid that does not fit at once would spin forever on blocks that never start
        row["us_per_barrier"] = round(_barrier_us(cp, bfn, grid, block, args.launches, args.repeat), 3) if grid <= fits else None
        barrier_rows.append(row)
    print(f"\none persistent launch crossing {args.launches} grid-wide barriers, median of {args.repeat}")
    print(tabulate(barrier_rows, headers="keys", tablefmt="github"))
    path = write_result("launch-floor", {"benchmark": "launch_floor", "launches": args.launches,
                                         "repeat": args.repeat, "compute_capability": cc, "rows": rows,
                                         "barriers": barrier_rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
