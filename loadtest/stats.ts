// Latency statistics of a load run: exact percentiles over every recorded latency (a run records at
// most a few million numbers, so sorting them is cheaper and simpler than a histogram sketch).
import { status as grpcStatus } from '@grpc/grpc-js';

export interface LatencySummary {
  count: number;
  min: number;
  mean: number;
  p50: number;
  p90: number;
  p95: number;
  p99: number;
  p999: number;
  max: number;
}

/**
 * Nearest-rank percentile of an ascending array: the smallest value with at least q of the values at
 * or below it. `sorted` must be sorted ascending; q in [0, 1].
 */
export function percentile(sorted: ArrayLike<number>, q: number): number {
  if (!(q >= 0 && q <= 1)) throw new RangeError(`percentile: q must be in [0, 1], got ${q}`);
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.max(1, Math.ceil(q * sorted.length));
  return sorted[rank - 1]!;
}

/** Summary of latencies in milliseconds; `values` is not modified. An empty input gives count 0 and NaNs. */
export function summarize(values: ArrayLike<number>): LatencySummary {
  const sorted = Float64Array.from(values as ArrayLike<number>).sort();
  let sum = 0;
  for (let i = 0; i < sorted.length; i++) sum += sorted[i]!;
  const n = sorted.length;
  return {
    count: n,
    min: n ? sorted[0]! : Number.NaN,
    mean: n ? sum / n : Number.NaN,
    p50: percentile(sorted, 0.5),
    p90: percentile(sorted, 0.9),
    p95: percentile(sorted, 0.95),
    p99: percentile(sorted, 0.99),
    p999: percentile(sorted, 0.999),
    max: n ? sorted[n - 1]! : Number.NaN,
  };
}

/** "RESOURCE_EXHAUSTED" for 8; codes outside the gRPC table keep their number. */
export function statusName(code: number): string {
  return (grpcStatus as unknown as Record<number, string>)[code] ?? `CODE_${code}`;
}

/** Rounds every number of a summary to `digits` decimals, for reports (NaN becomes null in JSON anyway). */
export function roundSummary(s: LatencySummary, digits = 3): LatencySummary {
  const f = 10 ** digits;
  const r = (x: number) => (Number.isFinite(x) ? Math.round(x * f) / f : x);
  return {
    count: s.count,
    min: r(s.min),
    mean: r(s.mean),
    p50: r(s.p50),
    p90: r(s.p90),
    p95: r(s.p95),
    p99: r(s.p99),
    p999: r(s.p999),
    max: r(s.max),
  };
}
