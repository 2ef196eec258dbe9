#!/usr/bin/env bash
# Peak device memory of a GRPO step at G = 16, 64, 256 with a fixed micro-batch (test/gpu/grpo-memory.gpu.ts,
# bundled by scripts/device/bundle.sh): the Qwen1.5-MoE-A2.7B shape with LAYERS layers (default 4: the training copy
# of all 24 does not fit one card) on GPU 0. Writes $OUT_DIR/grpo-memory-gpu.json.
# Env: MOEPILOT_ADDON (the built addon), LAYERS (default 4), GROUP_SIZES (default 16,64,256), PROMPTS (per step,
# default 2), MICRO (sequences per micro-batch, default 16), OUT_DIR (default bench/results).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT_DIR:-$root/bench/results}
: "${MOEPILOT_ADDON:?set MOEPILOT_ADDON to the built moepilot.node}"
mkdir -p "$out"
node "$root/test/gpu/dist/grpo-memory-gpu.mjs" --layers "${LAYERS:-4}" --groups "${GROUP_SIZES:-16,64,256}" \
  --prompts "${PROMPTS:-2}" --micro "${MICRO:-16}" \
  --gpu "$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null || echo unknown)" --out "$out/grpo-memory-gpu.json"
echo "wrote $out/grpo-memory-gpu.json"
