#!/usr/bin/env bash
# Expert + data parallelism inside the GPU engine, in one device run on 2 or more GPUs (about 5-8 minutes), from the
# repository root, after scripts/device/bundle.sh (test/gpu/dist carried to the machine): builds the addon (with
# NCCL), runs ep-model-gpu (N GPU ranks against the one-GPU engine: forward bits, losses, gradients, 3 AdamW steps,
# even / uneven / idle-rank splits, the collective GPU rollout), then the one-GPU regressions of the code it touched:
# model-gpu (trainer: forward_backward, AdamW) and generate-gpu (the GPU rollout). scripts/device/gpu-check.sh runs
# ep-model-gpu too, with every other GPU check.
#
# One line per step on stdout; each step's full log under $OUT (default /tmp/ep-check).
# Env: BUILD_DIR (default /tmp/b-ep-check), CMAKE_ARGS, FIXTURES (default test/fixtures), REGRESSIONS=0 skips the
# one-GPU regressions.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
build=${BUILD_DIR:-/tmp/b-ep-check}
out=${OUT:-/tmp/ep-check}
fixtures=${FIXTURES:-$root/test/fixtures}
mkdir -p "$out"
command -v nvidia-smi >/dev/null || { echo "ep-check: no nvidia-smi: this is not a GPU machine" >&2; exit 2; }
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
echo "ep-check: $gpus x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
[ "$gpus" -ge 2 ] || { echo "ep-check: needs 2 or more GPUs" >&2; exit 2; }
step_logs=$out
step_tail=20
source "$root/scripts/device/steps.sh"
for f in ep-model model generate; do
  [ -f "test/gpu/dist/$f-gpu.mjs" ] || { echo "ep-check: test/gpu/dist/$f-gpu.mjs missing (run scripts/device/bundle.sh first)" >&2; exit 2; }
done
step build 420 env BUILD_DIR="$build" BUILD_TARGETS=moepilot bash scripts/build-native.sh
grep -q "NCCL backend on" "$build.cmake.log" || echo "ep-check: warning: the build found no NCCL (see $build.cmake.log)"
addon=$build/moepilot.node
step ep-model-gpu 420 env MOEPILOT_ADDON="$addon" UV_THREADPOOL_SIZE=8 NCCL_NVLS_ENABLE=0 node test/gpu/dist/ep-model-gpu.mjs "$fixtures"
echo "ep-model-gpu: $(grep -c '^ok' "$out/ep-model-gpu.log") ok, $(grep -c '^FAIL' "$out/ep-model-gpu.log") failed checks"
grep -E '^FAIL' "$out/ep-model-gpu.log" | head -30 | cut -c1-240
# Measured gradient and post-training errors (the tolerances' margin), for the first fixture.
grep -E '^ok .*(gradients|after)' "$out/ep-model-gpu.log" | head -8 | cut -c1-200
if [ "${REGRESSIONS:-1}" != 0 ]; then
  step model-gpu 300 env MOEPILOT_ADDON="$addon" node test/gpu/dist/model-gpu.mjs "$fixtures"
  step generate-gpu 300 env MOEPILOT_ADDON="$addon" node test/gpu/dist/generate-gpu.mjs "$fixtures"
fi
echo "ep-check: $failed failure(s)"
[ "$failed" -eq 0 ]
