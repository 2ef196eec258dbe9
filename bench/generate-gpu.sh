#!/usr/bin/env bash
# GPU rollout throughput: the engine's generator (test/gpu/generate-bench.gpu.ts, bundled by
# scripts/device/bundle.sh) and the HF transformers `generate` baseline (bench/generate-gpu-hf.py) at the same
# config on the same GPU, one after the other (each process has the card to itself): the Qwen1.5-MoE-A2.7B shape
# (LAYERS layers, default 24; the engine's model in a weights-only device copy), random bf16 weights, prompt 64 + 64 new tokens, top-p 0.9, 16 / 128 / 1024 sequences (1 / 8 / 64
# prompts x 16 samples). The HF script measures the card's bandwidth and adds the fraction of the memory roofline
# (bytes a decode step must move / bandwidth, over the measured decode time) to both. Writes
# $OUT_DIR/generate-gpu.json.
# Env: MOEPILOT_ADDON (the built addon), LAYERS (default 24), PROMPTS (prompt groups of 16 samples, default 1,8,64; not GROUPS, which
# bash sets to the user's group ids), HF_PROMPTS (default: PROMPTS),
# GRAPHS (default 1; 0: eager decode), OUT_DIR (default bench/results).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${OUT_DIR:-$root/bench/results}
layers=${LAYERS:-24}
: "${MOEPILOT_ADDON:?set MOEPILOT_ADDON to the built moepilot.node}"
mkdir -p "$out"
tmp=$(mktemp -d)
node "$root/test/gpu/dist/generate-bench-gpu.mjs" --layers "$layers" --groups "${PROMPTS:-1,8,64}" --graphs "${GRAPHS:-1}" \
  --out "$tmp/engine.json" || echo "engine benchmark failed (rc=$?)"
python3 "$here/generate-gpu-hf.py" --layers "$layers" --groups "${HF_PROMPTS:-${PROMPTS:-1,8,64}}" --engine-json "$tmp/engine.json" \
  --out "$out/generate-gpu.json"
