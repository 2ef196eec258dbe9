#!/usr/bin/env bash
# Regenerates proto/gen/ (TypeScript, committed, never edited) from proto/**/*.proto with buf + ts-proto.
set -euo pipefail
cd "$(dirname "$0")/../proto"
rm -rf gen
../node_modules/.bin/buf generate
echo "generated $(find gen -name '*.ts' | wc -l) files in proto/gen"
