import { test } from 'node:test';
import assert from 'node:assert/strict';
import { percentile, statusName, summarize } from './stats.ts';

// The definition, written as a loop: the smallest value v with count(x <= v) >= q * n.
function percentileByCounting(values: number[], q: number): number {
  const candidates = [...new Set(values)].sort((a, b) => a - b);
  for (const v of candidates) if (values.filter((x) => x <= v).length >= q * values.length) return v;
  return Number.NaN;
}

test('percentile is the nearest-rank percentile, equal to counting for random inputs', () => {
  let seed = 7;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  for (let trial = 0; trial < 50; trial++) {
    const n = 1 + Math.floor(rand() * 300);
    const values = Array.from({ length: n }, () => Math.round(rand() * 1000) / 10);
    const sorted = Float64Array.from(values).sort();
    for (const q of [0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1]) {
      assert.equal(percentile(sorted, q), percentileByCounting(values, q), `n=${n} q=${q}`);
    }
  }
  assert.equal(percentile([1, 2, 3, 4], 0.5), 2);
  assert.equal(percentile([1, 2, 3, 4], 0.51), 3);
  assert.ok(Number.isNaN(percentile([], 0.5)));
  assert.throws(() => percentile([1], 1.5), /q must be in \[0, 1\]/);
});

test('summarize reports count, extremes, mean and percentiles without touching its input', () => {
  const values = [5, 1, 4, 2, 3];
  const s = summarize(values);
  assert.deepEqual(values, [5, 1, 4, 2, 3]);
  assert.equal(s.count, 5);
  assert.equal(s.min, 1);
  assert.equal(s.max, 5);
  assert.equal(s.mean, 3);
  assert.equal(s.p50, 3);
  assert.equal(s.p99, 5);
  assert.equal(summarize([]).count, 0);
});

test('statusName names gRPC codes and keeps unknown numbers', () => {
  assert.equal(statusName(8), 'RESOURCE_EXHAUSTED');
  assert.equal(statusName(4), 'DEADLINE_EXCEEDED');
  assert.equal(statusName(99), 'CODE_99');
});
