#!/usr/bin/env bash
# The GPU rollout's checks and benchmark in one device run (about 10 minutes), from the repository root, after
# scripts/device/bundle.sh (test/gpu/dist carried to the machine): builds the addon and the programs it needs,
# runs rollout_test (the rollout against the GPU trainer's forward, graphs == eager) and its memcheck, ops_test
# (the LM head's per-row temperature), model-gpu (the trainer path through the shared layer code), generate-gpu
# (the Node rollout tests) and then bench/generate-gpu.sh. scripts/device/gpu-check.sh runs all of it but the
# benchmark, with every other GPU check.
#
# One line per step on stdout; each step's full log and the benchmark JSON under $OUT (default /tmp/rollout-check).
# Env: BUILD_DIR (default /tmp/b-rollout-check), CMAKE_ARGS, FIXTURES (default test/fixtures), LAYERS (benchmark,
# default 4), BENCH=0 skips the benchmark.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
build=${BUILD_DIR:-/tmp/b-rollout-check}
out=${OUT:-/tmp/rollout-check}
fixtures=${FIXTURES:-$root/test/fixtures}
mkdir -p "$out"
command -v nvidia-smi >/dev/null || { echo "rollout-check: no nvidia-smi: this is not a GPU machine" >&2; exit 2; }
echo "rollout-check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
step_logs=$out
source "$root/scripts/device/steps.sh"
step build 400 env BUILD_DIR="$build" BUILD_TARGETS="moepilot rollout_test ops_test" bash scripts/build-native.sh
step rollout_test 120 "$build/rollout_test"
step rollout_test-memcheck 240 "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" --tool memcheck --error-exitcode 1 \
  "$build/rollout_test" --quick
step ops_test 120 "$build/ops_test"
step generate-gpu 240 env MOEPILOT_ADDON="$build/moepilot.node" node test/gpu/dist/generate-gpu.mjs "$fixtures"
step model-gpu 240 env MOEPILOT_ADDON="$build/moepilot.node" node test/gpu/dist/model-gpu.mjs "$fixtures"
if [ "${BENCH:-1}" != 0 ]; then
  step generate-bench 600 env MOEPILOT_ADDON="$build/moepilot.node" OUT_DIR="$out" LAYERS="${LAYERS:-4}" bash bench/generate-gpu.sh
  cat "$out/generate-bench.log"
fi
grep -h -E '^(ok|FAIL)' "$out"/rollout_test.log "$out"/generate-gpu.log 2>/dev/null | cut -c1-200
echo "rollout-check: $failed failure(s)"
[ "$failed" -eq 0 ]
