#!/usr/bin/env bash
# Bundles the Node entry points of test/gpu/ (GPU tests and benchmarks) into single ESM files under
# test/gpu/dist/ (ignored by git), for the GPU machine, which has Node but no node_modules. The native addon
# stays outside the bundle: the scripts load the file MOEPILOT_ADDON names.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/test/gpu/dist
mkdir -p "$out"
for src in "$root"/test/gpu/*.gpu.ts; do
  name=$(basename "$src" .gpu.ts)
  "$root/node_modules/.bin/esbuild" "$src" --bundle --platform=node --format=esm --target=node20 \
    --external:*.node --log-level=warning \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" \
    --outfile="$out/$name-gpu.mjs"
  echo "bundled $out/$name-gpu.mjs ($(du -k "$out/$name-gpu.mjs" | cut -f1) KB)"
done
