"""In-process A/B of kernels.cu switches on the expert products alone: one model's gate / up (or down)
launches of several layers, captured as one CUDA graph per build and replayed in interleaved rounds.

    python benchmarks/bench_experts_ab.py --model /tmp/30b.gguf --tokens 3 --layers 8 \
        --variant=-DMP_MMA_ZERO_ABSENT=0 --variant=-DMP_Q4_LAYOUT_PROBE=1 --tag zero-absent-layout

bench_ab.py times whole forwards, where a switch that computes wrong values (a timing probe such as
``MP_Q4_LAYOUT_PROBE``) changes the routing of every later layer and with it the work. Here the routing
is fixed: ``--tokens`` tokens, each routed to k distinct experts drawn at random (``--routing random``,
seeded; the same for every build and layer) or as the model routes the benchmarks' prompt
(``--routing model``: each layer its own, from the default build's forward; a long prompt's deep layers
send most tokens to a few experts, step 56 of NOTES.md), their activations random and their digits written
once. Each build groups the routing itself (its records follow its own MP_EXPERT_CHUNK). A build's graph
holds one launch per layer (layers ``--first-layer`` on, ``--layers`` of them, so each launch reads weights
that are not in L2 from the launch before); its time per launch is the graph's median over its rounds
divided by the layers.
Each build's outputs are compared with the default build's (bit for bit expected, but for probes).
Prints a table; writes benchmarks/results/experts-ab-<tag>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

# this checkout's package first (not an older installed copy), then the benchmarks' helpers
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import variant_builds, write_result  # noqa: E402
from bench_ab import change_from_first, interleaved_rounds  # noqa: E402
from bench_gpu import bench_model_path, d2d_bandwidth  # noqa: E402

import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

from pytest_moeparity.make_model import PRESETS  # noqa: E402
from pytest_moeparity.model import load_model  # noqa: E402


def random_ids(rng: np.random.Generator, n_tokens: int, k: int, n_experts: int) -> np.ndarray:
    """int32 [T, k]: each token's k distinct experts, drawn uniformly."""
    return np.stack([rng.choice(n_experts, size=k, replace=False) for _ in range(n_tokens)]).astype(np.int32)


def model_ids(model, backend, n_tokens: int, layers: list[int]) -> dict[int, np.ndarray]:
    """int32 [T, k] per layer: the experts the model's own forward (this backend, the default kernels)
    routes the benchmarks' prompt of ``n_tokens`` tokens to."""
    from pytest_moeparity.gpu import CupyEngine
    from pytest_moeparity.parity import default_tokens
    from pytest_moeparity.plan import SavePlan

    trace = CupyEngine(model, backend=backend).run(default_tokens(model.config.vocab, n_tokens),
                                                   SavePlan.parse("moe_router_indices")).trace
    return {L: np.ascontiguousarray(np.asarray(trace[f"layer.{L}.moe_router_indices"]), dtype=np.int32) for L in layers}


def capture(cp, launches):
    """``launches()`` (the stream current) captured as a CUDA graph after one warm-up run; a
    GraphedForward whose ``logits`` are what the launches return. It keeps ``launches`` (and so the
    device arrays its closure holds: the routing records) alive as long as the graph, which reads them."""
    from pytest_moeparity.gpu.forward import GraphedForward

    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        launches()  # compiles, fills the private pool
        stream.synchronize()
        stream.begin_capture()
        try:
            outs = launches()
        finally:
            graph = stream.end_capture()
    return GraphedForward(graph, stream, outs, (pool, launches))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the --preset model, made once)")
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8, help="layers whose launches one graph holds")
    ap.add_argument("--first-layer", type=int, default=0, help="the first of them")
    ap.add_argument("--routing", default="random", choices=["random", "model"],
                    help="random distinct experts a token, or the model's own routing of the prompt, layer by layer")
    ap.add_argument("--stage", default="gate_up", choices=["gate_up", "down"])
    ap.add_argument("--variant", action="append", required=True,
                    help="kernels.cu switches of one build, e.g. '-DMP_MMA_ZERO_ABSENT=0' (repeat for more builds)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--replays", type=int, default=20, help="graph replays of a build in each round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serial-builds", action="store_true", help="compile the variant builds one after another")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--emulator", action="store_true",
                    help="a dry run on the CPU emulator (no GPU): each build's launches once, their outputs "
                         "compared, no times (checks the script and the switches; use a small --preset)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.replays < 1 or args.tokens < 1 or args.layers < 1:
        ap.error("--rounds, --replays, --tokens and --layers must be at least 1")
    if args.first_layer < 0:
        ap.error("--first-layer must be at least 0")

    from pytest_moeparity.gpu import kernels as K
    from pytest_moeparity.gpu.weights import device_weights

    try:  # bad switches are refused before the model is read or a kernel compiled
        variants = [K.variant_options(v) for v in args.variant]
    except ValueError as exc:
        ap.error(str(exc))
    if args.emulator:
        from pytest_moeparity.gpu.emulator import EmulatorBackend

        cp, base = np, EmulatorBackend()
    else:
        import cupy as cp

        base = K.get_backend()
    K.set_debug(False)
    path = bench_model_path(args.model, args.preset, args.quant)
    model = load_model(path)
    cfg = model.config
    if args.first_layer + args.layers > cfg.n_layers:
        ap.error(f"--first-layer {args.first_layer} --layers {args.layers}: the model has {cfg.n_layers}")
    print(model.describe(), flush=True)
    bw = 0.0 if args.emulator else d2d_bandwidth(cp)
    names = ["default"] + [" ".join(v) for v in variants]
    backends = [base] + variant_builds(base, variants, threads=not args.serial_builds)
    weights = device_weights(model, base)
    layers = list(range(args.first_layer, args.first_layer + args.layers))
    T, k, E = args.tokens, cfg.n_experts_used, cfg.n_experts
    rng = np.random.default_rng(args.seed)
    if args.routing == "model":
        layer_ids = model_ids(model, base, T, layers)
    else:
        layer_ids = dict.fromkeys(layers, random_ids(rng, T, k, E))
    if args.stage == "gate_up":
        mats = [(weights.layer(L, "ffn_gate_exps"), weights.layer(L, "ffn_up_exps")) for L in layers]
        x = base.to_device(rng.standard_normal((T, cfg.hidden)).astype(np.float32))
    else:
        mats = [(weights.layer(L, "ffn_down_exps"),) for L in layers]
        x = base.to_device(rng.standard_normal((T * k, cfg.expert_ff)).astype(np.float32))
    digits = K.act_digits(x, backend=base)
    per_pair = args.stage == "down"
    # bytes each launch must read: the routed experts' slices of its matrices
    n_routed = [len(np.unique(layer_ids[L])) for L in layers]
    counts = [np.bincount(layer_ids[L].ravel(), minlength=E) for L in layers]
    busiest = [int(c.max()) for c in counts]
    # passes of 4 pairs over an expert's rows (the tensor-core kernels' unit of work past the bytes)
    passes = [int(((c + 3) // 4).sum()) for c in counts]
    launch_bytes = [sum(n * m.raw.nbytes // E for m in ms) for n, ms in zip(n_routed, mats)]
    types = sorted({m.qtype.name for ms in mats for m in ms})
    print(f"{len(names)} builds ({', '.join(names)}); {args.stage} of layers {layers[0]}-{layers[-1]} ({', '.join(types)}), "
          f"{T} tokens, {args.routing} routing: {min(n_routed)}-{max(n_routed)} experts a layer, the busiest holding "
          f"{min(busiest)}-{max(busiest)} tokens, {min(passes)}-{max(passes)} passes of 4 pairs a launch; "
          f"copy {bw / 1e9:.0f} GB/s", flush=True)

    graphs, checks, ref = [], [], None
    for be in backends:
        routings = [K.expert_routing(be.to_device(layer_ids[L]), E, backend=be) for L in layers]  # this build's records

        def launches(be=be, routings=routings):
            return [K.qmatmul_experts_shared_input(x, ms, r, x_per_pair=per_pair, digits=digits, backend=be)
                    for ms, r in zip(mats, routings)]
        if args.emulator:
            outs = launches()
        else:
            g = capture(cp, launches)
            g.replay()
            g.stream.synchronize()
            graphs.append(g)
            outs = g.logits
        got = np.concatenate([base.asnumpy(o).ravel() for os_ in outs for o in os_])
        ref = got if ref is None else ref
        checks.append(bool(np.array_equal(got.view(np.uint32), ref.view(np.uint32))))
    if args.emulator:
        print(tabulate([{"build": n, "bit_equal_to_default": c} for n, c in zip(names, checks)], headers="keys",
                       tablefmt="github"))
        return 0
    per_round = interleaved_rounds(cp, graphs, args.rounds, args.replays, f"{args.stage}, {T} tokens")
    rows = []
    for i, name in enumerate(names):
        med = statistics.median(per_round[i])
        row = {"build": name, "graph_median_ms": round(med * 1e3, 4),
               "us_per_launch": round(med * 1e6 / len(layers), 2),
               "gb_s": round(sum(launch_bytes) / med / 1e9, 1),
               "pct_of_copy": round(100 * sum(launch_bytes) / med / bw, 1),
               "bit_equal_to_default": checks[i]}
        if i:
            row.update(change_from_first(per_round, i))
        rows.append(row)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    doc = {"benchmark": "gpu_experts_ab", "model": path.name, "stage": args.stage, "tokens": T,
           "layers": layers, "routing": args.routing, "routed_experts": n_routed, "busiest_expert_tokens": busiest,
           "passes_of_4": passes,
           "types": types, "bytes_per_launch": launch_bytes,
           "rounds": args.rounds, "replays": args.replays, "seed": args.seed, "d2d_copy_gb_s": round(bw / 1e9, 1),
           "env_options": list(K.compile_options()[len(K.COMPILE_OPTIONS):]), "builds": names, "rows": rows}
    print("wrote", write_result(f"experts-ab-{args.tag or args.preset}", doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
