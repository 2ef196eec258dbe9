#!/usr/bin/env python3
"""How often would per-band weight masses decide the sampler's first top-p keep test without a counting pass?

An idea for the GPU sampler (bench/sampling-gpu.notes.md, "What might still reach 0.15 ms"): if the weights'
exchange also carried each block's masses by weight band, the mass strictly above the drawn token's band would be
known exactly and only its own band uncertain. This counts, on the benchmark's logits (per row N(0, s^2), s = 1, 2,
3, 4 cycling, as kernels/cuda/tests/sampling_test.cu makes them), how many first draws those bounds leave undecided,
for bands of one octave down to an eighth (the fp32 bit pattern of the weight shifted right by 23 .. 20).
Stop 19 built the idea with band counts (bounds from sixteenth-octave bands, shared-memory atomics in the weights
pass): the counting step got shorter, but the atomics doubled the weights pass; the notes have the figures.

usage: python3 bench/sampling-bands.py [--rows 2000] [--vocab 151936] [--top-p 0.9] [--seed 1]
"""
import argparse

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    for shift in (23, 22, 21, 20):
        undecided = 0
        for r in range(a.rows):
            s = np.float32(1 + r % 4)
            x = rng.standard_normal(a.vocab).astype(np.float32) * s
            w = np.exp((x - x.max()).astype(np.float64)).astype(np.float32)  # the sampler's fp32 weights
            z = w.astype(np.float64).sum()
            cdf = np.cumsum(w.astype(np.float64))
            v = w[int(np.searchsorted(cdf, rng.random() * z, side="right"))]
            band = w.view(np.uint32) >> shift
            bv = v.view(np.uint32) >> shift
            above = w[band > bv].astype(np.float64).sum()  # exact: the bands above the drawn token's
            rest = w[band == bv].astype(np.float64).sum() - v  # its own band: could all be above it
            bound = a.top_p * z
            decided = above + rest < bound or above >= bound
            if decided:  # the bounds agree with the exact keep test
                exact = above + w[(band == bv) & (w > v)].astype(np.float64).sum()
                assert (exact < bound) == (above + rest < bound)
            undecided += not decided
        print(f"bands of 1/{1 << (23 - shift)} octave (bits >> {shift}): undecided {undecided}/{a.rows} = "
              f"{undecided / a.rows:.3f}")


if __name__ == "__main__":
    main()
