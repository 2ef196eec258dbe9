import assert from 'node:assert/strict';
import { test } from 'node:test';

import { compareFirstStep, type DrillRecord } from './ep-compare.ts';

function record(ranks: number, patch: Record<string, unknown> = {}, load: Record<string, number> = {}): DrillRecord {
  const step1 = {
    step: 1, completion_tokens: 4096, trained_tokens: 5120, reward_mean: 0.25, loss: -0.0125, pg_loss: -0.0125, entropy: 2.5, grad_norm: 0.5,
    expert_load: { 'experts/L0/E0': 10, 'experts/L0/E1': 6, 'experts/L0/imbalance': 1.25, ...load },
    ...patch,
  };
  // A second step that differs freely: only the first is compared.
  return { ranks, per_step: [step1, { ...step1, step: 2, grad_norm: 9, completion_tokens: 1 }] };
}

test('first steps agreeing within the tolerance pass, whatever later steps do', () => {
  const r = compareFirstStep(record(4), record(8, { grad_norm: 0.5 * (1 + 5e-4), loss: -0.0125 * (1 - 1e-4) }), 1e-3);
  assert.ok(r.ok, JSON.stringify(r.checks));
  assert.equal(r.checks.length, 8);
});

test('a gradient norm beyond the tolerance fails, and says by how much', () => {
  const r = compareFirstStep(record(4), record(8, { grad_norm: 0.5 * 1.01 }), 1e-3);
  assert.equal(r.ok, false);
  const c = r.checks.find((x) => x.what === 'grad_norm')!;
  assert.equal(c.ok, false);
  assert.ok(Math.abs(c.rel! - 0.01) < 1e-9);
});

test('one token routed to another expert fails, although the imbalance is not compared', () => {
  const r = compareFirstStep(record(4), record(8, {}, { 'experts/L0/E0': 9, 'experts/L0/E1': 7, 'experts/L0/imbalance': 1.1 }), 1e-3);
  assert.equal(r.ok, false);
  assert.match(String(r.checks.at(-1)!.b), /2 differ \(first experts\/L0\/E0: 10 vs 9\)/);
});

test('a near-zero loss is measured against 1, not against itself', () => {
  assert.ok(compareFirstStep(record(4, { loss: 5.8e-10 }), record(8, { loss: 1.2e-9 }), 1e-3).ok);
  assert.equal(compareFirstStep(record(4, { loss: 5.8e-10 }), record(8, { loss: 2e-3 }), 1e-3).ok, false);
});

test('a different completion length fails exactly, and a record without step 1 is refused', () => {
  assert.equal(compareFirstStep(record(4), record(8, { completion_tokens: 4097 }), 1).ok, false);
  assert.equal(compareFirstStep(record(4), record(8, { reward_mean: 0.25 + 1e-12 }), 1).ok, false);
  assert.throws(() => compareFirstStep(record(4), { ranks: 8, per_step: [] }, 1e-3), /B: no step 1/);
});

test('a record without expert loads fails the expert check instead of passing it empty', () => {
  const bare = (ranks: number): DrillRecord => ({ ranks, per_step: [{ step: 1, completion_tokens: 1 }] });
  assert.equal(compareFirstStep(bare(4), bare(8), 1e-3).ok, false);
});
