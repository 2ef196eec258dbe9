#!/usr/bin/env bash
# The scaling figure of expert parallelism through the whole stack, in one device run on one machine: the full drill
# at N ranks (scripts/device/ep-stack.sh: GRPO, a checkpoint, a coordinator SIGKILL and resume), then a shorter run
# at M ranks on the same model, seed and prompts, whose first step must match the N-rank run's
# (src/stack/ep-compare.ts, through COMPARE_TO), and whose warm steps give the baseline. Sized to fit one 600 s call
# at 2 layers of the A2.7B widths: the 21 GB checkpoints take most of it.
#
# Usage (repository root, the bundles and .device-bin as ep-stack.sh needs): bash scripts/device/ep-scaling.sh [N [M]]
#   N defaults to every GPU, M to N / 2. Env: as ep-stack.sh (LAYERS 2, EXPERTS 60, TOP_K 4, PROMPTS 32, G 16, STEPS 6
#   and CKPT_EVERY 3 for the drill: two warm steps, steps 2 and 5, between the cold and the checkpoint ones, ...);
#   BASE_STEPS (4) steps of the M-rank run.
# Writes $OUT/ep-stack-ep<N>.json, $OUT/ep-stack-ep<M>.json (each with its logs and spans) and $OUT/ep-scaling.json:
# per EP degree, the median over warm steps (no checkpoint, not the first step of a process) of the step's rollout
# and training tokens/s and seconds; their ratios; the first-step check.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${OUT:-/tmp/ep-scaling}
mkdir -p "$out"
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
n=${1:-$gpus}
m=${2:-$((n / 2))}
[ "$m" -ge 1 ] && [ "$n" -gt "$m" ] && [ "$n" -le "$gpus" ] || { echo "ep-scaling: need 1 <= M < N <= $gpus GPUs (N=$n, M=$m)" >&2; exit 2; }
export LAYERS=${LAYERS:-2} EXPERTS=${EXPERTS:-60} TOP_K=${TOP_K:-4} PROMPTS=${PROMPTS:-32} MAX_NEW=${MAX_NEW:-64} MICRO=${MICRO:-32}
echo "ep-scaling: EP=$n (the drill) then EP=$m (the baseline) on $gpus GPUs"
RANKS=$n STEPS=${STEPS:-6} CKPT_EVERY=${CKPT_EVERY:-3} TAG=-ep$n bash scripts/device/ep-stack.sh || { echo "ep-scaling: the EP=$n run failed" >&2; exit 1; }
RANKS=$m STEPS=${BASE_STEPS:-4} CKPT_EVERY=0 DISK_GB=0 SKIP_BUILD=1 TAG=-ep$m COMPARE_TO="$out/ep-stack-ep$n.json" \
  bash scripts/device/ep-stack.sh
rc=$?
python3 - "$out" "$n" "$m" "$rc" <<'PY'
import json, statistics, sys
out, n, m, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def warm(rec):
    # Not a process's first step (step 1, or the first after the resume), not a checkpoint step.
    resumed_at = (rec.get("crash") or {}).get("after_checkpoint_step")
    cold = {1} | ({resumed_at + 1} if resumed_at else set())
    steps = [s for s in rec["per_step"] if s["step"] not in cold and "checkpoint" not in s["phases_seconds"]]
    med = lambda k: statistics.median(s[k] for s in steps) if steps else None
    return {"steps": [s["step"] for s in steps], "step_seconds": med("step_seconds"),
            "rollout_tokens_per_s": med("rollout_tokens_per_s"), "train_tokens_per_s": med("train_tokens_per_s")}
recs = {}
for r in (n, m):
    try:
        recs[r] = json.load(open(f"{out}/ep-stack-ep{r}.json"))
    except Exception as e:
        recs[r] = {"error": str(e), "per_step": []}
w = {r: warm(recs[r]) for r in (n, m)}
ratio = lambda k: (w[n][k] / w[m][k]) if w[n][k] and w[m][k] else None
res = {
    "gpu": recs[n].get("gpu"), "ranks": [n, m], "model": recs[n].get("engine_config"),
    "warm": {f"ep{r}": w[r] for r in (n, m)},
    "scaling": {"rollout_tokens_per_s": ratio("rollout_tokens_per_s"), "train_tokens_per_s": ratio("train_tokens_per_s"),
                "ideal": n / m, "what": f"EP={n} over EP={m}, same model and batch"},
    "first_step": recs[m].get("first_step_against"),
    "baseline_exit_status": rc,
}
json.dump(res, open(f"{out}/ep-scaling.json", "w"), indent=2)
print(json.dumps(res["scaling"]), "first step ok:", (res["first_step"] or {}).get("ok"))
PY
exit $rc
