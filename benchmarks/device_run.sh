#!/usr/bin/env bash
# One device call that checks and times the GPU backend (development aid; the device returns at most 8
# files from $OUT, and this writes 8):
#   bash benchmarks/device_run.sh [BASELINE_OPTIONS]
# after `../shared/gpu/wheels.sh` here, with `.whl` carried. In order: the GPU tests (GPU_TESTS_K: a -k
# expression, to run fewer), the built-in tiny
# check, bench_launch_floor.py (launch-floor.json; FLOOR=0 skips it), the per-kernel device times of a 4-layer
# 30b-a3b-shaped model at 3 tokens (PROFILE_TOKENS: others, e.g. 3,64) under programmatic dependent launch (then for each of the compile
# options in PROFILE_VARIANTS, ';'-separated, its table only), Nsight Compute's sections on the first 6
# expert-product launches of that model (ordinary launches; NCU=0 skips it; NCU_KERNELS: another kernel-name
# regex, e.g. "norm_rope_attention|moe_route", NCU_COUNT: launches, default 6; NCU_VARIANT: compile options
# of a second run, same file), the full 30b-a3b forward at
# 3 and 64 tokens (BENCH_TOKENS: others; FULL=0 skips the full model; the models are made in the background meanwhile), a same-machine baseline at 3 tokens (BASE_TOKENS: others),
# then, while under DEVICE_RUN_BUDGET_S (default 250) seconds have passed, the heavy pytest wall time.
# The baseline is the tree in .gpu/base where there is one (made here with
# `mkdir -p .gpu/base && git archive REV | tar -x -C .gpu/base`, `.gpu` ignored and carried), else this tree
# with MOEPARITY_NVRTC_OPTIONS=BASELINE_OPTIONS (default "-DMP_EXPERTS_EARLY=0"). Results: $OUT/gpu-30b-a3b.json,
# gpu-30b-a3b-baseline.json, profile-30b4-pdl-on.json, gpu-pytest-30b-a3b.json, launch-floor.json,
# ncu-experts.txt and the logs (gpu-tests.log; bench.log with the pytest wall's tail).
cd "$(dirname "$0")/.."
base_opts=${1:--DMP_EXPERTS_EARLY=0}
budget=${DEVICE_RUN_BUDGET_S:-250}
out=${OUT:?set by the device tool}
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site MOEPARITY_CACHE=/tmp/mpcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
(python3 -m pytest_moeparity.cli make-model /tmp/30b4.gguf --preset 30b-a3b --layers 4 --jobs 4 --quiet; \
 if [ "${FULL:-1}" != 0 ]; then python3 -m pytest_moeparity.cli make-model /tmp/30b.gguf --preset 30b-a3b --jobs 11 --quiet; fi; \
 echo "make rc=$?") \
  > /tmp/make.log 2>&1 &
# the tests' kernel builds compiled once, side by side, into CuPy's cache (warm_builds.py: on a cold machine
# the workers otherwise compile them each, the variant tests last)
timeout 200 python3 benchmarks/warm_builds.py --jobs 16 2>&1 | tail -1; el "builds warmed"
timeout 200 python3 -m pytest -m gpu -n 5 -q tests/test_gpu.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} > "$out/gpu-tests.log" 2>&1
rc=$?; el "gpu tests rc=$rc"
tail -2 "$out/gpu-tests.log"; grep -E "^(FAILED|ERROR)" "$out/gpu-tests.log" | head -20
timeout 40 python3 -m pytest_moeparity.cli check builtin:tiny --candidate cupy --stages all 2>&1 | tail -1
if [ "${FLOOR:-1}" != 0 ]; then  # FLOOR=0 skips it
  timeout 60 python3 benchmarks/bench_launch_floor.py --out "$out/launch-floor.json" 2>&1 | grep -E "^\||launch"; el "launch floor"
fi
while [ ! -s /tmp/30b4.gguf ]; do sleep 2; done; el "4-layer model made"
MOEPARITY_PDL=1 timeout 90 python3 benchmarks/profile_gpu.py --model /tmp/30b4.gguf --tokens "${PROFILE_TOKENS:-3}" --graph-only --top 22 \
  --tag 30b4-pdl-on --out "$out/profile-30b4-pdl-on.json" 2>&1 | grep -E "^\||graph" | cut -c1-120 | head -30
# compile-option variants of the same profile, tables printed only: PROFILE_VARIANTS="-DMP_MMA_Q6K=0;-DMP_FUSE_DIGITS=0"
IFS=';' read -ra variants <<< "${PROFILE_VARIANTS:-}"
for opt in "${variants[@]}"; do
  echo "variant: $opt"
  MOEPARITY_NVRTC_OPTIONS="$opt" MOEPARITY_PDL=1 timeout 150 python3 benchmarks/profile_gpu.py --model /tmp/30b4.gguf \
    --tokens 3 --graph-only --top 12 --tag variant --out /tmp/variant.json 2>&1 | grep -E "^\||graph" | cut -c1-120
done
if [ "${NCU:-1}" != 0 ]; then  # where the expert products' time goes (benchmarks/NOTES.md, step 36 and item 000)
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  # this tree (under the caller's MOEPARITY_NVRTC_OPTIONS, as the profile above), then (NCU_VARIANT: compile
  # options) the same launches of a variant, into the same file
  for opt in "${MOEPARITY_NVRTC_OPTIONS:-}" ${NCU_VARIANT:+"$NCU_VARIANT"}; do
    echo "==== ncu: MOEPARITY_NVRTC_OPTIONS='$opt'" >> "$out/ncu-experts.txt"
    MOEPARITY_NVRTC_OPTIONS="$opt" MOEPARITY_PDL=0 timeout 90 "$ncu" --profile-from-start off --clock-control none \
      -k "regex:${NCU_KERNELS:-qmm_experts_mma}" --launch-count "${NCU_COUNT:-6}" --section SpeedOfLight --section Occupancy --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis python3 benchmarks/ncu_forward.py \
      --model /tmp/30b4.gguf --tokens 3 >> "$out/ncu-experts.txt" 2>&1; el "ncu '$opt' rc=$?"
  done
  grep -E "^==== ncu|^  [a-z].*(${NCU_KERNELS:-qmm_experts_mma})|Duration|DRAM Throughput|L2 Hit|Warp Cycles Per Issued|Achieved Occ|being stalled" \
    "$out/ncu-experts.txt" | cut -c1-150 | head -70
fi
[ "${FULL:-1}" = 0 ] && exit "$rc"  # FULL=0: no full model (a short device budget)
# a result file's forwards as one line each
summary() { python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
for f in d['forward']:
    print(sys.argv[2], f['tokens'], 'tokens: graph', f.get('graph_median_ms'), 'ms,', f.get('graph_eff_vs_d2d_pct'),
          '% of', d['ceilings']['d2d_copy_gb_s'], 'GB/s copy; eager', f['median_ms'], 'ms')" "$1" "$2"; }
while ! grep -q "make rc" /tmp/make.log; do sleep 2; done; tail -1 /tmp/make.log; el made
timeout 100 python3 benchmarks/bench_gpu.py --model /tmp/30b.gguf --tokens "${BENCH_TOKENS:-3,64}" --repeat 3 --tag 30b-a3b \
  --out "$out/gpu-30b-a3b.json" > "$out/bench.log" 2>&1; el "bench rc=$?"
summary "$out/gpu-30b-a3b.json" "this tree:"
if [ -d .gpu/base/benchmarks ]; then
  (cd .gpu/base && timeout 80 python3 benchmarks/bench_gpu.py --model /tmp/30b.gguf --tokens "${BASE_TOKENS:-3}" --repeat 3 \
     --tag 30b-a3b-baseline --out "$out/gpu-30b-a3b-baseline.json" >> "$out/bench.log" 2>&1); el "baseline (.gpu/base) rc=$?"
else
  MOEPARITY_NVRTC_OPTIONS="$base_opts" timeout 60 python3 benchmarks/bench_gpu.py --model /tmp/30b.gguf --tokens "${BASE_TOKENS:-3}" \
    --repeat 3 --tag 30b-a3b-baseline --out "$out/gpu-30b-a3b-baseline.json" >> "$out/bench.log" 2>&1
  el "baseline ($base_opts) rc=$?"
fi
summary "$out/gpu-30b-a3b-baseline.json" "baseline:"
if [ $(( $(date +%s) - t0 )) -lt "$budget" ]; then
  timeout 110 python3 benchmarks/bench_gpu.py --model /tmp/30b.gguf --pytest-only --tag 30b-a3b \
    --out "$out/gpu-pytest-30b-a3b.json" > /tmp/pytest-wall.log 2>&1; el "pytest wall rc=$?"
  tail -3 /tmp/pytest-wall.log | cut -c1-300 | tee -a "$out/bench.log"
fi
exit "$rc"
