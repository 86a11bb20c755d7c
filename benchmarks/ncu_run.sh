#!/usr/bin/env bash
# One device call: Nsight Compute on a forward's product launches, and where their warps stall (development
# aid; the pattern of benchmarks/NOTES.md step 74). After `../shared/gpu/wheels.sh` here, with `.whl` carried
# and the install line first:
#   bash benchmarks/ncu_run.sh
# Makes a 30b-a3b of MODEL_LAYERS (default 8) layers, then for each of TOKENS (default 64,3) profiles the
# first COUNT (default 2) launches whose kernel matches KERNELS (default qmm_experts_mma: layer 0's gate / up
# and down) in one eager forward of ncu_forward.py, ordinary launches (MOEPARITY_PDL=0), with the warp-state,
# scheduler, source-counter and memory sections; NVRTC_OPTIONS (kernels.cu switches, e.g. "-DMP_PREFETCH=7")
# profiles another build. Under $OUT per prompt length: the report (ncu-T.ncu-rep, for the Nsight UI), its
# details page (details-T.txt) and SASS source page (source-T.csv), and ncu_stalls.py's summary, which it
# prints (~130 s on a cold H100 for both lengths).
out=${OUT:?set by the device tool}
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
export MOEPARITY_CACHE=${MOEPARITY_CACHE:-/tmp/mpcache}
nvidia-smi --query-gpu=name --format=csv,noheader
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "no ncu on this machine"; exit 1; }
"$ncu" --version | tail -1
model=/tmp/30b-${MODEL_LAYERS:-8}.gguf
python3 -m pytest_moeparity.cli make-model "$model" --preset 30b-a3b --layers "${MODEL_LAYERS:-8}" --jobs 14 --quiet; el "made $model"
IFS=',' read -ra lengths <<< "${TOKENS:-64,3}"
for T in "${lengths[@]}"; do
  MOEPARITY_PDL=0 MOEPARITY_NVRTC_OPTIONS="${NVRTC_OPTIONS:-}" timeout "${NCU_S:-240}" "$ncu" --profile-from-start off \
    --clock-control none -k "regex:${KERNELS:-qmm_experts_mma}" --launch-count "${COUNT:-2}" \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section InstructionStats --section SourceCounters --section MemoryWorkloadAnalysis --section LaunchStats \
    --import-source no -o "$out/ncu-$T" python3 benchmarks/ncu_forward.py --model "$model" --tokens "$T" \
    > "$out/ncu-run-$T.log" 2>&1
  el "ncu $T tokens rc=$?"
  "$ncu" -i "$out/ncu-$T.ncu-rep" --page details --print-details all > "$out/details-$T.txt" 2>&1
  "$ncu" -i "$out/ncu-$T.ncu-rep" --page source --csv --print-source sass > "$out/source-$T.csv" 2>&1
  grep -E "^  [a-z].*\(|Duration|DRAM Throughput|L2 Hit Rate |Achieved Active Warps|Warp Cycles Per Issued" \
    "$out/details-$T.txt" | awk '!seen[$0]++' | cut -c1-120
  python3 benchmarks/ncu_stalls.py "$out/source-$T.csv" --top "${TOP:-8}" | tee "$out/stalls-$T.txt"
done
el end
