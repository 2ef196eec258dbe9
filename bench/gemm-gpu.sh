#!/usr/bin/env bash
# GPU GEMM benchmark: moe-pilot's kernels (bench/gemm-gpu.cu over kernels/cuda/gemm.cu) and the PyTorch / cuBLAS
# baselines (bench/gemm-torch.py) on this machine's GPU 0, in one run, merged into one JSON.
# Builds with nvcc alone (no Node or CMake needed on the GPU machine).
#
# Usage: bench/gemm-gpu.sh [--tiles] [--grouped]   (--tiles: also time every forced tile configuration; --grouped: the
#   grouped training shapes alone)
#   env: CUDA_HOME (default /usr/local/cuda), BUILD_DIR (default /tmp/b-gemm-gpu),
#        OUT_DIR (JSON goes to $OUT_DIR/gemm-gpu.json; default bench/results), SKIP_TORCH=1, SKIP_BUILD=1,
#        BUILD_ONLY=1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
build=${BUILD_DIR:-/tmp/b-gemm-gpu}
out_dir=${OUT_DIR:-$root/bench/results}
mkdir -p "$build" "$out_dir"
flags=(-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -I"$root/kernels/include"
  -I"$root/kernels")
libs=()
if [ -f "$cuda/include/cublasLt.h" ]; then flags+=(-DMOEPILOT_WITH_CUBLASLT); libs+=(-lcublasLt); fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  "$cuda/bin/nvcc" "${flags[@]}" -c "$root/kernels/cuda/gemm.cu" -o "$build/gemm.o" &
  "$cuda/bin/nvcc" "${flags[@]}" -c "$root/bench/gemm-gpu.cu" -o "$build/gemm-gpu.o" &
  wait
  "$cuda/bin/nvcc" "${flags[@]}" "$build/gemm.o" "$build/gemm-gpu.o" "${libs[@]}" -o "$build/gemm_gpu"
fi
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0
"$build/gemm_gpu" --out "$build/gemm-moepilot.json" "$@"
if [ "${SKIP_TORCH:-0}" != 1 ]; then
  python3 "$root/bench/gemm-torch.py" "$build/gemm-torch.json"
else
  echo '{"results": []}' > "$build/gemm-torch.json"
fi
python3 - "$build/gemm-moepilot.json" "$build/gemm-torch.json" "$out_dir/gemm-gpu.json" "bench/gemm-gpu.sh $*" <<'PY'
import json, sys
ours, torch_, out, cmd = sys.argv[1:5]
a, b = json.load(open(ours)), json.load(open(torch_))
merged = dict(device=a["device"], sms=a["sms"], torch=b.get("torch"), command=cmd,
              units="TFLOP/s = 2*M*N*K / time; grouped M = total routed rows",
              results=a["results"] + b["results"])
json.dump(merged, open(out, "w"), indent=1)
# Summary: ours (automatic tile) vs the best torch figure per case.
best = {}
for r in b["results"]:
    k = (r["op"].replace("_cublaslt", ""), r["name"], r["dist"])
    if r["tflops"] > best.get(k, (0.0, ""))[0]:
        best[k] = (r["tflops"], r["impl"])
for r in a["results"]:
    if r["tile"] != 0:
        continue
    k = (r["op"].replace("_cublaslt", ""), r["name"], r["dist"])
    t = best.get(k, (0, "-"))
    print(f"SUMMARY {r['op']:<22} {r['name']:<16} {r['dist']:<7} moepilot {r['tflops']:7.1f}  torch best {t[0]:7.1f} ({t[1]})")
print("wrote", out)
PY
