#!/usr/bin/env python3
"""PyTorch baselines for the GPU sampler, on the logits the C++ benchmark wrote (bench/sampling-gpu.sh).

Sort-based top-p sampling (softmax, sort, cumsum, mask, renormalise, multinomial, gather: what HF-style warpers do)
and torch.multinomial on the full softmax, timed with CUDA events on the same card. Merges its figures into the
benchmark's JSON.

Usage: sampling-torch.py --logits FILE --rows R --vocab V --json IN_OUT.json [--iters N]
"""
import argparse
import json

import numpy as np
import torch


def top_p_sort(logits: torch.Tensor, p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs = sorted_probs.masked_fill(cum - sorted_probs > p, 0.0)  # keep the smallest prefix reaching p
    pick = torch.multinomial(sorted_probs / sorted_probs.sum(dim=-1, keepdim=True), 1)
    return torch.gather(order, -1, pick)


def plain_multinomial(logits: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits, dim=-1), 1)


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--logits", required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    host = np.fromfile(a.logits, dtype=np.float32).reshape(a.rows, a.vocab)
    x256 = torch.from_numpy(host).cuda()
    x1024 = x256.repeat(4, 1)
    torch.manual_seed(0)
    cases = [
        ("torch_sort_top_p_0.9", 256, lambda: top_p_sort(x256, 0.9)),
        ("torch_multinomial_softmax", 256, lambda: plain_multinomial(x256)),
        ("torch_sort_top_p_0.9_1024rows", 1024, lambda: top_p_sort(x1024, 0.9)),
        ("torch_multinomial_softmax_1024rows", 1024, lambda: plain_multinomial(x1024)),
    ]
    with open(a.json) as f:
        doc = json.load(f)
    doc["torch"] = {"version": torch.__version__, "cases": []}
    for name, rows, fn in cases:
        ms = time_ms(fn, a.iters)
        doc["torch"]["cases"].append({"name": name, "rows": rows, "ms": round(ms, 5)})
        print(f"{name:36s} rows {rows:4d}: {ms:.4f} ms")
    ours = {c["name"]: c["ms"] for c in doc["cases"]}
    theirs = {c["name"]: c["ms"] for c in doc["torch"]["cases"]}
    doc["speedup"] = {
        "top_p_0.9 vs torch sort": round(theirs["torch_sort_top_p_0.9"] / ours["top_p_0.9"], 2),
        "top_p_0.9 vs torch multinomial": round(theirs["torch_multinomial_softmax"] / ours["top_p_0.9"], 2),
        "1024 rows top_p_0.9 vs torch sort": round(
            theirs["torch_sort_top_p_0.9_1024rows"] / ours["top_p_0.9_1024rows"], 2),
    }
    for k, v in doc["speedup"].items():
        print(f"speedup {k}: {v}x")
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
