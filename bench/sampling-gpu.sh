#!/usr/bin/env bash
# GPU sampler benchmark: the kernel (kernels/cuda/tests/sampling_test.cu --bench) on 256 x 151936 logits for top-p
# 0.9, top-k 50 + top-p 0.9, min-p 0.1, greedy, and 1024 rows, with the default launch (pipelined persistent
# clusters on sm_90) and the one-row launch (one cluster per row), against one read of the logits and the PyTorch
# baselines (bench/sampling-torch.py: sort-based top-p, torch.multinomial on softmax) on the same logits, same card.
# Writes one JSON to $OUT_DIR/sampling-gpu.json (default OUT_DIR: bench/results).
#   env: BUILD_DIR (default /tmp/b-sampling), SKIP_BUILD=1 to reuse BUILD_DIR/sampling_test, ITERS (default 50).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-/tmp/b-sampling}
out_dir=${OUT_DIR:-$root/bench/results}
mkdir -p "$out_dir"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  BUILD_DIR=$build BUILD_TARGETS=sampling_test bash "$root/scripts/build-native.sh" >/dev/null
fi
logits=$(mktemp /tmp/sampling-logits.XXXXXX)
trap 'rm -f "$logits"' EXIT
json=$out_dir/sampling-gpu.json
"$build/sampling_test" --bench --iters "${ITERS:-50}" --out "$json" --logits-file "$logits"
python3 "$root/bench/sampling-torch.py" --logits "$logits" --rows 256 --vocab 151936 --json "$json" --iters 20
echo "wrote $json"
