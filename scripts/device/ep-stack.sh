#!/usr/bin/env bash
# Expert parallelism on one node through the whole service stack, in one device run (from the repository root): builds
# the addon (with NCCL), makes a random Qwen2-MoE at the A2.7B widths (scripts/make-random-moe.py), starts the
# project's stack with one rank per GPU (test/gpu/bundle/ep-stack.mjs: nats-server, reward, checkpoint, N GPU ranks
# over NCCL, coordinator), runs GRPO with a coordinator crash and resume after the first checkpoint, and records
# per-GPU peak memory with nvidia-smi, then a raw NCCL all-to-all of a micro-batch's size on the same GPUs. Needs scripts/device/bundle-cli.mjs's bundle (test/gpu/bundle) and a
# nats-server binary on PATH or at .device-bin/nats-server (the GPU machine has none: carry Debian's).
#
# Writes $OUT/ep-stack.json (the driver's record plus peak memory per GPU), $OUT/logs/*.
# Env: BUILD_DIR (default kernels/build-dev), CMAKE_ARGS, RANKS (default: every GPU), LAYERS (default 4), EXPERTS
# (60), TOP_K (4), STEPS (5), G (16), PROMPTS (prompts per step, 32), MAX_NEW (64), MICRO (32), KV_BLOCKS (1024),
# CKPT_EVERY (2), CKPT_KEEP (1). A checkpoint holds fp32 weights and AdamW moments (~172 GB at the full 24-layer A2.7B
# shape) and a new one is written before the last is dropped: at that shape a 235 GB disk holds one, not two, so set
# CKPT_EVERY so that the run writes a single checkpoint (the drill resumes from the first).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${OUT:-/tmp/ep-stack}
build=${BUILD_DIR:-$root/kernels/build-dev}
mkdir -p "$out/logs"
export PATH="$root/.device-bin:$PATH"
# A carried binary may come gzipped (the device tool's carry limit).
if [ -f .device-bin/nats-server.gz ] && [ ! -x .device-bin/nats-server ]; then
  gunzip -c .device-bin/nats-server.gz > .device-bin/nats-server && chmod +x .device-bin/nats-server
fi
command -v nats-server >/dev/null || { echo "ep-stack: no nats-server (carry Debian's as .device-bin/nats-server)" >&2; exit 2; }
[ -f test/gpu/bundle/ep-stack.mjs ] || { echo "ep-stack: test/gpu/bundle/ep-stack.mjs missing (node scripts/device/bundle-cli.mjs)" >&2; exit 2; }
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
ranks=${RANKS:-$gpus}
echo "ep-stack: $ranks ranks on $gpus x $gpu"
BUILD_DIR="$build" BUILD_TARGETS=moepilot bash scripts/build-native.sh > "$out/logs/build.log" 2>&1 || { tail -20 "$out/logs/build.log"; exit 1; }
grep -q "NCCL backend on" "$build.cmake.log" || echo "ep-stack: warning: the build found no NCCL"
model=/tmp/ep-model
t0=$SECONDS
python3 scripts/make-random-moe.py --out "$model" --tokenizer test/fixtures/tokenizer --layers "${LAYERS:-4}" \
  --experts "${EXPERTS:-60}" --top-k "${TOP_K:-4}" > "$out/logs/make-model.log" 2>&1 || { tail -20 "$out/logs/make-model.log"; exit 1; }
echo "$(tail -1 "$out/logs/make-model.log") in $((SECONDS - t0)) s"
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$out/logs/gpu-memory.csv" 2>/dev/null &
smi=$!
MOEPILOT_ADDON="$build/moepilot.node" NCCL_NVLS_ENABLE=0 node test/gpu/bundle/ep-stack.mjs --model "$model" --ranks "$ranks" \
  --device cuda --steps "${STEPS:-5}" --group-size "${G:-16}" --prompts-per-step "${PROMPTS:-32}" \
  --max-new-tokens "${MAX_NEW:-64}" --micro-batch "${MICRO:-32}" --kv-blocks "${KV_BLOCKS:-1024}" --checkpoint-every "${CKPT_EVERY:-2}" --checkpoint-keep "${CKPT_KEEP:-1}" \
  --state-dir /tmp/ep-stack-state --gpu "$gpu" --out "$out/ep-stack.json" 2> "$out/logs/driver.log"
rc=$?
kill $smi 2>/dev/null
cp -r /tmp/ep-stack-state/logs "$out/logs/services" 2>/dev/null
gzip -c /tmp/ep-stack-state/traces/spans.jsonl > "$out/spans.jsonl.gz" 2>/dev/null  # every phase's span, all services
python3 - "$out/ep-stack.json" "$out/logs/gpu-memory.csv" <<'PY'
import json, sys
path, csv = sys.argv[1], sys.argv[2]
peak = {}
for line in open(csv):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and parts[0].isdigit():
        peak[int(parts[0])] = max(peak.get(int(parts[0]), 0), int(parts[1]))
try:
    d = json.load(open(path))
except Exception:
    d = {}
d["peak_memory_mib_per_gpu"] = peak
json.dump(d, open(path, "w"), indent=2)
print("peak memory per GPU (MiB, nvidia-smi):", peak)
PY
# The same exchange alone: a raw NCCL all-to-all of one training micro-batch's rows per rank (its sequences x
# (prompt + completion) tokens x top-k, hidden 2048, bf16), on the same GPUs, for the in-step bus bandwidth the driver
# recorded (per_step[].alltoall_in_step).
if [ "$ranks" -ge 2 ]; then
  rows=$(( ${MICRO:-32} * (20 + ${MAX_NEW:-64}) ))
  SKIP_TEST=1 RESULTS="$out/ep-dispatch-raw.json" timeout 180 bash bench/ep-dispatch-gpu.sh "$ranks" --tokens "$rows" \
    --topk "${TOP_K:-4}" --chunks 1 --grouping kernel > "$out/logs/raw-alltoall.log" 2>&1 \
    && grep -i -E "raw|busbw" "$out/logs/raw-alltoall.log" | head -6
fi
tail -5 "$out/logs/driver.log"
exit $rc
