"""Kernel tuning sweep: the 3- and 64-token CUDA-graph forward time and the product kernels' device
time for several compile-time settings of kernels.cu (MP_ROWS weight rows per warp, MP_WARPS warps per
block, MP_MIN_BLOCKS* register caps, MP_VECLOADS).

    python benchmarks/sweep_gpu.py --model /tmp/30b4.gguf -- "" "-DMP_VECLOADS=0" "-DMP_MIN_BLOCKS_NT4=5"

("" is the defaults; the `--` lets the settings start with a dash.)

Each setting runs `profile_gpu.py --graph-only` in a fresh process (the kernels compile at import)
with MOEPARITY_NVRTC_OPTIONS set to it. Prints one table; writes benchmarks/results/sweep-<tag>.json.
A development aid for choosing the defaults, not a benchmark of record.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _common import write_result  # noqa: E402

from tabulate import tabulate  # noqa: E402

PRODUCTS = ("qmm_experts_mma<12", "qmm_dense_mma<12", "act_digits", "norm_digits", "swiglu_digits", "norm_rope_attention", "rms_norm", "add_rms_norm",
            "qk_norm_rope", "attention_core", "qmm_experts<12", "qmm_experts<14", "qmm_dense<12", "qmm_dense<14", "qmm_dense<0",
            "qmm_dense_splitk<12", "qmm_dense_splitk<14", "qmm_dense_splitk<0")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", default="3,64")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("settings", nargs="+", help="MOEPARITY_NVRTC_OPTIONS values, one per setting")
    args = ap.parse_args(argv)
    rows, doc = [], {"benchmark": "gpu_sweep", "model": Path(args.model).name, "settings": []}
    for setting in args.settings:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, MOEPARITY_NVRTC_OPTIONS=setting)
            res = subprocess.run([sys.executable, str(HERE / "profile_gpu.py"), "--model", args.model,
                                  "--tokens", args.tokens, "--graph-only", "--top", "40", "--out", str(Path(tmp) / "s.json")],
                                 env=env, capture_output=True, text=True)
            files = list(Path(tmp).glob("*.json"))
            if res.returncode != 0 or not files:
                print(f"{setting!r}: failed\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}", flush=True)
                doc["settings"].append({"options": setting, "error": res.stderr[-2000:]})
                continue
            prof = json.loads(files[0].read_text())
        entry = {"options": setting or "(defaults)", "runs": prof["runs"]}
        doc["settings"].append(entry)
        for run in prof["runs"]:
            per = {}
            for k in run.get("graph_kernels", []):
                for p in PRODUCTS:
                    if k["kernel"].startswith(p):
                        per[p] = per.get(p, 0.0) + k["total_us"]
            rows.append({"options": setting or "(defaults)", "tokens": run["tokens"], "graph_ms": run.get("graph_ms"),
                         **{p + ">": round(v, 1) for p, v in sorted(per.items())}})
        print(tabulate(rows[-len(prof["runs"]):], headers="keys", tablefmt="github"), flush=True)
    print()
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print("wrote", write_result(f"sweep-{args.tag or Path(args.model).stem}", doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
