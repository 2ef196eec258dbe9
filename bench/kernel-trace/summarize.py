#!/usr/bin/env python3
"""Summarises a kernel-trace.cpp trace: the most-launched CUDA graph (a decode step) per launch.

Each launch's wall time, the time some kernel was running, and per kernel (name + grid) its serialized time and its
attributed time: every instant of the launch is split evenly among the kernels running then, so the attributed
times add up to the busy time and show what the step waits on when kernels overlap on side streams.

Usage: summarize.py TRACE.tsv [--top 40] [--json OUT.json] [--skip 2 (first launches left out: warm-up)]
                    [--gpu NAME] [--command CMD] (recorded in the JSON)
                    [--marker REGEX] (eager work, e.g. a training step: no graph; the k-th "launch" runs from the
                    k-th start of a kernel whose short name matches REGEX to the next one; --skip and --count pick
                    which of them are summarised)
                    [--timeline K] (also lists the K-th summarised launch kernel by kernel: start, duration, stream,
                    the idle before it, and the time in which one stream alone had kernels running: where a join
                    waits on a side stream's tail)
TRACE may be gzipped (.gz).
"""
import argparse
import bisect
import collections
import gzip
import json
import re
import shutil
import subprocess


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt") or "/usr/local/cuda/bin/cu++filt"
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        lines = out.split("\n")
        return dict(zip(names, lines[: len(names)]))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def short(name):
    """'void ns::(anonymous namespace)::kern<1, 2>(Args)' -> 'kern<1, 2>'."""
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list: the first '(' at template depth 0 after the name
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    head = name[:cut]
    head = re.sub(r"^void ", "", head)
    head = head.replace("(anonymous namespace)::", "")
    depth, start = 0, 0
    for i, ch in enumerate(head):  # drop namespaces outside template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == ":" and depth == 0:
            start = i + 1
    return head[start:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--gpu", default="")
    ap.add_argument("--command", default="")
    ap.add_argument("--marker")
    ap.add_argument("--count", type=int, default=0, help="launches summarised after --skip (0: all)")
    ap.add_argument("--timeline", type=int, help="list the K-th summarised launch kernel by kernel")
    args = ap.parse_args()
    recs = []
    with (gzip.open(args.trace, "rt") if args.trace.endswith(".gz") else open(args.trace)) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 9:
                continue
            recs.append(dict(start=int(p[0]), end=int(p[1]), stream=int(p[2]), graph=int(p[3]), node=int(p[4]),
                             grid=p[5], block=int(p[6]), regs=int(p[7]), name=p[8]))
    if not recs:
        raise SystemExit("no kernel records in " + args.trace)
    names = demangle(sorted({r["name"] for r in recs}))
    for r in recs:
        r["short"] = short(names.get(r["name"], r["name"]))
    if args.marker:
        # Eager work: windows between successive starts of the marker kernel (the last one ends at the trace's end).
        graph = "marker:" + args.marker
        ordered = sorted(recs, key=lambda r: r["start"])
        starts = [r["start"] for r in ordered if re.search(args.marker, r["short"])]
        if not starts:
            raise SystemExit("no kernel matches --marker " + args.marker)
        launches = collections.defaultdict(list)
        for r in ordered:
            if r["start"] >= starts[0]:
                launches[bisect.bisect_right(starts, r["start"]) - 1].append(r)
        grecs = [r for k in launches for r in launches[k]]
    else:
        by_graph = collections.Counter(r["graph"] for r in recs if r["graph"])
        if not by_graph:
            raise SystemExit("no kernels ran inside a CUDA graph (eager work: pass --marker)")
        # The graph whose kernels ran most often: the decode step (a replayed graph exec keeps its id).
        graph = max(by_graph, key=lambda g: by_graph[g])
        grecs = sorted((r for r in recs if r["graph"] == graph), key=lambda r: r["start"])
        seen = collections.Counter()
        for r in grecs:  # the k-th run of a node belongs to launch k
            r["launch"] = seen[r["node"]]
            seen[r["node"]] += 1
        launches = collections.defaultdict(list)
        for r in grecs:
            launches[r["launch"]].append(r)
    keep = [k for k in sorted(launches) if k >= args.skip] or sorted(launches)
    if args.count:
        keep = keep[: args.count]
    per_kernel = collections.defaultdict(lambda: dict(count=0, serial_ns=0.0, attributed_ns=0.0))
    walls, busies = [], []
    # Idle intervals (no kernel running) inside a launch, by the kernel that ended before and the one that starts
    # after: where the host or a synchronisation leaves the GPU waiting.
    gaps = collections.defaultdict(lambda: [0.0, 0])
    for k in keep:
        rs = launches[k]
        t0, t1 = min(r["start"] for r in rs), max(r["end"] for r in rs)
        events = sorted([(r["start"], 1, i) for i, r in enumerate(rs)] + [(r["end"], -1, i) for i, r in enumerate(rs)])
        running, last, busy, last_ended = set(), t0, 0.0, None
        attributed = [0.0] * len(rs)
        for t, kind, i in events:
            if running and t > last:
                share = (t - last) / len(running)
                for j in running:
                    attributed[j] += share
                busy += t - last
            elif not running and t > last and kind == 1 and last_ended is not None:
                g = gaps[(rs[last_ended]["short"], rs[i]["short"])]
                g[0] += t - last
                g[1] += 1
            if kind == -1:
                last_ended = i
            last = t
            if kind == 1:
                running.add(i)
            else:
                running.discard(i)
        walls.append(t1 - t0)
        busies.append(busy)
        for i, r in enumerate(rs):
            key = (r["short"], r["grid"])
            d = per_kernel[key]
            d["count"] += 1
            d["serial_ns"] += r["end"] - r["start"]
            d["attributed_ns"] += attributed[i]
    n = len(keep)
    wall = sum(walls) / n / 1e6
    busy = sum(busies) / n / 1e6
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1]["attributed_ns"])
    table = [dict(kernel=name, grid=grid, per_launch=d["count"] / n, serial_ms=d["serial_ns"] / n / 1e6,
                  attributed_ms=d["attributed_ns"] / n / 1e6) for (name, grid), d in rows]
    print(f"{'' if args.marker else 'graph '}{graph}: {len(launches)} launches, {n} summarised; per launch: wall {wall:.3f} ms, "
          f"some kernel running {busy:.3f} ms, {len(grecs) // max(1, len(launches))} kernels")
    print(f"{'attrib ms':>9} {'serial ms':>9} {'n':>5}  kernel [grid]")
    for t in table[: args.top]:
        print(f"{t['attributed_ms']:9.3f} {t['serial_ms']:9.3f} {t['per_launch']:5.0f}  {t['kernel'][:110]} [{t['grid']}]")
    by_name = collections.defaultdict(lambda: [0.0, 0.0])
    for t in table:
        base = t["kernel"].split("<")[0]
        by_name[base][0] += t["attributed_ms"]
        by_name[base][1] += t["serial_ms"]
    print("by kernel function:")
    for base, (a, s) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        print(f"{a:9.3f} {s:9.3f}  {base}")
    gap_rows = sorted(gaps.items(), key=lambda kv: -kv[1][0])
    gap_table = [dict(after=a, before=b, idle_ms=v[0] / n / 1e6, per_launch=v[1] / n) for (a, b), v in gap_rows]
    print("idle (no kernel running) per launch, by the kernels around it:")
    for g in gap_table[:12]:
        print(f"{g['idle_ms']:9.3f} {g['per_launch']:5.1f}x  after {g['after'][:60]} -> before {g['before'][:60]}")
    if args.timeline is not None:
        timeline(launches[keep[min(args.timeline, n - 1)]])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=args.gpu, command=args.command, graph=graph, launches=len(launches), summarised=n,
                           wall_ms=wall, busy_ms=busy, kernels=table, idle=gap_table[:40]), f, indent=1)


def timeline(rs):
    """One launch kernel by kernel (us from its first start), then each stream's time alone on the GPU."""
    rs = sorted(rs, key=lambda r: r["start"])
    t0 = rs[0]["start"]
    print(f"timeline ({len(rs)} kernels; us): start, duration, idle before (no kernel running), stream, grid, kernel")
    end = t0
    for r in rs:
        idle = max(0, r["start"] - end) / 1e3
        end = max(end, r["end"])
        print(f"{(r['start'] - t0) / 1e3:9.1f} {(r['end'] - r['start']) / 1e3:8.1f} {idle:7.1f}  s{r['stream']:<4} "
              f"{r['grid']:>12}  {r['short'][:90]}")
    events = sorted([(r["start"], 1, r["stream"]) for r in rs] + [(r["end"], -1, r["stream"]) for r in rs])
    running, last, alone = collections.Counter(), t0, collections.Counter()
    for t, kind, st in events:
        live = [x for x in running if running[x] > 0]
        if len(live) == 1:
            alone[live[0]] += t - last
        last = t
        running[st] += kind
    print("time in which one stream alone had kernels running (ms): " +
          ", ".join(f"s{st} {ns / 1e6:.3f}" for st, ns in alone.most_common()))


if __name__ == "__main__":
    main()
