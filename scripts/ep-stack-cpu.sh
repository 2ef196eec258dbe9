#!/usr/bin/env bash
# The expert-parallel drill of scripts/device/ep-stack.sh on CPU ranks, from the repository root with node_modules:
# a tiny random qwen2_moe with EXPERTS experts top-TOP_K and a shared expert (src/demo/make-model.ts, a character
# tokenizer over printable ASCII), then test/gpu/ep-stack.ts --device cpu: nats-server, reward, checkpoint, RANKS rank
# processes (experts split in contiguous blocks, exchanges over Gloo), coordinator; GRPO on synthetic sums with a
# coordinator SIGKILL after the first checkpoint and a resume. The GPU run's topology and code path, on any machine.
#
# Usage: RANKS=8 EXPERTS=60 TOP_K=4 bash scripts/ep-stack-cpu.sh OUT.json
# Env: RANKS (8), EXPERTS (60), TOP_K (4), LAYERS (2), HIDDEN (64), STEPS (4), G (4), PROMPTS (8), MAX_NEW (8),
# MICRO (8), SEED (1).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: scripts/ep-stack-cpu.sh OUT.json}
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
work=$(mktemp -d /tmp/ep-stack-cpu.XXXXXX)  # the drill's model, state and logs; removed on exit
trap 'rm -rf "$work"' EXIT
cd "$root"
node --import tsx --input-type=module -e "
import { makeTinyModel } from './src/demo/make-model.ts';
const ascii = Array.from({ length: 95 }, (_, i) => String.fromCharCode(32 + i)).join('');
await makeTinyModel('$work/model', ascii, {
  modelType: 'qwen2_moe', layers: ${LAYERS:-2}, hidden: ${HIDDEN:-64}, heads: 4, kvHeads: 2, headDim: 16,
  numExperts: ${EXPERTS:-60}, topK: ${TOP_K:-4}, moeIntermediate: 32, sharedIntermediate: 64, seed: ${SEED:-1},
});
"
node --import tsx test/gpu/ep-stack.ts --model "$work/model" --ranks "${RANKS:-8}" --device cpu \
  --steps "${STEPS:-4}" --group-size "${G:-4}" --prompts-per-step "${PROMPTS:-8}" --max-new-tokens "${MAX_NEW:-8}" \
  --micro-batch "${MICRO:-8}" --checkpoint-every 2 --state-dir "$work/state" --out "$out"
