#!/usr/bin/env bash
# GPU training throughput: the engine (test/gpu/train.gpu.ts, bundled by scripts/device/bundle.sh) and the HF
# transformers baseline (bench/train-gpu-hf.py) at the same config on the same GPU, one after the other (each
# process has the card to itself). The engine runs twice: with fp32 gradients (the default) and with the routed
# experts' gradients in bf16 (toDevice's expertGradDtype; the HF baseline's bf16 parameters get bf16 gradients too).
# Writes $OUT_DIR/train-gpu.json.
# Env: MOEPILOT_ADDON (the built addon), LAYERS (default 4), ITERS (timed passes of each, median reported; default
# 10: with 4, one run's median moved by ~0.3 ms on the same machine), OUT_DIR (default bench/results).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${OUT_DIR:-$root/bench/results}
layers=${LAYERS:-4}
iters=${ITERS:-10}
: "${MOEPILOT_ADDON:?set MOEPILOT_ADDON to the built moepilot.node}"
tmp=$(mktemp -d)
node "$root/test/gpu/dist/train-gpu.mjs" --layers "$layers" --iters "$iters" --out "$tmp/engine.json" || echo "engine benchmark failed (rc=$?)"
node "$root/test/gpu/dist/train-gpu.mjs" --layers "$layers" --iters "$iters" --expert-grads bfloat16 \
  --out "$tmp/engine-bf16.json" || echo "engine benchmark (bf16 expert grads) failed (rc=$?)"
python3 "$here/train-gpu-hf.py" --layers "$layers" --iters "$iters" --engine-json "$tmp/engine.json" \
  --engine-bf16-grads-json "$tmp/engine-bf16.json" --out "$out/train-gpu.json"
