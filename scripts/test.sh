#!/usr/bin/env bash
# The test command of the README: installs what is missing, builds, type-checks and runs every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
npx tsc --noEmit -p .
# Tests are *.test.ts next to what they test or under test/; *.gpu.test.* run only on the GPU machine.
mapfile -t files < <(find test src services kernels/ts loadtest bench -name '*.test.ts' -not -name '*.gpu.test.*' -not -path '*/node_modules/*' 2>/dev/null | sort)
exec node --test --test-concurrency=1 --import tsx "$@" "${files[@]}"
