#!/usr/bin/env bash
# The CUDA backend's checks, run on a GPU machine from the repository root: builds the addon and every GPU test
# program (kernels/cuda/tests/*_test.cu), runs each one (fused ops, GEMMs, attention, sampler: every kernel
# against the CPU backend), the whole model against the CPU engine and the fixtures, the rollout on the GPU against
# the GPU trainer's forward and the CPU generator, a rank service whose policy is on the GPU (Node; the entry points
# are bundled beforehand by scripts/device/bundle.sh and scripts/device/bundle-cli.mjs where the machine has no
# node_modules), then compute-sanitizer memcheck on each program's quick cases. With two or more GPUs, also the NCCL
# collectives and expert-dispatch test, the expert-parallel oracle over NCCL (bench/ep-equivalence-gpu.sh) and the
# GPU engine's own expert + data parallelism against the one-GPU engine (test/gpu/ep-model.gpu.ts: 2, 3 and 4 ranks
# as the GPUs allow).
#
# On an sm_90 GPU, the sm_80 code paths (mma.sync GEMMs, one-block sampler, no wgmma, TMA or clusters) run too: a
# second build holds only compute_80 PTX, which the driver compiles for the GPU at load, and the test programs and
# the model checks run on it (SM80=0 skips this).
#
# Exit status 0 only when every check passed. One line per step on stdout; each step's full log under $LOGS.
# Env: BUILD_DIR (default /tmp/b-gpu-check; the sm_80 build beside it, $BUILD_DIR-sm80), CMAKE_ARGS (a GPU image
# without OpenBLAS/Gloo needs -DMOEPILOT_REQUIRE_CPU_LIBS=OFF), FIXTURES (default test/fixtures), LOGS (default
# /tmp/gpu-check-logs), SANITIZE=0 skips memcheck, SM80=0 skips the sm_80 pass.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
build=${BUILD_DIR:-/tmp/b-gpu-check}
logs=${LOGS:-/tmp/gpu-check-logs}
fixtures=${FIXTURES:-$root/test/fixtures}
mkdir -p "$logs"
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: this is not a GPU machine" >&2; exit 2; }
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
echo "gpu-check: $gpus x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
step_logs=$logs
source "$root/scripts/device/steps.sh"

major=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | cut -d. -f1)
sm80=0
if [ "${SM80:-1}" != 0 ] && [ "${major:-0}" -ge 9 ]; then
  sm80=1
  # Built alongside the main build (its own directory and log); its step line comes after.
  sm80_args="$(echo "${CMAKE_ARGS:-}" | sed 's/-DCMAKE_CUDA_ARCHITECTURES=[^ ]*//g') -DCMAKE_CUDA_ARCHITECTURES=80-virtual"
  (env BUILD_DIR="$build-sm80" CMAKE_ARGS="$sm80_args" bash scripts/build-native.sh > "$logs/build-sm80.log" 2>&1
   echo $? > "$logs/build-sm80.rc") &
fi
step build 600 env BUILD_DIR="$build" bash scripts/build-native.sh
programs=()
for src in kernels/cuda/tests/*_test.cu; do programs+=("$(basename "$src" .cu)"); done
for p in "${programs[@]}"; do
  [ -x "$build/$p" ] || { echo "FAIL $p: not built"; failed=$((failed + 1)); continue; }
  step "$p" 300 "$build/$p"
done
if [ -f test/gpu/dist/model-gpu.mjs ]; then
  step model-gpu 300 env MOEPILOT_ADDON="$build/moepilot.node" node test/gpu/dist/model-gpu.mjs "$fixtures"
else
  echo "FAIL model-gpu: test/gpu/dist/model-gpu.mjs missing (run scripts/device/bundle.sh first)"; failed=$((failed + 1))
fi
if [ -f test/gpu/dist/generate-gpu.mjs ]; then
  step generate-gpu 300 env MOEPILOT_ADDON="$build/moepilot.node" node test/gpu/dist/generate-gpu.mjs "$fixtures"
else
  echo "FAIL generate-gpu: test/gpu/dist/generate-gpu.mjs missing (run scripts/device/bundle.sh first)"; failed=$((failed + 1))
fi
# The same model test against transformers at a larger size, made here (the GPU machine has torch and
# transformers; the reference runs on the CPU in float64).
if [ -f test/gpu/dist/model-gpu.mjs ] && python3 -c 'import torch, transformers' 2>/dev/null; then
  step make-medium-fixture 600 python3 scripts/make-fixtures.py --out /tmp/gpu-check-fixtures \
    --tokenizer test/fixtures/tokenizer --only qwen2_moe-medium
  step model-gpu-medium 300 env MOEPILOT_ADDON="$build/moepilot.node" node test/gpu/dist/model-gpu.mjs \
    /tmp/gpu-check-fixtures qwen2_moe-medium
  step generate-gpu-medium 300 env MOEPILOT_ADDON="$build/moepilot.node" node test/gpu/dist/generate-gpu.mjs \
    /tmp/gpu-check-fixtures qwen2_moe-medium
fi
if [ -f test/gpu/bundle/rank-device.mjs ]; then
  step rank-device 300 env MOEPILOT_ADDON="$build/moepilot.node" node test/gpu/bundle/rank-device.mjs \
    "$fixtures/recomputed/qwen2_moe-tiny" cuda:0
else
  echo "FAIL rank-device: test/gpu/bundle/rank-device.mjs missing (run node scripts/device/bundle-cli.mjs first)"; failed=$((failed + 1))
fi
if [ "$sm80" = 1 ]; then
  wait
  if [ "$(cat "$logs/build-sm80.rc" 2>/dev/null)" = 0 ]; then
    echo "ok   build-sm80 (compute_80 PTX, compiled for this GPU at load)"
    for p in "${programs[@]}"; do
      [ -x "$build-sm80/$p" ] && step "sm80-$p" 600 "$build-sm80/$p"
    done
    if [ -f test/gpu/dist/model-gpu.mjs ]; then
      step sm80-model-gpu 300 env MOEPILOT_ADDON="$build-sm80/moepilot.node" node test/gpu/dist/model-gpu.mjs "$fixtures"
      step sm80-generate-gpu 300 env MOEPILOT_ADDON="$build-sm80/moepilot.node" node test/gpu/dist/generate-gpu.mjs \
        "$fixtures"
    fi
  else
    echo "FAIL build-sm80; last lines of $logs/build-sm80.log:"; tail -15 "$logs/build-sm80.log"
    failed=$((failed + 1))
  fi
fi
if [ "${SANITIZE:-1}" != 0 ]; then
  sanitizer=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
  for p in "${programs[@]}"; do
    [ -x "$build/$p" ] && step "$p-memcheck" 300 "$sanitizer" --tool memcheck --error-exitcode 1 "$build/$p" --quick
  done
fi
if [ "$gpus" -ge 2 ] && [ -x "$build/gpu_comm_test" ]; then
  step gpu_comm_test 300 "$build/gpu_comm_test" --ranks "$gpus"
  step ep-equivalence 300 env MOEPILOT_ADDON="$build/moepilot.node" FIXTURES="$fixtures" bash bench/ep-equivalence-gpu.sh --ranks 2
  if [ -f test/gpu/dist/ep-model-gpu.mjs ]; then
    step ep-model-gpu 600 env MOEPILOT_ADDON="$build/moepilot.node" UV_THREADPOOL_SIZE=8 NCCL_NVLS_ENABLE=0 \
      node test/gpu/dist/ep-model-gpu.mjs "$fixtures"
  else
    echo "FAIL ep-model-gpu: test/gpu/dist/ep-model-gpu.mjs missing (run scripts/device/bundle.sh first)"; failed=$((failed + 1))
  fi
fi
echo "gpu-check: $failed failure(s)"
[ "$failed" -eq 0 ]
