"""CuPy forward on a GPU: time per prompt, effective bandwidth, GPU memory, heavy-pytest wall time.

    python benchmarks/bench_gpu.py --model /tmp/30b.gguf --tokens 3,64 --pytest-wall --tag 30b-a3b

Effective bandwidth = quantized weight bytes the forward must read at least once (every
attention/router/norm tensor, each routed expert's gate/up/down slices once, the prompt's
embedding rows, the output projection) / median forward time; compared with the measured
device-to-device copy bandwidth (bytes read + written). Prints a table; writes
benchmarks/results/gpu-<tag>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this checkout's package first (not an older installed copy), then the benchmarks' helpers
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import write_result  # noqa: E402

import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

from pytest_moeparity.make_model import PRESETS, make_model  # noqa: E402
from pytest_moeparity.model import LAYER_TENSORS, load_model  # noqa: E402
from pytest_moeparity.parity import default_tokens  # noqa: E402
from pytest_moeparity.plan import SavePlan  # noqa: E402


def d2d_bandwidth(cp, nbytes: int = 1 << 30, reps: int = 20) -> float:
    a = cp.empty(nbytes, dtype=cp.uint8)
    a[:] = 1
    b = cp.empty_like(a)
    for _ in range(3):
        b[:] = a
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        b[:] = a
    end.record()
    end.synchronize()
    ms = cp.cuda.get_elapsed_time(start, end)
    del a, b
    return 2 * nbytes * reps / (ms / 1e3)


_FMA_SRC = r"""
extern "C" __global__ void fma_chains(float* out, int iters) {
    float a[8];
    for (int j = 0; j < 8; ++j) a[j] = threadIdx.x * 1e-3f + j;
    for (int i = 0; i < iters; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] = fmaf(a[j], 0.999f, 1e-3f);
    float s = 0.f;
    for (int j = 0; j < 8; ++j) s += a[j];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def fp32_fma_rate(cp, iters: int = 4096) -> float:
    """Measured float32 FLOP/s of independent fmaf chains on every SM (the CUDA-core ceiling)."""
    k = cp.RawKernel(_FMA_SRC, "fma_chains")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    blocks, threads = sms * 8, 256
    out = cp.empty(blocks * threads, dtype=cp.float32)
    k((blocks,), (threads,), (out, np.int32(iters)))
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(5):
        k((blocks,), (threads,), (out, np.int32(iters)))
    end.record()
    end.synchronize()
    return 5 * 2 * 8 * iters * blocks * threads / (cp.cuda.get_elapsed_time(start, end) / 1e3)


def bytes_touched(model, ids_per_layer: dict[int, np.ndarray], n_tokens: int) -> int:
    total = 0
    for layer in range(model.config.n_layers):
        for name in LAYER_TENSORS:
            t = model.layer(layer, name)
            if name.endswith("_exps"):
                experts = np.unique(ids_per_layer[layer])
                total += len(experts) * t.expert(0).nbytes
            else:
                total += t.nbytes
    emb = model.tensor("token_embd.weight")
    total += n_tokens * emb.raw[0].nbytes + model.output.nbytes + model.tensor("output_norm.weight").nbytes
    return total


def matmul_flops(model, n_tokens: int) -> int:
    """Floating-point operations of the products with weights (2 per multiply-add): every dense
    weight once per token, k experts' gate/up/down per token, the head. Attention's own products
    (T x T per head) are left out: under 0.1 % at these prompt lengths."""
    cfg = model.config
    macs = 0
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp"):
        n, k = model.layer(0, name).shape[-2:]
        macs += cfg.n_layers * n_tokens * n * k
    macs += cfg.n_layers * n_tokens * cfg.n_experts_used * 3 * cfg.expert_ff * cfg.hidden
    macs += n_tokens * cfg.vocab * cfg.hidden
    return 2 * macs


def time_forward(cp, engine, tokens, repeat: int) -> list[float]:
    engine.run(tokens, SavePlan.empty())  # warm-up: compile, upload, allocator
    cp.cuda.Device().synchronize()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        engine.run(tokens, SavePlan.empty())
        cp.cuda.Device().synchronize()
        out.append(time.perf_counter() - t0)
    return out


def time_graph(cp, engine, tokens, repeat: int) -> tuple[list[float], float]:
    """Median-able replay times of the CUDA-graph forward (device events), and its max relative
    difference from the eager forward's logits (the graph must compute the same thing)."""
    eager = engine.run(tokens, SavePlan.empty()).logits
    g = engine.graphed(tokens)
    g.replay()
    g.stream.synchronize()
    got = cp.asnumpy(g.logits)
    rel = float(np.linalg.norm(got - eager) / np.linalg.norm(eager))
    return replay_times(cp, g, repeat), rel


def bench_model_path(model: str | None, preset: str, quant: str) -> Path:
    """``model``, or the ``preset`` / ``quant`` model in the temp directory (made there once)."""
    if model:
        return Path(model)
    path = Path(tempfile.gettempdir()) / f"moeparity-bench-{preset}-{quant.lower()}.gguf"
    if not path.exists():
        make_model(path, PRESETS[preset], quant=quant)
    return path


def replay_times(cp, g, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` replays of the graphed forward ``g`` (device events on its stream)."""
    out = []
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(repeat):
        start.record(g.stream)
        g.replay()
        end.record(g.stream)
        end.synchronize()
        out.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return out


def pytest_wall(model_path: Path, candidate: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", d, d, "-q",
               "--moe-model", str(model_path), "--include-heavy", "--moe-candidate", candidate,
               "--moe-stages", "all", "--moe-layers", "all", "--moe-report-json", str(report)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        tail = proc.stdout.strip().splitlines()[-3:]
        doc = json.loads(report.read_text()) if report.exists() else {}
    fd = doc.get("first_divergence")
    return {"command": " ".join(["pytest"] + cmd[3:]), "wall_s": round(wall, 1), "exit": proc.returncode,
            "cells": len(doc.get("cells", [])), "first_divergence": fd and {k: fd.get(k) for k in ("layer", "stage", "expert", "verdict")},
            "tail": tail}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--tokens", default="3,64")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--act", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--pytest-wall", action="store_true", help="also time the heavy pytest run, all stages x all layers")
    ap.add_argument("--pytest-only", action="store_true", help="only time the heavy pytest run")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import cupy as cp

    from pytest_moeparity.gpu import CupyEngine
    from pytest_moeparity.gpu import kernels as K

    K.set_debug(False)
    path = bench_model_path(args.model, args.preset, args.quant)
    model = load_model(path)
    print(model.describe(), flush=True)
    if args.pytest_only:
        res = pytest_wall(path, "cupy")
        print(tabulate([{k: v for k, v in res.items() if k != "tail"}], headers="keys", tablefmt="github"))
        print("\n".join(res["tail"]))
        print("wrote", write_result(f"gpu-pytest-{args.tag or args.preset}", {"benchmark": "pytest_heavy_wall",
                                    "model": path.name, "pytest_heavy": res}, args.out))
        return 0
    bw = d2d_bandwidth(cp)
    fma = fp32_fma_rate(cp)
    print(f"ceilings: device-to-device copy {bw / 1e9:.0f} GB/s, float32 FMA {fma / 1e12:.1f} TFLOP/s", flush=True)
    pool = cp.get_default_memory_pool()
    free0, total = cp.cuda.runtime.memGetInfo()
    engine = CupyEngine(model, act_dtype=args.act)
    t0 = time.perf_counter()
    weights = engine.weights
    tok0 = default_tokens(model.config.vocab, 1)
    engine.run(tok0, SavePlan.empty())
    cp.cuda.Device().synchronize()
    upload_s = time.perf_counter() - t0
    mem = {"file_gib": round(model.file_size / 2**30, 3), "weights_mode": weights.mode,
           "pool_used_gib": round(pool.used_bytes() / 2**30, 3),
           "device_used_gib": round((free0 - cp.cuda.runtime.memGetInfo()[0]) / 2**30, 3),
           "gpu_total_gib": round(total / 2**30, 1), "first_run_with_upload_s": round(upload_s, 2)}
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        tokens = default_tokens(model.config.vocab, n)
        routing = engine.run(tokens, SavePlan.parse("moe_router_indices")).trace
        ids = {L: routing[f"layer.{L}.moe_router_indices"] for L in range(model.config.n_layers)}
        times = time_forward(cp, engine, tokens, args.repeat)
        med = statistics.median(times)
        touched = bytes_touched(model, ids, n)
        flops = matmul_flops(model, n)
        row = {"tokens": n, "median_ms": round(med * 1e3, 2), "min_ms": round(min(times) * 1e3, 2),
               "ms_per_token": round(med * 1e3 / n, 3), "bytes_touched_gib": round(touched / 2**30, 3),
               "bytes_floor_ms": round(touched / bw * 1e3, 3), "gflop": round(flops / 1e9, 1),
               "fp32_floor_ms": round(flops / fma * 1e3, 3),
               "eff_bw_gb_s": round(touched / med / 1e9, 1), "d2d_bw_gb_s": round(bw / 1e9, 1),
               "eff_vs_d2d_pct": round(100 * touched / med / bw, 1)}
        try:
            gtimes, rel = time_graph(cp, engine, tokens, max(args.repeat, 10))
            gmed = statistics.median(gtimes)
            row.update({"graph_median_ms": round(gmed * 1e3, 3), "graph_eff_vs_d2d_pct": round(100 * touched / gmed / bw, 1),
                        "graph_tflops": round(flops / gmed / 1e12, 2), "graph_vs_eager_rel_l2": float(f"{rel:.2e}")})
        except Exception as exc:  # report, do not hide: the eager numbers stand on their own
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(tabulate([rows[-1]], headers="keys", tablefmt="github"), flush=True)
    print(tabulate([mem], headers="keys", tablefmt="github"))
    doc = {"benchmark": "gpu_forward", "model": path.name, "act": args.act, "config": model.config.as_dict(),
           "ceilings": {"d2d_copy_gb_s": round(bw / 1e9, 1), "fp32_fma_tflops": round(fma / 1e12, 2)},
           "forward": rows, "memory": mem}
    if args.pytest_wall:
        del engine
        from pytest_moeparity.gpu import clear_weight_cache

        clear_weight_cache()
        pool.free_all_blocks()
        doc["pytest_heavy"] = pytest_wall(path, "cupy" if args.act == "float32" else f"cupy-{args.act[:4].replace('floa', 'f')}")
        print(tabulate([{k: v for k, v in doc["pytest_heavy"].items() if k != "tail"}], headers="keys", tablefmt="github"))
        print("\n".join(doc["pytest_heavy"]["tail"]))
    print("wrote", write_result(f"gpu-{args.tag or args.preset}", doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
