import { test } from 'node:test';
import assert from 'node:assert/strict';
import { aggregate, parseLoopbackAddress, resolveLoadConfig, split } from './load.ts';
import { TARGET_DEFAULTS } from './targets.ts';

const score = TARGET_DEFAULTS.score;

test('only loopback addresses are accepted', () => {
  assert.deepEqual(parseLoopbackAddress('127.0.0.1:50051'), { host: '127.0.0.1', port: 50051 });
  assert.deepEqual(parseLoopbackAddress('localhost:1'), { host: 'localhost', port: 1 });
  assert.deepEqual(parseLoopbackAddress('[::1]:8080'), { host: '[::1]', port: 8080 });
  assert.throws(() => parseLoopbackAddress('10.0.0.5:50051'), /not loopback/);
  assert.throws(() => parseLoopbackAddress('example.com:443'), /not loopback/);
  assert.throws(() => parseLoopbackAddress('127.0.0.1'), /must be host:port/);
  assert.throws(() => parseLoopbackAddress('127.0.0.1:0'), /port must be/);
});

test('resolveLoadConfig fills defaults and names what is wrong', () => {
  const c = resolveLoadConfig({ address: '127.0.0.1:1', target: score, mode: 'closed', concurrency: 3, workers: 8 });
  assert.equal(c.workers, 3, 'no more workers than clients');
  assert.equal(c.rate, null);
  assert.throws(() => resolveLoadConfig({ address: '127.0.0.1:1', target: score, mode: 'open' }), /open loop needs a rate/);
  assert.throws(() => resolveLoadConfig({ address: '127.0.0.1:1', target: score, concurrency: 0 }), /concurrency must be an integer >= 1/);
  assert.throws(() => resolveLoadConfig({ address: '127.0.0.1:1', target: { ...score, batch: 0 } }), /target batch/);
  assert.throws(() => resolveLoadConfig({ address: '127.0.0.1:1', target: { kind: 'nope' } as never }), /unknown target "nope"; valid: submit, generate, score/);
  assert.throws(() => resolveLoadConfig({ address: '127.0.0.1:1', target: score, durationMs: 0 }), /durationMs must be > 0/);
});

test('split shares n over k parts evenly', () => {
  assert.deepEqual(split(10, 3), [4, 3, 3]);
  assert.deepEqual(split(2, 4), [1, 1, 0, 0]);
  assert.equal(split(1001, 7).reduce((a, b) => a + b, 0), 1001);
});

test('aggregate merges worker records: throughput, ok latency, errors by status name, timeline', () => {
  const config = resolveLoadConfig({ address: '127.0.0.1:1', target: score, concurrency: 2 });
  const rec = (worker: number, endAt: number[], latency: number[], codes: number[]) => ({
    worker,
    sent: endAt.length,
    skipped: 0,
    endAt: Float64Array.from(endAt),
    latency: Float64Array.from(latency),
    units: Float64Array.from(codes.map((c) => (c === 0 ? 3 : 0))),
    codes: Float64Array.from(codes),
    firstResponse: new Float64Array(0),
    lag: Float64Array.from(endAt.map(() => 0)),
    errorSamples: (codes.some((c) => c === 8) ? { '8': 'queue full' } : {}) as Record<string, string>,
    unit: 'items',
    eventLoopUtilization: 0.25 * (worker + 1),
  });
  const r = aggregate(config, [rec(0, [100, 500, 1000], [10, 20, 30], [0, 0, 8]), rec(1, [1500, 2000], [40, 50], [0, 14])], 0);
  assert.equal(r.elapsedS, 2);
  assert.deepEqual(r.calls, { sent: 5, ok: 3, errors: 2, skipped: 0 });
  assert.equal(r.units, 9);
  assert.equal(r.throughput.unitsPerS, 4.5);
  assert.equal(r.throughput.okCallsPerS, 1.5);
  assert.deepEqual(r.errorsByCode, { RESOURCE_EXHAUSTED: 1, UNAVAILABLE: 1 });
  assert.deepEqual(r.errorSamples, { RESOURCE_EXHAUSTED: 'queue full' });
  assert.equal(r.latencyMs.max, 40);
  assert.equal(r.errorLatencyMs.count, 2);
  assert.equal(r.timeline.reduce((s, b) => s + b.ok + b.errors, 0), 5);
  assert.equal(r.points.length, 5);
  assert.deepEqual(r.workerUtilization, [0.25, 0.5]);
});
