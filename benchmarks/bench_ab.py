"""In-process A/B of kernels.cu switches on a GPU: the default kernels and each variant's (the same
weights, uploaded once) replayed as CUDA graphs in interleaved rounds.

    python benchmarks/bench_ab.py --model /tmp/30b.gguf --tokens 3,64 --variant=-DMP_TOPK_REDUX=0 \
        --variant="-DMP_ATTN_WIDE=0 -DMP_ROPE_REGS=0" --rounds 9 --tag topk-attn

Separate processes timing two builds (bench_gpu.py with MOEPARITY_NVRTC_OPTIONS) each load the model
and compile the kernels (~15-50 s a build), and what drifts between them (clocks, the machine's other
work) is of the size of the ~1 % changes being looked for. Here every build is compiled once, its graph
checked against the default build's logits (the switches are meant to be bit for bit), then each of
``--rounds`` rounds replays every build ``--replays`` times in a rotating order. A build's time is the
median of its rounds' medians; its change is the median of its per-round differences from the default
build's, with the smallest and largest ("same sign" when every round agrees). Switches kernels.py reads
at import are refused (``kernels.variant_options``): launch geometry fixed at import needs a process of its
own; those it reads from the backend (``Backend.switch``: MP_EXPERT_CHUNK sizes the routing records) follow
each variant. Prints a table; writes benchmarks/results/ab-<tag>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

# this checkout's package first (not an older installed copy), then the benchmarks' helpers
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import variant_builds, write_result  # noqa: E402
from bench_gpu import bench_model_path, bytes_touched, d2d_bandwidth, replay_times  # noqa: E402

import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

from pytest_moeparity.make_model import PRESETS  # noqa: E402
from pytest_moeparity.model import load_model  # noqa: E402
from pytest_moeparity.parity import default_tokens  # noqa: E402
from pytest_moeparity.plan import SavePlan  # noqa: E402


def interleaved_rounds(cp, graphs, rounds: int, replays: int, label: str) -> list[list[float]]:
    """Per build (a graph with ``replay()`` and ``stream``), the median seconds of ``replays`` replays in
    each of ``rounds`` rounds, every build first in turn; one line printed a round."""
    per_round = [[] for _ in graphs]
    for r in range(rounds):
        for i in [(r + j) % len(graphs) for j in range(len(graphs))]:
            per_round[i].append(statistics.median(replay_times(cp, graphs[i], replays)))
        print(f"  {label}, round {r + 1}/{rounds}: " + ", ".join(f"{t[-1] * 1e3:.3f}" for t in per_round) + " ms",
              flush=True)
    return per_round


def change_from_first(per_round: list[list[float]], i: int) -> dict:
    """Build i's change from build 0: the median of the per-round differences, its share, the smallest and
    largest difference and whether every round agrees in sign."""
    diffs = [a - b for a, b in zip(per_round[i], per_round[0])]
    return {"change_ms": round(statistics.median(diffs) * 1e3, 4),
            "change_pct": round(100 * statistics.median(diffs) / statistics.median(per_round[0]), 2),
            "change_min_ms": round(min(diffs) * 1e3, 4), "change_max_ms": round(max(diffs) * 1e3, 4),
            "same_sign": all(d > 0 for d in diffs) or all(d < 0 for d in diffs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the --preset model, made once)")
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--tokens", default="3", help="prompt lengths, comma-separated")
    ap.add_argument("--variant", action="append", required=True,
                    help="kernels.cu switches of one build, e.g. '-DMP_TOPK_REDUX=0' (repeat for more builds)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--replays", type=int, default=10, help="graph replays of a build in each round")
    ap.add_argument("--act", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--serial-builds", action="store_true", help="compile the variant builds one after another")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.replays < 1:
        ap.error("--rounds and --replays must be at least 1")
    tokens = [int(t) for t in args.tokens.split(",")]

    from pytest_moeparity.gpu import CupyEngine
    from pytest_moeparity.gpu import kernels as K

    try:  # bad switches are refused before the model is read or a kernel compiled
        variants = [K.variant_options(v) for v in args.variant]
    except ValueError as exc:
        ap.error(str(exc))
    import cupy as cp

    K.set_debug(False)
    path = bench_model_path(args.model, args.preset, args.quant)
    model = load_model(path)
    print(model.describe(), flush=True)
    bw = d2d_bandwidth(cp)
    base = K.get_backend()
    names = ["default"] + [" ".join(v) for v in variants]
    backends = [base] + variant_builds(base, variants, threads=not args.serial_builds)
    engines = [CupyEngine(model, act_dtype=args.act, backend=be) for be in backends]
    assert all(e.weights is engines[0].weights for e in engines), "the builds must share one upload"
    print(f"{len(names)} builds ({', '.join(names)}) over one upload; copy {bw / 1e9:.0f} GB/s; env options "
          f"{' '.join(K.compile_options()[len(K.COMPILE_OPTIONS):]) or 'none'}", flush=True)
    rows = []
    for n in tokens:
        toks = default_tokens(model.config.vocab, n)
        routing = engines[0].run(toks, SavePlan.parse("moe_router_indices")).trace
        touched = bytes_touched(model, {L: routing[f"layer.{L}.moe_router_indices"]
                                        for L in range(model.config.n_layers)}, n)
        graphs, ref = [], None
        for name, eng in zip(names, engines):
            eng.run(toks, SavePlan.empty())  # compile and warm up this build
            g = eng.graphed(toks)
            g.replay()
            g.stream.synchronize()
            got = cp.asnumpy(g.logits)
            ref = got if ref is None else ref
            graphs.append((g, bool(np.array_equal(got.view(np.uint32), ref.view(np.uint32))),
                           float(np.nanmax(np.abs(got - ref)))))
        per_round = interleaved_rounds(cp, [g for g, _, _ in graphs], args.rounds, args.replays, f"{n} tokens")
        for i, name in enumerate(names):
            med = statistics.median(per_round[i])
            row = {"tokens": n, "build": name, "graph_median_ms": round(med * 1e3, 4),
                   "eff_vs_d2d_pct": round(100 * touched / med / bw, 2),
                   "bit_equal_to_default": graphs[i][1], "max_abs_diff": graphs[i][2]}
            if i:
                row.update(change_from_first(per_round, i))
            rows.append(row)
        # this prompt length's rows now, so a run stopped by a time limit keeps what it measured
        print(tabulate([r for r in rows if r["tokens"] == n], headers="keys", tablefmt="github"), flush=True)
        del graphs  # this prompt length's buffers, before the next one's
    if len(tokens) > 1:
        print(tabulate(rows, headers="keys", tablefmt="github"))
    doc = {"benchmark": "gpu_ab", "model": path.name, "act": args.act, "rounds": args.rounds,
           "replays": args.replays, "d2d_copy_gb_s": round(bw / 1e9, 1),
           "env_options": list(K.compile_options()[len(K.COMPILE_OPTIONS):]), "builds": names, "rows": rows}
    print("wrote", write_result(f"ab-{args.tag or args.preset}", doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
