#!/usr/bin/env bash
# GPU sampler benchmark: the kernel (kernels/cuda/tests/sampling_test.cu --bench) on 256 x 151936 logits for top-p
# 0.9, top-k 50 + top-p 0.9, min-p 0.1, greedy, and 1024 rows, with the default launch (one cluster per row) and
# other launch shapes (pipelined persistent clusters, clusters of 4, one block over scratch), against one read of the
# logits and the PyTorch baselines (bench/sampling-torch.py: sort-based top-p, torch.multinomial on softmax) on the
# same logits, same card. bench/sampling-gpu.notes.md: where a row's time goes, and variants that did not pay.
# Writes one JSON to $OUT_DIR/sampling-gpu.json (default OUT_DIR: bench/results).
#   env: BUILD_DIR (default /tmp/b-sampling), SKIP_BUILD=1 to reuse BUILD_DIR/sampling_test, ITERS (default 50).
#   PROFILE=1: instead, builds the benchmark with the sampler's phase clock (-DMP_SAMPLE_PROFILE=1, nvcc alone) and
#   prints each case's time per row and phase (wait, max, weights, inverse CDF, counting, top-k mass, rest); no JSON.
#   NCU=1: instead, Nsight Compute on the default top-p launch: stall reasons and the instructions that stall most.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-/tmp/b-sampling}
out_dir=${OUT_DIR:-$root/bench/results}
mkdir -p "$out_dir"
if [ "${NCU:-0}" = 1 ]; then
  # Nsight Compute on the default top-p 0.9 launch (256 rows, after its 3 warm-up launches): speed of light, the
  # warps' stall reasons and the instructions (SASS) where warps stalled most.
  cuda=${CUDA_HOME:-/usr/local/cuda}
  mkdir -p "$build"
  "$cuda/bin/nvcc" -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -gencode=arch=compute_90a,code=sm_90a \
    -I"$root/kernels" -I"$root/kernels/include" "$root/kernels/cuda/tests/sampling_test.cu" \
    "$root/kernels/cuda/sampling.cu" "$root/kernels/gen/sampling.cpp" -o "$build/sampling_test_lineinfo"
  rep=$build/sampling-ncu
  "$cuda/bin/ncu" -f -o "$rep" --kernel-name regex:sample_rows --launch-skip "${NCU_SKIP:-3}" --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section SourceCounters --import-source yes "$build/sampling_test_lineinfo" --bench --iters 5 >/dev/null
  "$cuda/bin/ncu" -i "$rep.ncu-rep" --page raw --csv > "$build/ncu-raw.csv"
  "$cuda/bin/ncu" -i "$rep.ncu-rep" --page source --print-source sass --csv > "$build/ncu-src.csv" 2>/dev/null || true
  exec python3 "$root/bench/ncu-summary.py" "$build/ncu-raw.csv" "$build/ncu-src.csv"
fi
if [ "${PROFILE:-0}" = 1 ]; then
  cuda=${CUDA_HOME:-/usr/local/cuda}
  mkdir -p "$build"
  "$cuda/bin/nvcc" -O3 -std=c++17 --expt-relaxed-constexpr -DMP_SAMPLE_PROFILE=1 -gencode=arch=compute_90a,code=sm_90a \
    -I"$root/kernels" -I"$root/kernels/include" "$root/kernels/cuda/tests/sampling_test.cu" \
    "$root/kernels/cuda/sampling.cu" "$root/kernels/gen/sampling.cpp" -o "$build/sampling_test_profile"
  exec "$build/sampling_test_profile" --bench --iters "${ITERS:-50}"
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  BUILD_DIR=$build BUILD_TARGETS=sampling_test bash "$root/scripts/build-native.sh" >/dev/null
fi
logits=$(mktemp /tmp/sampling-logits.XXXXXX)
trap 'rm -f "$logits"' EXIT
json=$out_dir/sampling-gpu.json
"$build/sampling_test" --bench --iters "${ITERS:-50}" --out "$json" --logits-file "$logits"
python3 "$root/bench/sampling-torch.py" --logits "$logits" --rows 256 --vocab 151936 --json "$json" --iters 20
echo "wrote $json"
