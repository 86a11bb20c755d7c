#!/usr/bin/env bash
# One device call that checks a tree and A/Bs kernels.cu switches on the full 30b-a3b model (development aid;
# the pattern of benchmarks/NOTES.md steps 68-71):
#   bash benchmarks/ab_run.sh TAG "-DMP_X=1" "-DMP_X=1 -DMP_Y=2" ...
# after `../shared/gpu/wheels.sh` here, with `.whl` carried and the install line first. In order: the
# 30b-a3b model made in the background (MODEL_JOBS, default 8), the GPU tests' builds compiled by
# warm_builds.py (WARM_S seconds, default 200, WARM_JOBS builds at once, default 14), the GPU tests (TESTS_S, default 200; TESTS_K: a -k
# expression; TESTS=0 skips them) and the tiny check, then bench_ab.py at TOKENS (default 64,3), ROUNDS
# (default 4) rounds, with each argument after TAG as a variant, until BUDGET_S (default 575) seconds have
# passed. Results under $OUT: ab-TAG.json, warm.log, gpu-tests.log. On a cold machine the tests and an A/B of
# three variants do not fit one call (step 72: the builds took ~98 s each beside the model's making, the
# tests ran out at 200 s, bench_ab.py got ~100 s and compiled nothing in it): TESTS=0 for an A/B call.
# MODEL_LAYERS=8 makes a 30b-a3b of its first 8 layers instead (~22 s on the device where the 48 take ~200 s;
# the per-layer shapes and quant types are the full model's: steps 74-75 A/B'd on it).
# EXPERTS="gate_up:3 gate_up:64 down:3" also times the expert launches alone, each STAGE:TOKENS by
# bench_experts_ab.py (layers 0 to EXPERTS_LAYERS - 1, default 8; the model's routing; EXPERTS_ROUNDS x 10),
# before the forwards; FORWARD=0 leaves bench_ab.py out. Its first run compiles the builds (the later ones
# find them in MOEPARITY_CACHE): on a cold machine with three builds give it ~150 s after the model
# (step 76: a call of 175 s ran out before the first table).
tag=${1:?usage: ab_run.sh TAG VARIANT...}; shift
out=${OUT:?set by the device tool}
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
export MOEPARITY_CACHE=${MOEPARITY_CACHE:-/tmp/mpcache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
(python3 -m pytest_moeparity.cli make-model /tmp/30b.gguf --preset 30b-a3b ${MODEL_LAYERS:+--layers "$MODEL_LAYERS"} --jobs "${MODEL_JOBS:-8}" --quiet
 echo "make rc=$?") > /tmp/make.log 2>&1 &
if [ "${TESTS:-1}" != 0 ]; then
  timeout "${WARM_S:-200}" python3 benchmarks/warm_builds.py --jobs "${WARM_JOBS:-14}" > "$out/warm.log" 2>&1; el "warm_builds rc=$?"
  timeout "${TESTS_S:-200}" python3 -m pytest -m gpu -n 14 -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_tuning.py \
    ${TESTS_K:+-k "$TESTS_K"} > "$out/gpu-tests.log" 2>&1
  el "gpu tests rc=$?"; tail -1 "$out/gpu-tests.log"; grep -E "^(FAILED|ERROR)" "$out/gpu-tests.log" | head -20
  timeout 30 python3 -m pytest_moeparity.cli check builtin:tiny --candidate cupy --stages all 2>&1 | tail -1
fi
while ! grep -q "make rc" /tmp/make.log; do sleep 2; done; el "$(tail -1 /tmp/make.log)"
args=()
for v in "$@"; do args+=("--variant=$v"); done
left() { echo $(( ${BUDGET_S:-575} - ($(date +%s) - t0) )); }
for spec in ${EXPERTS:-}; do
  stage=${spec%%:*} tok=${spec##*:}
  timeout "$(left)" python3 benchmarks/bench_experts_ab.py --model /tmp/30b.gguf --stage "$stage" --tokens "$tok" \
    --layers "${EXPERTS_LAYERS:-8}" --routing model --rounds "${EXPERTS_ROUNDS:-5}" --replays 10 "${args[@]}" \
    --tag "$tag-$stage-${tok}tok" --out "$out/experts-ab-$tag-$stage-${tok}tok.json" 2>&1 | grep -E "^\||builds" | tail -8
  el "experts $spec rc=${PIPESTATUS[0]}"
done
if [ "${FORWARD:-1}" != 0 ]; then
  timeout "$(left)" python3 benchmarks/bench_ab.py --model /tmp/30b.gguf \
    --tokens "${TOKENS:-64,3}" --rounds "${ROUNDS:-4}" "${args[@]}" --tag "$tag" --out "$out/ab-$tag.json" 2>&1 \
    | grep -E "^\||round|builds" | tail -40
fi
el end
