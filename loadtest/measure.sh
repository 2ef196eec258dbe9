#!/usr/bin/env bash
# The load measurements of bench/results/loadtest-*.json, end to end on this machine:
#   1. `pilot up --ranks 2` (the local CPU stack) in a temporary PILOT_HOME;
#   2. SubmitPrompts: single-prompt and batched closed loops, open loops at 2k/5k/10k prompts/s (100 per
#      call), the goal run (10k prompts/s as 40 calls/s x 250) and an overload run (40k prompts/s),
#      each followed by the queue check (every accepted prompt is in JetStream);
#   3. the prompt queue without gRPC (queue-bench.ts);
#   4. RolloutService.Generate on the tiny model at 1, 8 and 32 clients, on one rank started as the
#      stack starts its ranks plus --model-dir (with several ranks Generate is a collective phase that
#      only the coordinator can drive, so a single rank is what a load generator can call);
#   5. `pilot down`.
# Usage: bash loadtest/measure.sh [seconds per step, default 10] [results dir, default bench/results]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-10}
out=${2:-bench/results}
mkdir -p "$out"
home=$(mktemp -d /tmp/pilot-measure.XXXXXX)
rank_pid=
cleanup() {
  [ -n "$rank_pid" ] && kill "$rank_pid" 2>/dev/null || true
  PILOT_HOME=$home node bin/pilot.js down >/dev/null 2>&1 || true
  rm -rf "$home"
}
trap cleanup EXIT

PILOT_HOME=$home node bin/pilot.js up --ranks 2 --json > "$home/up.json"
run=$(node -e 'const s=require(process.argv[1]); console.log(s.services.find((x)=>x.name==="coordinator").address)' "$home/up.json")
nats=$(node -e 'console.log(require(process.argv[1]).natsUrl)' "$home/up.json")
tag=$(date +%H%M%S)
lt() { node --import tsx loadtest/main.ts "$@"; }

lt --address "$run" --target submit --batch 1 --concurrency 1,8,32,64 --duration "$secs" --workers 1 \
  --dataset "single-$tag" --verify-nats "$nats" --title "SubmitPrompts, 1 prompt per call, pilot up stack" \
  --out "$out/loadtest-submit-single.json" --html "$out/loadtest-submit-single.html"
lt --address "$run" --target submit --batch 100 --concurrency 1,4,16 --duration "$secs" --workers 1 \
  --dataset "batch100-$tag" --verify-nats "$nats" --title "SubmitPrompts, 100 prompts per call, pilot up stack" \
  --out "$out/loadtest-submit-batch100.json" --html "$out/loadtest-submit-batch100.html"
lt --address "$run" --target submit --batch 1000 --concurrency 1,4 --duration "$secs" --workers 1 \
  --dataset "batch1000-$tag" --verify-nats "$nats" --title "SubmitPrompts, 1000 prompts per call, pilot up stack" \
  --out "$out/loadtest-submit-batch1000.json" --html "$out/loadtest-submit-batch1000.html"
lt --address "$run" --target submit --batch 100 --mode open --rate 20,50,100 --duration "$secs" --workers 1 --timeout-ms 30000 \
  --dataset "open-$tag" --verify-nats "$nats" --title "SubmitPrompts open loop, 100 prompts per call: 2k, 5k, 10k prompts/s offered" \
  --out "$out/loadtest-submit-open.json" --html "$out/loadtest-submit-open.html"
# The goal: 10,000 prompts/s offered at a steady rate, 250 prompts per call.
lt --address "$run" --target submit --batch 250 --mode open --rate 40 --duration "$secs" --workers 1 --timeout-ms 30000 \
  --dataset "goal-$tag" --verify-nats "$nats" --title "SubmitPrompts goal: 10k prompts/s offered (40 calls/s x 250)" \
  --out "$out/loadtest-submit-goal.json" --html "$out/loadtest-submit-goal.html"
# Past capacity: 40k prompts/s offered with a 5 s deadline (what happens to latency, errors, accepted prompts).
lt --address "$run" --target submit --batch 250 --mode open --rate 160 --duration "$secs" --workers 1 --timeout-ms 5000 \
  --dataset "overload-$tag" --verify-nats "$nats" --title "SubmitPrompts overload: 40k prompts/s offered, 5 s deadline" \
  --out "$out/loadtest-submit-overload.json" --html "$out/loadtest-submit-overload.html"
node --import tsx loadtest/queue-bench.ts "$nats" --batch 1 --concurrency 64 --seconds 5 --out "$out/loadtest-queue-direct-single.json"
node --import tsx loadtest/queue-bench.ts "$nats" --batch 100 --concurrency 16 --seconds 5 --out "$out/loadtest-queue-direct-batch100.json"

# One rank with the tiny model; its port comes from its "listening" line.
node --import tsx services/rank/main.ts --host 127.0.0.1 --port 0 --model-dir test/fixtures/recomputed/qwen2_moe-tiny > "$home/rank.log" 2>&1 &
rank_pid=$!
for _ in $(seq 1 300); do grep -q model-loaded "$home/rank.log" && break; sleep 0.1; done
grep -q model-loaded "$home/rank.log" || { cat "$home/rank.log" >&2; exit 1; }
rank_port=$(node -e 'for (const l of require("fs").readFileSync(process.argv[1],"utf8").split("\n")) { try { const e=JSON.parse(l); if (e.event==="listening") console.log(e.port) } catch {} }' "$home/rank.log")
lt --address "127.0.0.1:$rank_port" --target generate --max-new-tokens 32 --prompt-tokens 10,20,30,40,50,60,70,80 --temperature 1 \
  --concurrency 1,8,32 --duration "$secs" --workers 1 --title "RolloutService.Generate, qwen2_moe-tiny, one CPU rank" \
  --out "$out/loadtest-generate.json" --html "$out/loadtest-generate.html"
