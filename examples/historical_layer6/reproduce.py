"""Reproduce the historical aprender finding on a small 48-layer Qwen3-MoE (Q4_K_M).

The GPU expert code once dispatched its matvec kernels by a fixed assumption (Q6_K for
``ffn_down_exps``) instead of each tensor's own quant type. In a Q4_K_M file llama.cpp's rule
stores ``ffn_down_exps`` as Q6_K in layers 0-5 of 48 and Q4_K in layer 6 (the first one), so the
bug first shows at layer 6 and everything after it is poisoned.

Here the bug is planted in the NumPy candidate with the fault ``dispatch=q6_k@*:ffn_down_exps``
(every layer's ffn_down_exps bytes read with the Q6_K layout; a no-op where the tensor really is
Q6_K), and pytest-moeparity is asked to find it:

    python examples/historical_layer6/reproduce.py [--out DIR] [--json report.json]

Expected: first divergence at layer 6 (moe_ffn_out, or moe_expert_out with per-expert stages),
layers 0-5 Match, layers 7+ marked downstream (*), and the drill-down naming an expert of
layer 6 whose first bad sub-stage is moe_expert_out with ffn_down_exps Q4_K.
The same check from the command line:

    moeparity check MODEL.gguf --candidate numpy --inject 'dispatch=q6_k@*:ffn_down_exps' \\
        --stages moe_router,moe_router_indices,moe_ffn_out,post_ffn_residual --isolated
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# this model's dequantized weights (~620 MiB) fit the NumPy engine's weight cache
os.environ.setdefault("MOEPARITY_NUMPY_CACHE_MB", "1024")

from pytest_moeparity.make_model import ModelSpec, make_model  # noqa: E402
from pytest_moeparity.model import load_model  # noqa: E402
from pytest_moeparity.parity import run_parity  # noqa: E402
from pytest_moeparity.plan import SavePlan  # noqa: E402

# Qwen3-30B-A3B's layer count (so the Q4_K_M mix is the real one) with small matrices
SPEC = ModelSpec(n_layers=48, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                 n_experts_used=2, expert_ff=512, vocab=512, context_length=512)
FAULT = "dispatch=q6_k@*:ffn_down_exps"
STAGES = "moe_router,moe_router_indices,moe_ffn_out,post_ffn_residual"


def build(out_dir: Path) -> Path:
    path = out_dir / "qwen3moe-48l-q4km.gguf"
    if not path.exists():
        make_model(path, SPEC, quant="Q4_K_M", seed=0, progress=False)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="where to write the model (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the JSON report (and a heatmap PNG next to it)")
    ap.add_argument("--isolated", action="store_true", help="add the isolated-layers section")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="moeparity-hist-"))
    model = load_model(build(out))
    types = {L: model.layer(L, "ffn_down_exps").type_name for L in range(8)}
    print("ffn_down_exps types, layers 0-7:", ", ".join(f"{L}:{t}" for L, t in types.items()))
    run = run_parity(model, plan=SavePlan.parse(STAGES), candidate="numpy", faults=FAULT,
                     isolated=args.isolated)
    print(run.report.render(max_width=150))
    if args.json:
        run.report.write_json(args.json)
        from pytest_moeparity.heatmap import png_path_for, write_heatmap

        png = write_heatmap(run.report, png_path_for(args.json))
        print(f"JSON report: {args.json}" + (f"; heatmap: {png}" if png else ""))
    first = run.report.first_divergence
    ok = first is not None and first.layer == 6 and any(
        d.layer == 6 and d.stage == "moe_expert_out" and d.quant_types["ffn_down_exps"] == "Q4_K"
        for d in run.report.bisect.drilldown)
    print("reproduced: first divergence at layer 6, drill-down names a Q4_K down projection" if ok
          else "NOT reproduced")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
