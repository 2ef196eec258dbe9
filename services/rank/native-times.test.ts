import { test } from 'node:test';
import assert from 'node:assert/strict';
import { nativeTimeAttributes } from './native-times.ts';

test('native time attributes are the differences of two readings, over every call name', () => {
  const before = { 'moepilot.generate': { calls: 2, queuedMs: 1, runMs: 10, resolveMs: 0.5 } };
  const after = {
    'moepilot.generate': { calls: 5, queuedMs: 4, runMs: 40, resolveMs: 1.5 },
    'moepilot.forward': { calls: 1, queuedMs: 0.25, runMs: 3, resolveMs: 0.25 },  // first seen between the readings
  };
  assert.deepEqual(nativeTimeAttributes(before, after), {
    'rank.native_calls': 4,
    'rank.native_queued_ms': 3.25,
    'rank.native_run_ms': 33,
    'rank.native_resolve_ms': 1.25,
  });
  assert.deepEqual(nativeTimeAttributes(after, after), { 'rank.native_calls': 0, 'rank.native_queued_ms': 0, 'rank.native_run_ms': 0, 'rank.native_resolve_ms': 0 });
});
