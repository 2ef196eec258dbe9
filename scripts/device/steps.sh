# Sourced by the device check scripts (gpu-check.sh, rollout-check.sh, ep-check.sh).
# step NAME LIMIT COMMAND...: runs one check under a timeout of LIMIT seconds, its output in $step_logs/NAME.log;
# prints one line (and, on failure, the log's last lines that are not ok/PASS lines, $step_tail of them, default 15);
# counts failures in $failed.
failed=0
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" > "$step_logs/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then echo "ok   $name ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    echo "FAIL $name rc=$rc ($((SECONDS - t0)) s); last lines of $step_logs/$name.log:"
    grep -v -E '^(ok|PASS)' "$step_logs/$name.log" | tail -"${step_tail:-15}" | cut -c1-300
  fi
}
