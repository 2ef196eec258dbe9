#!/usr/bin/env bash
# The expert-parallel oracle over NCCL: `pilot oracle --ranks N --comm nccl DIR` (src/dist/oracle-ranks.ts:
# the CPU engine's ranks, one process and one GPU each, their exchanges over NCCL with host buffers
# staged through the GPU) for each fixture and each N, compared with the verdicts the same command
# gives over Gloo (a file written by this script with --comm gloo on a CPU machine).
#
# Runs the bundled CLI (node scripts/device/bundle-cli.mjs -> test/gpu/bundle/), so the machine needs
# Node 20 and the addon only: no node_modules, no tsx. Builds the addon unless MOEPILOT_ADDON names one.
#
# Usage: bench/ep-equivalence-gpu.sh [--comm nccl|gloo] [--ranks 2,4] [--reference FILE] [--out FILE]
#   --reference  JSON written by a --comm gloo run: each verdict must match it (default
#                bench/results/ep-equivalence-gloo.json when --comm nccl)
#   --out        where to write this run's JSON (every oracle report, and the comparison)
#   env: FIXTURES (default <repo>/test/fixtures), MOEPILOT_ADDON, BUILD_DIR (default /tmp/b-ep-equivalence)
# Exit code 0 only when every oracle run finished, reported ok, and matched the reference's verdict.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
command="bench/ep-equivalence-gpu.sh $*"
comm=nccl
ranks=2,4
reference=
out=
while [ $# -gt 0 ]; do
  case $1 in
    --comm) comm=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --reference) reference=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "ep-equivalence-gpu: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$comm" = nccl ] || [ "$comm" = gloo ] || { echo "ep-equivalence-gpu: --comm takes nccl or gloo" >&2; exit 2; }
if [ "$comm" = nccl ] && [ -z "$reference" ]; then reference=$root/bench/results/ep-equivalence-gloo.json; fi
fixtures=${FIXTURES:-$root/test/fixtures}
cases=(recomputed/qwen2_moe-tiny qwen3_moe-tiny mixtral-tiny)
for c in "${cases[@]}"; do [ -f "$fixtures/$c/expected.json" ] || { echo "ep-equivalence-gpu: no fixture $fixtures/$c (set FIXTURES)" >&2; exit 2; }; done
bundle=$root/test/gpu/bundle/pilot.mjs
[ -f "$bundle" ] || { echo "ep-equivalence-gpu: $bundle missing: run node scripts/device/bundle-cli.mjs" >&2; exit 2; }
if [ -z "${MOEPILOT_ADDON:-}" ]; then
  build=${BUILD_DIR:-/tmp/b-ep-equivalence}
  BUILD_DIR=$build BUILD_TARGETS=moepilot bash "$root/scripts/build-native.sh" >/dev/null
  export MOEPILOT_ADDON=$build/moepilot.node
fi
export UV_THREADPOOL_SIZE=${UV_THREADPOOL_SIZE:-8}  # as bin/pilot.js sets it
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
runs=()
for n in ${ranks//,/ }; do
  for c in "${cases[@]}"; do
    f=$tmp/$n-${c//\//_}.json
    start=$(date +%s%N)
    set +e
    node "$bundle" oracle --ranks "$n" --comm "$comm" "$fixtures/$c" > "$f" 2> "$f.err"
    rc=$?
    set -e
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    runs+=("$n|$c|$rc|$ms|$f")
  done
done

# One JSON for the run; one line per oracle run, compared with the reference where given.
card=$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true) | head -1)
printf '%s\n' "${runs[@]}" | COMMAND=$command CARD=$card COMM=$comm REFERENCE=$reference OUT=$out node --input-type=module -e '
import { readFileSync, writeFileSync, existsSync } from "node:fs";
const lines = readFileSync(0, "utf8").trim().split("\n");
const ref = process.env.REFERENCE ? JSON.parse(readFileSync(process.env.REFERENCE, "utf8")) : null;
const quantities = ["logits", "logprobs", "router_logits", "grpo_loss", "sft_loss", "grads_grpo", "grads_sft"];
const results = [];
let failed = 0;
for (const line of lines) {
  const [ranks, fixture, rc, ms, file] = line.split("|");
  const text = readFileSync(file, "utf8").trim();
  let report = null;
  try { report = JSON.parse(text); } catch {}
  const err = existsSync(file + ".err") ? readFileSync(file + ".err", "utf8").trim() : "";
  if (report) delete report.dir;
  const r = { ranks: Number(ranks), fixture, exit_code: Number(rc), seconds: Number(ms) / 1000, report };
  if (!report) r.error = (err || text).slice(-2000);
  let verdict = report ? (report.ok ? "ok" : "NOT ok") : "no report";
  let ok = !!report && report.ok === true && r.exit_code === 0;
  if (ref) {
    const g = ref.results.find((x) => x.ranks === r.ranks && x.fixture === fixture);
    r.reference_ok = g?.report?.ok ?? null;
    r.same_verdict = !!report && g?.report != null && report.ok === g.report.ok && report.greedy_match === g.report.greedy_match;
    ok &&= r.same_verdict;
    verdict += r.same_verdict ? ", same verdict as gloo" : `, DIFFERENT from gloo (ok=${r.reference_ok})`;
    if (report && g?.report) r.max_rel_error_vs_gloo = Object.fromEntries(quantities.filter((q) => q in report).map((q) => [q, [report[q], g.report[q]]]));
  }
  if (!ok) failed++;
  results.push(r);
  const errs = report ? quantities.filter((q) => q in report).map((q) => `${q} ${Number(report[q]).toExponential(1)}`).join(", ") : r.error;
  console.log(`${ok ? "ok  " : "FAIL"} ${process.env.COMM} ranks=${ranks} ${fixture}: ${verdict} (${r.seconds} s; max rel: ${errs})`);
}
const doc = { benchmark: "ep-equivalence-gpu", comm: process.env.COMM, card: process.env.CARD || "none (CPU)", command: process.env.COMMAND, reference: process.env.REFERENCE || null, results };
if (process.env.OUT) writeFileSync(process.env.OUT, JSON.stringify(doc, null, 2) + "\n");
console.log(failed ? `ep-equivalence-gpu: ${failed} of ${results.length} FAILED` : `ep-equivalence-gpu: all ${results.length} passed`);
process.exit(failed ? 1 : 0);
'
