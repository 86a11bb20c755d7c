"""Where the GPU forward's time goes: device time per kernel name, through CUPTI (torch.profiler
sees every kernel of the process, CuPy's included).

    python benchmarks/profile_gpu.py --model /tmp/30b4.gguf --tokens 3,64

For each prompt length: the eager forward's wall time, its summed kernel time, and the kernels
grouped by name (count, total and mean device microseconds, exposed microseconds: what the kernel
adds to the span, walking the kernels in the order they end; share), then the same for one CUDA
graph replay. Prints tables; writes benchmarks/results/profile-<tag>.json. Needs torch (present
on the GPU machines); a development aid next to bench_gpu.py, not a benchmark of record.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import write_result  # noqa: E402

from tabulate import tabulate  # noqa: E402

from pytest_moeparity.model import load_model  # noqa: E402
from pytest_moeparity.parity import default_tokens  # noqa: E402
from pytest_moeparity.plan import SavePlan  # noqa: E402


def _short(name: str) -> str:
    name = re.sub(r"\(.*", "", name)          # drop argument lists
    name = re.sub(r"^void\s+", "", name)
    return name[:70]


def kernel_table(fn, top: int) -> tuple[list[dict], float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    acc = defaultdict(lambda: [0, 0.0, 0.0])
    spans = []
    for ev in prof.events():
        if getattr(ev, "device_type", None) is None or "cuda" not in str(ev.device_type).lower():
            continue
        dt = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        a = acc[_short(ev.name)]
        a[0] += 1
        a[1] += dt
        tr = getattr(ev, "time_range", None)
        if tr is not None:
            spans.append((tr.end, tr.start, _short(ev.name)))
    # exposed time: walking the kernels in the order they end, what each adds to the span (its end less
    # the latest end before it, an idle gap before it included). Under programmatic dependent launch a
    # kernel starts while its predecessor runs and waits, so its own duration overstates it; the exposed
    # times add up to the span.
    prev = None
    for end, start, name in sorted(spans):
        acc[name][2] += end - (start if prev is None else prev)
        prev = end
    total = sum(v[1] for v in acc.values())
    rows = sorted(({"kernel": k, "count": c, "total_us": round(t, 1), "mean_us": round(t / c, 2),
                    "exposed_us": round(x, 1), "share_pct": round(100 * t / max(total, 1e-9), 1)}
                   for k, (c, t, x) in acc.items()),
                  key=lambda r: -r["total_us"])
    return rows[:top], total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", default="3,64")
    ap.add_argument("--act", default="float32")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--graph-only", action="store_true", help="skip the eager forward's profile (tuning sweeps)")
    args = ap.parse_args(argv)

    import cupy as cp

    from pytest_moeparity.gpu import CupyEngine
    from pytest_moeparity.gpu import kernels as K

    K.set_debug(False)
    model = load_model(args.model)
    print(model.describe(), flush=True)
    engine = CupyEngine(model, act_dtype=args.act)
    doc = {"benchmark": "gpu_profile", "model": Path(args.model).name, "act": args.act,
           "nvrtc_options": os.environ.get(K.NVRTC_OPTIONS_ENV, ""), "rows": K.ROWS, "warps": K.WARPS,
           "config": model.config.as_dict(), "runs": []}
    for n in [int(t) for t in args.tokens.split(",")]:
        tokens = default_tokens(model.config.vocab, n)
        for _ in range(3):
            engine.run(tokens, SavePlan.empty())
        cp.cuda.Device().synchronize()
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            engine.run(tokens, SavePlan.empty())
            cp.cuda.Device().synchronize()
            walls.append(time.perf_counter() - t0)

        def eager():
            engine.run(tokens, SavePlan.empty())
            cp.cuda.Device().synchronize()

        run = {"tokens": n, "eager_wall_ms": round(statistics.median(walls) * 1e3, 3)}
        if not args.graph_only:
            rows, total = kernel_table(eager, args.top)
            print(f"\n{n} tokens, eager: wall {statistics.median(walls) * 1e3:.2f} ms, kernels {total / 1e3:.2f} ms")
            print(tabulate(rows, headers="keys", tablefmt="github"), flush=True)
            run.update({"eager_kernel_ms": round(total / 1e3, 3), "eager_kernels": rows})
        try:
            g = engine.graphed(tokens)
            for _ in range(3):
                g.replay()
            g.stream.synchronize()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            gt = []
            for _ in range(10):
                start.record(g.stream)
                g.replay()
                end.record(g.stream)
                end.synchronize()
                gt.append(cp.cuda.get_elapsed_time(start, end))

            def replay():
                g.replay()
                g.stream.synchronize()

            grows, gtotal = kernel_table(replay, args.top)
            print(f"\n{n} tokens, graph replay: {statistics.median(gt):.3f} ms, kernels {gtotal / 1e3:.3f} ms")
            print(tabulate(grows, headers="keys", tablefmt="github"), flush=True)
            run.update({"graph_ms": round(statistics.median(gt), 3), "graph_kernel_ms": round(gtotal / 1e3, 3),
                        "graph_kernels": grows})
        except Exception as exc:  # the eager numbers stand on their own
            run["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            print("graph:", run["graph_error"])
        doc["runs"].append(run)
    print("wrote", write_result(f"profile-{args.tag or Path(args.model).stem}", doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
