#!/usr/bin/env python3
"""Summarises one Nsight Compute report exported as CSV (bench/sampling-gpu.sh NCU=1).

argv: RAW_CSV (--page raw) [SOURCE_CSV (--page source --print-source sass)] [N]. Prints the kernel's time,
throughput and occupancy figures, its warps' stall reasons (share of sampled stalls) and the N (default 45)
instructions with the most stall samples.
"""
import csv
import sys


def num(v):
    try:
        return float(str(v).replace(',', ''))
    except ValueError:
        return 0.0


def main():
    rows = list(csv.reader(open(sys.argv[1])))
    if len(rows) < 3:
        sys.exit(f'{sys.argv[1]}: no kernel in the report')
    hdr, vals = rows[0], rows[-1]
    m = dict(zip(hdr, vals))
    for k in ('Kernel Name', 'gpu__time_duration.sum', 'sm__throughput.avg.pct_of_peak_sustained_elapsed',
              'dram__throughput.avg.pct_of_peak_sustained_elapsed', 'sm__warps_active.avg.pct_of_peak_sustained_active',
              'smsp__issue_active.avg.pct_of_peak_sustained_active', 'launch__registers_per_thread',
              'launch__occupancy_limit_shared_mem', 'launch__cluster_dim_x'):
        if k in m:
            print(f'{k}: {m[k]}')
    stalls = [(h.split('stalled_')[-1].replace('_per_warp_active.pct', ''), num(v)) for h, v in m.items()
              if h.startswith('smsp__average_warp_latency_issue_stalled_') or
              (h.startswith('smsp__pcsamp_warps_issue_stalled_') and not h.endswith('not_issued'))]
    total = sum(v for _, v in stalls) or 1.0
    print('stall reasons (share of samples or of warp latency):')
    for name, v in sorted(stalls, key=lambda x: -x[1])[:14]:
        print(f'  {100 * v / total:5.1f}%  {name}')
    if len(sys.argv) < 3:
        return
    src = list(csv.reader(open(sys.argv[2])))
    # The source page: optionally a ['File Name', path] row per file, a header row, then one row per line or
    # instruction.
    body, hdr, path = [], None, ''
    for r in src:
        if len(r) >= 2 and r[0] == 'File Name':
            path, hdr = r[1], None
        elif hdr is None and any(h.startswith('Warp Stall Sampling (All') for h in r):
            hdr = r
            col = [i for i, h in enumerate(hdr) if h.startswith('Warp Stall Sampling (All')][0]
            text = ([i for i, h in enumerate(hdr) if h.strip() in ('Source', '# Source')] or [1])[0]
            line = ([i for i, h in enumerate(hdr) if h.strip() in ('#', 'Line', 'Address', '# Address')] or [0])[0]
        elif hdr is not None and len(r) > col:
            body.append((num(r[col]), path.rsplit('/', 1)[-1], r[line], r[text].strip()))
    if not body:
        print('source page without stall samples; first rows:', src[:3])
        return
    tot = sum(b[0] for b in body) or 1.0
    print(f'lines by stall samples ({len(body)} lines):')
    for n, f, ln, t in sorted(body, key=lambda b: -b[0])[:int(sys.argv[3]) if len(sys.argv) > 3 else 45]:
        where = f'{f}:{ln}' if f else ln
        print(f'  {100 * n / tot:5.1f}%  {where:<8} {t[:110]}')

main()
