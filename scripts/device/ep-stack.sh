#!/usr/bin/env bash
# Expert parallelism on one node through the whole service stack, in one device run (from the repository root): builds
# the addon (with NCCL), makes a random Qwen2-MoE at the A2.7B widths (scripts/make-random-moe.py), starts the
# project's stack with one rank per GPU (test/gpu/bundle/ep-stack.mjs: nats-server, reward, checkpoint, N GPU ranks
# over NCCL, coordinator), runs GRPO with a coordinator crash and resume after the first checkpoint, and records
# per-GPU peak memory with nvidia-smi, then a raw NCCL all-to-all of a micro-batch's size on the same GPUs. Needs
# scripts/device/bundle-cli.mjs's bundle (`node scripts/device/bundle-cli.mjs --only stack`: test/gpu/bundle with the
# services alone, so that it, .device-node, node_modules/node-addon-api and .device-bin fit the device tool's 64 MiB
# carry) and a nats-server binary on PATH or at .device-bin/nats-server.gz (the GPU machine has none: carry Debian's).
#
# Writes $OUT/ep-stack$TAG.json (the driver's record plus peak memory per GPU and the disk's own write and read
# rates, beside which the checkpoint's stand), $OUT/logs$TAG/*, $OUT/spans$TAG.jsonl.gz.
# Env: BUILD_DIR (default kernels/build-dev), CMAKE_ARGS, SKIP_BUILD (1: use the addon already in BUILD_DIR), RANKS (default: every GPU), LAYERS (default 4), EXPERTS
# (60), TOP_K (4), MODEL_SEED (0), STEPS (5), G (16), PROMPTS (prompts per step, 32), MAX_NEW (64), MICRO (32),
# KV_BLOCKS (1024), EXPERT_GRADS (float32, or bfloat16: the ranks' routed-expert gradients), CKPT_EVERY (2), CKPT_KEEP (1), TAG (suffix of the output names, so that several runs share
# $OUT), COMPARE_TO (an earlier run's JSON: its first step must agree with this one's, see src/stack/ep-compare.ts),
# DISK_GB (GiB written and read back to measure the disk, 8; 0 skips), KEEP_STATE (1 keeps the checkpoints). The model is made once per shape and seed
# (/tmp/ep-model-L<layers>-E<experts>-K<top-k>-S<seed>) and reused by later runs on the same machine. A checkpoint holds fp32 weights and AdamW moments (~172 GB at the full 24-layer A2.7B
# shape) and a new one is written before the last is dropped: at that shape a 235 GB disk holds one, not two, so set
# CKPT_EVERY so that the run writes a single checkpoint (the drill resumes from the first).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${OUT:-/tmp/ep-stack}
build=${BUILD_DIR:-$root/kernels/build-dev}
tag=${TAG:-}
logs=$out/logs$tag
mkdir -p "$logs"
export PATH="$root/.device-bin:$PATH"
# A carried binary may come gzipped (the device tool's carry limit).
if [ -f .device-bin/nats-server.gz ] && [ ! -x .device-bin/nats-server ]; then
  gunzip -c .device-bin/nats-server.gz > .device-bin/nats-server && chmod +x .device-bin/nats-server
fi
command -v nats-server >/dev/null || { echo "ep-stack: no nats-server (carry Debian's as .device-bin/nats-server)" >&2; exit 2; }
[ -f test/gpu/bundle/ep-stack.mjs ] || { echo "ep-stack: test/gpu/bundle/ep-stack.mjs missing (node scripts/device/bundle-cli.mjs --only stack)" >&2; exit 2; }
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
ranks=${RANKS:-$gpus}
echo "ep-stack: $ranks ranks on $gpus x $gpu"
if [ "${SKIP_BUILD:-0}" = 1 ] && [ -f "$build/moepilot.node" ]; then
  echo "ep-stack: SKIP_BUILD=1: the addon built earlier in $build"
else
  BUILD_DIR="$build" BUILD_TARGETS=moepilot bash scripts/build-native.sh > "$logs/build.log" 2>&1 || { tail -20 "$logs/build.log"; exit 1; }
fi
grep -q "NCCL backend on" "$build.cmake.log" || echo "ep-stack: warning: the build found no NCCL"
model=/tmp/ep-model-L${LAYERS:-4}-E${EXPERTS:-60}-K${TOP_K:-4}-S${MODEL_SEED:-0}
if [ -f "$model/config.json" ]; then
  echo "model: $model (made earlier on this machine)"
else
  t0=$SECONDS
  python3 scripts/make-random-moe.py --out "$model.tmp" --tokenizer test/fixtures/tokenizer --layers "${LAYERS:-4}" \
    --experts "${EXPERTS:-60}" --top-k "${TOP_K:-4}" --seed "${MODEL_SEED:-0}" > "$logs/make-model.log" 2>&1 \
    || { tail -20 "$logs/make-model.log"; exit 1; }
  rm -rf "$model" && mv "$model.tmp" "$model"
  echo "$(tail -1 "$logs/make-model.log") in $((SECONDS - t0)) s"
fi
state=/tmp/ep-stack-state$tag
# The disk the checkpoints go to, alone: DISK_GB written (flushed to it) and read back past the page cache.
disk_json=null
if [ "${DISK_GB:-8}" != 0 ]; then
  mkdir -p "$state"
  t=$(date +%s.%N); dd if=/dev/zero of="$state/disk-probe" bs=16M count=$(( ${DISK_GB:-8} * 64 )) conv=fdatasync status=none
  w=$(python3 -c "print($(date +%s.%N) - $t)")
  t=$(date +%s.%N); dd if="$state/disk-probe" of=/dev/null bs=16M iflag=direct status=none
  r=$(python3 -c "print($(date +%s.%N) - $t)")
  rm -f "$state/disk-probe"
  disk_json=$(python3 -c "import sys; gb=${DISK_GB:-8}*2**30/1e9; print('{\"bytes\": %d, \"write_gb_s\": %.3f, \"read_gb_s\": %.3f, \"how\": \"dd 16M blocks, conv=fdatasync / iflag=direct\"}' % (gb*1e9, gb/float('$w'), gb/float('$r')))" 2>/dev/null || echo null)
  echo "disk: $disk_json"
fi
compare=()
[ -n "${COMPARE_TO:-}" ] && compare=(--compare-to "$COMPARE_TO")
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$logs/gpu-memory.csv" 2>/dev/null &
smi=$!
MOEPILOT_ADDON="$build/moepilot.node" NCCL_NVLS_ENABLE=0 node test/gpu/bundle/ep-stack.mjs --model "$model" --ranks "$ranks" \
  --device cuda --expert-grads "${EXPERT_GRADS:-float32}" --steps "${STEPS:-5}" --group-size "${G:-16}" --prompts-per-step "${PROMPTS:-32}" \
  --max-new-tokens "${MAX_NEW:-64}" --micro-batch "${MICRO:-32}" --kv-blocks "${KV_BLOCKS:-1024}" --checkpoint-every "${CKPT_EVERY:-2}" --checkpoint-keep "${CKPT_KEEP:-1}" \
  --state-dir "$state" --gpu "$gpu" "${compare[@]}" --out "$out/ep-stack$tag.json" 2> "$logs/driver.log"
rc=$?
kill $smi 2>/dev/null
cp -r "$state/logs" "$logs/services" 2>/dev/null
# The checkpoints (tens of GB at these widths) go once measured, so that later runs on the machine have the disk.
[ "${KEEP_STATE:-0}" = 1 ] || rm -rf "$state/checkpoints"

gzip -c "$state/traces/spans.jsonl" > "$out/spans$tag.jsonl.gz" 2>/dev/null  # every phase's span, all services
python3 - "$out/ep-stack$tag.json" "$logs/gpu-memory.csv" "$disk_json" <<'PY'
import json, sys
path, csv, disk = sys.argv[1], sys.argv[2], sys.argv[3]
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
d["disk"] = json.loads(disk)
json.dump(d, open(path, "w"), indent=2)
print("peak memory per GPU (MiB, nvidia-smi):", peak)
PY
# The same exchange alone: a raw NCCL all-to-all of one training micro-batch's rows per rank (its sequences x
# (prompt + completion) tokens x top-k, hidden 2048, bf16), on the same GPUs, for the in-step bus bandwidth the driver
# recorded (per_step[].alltoall_in_step).
if [ "$ranks" -ge 2 ]; then
  rows=$(( ${MICRO:-32} * (20 + ${MAX_NEW:-64}) ))
  SKIP_TEST=1 RESULTS="$out/ep-dispatch-raw$tag.json" timeout 180 bash bench/ep-dispatch-gpu.sh "$ranks" --tokens "$rows" \
    --topk "${TOP_K:-4}" --chunks 1 --grouping kernel > "$logs/raw-alltoall.log" 2>&1 \
    && grep -i -E "raw|busbw" "$logs/raw-alltoall.log" | head -6
fi
tail -5 "$logs/driver.log"
exit $rc
