// The prototype's argument parsing and a scaled-down end-to-end run (the full run is the tuning command).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DEMO_DEFAULTS, parseDemoArgs, runDemo } from './prototype.ts';

test('arguments override the defaults by name, model options under model.', () => {
  const c = parseDemoArgs(['--seed', '7', '--kind', 'add', '--grpoLr', '1e-4', '--model.hidden', '48', '--model.modelType', 'qwen2_moe']);
  assert.equal(c.seed, 7);
  assert.equal(c.kind, 'add');
  assert.equal(c.grpoLr, 1e-4);
  assert.deepEqual(c.model, { hidden: 48, modelType: 'qwen2_moe' });
  assert.equal(c.G, DEMO_DEFAULTS.G);
  assert.deepEqual(DEMO_DEFAULTS.model, {}, 'defaults untouched');
  assert.throws(() => parseDemoArgs(['--sed', '1']), /unknown option 'sed'/);
  assert.throws(() => parseDemoArgs(['--model.width', '1']), /unknown model option 'width'/);
  assert.throws(() => parseDemoArgs(['--G', 'x']), /option 'G' needs a number/);
  assert.throws(() => parseDemoArgs(['--G']), /expected --key value pairs/);
  assert.equal(parseDemoArgs(['--normalizeStd', 'false']).normalizeStd, false);
  assert.throws(() => parseDemoArgs(['--normalizeStd', '0']), /needs true or false/);
  assert.equal(parseDemoArgs(['--aggregation', 'seq-mean-token-mean']).aggregation, 'seq-mean-token-mean');
});

test('a scaled-down demo run reports SFT and GRPO accuracy and its curve', async () => {
  const s = await runDemo({ ...DEMO_DEFAULTS, digits: 3, heldOut: 40, sftSteps: 20, grpoSteps: 4, promptsPerStep: 8, evalEvery: 2, model: { hidden: 48, headDim: 12 } });
  assert.equal(s.task, 'sort-3');
  assert.equal(s.steps, 4);
  assert.deepEqual(s.curve.map((c) => c.step), [0, 2, 4]);
  assert.equal(s.curve[0].accuracy, s.sft_accuracy);
  assert.equal(s.curve[2].accuracy, s.grpo_accuracy);
  for (const c of s.curve) assert.ok(c.accuracy >= 0 && c.accuracy <= 1);
  assert.ok(s.curve[1].train_reward !== null && s.curve[1].train_reward >= 0 && s.curve[1].train_reward <= 1);
  assert.ok(s.seconds > 0 && s.seconds >= s.grpo_seconds);
});
