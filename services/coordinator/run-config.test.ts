import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { InvalidArgumentError } from '../common/errors.ts';
import type { RunConfig } from '../../proto/gen/pilot/v1/run.ts';
import { KlEstimator, LossAggregation } from '../../proto/gen/pilot/v1/trainer.ts';
import { LOSS_DEFAULTS, OPTIMIZER_DEFAULTS, resolveRunConfig, settingsToConfig } from './run-config.ts';
import { flattenSummary, summarizeStep } from './algo/metrics.ts';
import { metricsToProto, promptInput } from './run-service.ts';

const MODEL = join(import.meta.dirname, '..', '..', 'test', 'fixtures', 'recomputed', 'qwen2_moe-tiny');

const base = (o: Partial<RunConfig> = {}): RunConfig => ({
  name: 'r1', modelDir: MODEL, dtype: '', dataset: '', groupSize: 4, promptsPerStep: 2, steps: 3,
  sampling: undefined, loss: undefined, advantage: undefined, dynamicSampling: undefined, mu: 0, microBatchSize: 0,
  optimizer: undefined, checkpointEvery: 0, reward: { scorers: [{ name: 'math', weight: 1, params: undefined, label: '' }] },
  seed: 1, worldSize: 0, ...o,
});

async function rejects(c: RunConfig, field: string, msg: RegExp, ranks = 2) {
  await assert.rejects(resolveRunConfig(c, ranks), (err: Error) => {
    assert.ok(err instanceof InvalidArgumentError, String(err));
    assert.equal(err.field, field);
    assert.match(err.message, msg);
    return true;
  });
}

test('defaults fill every unset field', async () => {
  const s = await resolveRunConfig(base(), 2);
  assert.equal(s.dtype, 'f32');
  assert.equal(s.dataset, 'default');
  assert.equal(s.mu, 1);
  assert.equal(s.microBatchSize, 8);
  assert.equal(s.worldSize, 2);
  assert.equal(s.sampling.temperature, 1);
  assert.deepEqual(s.loss, LOSS_DEFAULTS);
  assert.deepEqual(s.optimizer, OPTIMIZER_DEFAULTS);
  assert.deepEqual(s.advantage, { stdNormalize: true });
  assert.deepEqual(s.dynamicSampling, { enabled: false, maxDraws: 2 });
  // Dr. GRPO: no std normalisation, sequence-mean of token sums.
  const dr = await resolveRunConfig(
    base({ advantage: { stdNormalize: false }, loss: { epsLow: 0, epsHigh: 0, beta: 0, kl: 0, aggregation: LossAggregation.LOSS_AGGREGATION_SEQ_MEAN_TOKEN_SUM } }),
    2,
  );
  assert.equal(dr.advantage.stdNormalize, false);
  assert.equal(dr.loss.aggregation, LossAggregation.LOSS_AGGREGATION_SEQ_MEAN_TOKEN_SUM);
  assert.equal(dr.loss.kl, KlEstimator.KL_ESTIMATOR_K3);
  assert.equal(settingsToConfig(dr).groupSize, 4);
});

test('invalid configs name their field', async () => {
  await rejects(base({ groupSize: 1 }), 'config.group_size', /G must be at least 2/);
  await rejects(base({ modelDir: '/nonexistent/model' }), 'config.model_dir', /does not exist/);
  await rejects(base({ modelDir: join(MODEL, '..') }), 'config.model_dir', /no config\.json/);
  await rejects(base({ modelDir: '' }), 'config.model_dir', /is required/);
  await rejects(base({ dtype: 'fp8' }), 'config.dtype', /"f32" or "bf16"/);
  await rejects(base({ dataset: 'a.b' }), 'config.dataset', /may only contain/);
  await rejects(base({ promptsPerStep: 0 }), 'config.prompts_per_step', /positive integer/);
  await rejects(base({ steps: 0 }), 'config.steps', /positive integer/);
  await rejects(base({ reward: { scorers: [] } }), 'config.reward', /at least one scorer/);
  await rejects(base({ worldSize: 4 }), 'config.world_size', /drives 2 rank/);
  await rejects(base({ optimizer: { ...OPTIMIZER_DEFAULTS, lr: -1 } }), 'config.optimizer.lr', /\(0, 1\]/);
  await rejects(base({ loss: { ...LOSS_DEFAULTS, beta: -0.1 } }), 'config.loss.beta', /\[0, Infinity\]/);
  await rejects(
    base({ sampling: { temperature: 1, topK: 0, topP: 2, minP: 0, seed: undefined, maxNewTokens: 8, stop: [], stopTokenIds: [] } }),
    'config.sampling.top_p',
    /\[0, 1\]/,
  );
});

test('prompts from the public API: text or messages, validated with the field named', () => {
  const p = promptInput({ id: '', input: { $case: 'text', value: 'hi' }, referenceAnswer: '4', metadata: { k: 'v' } }, 0);
  assert.deepEqual(p, { text: 'hi', reference: '4', metadata: { k: 'v' } });
  const m = promptInput(
    { id: 'm1', input: { $case: 'messages', value: { messages: [{ role: 'system', content: 'be brief' }, { role: 'user', content: '2+2?' }] } }, referenceAnswer: '', metadata: {} },
    3,
  );
  assert.equal(m.text, '2+2?');
  assert.equal(m.reference, null);
  assert.equal((m.metadata!.messages as unknown[]).length, 2);
  assert.throws(
    () => promptInput({ id: '', input: { $case: 'messages', value: { messages: [{ role: 'wizard', content: 'x' }] } }, referenceAnswer: '', metadata: {} }, 2),
    /prompts\[2\]\.messages\[0\]\.role: must be one of/,
  );
  assert.throws(() => promptInput({ id: 'has space', input: { $case: 'text', value: 'x' }, referenceAnswer: '', metadata: {} }, 1), /prompts\[1\]: prompt "id" must be/);
});

test('step metrics survive the trip through NATS names into StepMetrics', () => {
  const s = summarizeStep({
    step: 2, rewards: [1, 0], components: [{ a: 1 }, { a: 0 }], accuracyLabel: 'a', completionLengths: [3, 5],
    updates: [{ parts: [{ loss: 0.1, pgLoss: 0.1, kl: 0, entropy: 2, clipFractionLow: 0, clipFractionHigh: 0.5, tokens: 8 }], gradNorm: 0.3, lr: 1e-4 }],
    groupsKept: 1, groupsFiltered: 0, phaseSeconds: { rollout: 1 }, stepSeconds: 2, expertTokens: null,
  });
  const back = metricsToProto({ step: 2, metrics: flattenSummary(s) });
  assert.equal(back.step, 2);
  assert.equal(back.rewardMean, 0.5);
  assert.equal(back.accuracy, 0.5);
  assert.equal(back.gradNorm, 0.3);
  assert.equal(back.clipFraction, 0.5);
  assert.equal(back.extra['time/rollout'], 1);
  assert.equal(back.extra.reward_mean, undefined);
});
