// Inputs of the multi-process communicator tests, shared by the worker processes (which send them)
// and the test (which computes what every rank must receive with plain loops). Values are small
// integers, so sums are exact in f32 and results can be compared exactly.

// Elements rank `src` sends to rank `dst` in the all-to-all: uneven, and zero for some pairs.
export function a2aCount(src: number, dst: number): number {
  return (src + 2 * dst + 1) % 4;
}

// The i-th element rank `src` sends to rank `dst`.
export function a2aValue(src: number, dst: number, i: number): number {
  return src * 1000 + dst * 100 + i;
}

// Length of the all-reduce vectors: big enough that Gloo's ring splits it into several segments.
export const reduceLength = 300_001;

export function reduceValue(rank: number, i: number): number {
  return ((rank + 1) * (i % 97)) - rank;
}

// Block sizes of the reduce-scatter (elements rank r receives) and of the all-gather (elements rank
// r contributes): uneven, one of them empty.
export function scatterCount(rank: number): number {
  return rank === 1 ? 0 : rank + 3;
}
export function gatherCount(rank: number): number {
  return rank === 0 ? 0 : 2 * rank + 1;
}
export function gatherValue(rank: number, i: number): number {
  return rank * 10_000 + i;
}

export function broadcastValue(i: number): number {
  return 7 * i - 3;
}
export const broadcastLength = 1025;
