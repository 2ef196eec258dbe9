#!/usr/bin/env bash
# Builds the native engine (kernels/) into kernels/build/moepilot.node.
# BUILD_DIR overrides the folder (several checkouts or configurations side by side); BUILD_TARGETS (space-separated)
# builds only those targets (e.g. one GPU test program).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/kernels/build}
node_bin=$(command -v node)
api=${NODE_API_INCLUDE:-}
if [ -z "$api" ]; then
  for d in "$(dirname "$(dirname "$(readlink -f "$node_bin")")")/include/node" /usr/include/node /usr/local/include/node; do
    [ -f "$d/node_api.h" ] && api=$d && break
  done
fi
[ -n "$api" ] || { echo "build-native: node_api.h not found (set NODE_API_INCLUDE)" >&2; exit 1; }
addon_api=$(cd "$root" && node -p "require('path').dirname(require.resolve('node-addon-api/package.json'))" 2>/dev/null) || {
  echo "build-native: node-addon-api missing: run 'npm ci' first" >&2; exit 1; }
command -v cmake >/dev/null || { echo "build-native: cmake missing (Debian: apt-get install cmake)" >&2; exit 1; }
# Optional GPU part: nvcc on PATH or under CUDA_HOME; NCCL under NCCL_HOME (include/nccl.h, lib/).
gpu_args=()
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then gpu_args+=("-DCMAKE_CUDA_COMPILER=$CUDA_HOME/bin/nvcc" "-DCUDAToolkit_ROOT=$CUDA_HOME"); fi
if [ -n "${NCCL_HOME:-}" ]; then gpu_args+=("-DNCCL_HOME=$NCCL_HOME"); fi
cmake -S "$root/kernels" -B "$build" -DNODE_API_INCLUDE="$api" -DNODE_ADDON_API_INCLUDE="$addon_api" \
  -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" -DMOEPILOT_MARCH="${MOEPILOT_MARCH:-native}" "${gpu_args[@]}" ${CMAKE_ARGS:-} > "$build.cmake.log" 2>&1 || { cat "$build.cmake.log" >&2; exit 1; }
targets=(); for t in ${BUILD_TARGETS:-}; do targets+=(--target "$t"); done
cmake --build "$build" -j "$(nproc)" "${targets[@]}" > "$build.build.log" 2>&1 || { grep -v '^\[' "$build.build.log" >&2; echo "build-native: build failed" >&2; exit 1; }
echo "built $build/moepilot.node"
