#!/usr/bin/env bash
# The main job (npm start). Until the CPU demo lands: the oracle check of every reference fixture.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
status=0
for dir in test/fixtures/recomputed/qwen2_moe-tiny test/fixtures/recomputed/qwen2_moe-tiny-bf16-sharded \
           test/fixtures/qwen3_moe-tiny test/fixtures/mixtral-tiny test/fixtures/qwen2_moe-sparse-step \
           test/fixtures/tokenizer test/fixtures/tokenizer-qwen-style test/fixtures/tokenizer-llama-style; do
  node bin/pilot.js oracle "$dir" || status=1
done
node bin/pilot.js oracle --ranks 2 test/fixtures/qwen3_moe-tiny || status=1
exit $status
