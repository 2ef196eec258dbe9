// The GRPO math as pure functions over arrays: group advantages and the packing of prompt+completion
// sequences into the engine's batch layout. No engine, no tokenizer: the coordinator mirrors these.
//
// Packed layout (the engine's): tokens are the sequences concatenated; per-row arrays are [N] and row i
// holds the prediction of token i + 1, so a sequence with a prompt of P tokens and a completion of C tokens
// predicts completion token j at its row P - 1 + j, and its last row (P + C - 1) predicts nothing.
import type { PackedBatch } from '../engine/engine.ts';

export interface AdvantageOptions {
  /** Divide by the group's standard deviation (GRPO); false: only subtract the mean (Dr. GRPO). */
  normalizeStd: boolean;
  /** Added to the std before dividing; default 1e-6. */
  eps?: number;
}

/**
 * One advantage per sample, rewards laid out group by group ([numGroups * G]):
 * A = (r - mean_group) / (std_group + eps), with the population std; a group whose rewards are all equal
 * has no signal and gets 0 for every sample.
 */
export function groupAdvantages(rewards: ArrayLike<number>, G: number, options: AdvantageOptions): Float32Array {
  if (!Number.isInteger(G) || G < 1) throw new RangeError(`groupAdvantages: G must be an integer >= 1, got ${G}`);
  if (rewards.length % G !== 0) throw new RangeError(`groupAdvantages: ${rewards.length} rewards is not a multiple of G = ${G}`);
  const eps = options.eps ?? 1e-6;
  const out = new Float32Array(rewards.length);
  for (let g = 0; g < rewards.length; g += G) {
    let mean = 0;
    for (let i = 0; i < G; i++) {
      const r = rewards[g + i];
      if (!Number.isFinite(r)) throw new RangeError(`groupAdvantages: rewards[${g + i}] is not finite`);
      mean += r;
    }
    mean /= G;
    let v = 0;
    for (let i = 0; i < G; i++) v += (rewards[g + i] - mean) ** 2;
    const std = Math.sqrt(v / G);
    // Exactly equal rewards: the deviations are exactly 0 too, so the division below would also give 0;
    // the explicit branch keeps that true for any eps.
    if (v === 0) continue;
    const scale = options.normalizeStd ? 1 / (std + eps) : 1;
    for (let i = 0; i < G; i++) out[g + i] = (rewards[g + i] - mean) * scale;
  }
  return out;
}

export interface PackItem {
  prompt: readonly number[];
  completion: readonly number[];
}

export interface RolloutItem extends PackItem {
  /** The rollout's logprob of each completion token (same length as completion). */
  logprobs: readonly number[];
  advantage: number;
}

export interface SftPack {
  batch: PackedBatch;
  /** 1 on the rows that predict a completion token. */
  mask: Float32Array;
}

export interface GrpoPack extends SftPack {
  advantages: Float32Array;
  oldLogprobs: Float32Array;
  /** Completion tokens in the batch (the mask's sum). */
  completionTokens: number;
}

function checkItem(it: PackItem, k: number): void {
  if (it.prompt.length < 1) throw new RangeError(`pack: item ${k} has an empty prompt`);
  if (it.completion.length < 1) throw new RangeError(`pack: item ${k} has an empty completion`);
}

/** Packs prompt+completion sequences; the mask selects the completion rows (the SFT target). */
export function packCompletions(items: readonly PackItem[]): SftPack {
  if (items.length === 0) throw new RangeError('pack: no items');
  items.forEach(checkItem);
  const seqLens = Int32Array.from(items, (it) => it.prompt.length + it.completion.length);
  const n = seqLens.reduce((a, b) => a + b, 0);
  const tokens = new Int32Array(n);
  const mask = new Float32Array(n);
  let o = 0;
  for (const it of items) {
    tokens.set(it.prompt, o);
    tokens.set(it.completion, o + it.prompt.length);
    mask.fill(1, o + it.prompt.length - 1, o + it.prompt.length - 1 + it.completion.length);
    o += it.prompt.length + it.completion.length;
  }
  return { batch: { tokens, seqLens }, mask };
}

/** Packs GRPO samples: each completion row carries its sample's advantage and its rollout logprob. */
export function packGroup(items: readonly RolloutItem[]): GrpoPack {
  const { batch, mask } = packCompletions(items);
  const n = batch.tokens.length;
  const advantages = new Float32Array(n);
  const oldLogprobs = new Float32Array(n);
  let o = 0;
  let completionTokens = 0;
  items.forEach((it, k) => {
    if (it.logprobs.length !== it.completion.length) {
      throw new RangeError(`packGroup: item ${k} has ${it.logprobs.length} logprobs for ${it.completion.length} completion tokens`);
    }
    if (!Number.isFinite(it.advantage)) throw new RangeError(`packGroup: item ${k} advantage is not finite`);
    const first = o + it.prompt.length - 1;
    advantages.fill(it.advantage, first, first + it.completion.length);
    oldLogprobs.set(it.logprobs, first);
    completionTokens += it.completion.length;
    o += it.prompt.length + it.completion.length;
  });
  return { batch, mask, advantages, oldLogprobs, completionTokens };
}
