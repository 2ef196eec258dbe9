import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  assignPrompts,
  expertLoadMetrics,
  flattenSummary,
  globalNormalisers,
  groupAdvantages,
  packMicroBatch,
  planMicroBatches,
  readF32,
  summarizeStep,
  zeroVarianceGroups,
} from './mod.ts';

const close = (a: number, b: number, tol = 1e-9) => assert.ok(Math.abs(a - b) <= tol, `${a} != ${b}`);

test('group advantages: GRPO divides by the group std, Dr. GRPO only subtracts the mean', () => {
  const r = [1, 0, 0, 1, 2, 2, 2, 2];
  const grpo = groupAdvantages(r, 4, { stdNormalize: true, eps: 0 });
  // group 1: mean .5, population std .5
  assert.deepEqual([...grpo.slice(0, 4)], [1, -1, -1, 1]);
  assert.deepEqual([...grpo.slice(4)], [0, 0, 0, 0]);
  const dr = groupAdvantages(r, 4, { stdNormalize: false });
  assert.deepEqual([...dr.slice(0, 4)], [0.5, -0.5, -0.5, 0.5]);
  // each group's advantages sum to zero
  const g = groupAdvantages([0.3, 0.9, 0.1], 3, { stdNormalize: true });
  close(g[0] + g[1] + g[2], 0, 1e-12);
  // the loop and a direct formula agree
  const m = (0.3 + 0.9 + 0.1) / 3;
  const s = Math.sqrt(((0.3 - m) ** 2 + (0.9 - m) ** 2 + (0.1 - m) ** 2) / 3);
  close(g[1], (0.9 - m) / (s + 1e-6), 1e-12);
});

test('group advantages reject bad layouts and non-finite rewards', () => {
  assert.throws(() => groupAdvantages([1, 2, 3], 2), /not a multiple of G = 2/);
  assert.throws(() => groupAdvantages([1, 2], 1), /G must be an integer >= 2/);
  assert.throws(() => groupAdvantages([1, NaN], 2), /reward 1 is not finite/);
});

test('zero-variance groups are found exactly', () => {
  assert.deepEqual(zeroVarianceGroups([1, 1, 0, 1, 0.5, 0.5], 2), [true, false, true]);
});

test('prompts go round-robin over ranks, a rank may get none', () => {
  assert.deepEqual(assignPrompts(5, 2), [0, 1, 0, 1, 0]);
  assert.deepEqual(assignPrompts(1, 3), [0]);
  assert.deepEqual(assignPrompts(2, 2, 1), [1, 0]);
});

test('micro-batches: same count on every rank, never more than M sequences, memory fixed as G grows', () => {
  const p = planMicroBatches([7, 2, 0], 3);
  assert.equal(p.microBatches, 3);
  for (const ranges of p.ranges) {
    assert.equal(ranges.length, 3);
    for (const [b, e] of ranges) assert.ok(e - b <= 3);
  }
  assert.deepEqual(p.ranges[0], [[0, 3], [3, 5], [5, 7]]);
  assert.deepEqual(p.ranges[1], [[0, 1], [1, 2], [2, 2]]);
  assert.deepEqual(p.ranges[2], [[0, 0], [0, 0], [0, 0]]);
  // Doubling the sequences (G x 2) doubles the micro-batches, not their size.
  for (const n of [8, 16, 64, 256]) {
    const q = planMicroBatches([n, n], 4);
    assert.equal(q.microBatches, n / 4);
    assert.ok(q.ranges.flat().every(([b, e]) => e - b <= 4));
  }
  // Nothing to train still runs one (empty) collective micro-batch.
  assert.equal(planMicroBatches([0, 0], 4).microBatches, 1);
  assert.throws(() => planMicroBatches([1], 0), /micro-batch size must be an integer >= 1/);
});

test('global normalisers count every rank and micro-batch', () => {
  assert.deepEqual(globalNormalisers([{ completionTokens: 3 }, { completionTokens: 0 }, { completionTokens: 5 }]), {
    globalTokens: 8,
    globalSequences: 3,
  });
});

test('packing follows the trainer proto layout', () => {
  const { microBatch, tokens, sequences } = packMicroBatch([
    { promptTokens: [5, 6], completionTokens: [7, 8, 9], logprobs: [-0.5, -1, -2], advantage: 0.75 },
    { promptTokens: [1], completionTokens: [2], logprobs: [-3], advantage: -1 },
  ]);
  assert.equal(tokens, 4);
  assert.equal(sequences, 2);
  const ids = new Int32Array(new Uint8Array(microBatch.sequences!.inputIds!.data).buffer);
  assert.deepEqual([...ids], [5, 6, 7, 8, 9, 1, 2]);
  const pos = new Int32Array(new Uint8Array(microBatch.sequences!.positionIds!.data).buffer);
  assert.deepEqual([...pos], [0, 1, 2, 3, 4, 0, 1]);
  const cu = new Int32Array(new Uint8Array(microBatch.sequences!.cuSeqlens!.data).buffer);
  assert.deepEqual([...cu], [0, 5, 7]);
  assert.deepEqual([...microBatch.lossMask!.data], [0, 0, 1, 1, 1, 0, 1]);
  assert.equal(microBatch.lossMask!.dtype, 'u8');
  assert.deepEqual([...readF32(microBatch.advantages, 'adv')], [0, 0, 0.75, 0.75, 0.75, 0, -1]);
  assert.deepEqual([...readF32(microBatch.oldLogprobs, 'old')], [0, 0, -0.5, -1, -2, 0, -3]);
  assert.equal(microBatch.refLogprobs, undefined);
  // Empty micro-batch for an idle rank.
  const empty = packMicroBatch([]);
  assert.equal(empty.microBatch.sequences!.inputIds!.data.length, 0);
  assert.deepEqual(empty.microBatch.sequences!.cuSeqlens!.shape, [1]);
  assert.throws(
    () => packMicroBatch([{ promptTokens: [1], completionTokens: [2, 3], logprobs: [0], advantage: 0 }]),
    /1 logprobs for 2 completion tokens/,
  );
});

test('step summary: rewards, accuracy from the verifiable component, token-weighted loss metrics', () => {
  const part = (tokens: number, kl: number) => ({ loss: 0.5, pgLoss: 0.4, kl, entropy: 1, clipFractionLow: 0.1, clipFractionHigh: 0, tokens });
  const s = summarizeStep({
    step: 3,
    rewards: [1, 0, 1.2, 0.2],
    components: [{ math: 1, format: 0 }, { math: 0, format: 0 }, { math: 1, format: 0.2 }, { math: 0, format: 0.2 }],
    accuracyLabel: 'math',
    completionLengths: [4, 6, 2, 4],
    updates: [
      { parts: [part(10, 0.1), part(30, 0.3)], gradNorm: 2, lr: 1e-3 },
      { parts: [part(10, 0.1), part(30, 0.3)], gradNorm: 1.5, lr: 1e-3 },
    ],
    groupsKept: 2,
    groupsFiltered: 1,
    phaseSeconds: { rollout: 2, reward: 0.5, train: 1, optimizer: 0.5 },
    stepSeconds: 4,
    expertTokens: { layers: 1, experts: 2, counts: [30, 10] },
  });
  close(s.rewardMean, 0.6);
  close(s.accuracy, 0.5);
  close(s.loss, 1.0); // two parts of 0.5 per update, mean over updates
  close(s.kl, 0.25); // (10*.1 + 30*.3) / 40
  close(s.clipFraction, 0.1);
  assert.equal(s.tokens, 40);
  assert.equal(s.gradNorm, 1.5);
  close(s.responseLengthMean, 4);
  assert.equal(s.trainSeconds, 1.5);
  close(s.extra['tokens_per_second'], (40 + 16) / 4);
  assert.equal(s.extra['experts/L0/E0'], 30);
  close(s.extra['experts/L0/imbalance'], 1.5);
  const flat = flattenSummary(s);
  assert.equal(flat.reward_mean, s.rewardMean);
  assert.equal(flat.groups_filtered, 1);
  assert.equal(flat['time/rollout'], 2);
  assert.throws(() => expertLoadMetrics({ layers: 2, experts: 2, counts: [1] }), /1 counts for 2 layers x 2 experts/);
});
