// In-process reference training loops: SFT warm-up and GRPO on the demo task, with one engine and one
// generator in the same process. The services mirror this loop (rollout on the rank, reward in the reward
// service, the step on the trainer); the math lives in algo.ts.
import type { AdamWOptions, Aggregation, Engine } from '../engine/engine.ts';
import type { Generator } from '../engine/generator.ts';
import { groupAdvantages, packCompletions, packGroup, type RolloutItem } from './algo.ts';
import { createRng } from './rng.ts';
import { reward, type Example, type Task } from './task.ts';
import type { DemoTokenizer } from './tokenizer.ts';

type Tok = Pick<DemoTokenizer, 'encode' | 'decode' | 'eosId'>;

export interface SftOptions {
  steps: number;
  /** Examples per step. */
  batch: number;
  lr: number;
  /** Linear warm-up steps; default 0. */
  warmupSteps?: number;
  weightDecay?: number;
  /** 0: no clipping; default 1. */
  maxGradNorm?: number;
  seed?: number;
  onStep?: (s: SftStepInfo) => void | Promise<void>;
}

export interface SftStepInfo {
  step: number;
  loss: number;
  gradNorm: number;
  lr: number;
}

/** Prompt ids and completion ids (answer + eos) of an example. */
export function encodeExample(tokenizer: Tok, ex: Example): { prompt: number[]; completion: number[] } {
  return { prompt: tokenizer.encode(ex.prompt), completion: [...tokenizer.encode(ex.answer), tokenizer.eosId] };
}

function checkSteps(name: string, v: number): void {
  if (!Number.isInteger(v) || v < 0) throw new RangeError(`${name} must be an integer >= 0, got ${v}`);
}

/** Supervised warm-up on the task's train set: cross-entropy on the answer and eos tokens. */
export async function sftWarmup(engine: Engine, tokenizer: Tok, task: Task, options: SftOptions): Promise<SftStepInfo[]> {
  checkSteps('sftWarmup: steps', options.steps);
  if (!Number.isInteger(options.batch) || options.batch < 1) throw new RangeError(`sftWarmup: batch must be an integer >= 1, got ${options.batch}`);
  const rng = createRng(options.seed ?? 1);
  const warmup = options.warmupSteps ?? 0;
  const history: SftStepInfo[] = [];
  for (let step = 0; step < options.steps; step++) {
    const items = Array.from({ length: options.batch }, () => encodeExample(tokenizer, task.train[rng.int(task.train.length)]));
    const { batch, mask } = packCompletions(items);
    await engine.zeroGrad();
    const r = await engine.forwardBackward(batch, { type: 'sft', mask });
    const lr = warmup > 0 && step < warmup ? (options.lr * (step + 1)) / warmup : options.lr;
    const gradNorm = await engine.adamwStep({ lr, weightDecay: options.weightDecay ?? 0, maxGradNorm: options.maxGradNorm ?? 1 });
    const info = { step, loss: r.loss, gradNorm, lr };
    history.push(info);
    await options.onStep?.(info);
  }
  return history;
}

export interface GrpoOptions {
  steps: number;
  /** Distinct train prompts per step (groups). */
  promptsPerStep: number;
  /** Samples per prompt (the group size). */
  G: number;
  /** Sampling temperature (the loss's logprobs use the same). */
  temperature: number;
  topP?: number;
  lr: number;
  epsLow?: number;
  epsHigh?: number;
  /** Optimizer steps on each rollout batch (1: on-policy; more reuse it with the clipped ratio). */
  updatesPerStep?: number;
  /** Divide advantages by the group std (GRPO); default true. */
  normalizeStd?: boolean;
  aggregation?: Aggregation;
  /** Leave groups whose rewards are all equal out of the update (their gradient is 0 anyway); default true. */
  dropZeroAdvantage?: boolean;
  weightDecay?: number;
  maxGradNorm?: number;
  /** Extra AdamW options (betas, eps). */
  adamw?: Partial<Pick<AdamWOptions, 'beta1' | 'beta2' | 'eps'>>;
  seed?: number;
  onStep?: (s: GrpoStepInfo) => void | Promise<void>;
}

export interface GrpoStepInfo {
  step: number;
  /** Mean reward of the step's samples (sampling accuracy on train prompts). */
  meanReward: number;
  /** Groups with some reward variance (they carry the signal). */
  activeGroups: number;
  groups: number;
  /** Completion tokens trained on this step. */
  tokens: number;
  loss: number;
  gradNorm: number;
  /** Fraction of trained tokens whose ratio was clipped (0 for a single on-policy update). */
  clipFraction: number;
  rolloutSeconds: number;
  trainSeconds: number;
}

export interface RolloutGroup {
  example: Example;
  prompt: number[];
  samples: { tokens: number[]; logprobs: number[]; reward: 0 | 1 }[];
}

/** Samples G completions of each example and scores them. */
export async function rolloutGroups(
  generator: Pick<Generator, 'generateAll'>,
  tokenizer: Tok,
  task: Task,
  examples: readonly Example[],
  o: { G: number; temperature: number; topP?: number; seed: number; requestIdBase: number },
): Promise<RolloutGroup[]> {
  const maxNewTokens = task.maxAnswerChars + 1;
  return Promise.all(
    examples.map(async (example, i) => {
      const prompt = tokenizer.encode(example.prompt);
      const out = await generator.generateAll({
        prompt,
        n: o.G,
        maxNewTokens,
        temperature: o.temperature,
        topP: o.topP,
        seed: o.seed,
        requestId: o.requestIdBase + i,
        stopTokenIds: [tokenizer.eosId],
      });
      return {
        example,
        prompt,
        samples: out.map((s) => ({ tokens: s.tokens, logprobs: s.logprobs, reward: reward(tokenizer.decode(s.tokens), example.answer) })),
      };
    }),
  );
}

/** GRPO on the task's train prompts. Returns one entry per step. */
export async function grpoTrain(engine: Engine, generator: Pick<Generator, 'generateAll'>, tokenizer: Tok, task: Task, options: GrpoOptions): Promise<GrpoStepInfo[]> {
  checkSteps('grpoTrain: steps', options.steps);
  for (const k of ['promptsPerStep', 'G'] as const) {
    if (!Number.isInteger(options[k]) || options[k] < 1) throw new RangeError(`grpoTrain: ${k} must be an integer >= 1, got ${options[k]}`);
  }
  if (options.G < 2) throw new RangeError('grpoTrain: G must be >= 2 (advantages compare samples within a group)');
  if (!(options.temperature > 0)) throw new RangeError(`grpoTrain: temperature must be > 0 (sampling), got ${options.temperature}`);
  const updates = options.updatesPerStep ?? 1;
  if (!Number.isInteger(updates) || updates < 1) throw new RangeError(`grpoTrain: updatesPerStep must be an integer >= 1, got ${updates}`);
  const seed = options.seed ?? 1;
  const rng = createRng(seed ^ 0x5bd1e995);
  const history: GrpoStepInfo[] = [];
  for (let step = 0; step < options.steps; step++) {
    const t0 = performance.now();
    const examples = Array.from({ length: options.promptsPerStep }, () => task.train[rng.int(task.train.length)]);
    const groups = await rolloutGroups(generator, tokenizer, task, examples, {
      G: options.G,
      temperature: options.temperature,
      topP: options.topP,
      seed,
      requestIdBase: step * options.promptsPerStep,
    });
    const rewards = groups.flatMap((g) => g.samples.map((s) => s.reward));
    const adv = groupAdvantages(rewards, options.G, { normalizeStd: options.normalizeStd ?? true });
    const items: RolloutItem[] = [];
    let active = 0;
    groups.forEach((g, gi) => {
      const base = gi * options.G;
      const hasSignal = g.samples.some((_, i) => adv[base + i] !== 0);
      if (hasSignal) active++;
      if (!hasSignal && (options.dropZeroAdvantage ?? true)) return;
      g.samples.forEach((s, i) => items.push({ prompt: g.prompt, completion: s.tokens, logprobs: s.logprobs, advantage: adv[base + i] }));
    });
    const t1 = performance.now();
    let loss = 0;
    let gradNorm = 0;
    let clipped = 0;
    let tokens = 0;
    if (items.length > 0) {
      const pack = packGroup(items);
      tokens = pack.completionTokens;
      for (let u = 0; u < updates; u++) {
        await engine.zeroGrad();
        const r = await engine.forwardBackward(pack.batch, {
          type: 'grpo',
          mask: pack.mask,
          advantages: pack.advantages,
          oldLogprobs: pack.oldLogprobs,
          epsLow: options.epsLow,
          epsHigh: options.epsHigh,
          aggregation: options.aggregation,
          temperature: options.temperature,
        });
        gradNorm = await engine.adamwStep({ lr: options.lr, weightDecay: options.weightDecay ?? 0, maxGradNorm: options.maxGradNorm ?? 1, ...options.adamw });
        loss = r.loss;
        clipped += r.clipLowCount + r.clipHighCount;
      }
    }
    const t2 = performance.now();
    const info: GrpoStepInfo = {
      step,
      meanReward: rewards.reduce<number>((a, b) => a + b, 0) / rewards.length,
      activeGroups: active,
      groups: groups.length,
      tokens,
      loss,
      gradNorm,
      clipFraction: tokens > 0 ? clipped / (tokens * updates) : 0,
      rolloutSeconds: (t1 - t0) / 1000,
      trainSeconds: (t2 - t1) / 1000,
    };
    history.push(info);
    await options.onStep?.(info);
  }
  return history;
}
