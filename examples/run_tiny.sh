#!/usr/bin/env bash
# The main job on the built-in tiny model (made on first use and cached), no GPU needed.
# Each command prints the layer x stage divergence table; exit status 0 = all Match, 1 = divergence.
set -u
cd "$(dirname "$0")"
out=${OUT:-$(mktemp -d)}

echo "== 1. the parity check (reference numpy vs numpy-f64, or cupy where a GPU is usable)"
moeparity check --json "$out/report.json"            # also writes $out/report.png (with matplotlib)

echo "== 2. prove the harness: a planted scale bug at layer 3 must be named, and layers 4+ called inherited"
moeparity check --candidate numpy --inject 'scale=2@3:attn_out' --isolated \
    --stages attn_out,moe_router_indices,moe_ffn_out,post_ffn_residual,lm_head --json "$out/inject.json"

echo "== 3. the historical bug class: ffn_down_exps read as Q6_K everywhere; the drill-down names the expert"
moeparity check --candidate numpy --inject 'dispatch=q6_k@*:ffn_down_exps' --forced-routing \
    --stages moe_router,moe_router_indices,moe_ffn_out,post_ffn_residual

echo "== 4. offline: save a trace, dump it aprender-style, diff the dump against the trace"
moeparity trace builtin:tiny --tokens 3,1,4,1,5 --out "$out/ref.safetensors"
python - "$out" <<'PY'
import sys
from pytest_moeparity.aprender import write_dump
from pytest_moeparity.trace import Trace
write_dump(Trace.load(sys.argv[1] + "/ref.safetensors"), sys.argv[1] + "/dump", fuse_qkv=True)
PY
moeparity diff "$out/ref.safetensors" "$out/dump" --tokens 3,1,4,1,5
echo "outputs in $out"
