// A RunConfig message validated and filled with defaults, in one place. Every error is an InvalidArgumentError
// naming the proto field (snake_case, as in the run YAML). Checks that need other services (the reward scorer
// names, the ranks) are done by the run service; this file is pure apart from the model folder check.
import { stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { InvalidArgumentError } from '../common/errors.ts';
import { checkToken } from '../common/nats/names.ts';
import type { RunConfig } from '../../proto/gen/pilot/v1/run.ts';
import type { SamplingParams } from '../../proto/gen/pilot/v1/rollout.ts';
import type { RewardSpec } from '../../proto/gen/pilot/v1/reward.ts';
import { KlEstimator, LossAggregation, type AdamWParams, type LossParams } from '../../proto/gen/pilot/v1/trainer.ts';

/** A run's settings with every default applied: what the loop runs and what GetRun shows. */
export interface RunSettings {
  name: string;
  modelDir: string;
  dtype: 'f32' | 'bf16';
  dataset: string;
  groupSize: number;
  promptsPerStep: number;
  steps: number;
  sampling: SamplingParams;
  loss: LossParams;
  advantage: { stdNormalize: boolean };
  dynamicSampling: { enabled: boolean; maxDraws: number };
  mu: number;
  microBatchSize: number;
  optimizer: AdamWParams;
  /** 0 = only at the end. */
  checkpointEvery: number;
  reward: RewardSpec;
  seed: number;
  worldSize: number;
}

export const SAMPLING_DEFAULTS: SamplingParams = {
  temperature: 1,
  topK: 0,
  topP: 0,
  minP: 0,
  seed: undefined,
  maxNewTokens: 256,
  stop: [],
  stopTokenIds: [],
};
export const LOSS_DEFAULTS: LossParams = {
  epsLow: 0.2,
  epsHigh: 0.2,
  beta: 0,
  kl: KlEstimator.KL_ESTIMATOR_K3,
  aggregation: LossAggregation.LOSS_AGGREGATION_TOKEN_MEAN,
};
export const OPTIMIZER_DEFAULTS: AdamWParams = { lr: 1e-6, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 };
export const RUN_DEFAULTS = { dtype: 'f32' as const, dataset: 'default', mu: 1, microBatchSize: 8, maxDraws: 2 };

function bad(field: string, message: string): never {
  throw new InvalidArgumentError(field, message);
}

function positiveInt(field: string, v: number, allowZero = false): number {
  if (!Number.isInteger(v) || v < 0 || (!allowZero && v === 0)) bad(field, `must be a ${allowZero ? 'non-negative' : 'positive'} integer, got ${v}`);
  return v;
}

function finite(field: string, v: number, min: number, max = Infinity, minExclusive = false): number {
  if (!Number.isFinite(v) || v < min || v > max || (minExclusive && v === min)) {
    bad(field, `must be a number in ${minExclusive ? '(' : '['}${min}, ${max}], got ${v}`);
  }
  return v;
}

/** Validates and fills defaults; `ranks` is how many rank addresses the coordinator drives. */
export async function resolveRunConfig(c: RunConfig | undefined, ranks: number): Promise<RunSettings> {
  if (!c) bad('config', 'is required');
  const name = c.name === '' ? 'run' : c.name;
  try {
    checkToken('name', name);
  } catch (err) {
    bad('config.name', (err as Error).message);
  }
  if (!c.modelDir) bad('config.model_dir', 'is required (a Hugging Face model folder)');
  const modelDir = resolve(c.modelDir);
  try {
    const st = await stat(modelDir);
    if (!st.isDirectory()) bad('config.model_dir', `${modelDir} is not a directory`);
  } catch (err) {
    if (err instanceof InvalidArgumentError) throw err;
    bad('config.model_dir', `${modelDir} does not exist`);
  }
  try {
    await stat(join(modelDir, 'config.json'));
  } catch {
    bad('config.model_dir', `${modelDir} has no config.json; it is not a Hugging Face model folder`);
  }
  const dtype = c.dtype === '' ? RUN_DEFAULTS.dtype : c.dtype;
  if (dtype !== 'f32' && dtype !== 'bf16') bad('config.dtype', `must be "f32" or "bf16", got "${dtype}"`);
  const dataset = c.dataset === '' ? RUN_DEFAULTS.dataset : c.dataset;
  try {
    checkToken('dataset', dataset);
  } catch (err) {
    bad('config.dataset', (err as Error).message);
  }
  if (!Number.isInteger(c.groupSize) || c.groupSize < 2) {
    bad('config.group_size', `G must be at least 2 (group advantages compare samples of one prompt), got ${c.groupSize}`);
  }
  positiveInt('config.prompts_per_step', c.promptsPerStep);
  positiveInt('config.steps', c.steps);

  const s = c.sampling ? { ...c.sampling } : { ...SAMPLING_DEFAULTS };
  if (c.sampling) {
    finite('config.sampling.temperature', s.temperature, 0);
    if (s.maxNewTokens === 0) s.maxNewTokens = SAMPLING_DEFAULTS.maxNewTokens;
    positiveInt('config.sampling.max_new_tokens', s.maxNewTokens);
    positiveInt('config.sampling.top_k', s.topK, true);
    finite('config.sampling.top_p', s.topP, 0, 1);
    finite('config.sampling.min_p', s.minP, 0, 1);
  }
  // Zero fields of a given message fall back to the defaults: proto3 cannot tell "0" from "unset", and a clip
  // range of 0 (no update at all) or an lr of 0 is never what a run wants.
  const l = c.loss ?? LOSS_DEFAULTS;
  const loss: LossParams = {
    epsLow: l.epsLow === 0 ? LOSS_DEFAULTS.epsLow : finite('config.loss.eps_low', l.epsLow, 0, 1),
    epsHigh: l.epsHigh === 0 ? LOSS_DEFAULTS.epsHigh : finite('config.loss.eps_high', l.epsHigh, 0, 10),
    beta: finite('config.loss.beta', l.beta, 0),
    kl: l.kl === KlEstimator.KL_ESTIMATOR_UNSPECIFIED ? LOSS_DEFAULTS.kl : l.kl,
    aggregation: l.aggregation === LossAggregation.LOSS_AGGREGATION_UNSPECIFIED ? LOSS_DEFAULTS.aggregation : l.aggregation,
  };
  if (!(loss.kl in KlEstimator) || loss.kl === KlEstimator.UNRECOGNIZED) bad('config.loss.kl', `unknown estimator ${loss.kl}`);
  if (!(loss.aggregation in LossAggregation) || loss.aggregation === LossAggregation.UNRECOGNIZED) {
    bad('config.loss.aggregation', `unknown aggregation ${loss.aggregation}`);
  }
  const o = c.optimizer ?? OPTIMIZER_DEFAULTS;
  const optimizer: AdamWParams = {
    lr: o.lr === 0 ? OPTIMIZER_DEFAULTS.lr : finite('config.optimizer.lr', o.lr, 0, 1, true),
    beta1: o.beta1 === 0 ? OPTIMIZER_DEFAULTS.beta1 : finite('config.optimizer.beta1', o.beta1, 0, 0.999999),
    beta2: o.beta2 === 0 ? OPTIMIZER_DEFAULTS.beta2 : finite('config.optimizer.beta2', o.beta2, 0, 0.99999999),
    eps: o.eps === 0 ? OPTIMIZER_DEFAULTS.eps : finite('config.optimizer.eps', o.eps, 0, 1, true),
    weightDecay: finite('config.optimizer.weight_decay', o.weightDecay, 0),
    maxGradNorm: finite('config.optimizer.max_grad_norm', o.maxGradNorm, 0),
  };
  if (!c.reward || c.reward.scorers.length === 0) bad('config.reward', 'needs at least one scorer');
  const worldSize = c.worldSize === 0 ? ranks : c.worldSize;
  if (worldSize !== ranks) {
    bad('config.world_size', `is ${worldSize} but the coordinator drives ${ranks} rank(s) (RANK_ADDRS); leave it 0 to use them all`);
  }
  const ds = c.dynamicSampling;
  return {
    name,
    modelDir,
    dtype,
    dataset,
    groupSize: c.groupSize,
    promptsPerStep: c.promptsPerStep,
    steps: c.steps,
    sampling: s,
    loss,
    advantage: { stdNormalize: c.advantage ? c.advantage.stdNormalize : true },
    dynamicSampling: { enabled: ds?.enabled ?? false, maxDraws: ds && ds.maxDraws > 0 ? ds.maxDraws : RUN_DEFAULTS.maxDraws },
    mu: c.mu === 0 ? RUN_DEFAULTS.mu : positiveInt('config.mu', c.mu),
    microBatchSize: c.microBatchSize === 0 ? RUN_DEFAULTS.microBatchSize : positiveInt('config.micro_batch_size', c.microBatchSize),
    optimizer,
    checkpointEvery: positiveInt('config.checkpoint_every', c.checkpointEvery, true),
    reward: c.reward,
    seed: c.seed,
    worldSize,
  };
}

/** The settings as a RunConfig message again (GetRun shows what the run actually uses). */
export function settingsToConfig(s: RunSettings): RunConfig {
  return {
    name: s.name,
    modelDir: s.modelDir,
    dtype: s.dtype,
    dataset: s.dataset,
    groupSize: s.groupSize,
    promptsPerStep: s.promptsPerStep,
    steps: s.steps,
    sampling: s.sampling,
    loss: s.loss,
    advantage: s.advantage,
    dynamicSampling: s.dynamicSampling,
    mu: s.mu,
    microBatchSize: s.microBatchSize,
    optimizer: s.optimizer,
    checkpointEvery: s.checkpointEvery,
    reward: s.reward,
    seed: s.seed,
    worldSize: s.worldSize,
  };
}
