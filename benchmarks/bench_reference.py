"""Reference (NumPy) forward: seconds per token and peak memory.

    python benchmarks/bench_reference.py --preset small            # makes the model if needed
    python benchmarks/bench_reference.py --model /path/30b.gguf --tokens 3 --tag 30b-a3b

Prints a table and writes benchmarks/results/reference-<tag>.json. Peak anonymous RSS is the
memory the forward allocates (dequantized weights, activations); VmHWM also counts the pages of
the memory-mapped GGUF that were read (file-backed, reclaimable).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# this checkout's package first (not an older installed copy), then the benchmarks' helpers
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import MemorySampler, write_result  # noqa: E402

from tabulate import tabulate  # noqa: E402

from pytest_moeparity.make_model import PRESETS, make_model  # noqa: E402
from pytest_moeparity.model import load_model  # noqa: E402
from pytest_moeparity.parity import default_tokens  # noqa: E402
from pytest_moeparity.plan import SavePlan  # noqa: E402
from pytest_moeparity.reference import BACKENDS, NumpyForward  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--model", default=None, help="existing GGUF (default: make the preset under /tmp)")
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--backend", default="numpy", choices=list(BACKENDS))
    ap.add_argument("--plan", default="none", choices=["none", "all"], help="capture nothing or every stage")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    made = None
    if args.model:
        path = Path(args.model)
    else:
        path = Path("/tmp") / f"moeparity-bench-{args.preset}-{args.quant.lower()}.gguf"
        if not path.exists():
            res = make_model(path, PRESETS[args.preset], quant=args.quant, progress=True)
            made = {"seconds": round(res.seconds, 2), "mib_per_s": round(res.mb_per_s, 1)}
    model = load_model(path)
    print(model.describe())
    tokens = default_tokens(model.config.vocab, args.tokens)
    plan = SavePlan.parse() if args.plan == "all" else SavePlan.empty()
    fwd = NumpyForward(model, name=args.backend, **BACKENDS[args.backend])
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        result = fwd.run(tokens, plan)
        dt = time.perf_counter() - t0
    captured = sum(v.nbytes for v in result.trace.tensors.values())
    row = {
        "model": path.name, "file_gib": round(model.file_size / 2**30, 3), "backend": args.backend,
        "tokens": len(tokens), "plan": args.plan, "forward_s": round(dt, 3),
        "s_per_token": round(dt / len(tokens), 3), "peak_anon_mib": round(mem.peak_anon_mib, 1),
        "peak_rss_mib": round(mem.peak_rss_mib(), 1), "captured_mib": round(captured / 2**20, 2),
    }
    print(tabulate([row], headers="keys", tablefmt="github"))
    tag = args.tag or args.preset
    doc = {"benchmark": "reference_forward", "result": row, "config": model.config.as_dict()}
    if made:
        doc["make_model"] = made
    print("wrote", write_result(f"reference-{tag}", doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
