#!/usr/bin/env bash
# Attention benchmark on this machine's GPU: bench/attention-gpu.cu (our kernels, built with nvcc alone: the
# kernels need only the CUDA runtime) and, in the same run, PyTorch's flash SDPA (bench/attention-torch.py).
# Writes the merged JSON to $OUT_DIR/attention-gpu.json (default bench/results/attention-gpu.json).
#   env: CUDA_HOME (default /usr/local/cuda), BUILD_DIR (default /tmp/b-attention-bench), OUT_DIR;
#   DECODE_VARIANTS="W,S ...": also builds the decode kernel with W warps and S key tiles in flight per warp
#   (MOEPILOT_PAGED_DECODE_WARPS / _STAGES) and prints each build's decode lines (not written to the JSON).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
build=${BUILD_DIR:-/tmp/b-attention-bench}
out_dir=${OUT_DIR:-$root/bench/results}
mkdir -p "$build" "$out_dir"
"$cuda/bin/nvcc" -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo \
  -I"$root/kernels/include" -I"$root/kernels" "$root/bench/attention-gpu.cu" "$root/kernels/cuda/attention.cu" \
  -o "$build/attention_gpu"
ours=$("$build/attention_gpu")
for v in ${DECODE_VARIANTS:-}; do
  w=${v%,*} st=${v#*,}
  "$cuda/bin/nvcc" -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
    -DMOEPILOT_PAGED_DECODE_WARPS="$w" -DMOEPILOT_PAGED_DECODE_STAGES="$st" -I"$root/kernels/include" \
    -I"$root/kernels" "$root/bench/attention-gpu.cu" "$root/kernels/cuda/attention.cu" -o "$build/attention_gpu_${w}_${st}"
  echo "decode kernel with $w warps x $st stages:" >&2
  "$build/attention_gpu_${w}_${st}" --decode > /dev/null
done
torch_json=$(python3 "$root/bench/attention-torch.py" || echo '{"error": "torch baseline failed"}')
python3 - "$ours" "$torch_json" "$out_dir/attention-gpu.json" <<'EOF'
import json, sys
ours, base = json.loads(sys.argv[1]), json.loads(sys.argv[2])
res = {"gpu": ours["gpu"], "shape": {"NH": ours["NH"], "KVH": ours["KVH"], "HD": ours["HD"]},
       "train": ours["train"], "train_torch": base, "decode": ours["decode"],
       "notes": "TFLOP/s: causal forward 4*B*NH*T*T/2*HD, forward+backward 3.5x that; decode bandwidth: bytes that "
                "must move (shared prompt blocks once per group, own blocks, q, out) / time per layer call"}
for o, t in zip(ours["train"], base.get("train", [])):
    print(f"B={o['B']} T={o['T']}: fwd {o['fwd_tflops']} vs torch {t['fwd_tflops']} TFLOP/s; "
          f"fwd+bwd {o['fwdbwd_tflops']} vs torch {t['fwdbwd_tflops']} TFLOP/s")
for d in ours["decode"]:
    print(f"decode {d['seqs']} seqs: {d['attn_us']} us, {d['attn_GBps']} GB/s; cache write {d['write_us']} us")
json.dump(res, open(sys.argv[3], "w"), indent=1)
print("wrote", sys.argv[3])
EOF
