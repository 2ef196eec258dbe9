import assert from 'node:assert/strict';
import { test } from 'node:test';

import { a2p7bConfig } from './a2p7b.ts';
import { expertsTouchedPerStep, stepBytes } from './rollout-bytes.ts';

test('experts touched per decode step count distinct ids per layer over the step row of every sample', () => {
  // 2 MoE layers, K = 2, prompt 3: rows 0..2 are the prompt, step t reads row 2 + t.
  const row = (l0: number[], l1: number[]) => [...l0, ...l1];
  const a = Int32Array.from([
    ...row([9, 9], [9, 9]),
    ...row([9, 9], [9, 9]),
    ...row([9, 9], [9, 9]),
    ...row([0, 1], [2, 3]), // step 1
    ...row([4, 5], [6, 7]), // step 2
  ]);
  const b = Int32Array.from([
    ...row([9, 9], [9, 9]),
    ...row([9, 9], [9, 9]),
    ...row([9, 9], [9, 9]),
    ...row([1, 2], [3, 4]), // step 1: layer 0 {0, 1, 2}, layer 1 {2, 3, 4}
  ]); // one step shorter: adds nothing to step 2
  assert.deepEqual(expertsTouchedPerStep([a, b], 3, 2, 2, 3), [6, 4, 0]);
});

test('experts touched per decode step refuses routing that is not whole rows', () => {
  assert.throws(() => expertsTouchedPerStep([new Int32Array(5)], 1, 2, 2, 1), /not a whole number of rows of 4/);
  assert.throws(() => expertsTouchedPerStep([], 1, 0, 2, 1), /positive integers/);
});

test('step bytes take the measured experts in place of the uniform-routing expectation', () => {
  const hf = a2p7bConfig(2);
  const uniform = stepBytes(hf, 16, 1, 64, 70);
  const perExpert = 3 * 1408 * 2048 * 2;
  // E (1 - (1 - K/E)^B) per layer at B = 16, E = 60, K = 4.
  const expected = 2 * 60 * (1 - Math.pow(1 - 4 / 60, 16)) * perExpert;
  assert.ok(Math.abs(uniform.experts - expected) < 1);
  const measured = stepBytes(hf, 16, 1, 64, 70, 50);
  assert.equal(measured.experts, 50 * perExpert);
  assert.equal(measured.weights, uniform.weights);
  assert.equal(measured.kv, uniform.kv);
  assert.equal(measured.total, measured.weights + measured.experts + measured.kv);
  // KV: the shared prompt once for the group, each sequence's own 6 positions, the 16 new rows written.
  assert.equal(uniform.kv, (64 + 16 * 6 + 16) * 2 * 2 * 2048 * 2);
});
