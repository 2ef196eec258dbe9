#!/usr/bin/env bash
# Builds the GPU test (kernels/cuda/tests/gpu_comm_test.cpp) and the dispatch benchmark
# (bench/ep-dispatch-gpu.cpp) with nvcc alone, runs the test, then the benchmark, on this machine's
# GPUs. No Node, CMake, OpenBLAS or Gloo needed (the GPU machines have none of the last two), so this
# does not go through kernels/CMakeLists.txt, which builds the same programs where the whole engine
# builds.
#
# Usage: bench/ep-dispatch-gpu.sh RANKS [benchmark flags...]
#   env: NCCL_HOME (default: the Python nvidia.nccl package), CUDA_HOME (default /usr/local/cuda),
#        BUILD_DIR (default kernels/build-gpu), RESULTS (default bench/results/ep-dispatch-gpu-RANKS.json),
#        SKIP_TEST=1 to skip the correctness test, SKIP_BUILD=1 to reuse the programs in BUILD_DIR.
# Example: bench/ep-dispatch-gpu.sh 4 --tokens 4096,16384,65536 --topk 2,4 --chunks 1 --grouping peer,kernel
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ranks=${1:?usage: bench/ep-dispatch-gpu.sh RANKS [benchmark flags...]}
shift
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on shared hosts
cuda=${CUDA_HOME:-/usr/local/cuda}
nccl=${NCCL_HOME:-$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])')}
[ -f "$nccl/include/nccl.h" ] || { echo "ep-dispatch-gpu: nccl.h not under $nccl/include (set NCCL_HOME)" >&2; exit 1; }
export LD_LIBRARY_PATH=$nccl/lib:$cuda/lib64:${LD_LIBRARY_PATH:-}
build=${BUILD_DIR:-$root/kernels/build-gpu}
mkdir -p "$build"
flags=(-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DMOEPILOT_WITH_NCCL -I"$root/kernels/include"
  -I"$root/kernels" -I"$nccl/include" -Xcompiler -Wall,-Wno-unused-parameter)
objs=()
if [ "${SKIP_BUILD:-0}" != 1 ]; then
for src in kernels/cuda/ep_kernels.cu kernels/cuda/ep_dispatch.cu kernels/comm/nccl.cpp; do
  o="$build/$(basename "$src").o"
  "$cuda/bin/nvcc" "${flags[@]}" -x cu -c "$root/$src" -o "$o" &
  objs+=("$o")
done
"$cuda/bin/nvcc" "${flags[@]}" -x cu -c "$root/kernels/cuda/tests/gpu_comm_test.cpp" -o "$build/gpu_comm_test.o" &
"$cuda/bin/nvcc" "${flags[@]}" -x cu -c "$root/bench/ep-dispatch-gpu.cpp" -o "$build/ep_dispatch_gpu.o" &
wait
for p in gpu_comm_test ep_dispatch_gpu; do
  "$cuda/bin/nvcc" "${flags[@]}" "$build/$p.o" "${objs[@]}" -L"$nccl/lib" -l:libnccl.so.2 -o "$build/$p"
done
fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
if [ "${SKIP_TEST:-0}" != 1 ]; then
  "$build/gpu_comm_test" --ranks "$ranks"
fi
out=${RESULTS:-$root/bench/results/ep-dispatch-gpu-$ranks.json}
cmd="bench/ep-dispatch-gpu.sh $ranks $*"
[ -n "${CUDA_VISIBLE_DEVICES:-}" ] && cmd="CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $cmd"
"$build/ep_dispatch_gpu" --ranks "$ranks" --card "$card" --command "$cmd" --out "$out" "$@"
echo "wrote $out"
