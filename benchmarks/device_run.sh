#!/usr/bin/env bash
# One device call that checks and times the GPU backend (development aid; the device returns at most 8
# files from $OUT, and this writes 7):
#   bash benchmarks/device_run.sh [BASELINE_OPTIONS]
# after `../shared/gpu/wheels.sh` here, with `.whl` carried. In order: the GPU tests, the built-in tiny
# check, the full 30b-a3b forward at 3 and 64 tokens (made in the background meanwhile), the same at 3
# tokens with MOEPARITY_NVRTC_OPTIONS=BASELINE_OPTIONS (default "-DMP_FUSE_DIGITS=0": the same machine's
# baseline for the last change), then, while under DEVICE_RUN_BUDGET_S (default 330) seconds have passed,
# the heavy pytest wall time. Results: $OUT/gpu-30b-a3b.json, gpu-30b-a3b-baseline.json,
# gpu-pytest-30b-a3b.json and the logs.
cd "$(dirname "$0")/.."
base_opts=${1:--DMP_FUSE_DIGITS=0}
budget=${DEVICE_RUN_BUDGET_S:-330}
out=${OUT:?set by the device tool}
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site MOEPARITY_CACHE=/tmp/mpcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
(python3 -m pytest_moeparity.cli make-model /tmp/30b.gguf --preset 30b-a3b --jobs 11 --quiet; echo "make rc=$?") \
  > "$out/make.log" 2>&1 &
timeout 200 python3 -m pytest -m gpu -n 5 -q tests/test_gpu.py > "$out/gpu-tests.log" 2>&1
rc=$?; el "gpu tests rc=$rc"
tail -2 "$out/gpu-tests.log"; grep -E "^(FAILED|ERROR)" "$out/gpu-tests.log" | head -20
timeout 40 python3 -m pytest_moeparity.cli check builtin:tiny --candidate cupy --stages all 2>&1 | tail -1
wait; tail -2 "$out/make.log"; el made
timeout 100 python3 benchmarks/bench_gpu.py --model /tmp/30b.gguf --tokens 3,64 --repeat 3 --tag 30b-a3b \
  --out "$out/gpu-30b-a3b.json" > "$out/bench.log" 2>&1; el "bench rc=$?"
grep -E "^\|" "$out/bench.log" | cut -c1-330 | tail -6
MOEPARITY_NVRTC_OPTIONS="$base_opts" timeout 60 python3 benchmarks/bench_gpu.py --model /tmp/30b.gguf --tokens 3 \
  --repeat 3 --tag 30b-a3b-baseline --out "$out/gpu-30b-a3b-baseline.json" >> "$out/bench.log" 2>&1
el "baseline ($base_opts) rc=$?"; grep -E "^\|" "$out/bench.log" | cut -c1-330 | tail -3
if [ $(( $(date +%s) - t0 )) -lt "$budget" ]; then
  timeout 100 python3 benchmarks/bench_gpu.py --model /tmp/30b.gguf --pytest-only --tag 30b-a3b \
    --out "$out/gpu-pytest-30b-a3b.json" > "$out/pytest-wall.log" 2>&1; el "pytest wall rc=$?"
  tail -4 "$out/pytest-wall.log" | cut -c1-400
fi
exit "$rc"
