#!/usr/bin/env bash
# `npm start`: the end-to-end demo on this machine's CPU, no download. Installs/builds what is missing
# (scripts/setup.sh), then `pilot demo`: a tiny MoE and its tokenizer, SFT warm-up, GRPO through the local
# service stack (nats-server, reward, checkpoint, 2 expert-parallel CPU ranks, coordinator), held-out accuracy
# before and after, an exported Hugging Face folder. The last line of output is one JSON object {"summary": ...}.
# Extra arguments go to `pilot demo` (see `node bin/pilot.js demo --help`). State goes to .pilot/ (or PILOT_HOME).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# Setup's own output goes to stderr so that stdout is the demo's.
bash scripts/setup.sh >&2

# The demo takes its stack down itself, also when it fails or is interrupted; this only catches a stack left by a
# demo that was killed outright.
trap 'node bin/pilot.js down >/dev/null 2>&1 || true' EXIT
node bin/pilot.js demo "$@"
