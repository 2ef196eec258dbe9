#!/usr/bin/env bash
# Records every kernel of a command through CUPTI (kernel-trace.cpp, built here against the CUDA toolkit's CUPTI)
# and summarises the most-launched CUDA graph per launch (summarize.py). On a GPU machine:
#   bash bench/kernel-trace/trace.sh OUT_PREFIX command args...
# writes OUT_PREFIX.tsv (every kernel) and OUT_PREFIX.json (the summary), and prints the summary. For a command whose
# GPU work is in one process: processes it starts inherit the injection and would write the same file
# (kernel-trace.cpp turns a "%p" in KERNEL_TRACE_OUT into the process id for such runs).
# Env: CUDA_HOME (default /usr/local/cuda), SKIP (graph launches left out as warm-up, default 2), TOP (rows, 40),
# MARKER (eager work such as a training step: summarise the windows between starts of the kernel this regex names,
# e.g. MARKER=embedding_forward_kernel SKIP=1 COUNT=4 for train-gpu's timed forward+backward passes), COUNT.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${1:?usage: trace.sh OUT_PREFIX command args...}
shift
cuda=${CUDA_HOME:-/usr/local/cuda}
inc=""
for d in "$cuda/include" "$cuda/extras/CUPTI/include"; do [ -f "$d/cupti_activity.h" ] && inc=$d && break; done
[ -n "$inc" ] || { echo "trace.sh: cupti_activity.h not found under $cuda" >&2; exit 2; }
libdir=""
for d in "$cuda/lib64" "$cuda/extras/CUPTI/lib64" "$cuda/targets/x86_64-linux/lib"; do
  [ -e "$d/libcupti.so" ] && libdir=$d && break
done
[ -n "$libdir" ] || { echo "trace.sh: libcupti.so not found under $cuda" >&2; exit 2; }
# The newest kernel record this CUPTI declares (the one it fills for CONCURRENT_KERNEL).
newest() { grep -ho "CUpti_Activity$1[0-9]*;" "$inc"/cupti_activity*.h | tr -d ';' | sort -V | tail -1; }
record=$(newest Kernel) memcpy_record=$(newest Memcpy) memset_record=$(newest Memset)
[ -n "$record" ] && [ -n "$memcpy_record" ] && [ -n "$memset_record" ] ||
  { echo "trace.sh: no CUpti_ActivityKernelN / MemcpyN / MemsetN in $inc" >&2; exit 2; }
lib=$(mktemp -d)/libkernel-trace.so
g++ -O2 -shared -fPIC -std=c++17 -DKERNEL_RECORD="$record" -DMEMCPY_RECORD="$memcpy_record" -DMEMSET_RECORD="$memset_record" -I"$inc" -I"$cuda/include" "$here/kernel-trace.cpp" \
  -L"$libdir" -Wl,-rpath,"$libdir" -lcupti -o "$lib"
echo "trace.sh: $record, $memcpy_record, $memset_record, tracing: $*" >&2
KERNEL_TRACE_OUT="$prefix.tsv" CUDA_INJECTION64_PATH="$lib" "$@"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
python3 "$here/summarize.py" "$prefix.tsv" --skip "${SKIP:-2}" --top "${TOP:-40}" \
  ${MARKER:+--marker "$MARKER"} --count "${COUNT:-0}" --json "$prefix.json" --gpu "$gpu" \
  --command "$*"
