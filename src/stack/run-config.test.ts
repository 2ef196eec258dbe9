import assert from 'node:assert/strict';
import { test } from 'node:test';

import { KlEstimator, LossAggregation } from '../../proto/gen/pilot/v1/trainer.ts';
import { parseRunConfig, RunConfigError, runConfigToYamlObject } from './run-config.ts';
import { stringify } from 'yaml';

const GOOD = `name: demo
model_dir: ./model
dataset: digits
group_size: 8
prompts_per_step: 16
steps: 20
sampling:
  max_new_tokens: 6
  top_p: 0.95
loss: {eps_low: 0.2, eps_high: 0.28, kl: k3, aggregation: seq-mean-token-mean}
optimizer:
  lr: 0.001
reward:
  scorers:
    - name: math
      params: {tolerance: 0}
world_size: 2
`;

function issuesOf(text: string): { field: string; line: number | null; message: string }[] {
  try {
    parseRunConfig(text, '/runs/run.yaml');
  } catch (err) {
    assert.ok(err instanceof RunConfigError, `expected RunConfigError, got ${err}`);
    return [...err.issues];
  }
  assert.fail('expected the config to be rejected');
}

test('a valid run.yaml maps onto RunConfig (relative model_dir anchored at the file, enums, defaults)', () => {
  const c = parseRunConfig(GOOD, '/runs/run.yaml');
  assert.equal(c.modelDir, '/runs/model');
  assert.equal(c.groupSize, 8);
  assert.equal(c.worldSize, 2);
  assert.equal(c.sampling?.maxNewTokens, 6);
  assert.equal(c.sampling?.topP, 0.95);
  // Left out of a written sampling section: the coordinator's default temperature, not greedy.
  assert.equal(c.sampling?.temperature, 1);
  assert.equal(c.loss?.kl, KlEstimator.KL_ESTIMATOR_K3);
  assert.equal(c.loss?.aggregation, LossAggregation.LOSS_AGGREGATION_SEQ_MEAN_TOKEN_MEAN);
  assert.deepEqual(c.reward?.scorers, [{ name: 'math', weight: 1, params: { tolerance: 0 }, label: '' }]);
  assert.equal(c.mu, 0, 'unset fields keep the proto default (the coordinator fills its defaults)');
});

test('every problem is reported with its field path and line', () => {
  const issues = issuesOf(`model_dir: 3
group_size: 1
prompts_per_step: 16
stepz: 20
sampling:
  temperature: hot
loss: {kl: k7}
optimizer:
  lr: 0
reward:
  scorers:
    - weight: 1
`);
  const by = (field: string) => issues.find((i) => i.field === field);
  assert.deepEqual(by('model_dir'), { field: 'model_dir', line: 1, message: 'expected a string, got 3 (quote it)' });
  assert.equal(by('group_size')?.line, 2);
  assert.match(by('group_size')!.message, />= 2/);
  assert.equal(by('stepz')?.line, 4);
  assert.match(by('stepz')!.message, /unknown field \(did you mean steps\?\)/);
  assert.equal(by('sampling.temperature')?.line, 6);
  assert.equal(by('loss.kl')?.line, 7);
  assert.match(by('loss.kl')!.message, /one of k1, k2, k3/);
  assert.equal(by('optimizer.lr')?.line, 9);
  assert.equal(by('reward.scorers[0].name')?.line, 12);
  assert.deepEqual(by('steps'), { field: 'steps', line: null, message: 'required field is missing' });
  assert.equal(issues.length, 8);
});

test('the error message lists file:line: field: message', () => {
  assert.throws(() => parseRunConfig('model_dir: m\ngroup_size: x\nprompts_per_step: 1\nsteps: 1\nreward: {scorers: [{name: math}]}\n', 'run.yaml'), (err: Error) => {
    assert.match(err.message, /run\.yaml:2: group_size: expected an integer, got "x"/);
    return true;
  });
});

test('YAML syntax errors and a non-mapping document are reported with a line', () => {
  const syntax = issuesOf('steps: [1\nmodel_dir: x\n');
  assert.equal(syntax.length, 1);
  assert.match(syntax[0].message, /^YAML syntax/);
  assert.equal(typeof syntax[0].line, 'number');
  const list = issuesOf('- a\n- b\n');
  assert.match(list[0].message, /expected a mapping/);
  assert.equal(list[0].line, 1);
  const dup = issuesOf(GOOD + 'steps: 3\n');
  assert.match(dup[0].message, /YAML syntax.*[Mm]ap keys must be unique/);
});

test('wrong shapes: a list where a mapping belongs, a mapping where a number belongs, bad list items', () => {
  const issues = issuesOf(`model_dir: m
group_size: 2
prompts_per_step: {a: 1}
steps: 1
sampling: [1, 2]
reward:
  scorers:
    - name: math
      params: 5
  `);
  assert.match(issues.find((i) => i.field === 'prompts_per_step')!.message, /expected an integer >= 1, got a mapping/);
  assert.match(issues.find((i) => i.field === 'sampling')!.message, /expected a mapping/);
  assert.equal(issues.find((i) => i.field === 'reward.scorers[0].params')?.line, 9);
});

test('runConfigToYamlObject writes a file parseRunConfig reads back to the same config', () => {
  const c = parseRunConfig(GOOD, '/runs/run.yaml');
  const again = parseRunConfig(stringify(runConfigToYamlObject(c)), '/elsewhere/run.yaml');
  assert.deepEqual(again, c);
});
