// The oracle check: runs the engine on a reference folder (model files + expected.safetensors +
// expected.json, optionally expected_grads_*.safetensors, see test/fixtures/README.md) and measures the
// maximum relative error of every quantity it finds against the reference.
//
// Three parts: readReference (inputs and expected values), computeOutputs (what the engine gives, on one
// rank; src/dist/oracle-ranks.ts computes the same over several ranks) and compareOutputs.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import { Engine } from '../engine/engine.ts';
import type { LossInput, PackedBatch } from '../engine/engine.ts';
import { createGenerator } from '../engine/generator.ts';
import type { RopeFreqDtype } from '../hf/config.ts';
import { SafetensorsFile } from '../hf/safetensors.ts';

/** Tolerances a correct float32 engine meets against float64 references. */
export const TOLERANCES = {
  logits: 1e-5,
  logprobs: 1e-5,
  router_logits: 1e-5,
  grpo_loss: 1e-5,
  sft_loss: 1e-5,
  grads_grpo: 1e-4,
  grads_sft: 1e-4,
} as const;

export type Quantity = keyof typeof TOLERANCES;

export interface ModelOracleReport {
  family: string;
  errors: Partial<Record<Quantity, number>>;
  /** The tensor with the largest relative gradient error, per gradient file. */
  worst_tensor: Partial<Record<'grads_grpo' | 'grads_sft', string>>;
  greedy_match?: boolean;
  ok: boolean;
}

interface ExpectedMeta {
  family?: string;
  seq_lens: number[];
  prompt_lens: number[];
  grpo?: { eps_low: number; eps_high: number; beta: number; kl: string; aggregation?: string; value: number };
  sft?: { value: number };
}

/** The reference's inputs, packed, and its expected values (rows in packed order). */
export interface Reference {
  dir: string;
  meta: ExpectedMeta;
  batch: PackedBatch;
  /** [N] per-row completion mask; null when the reference has none. */
  mask: Float32Array | null;
  grpo: Omit<LossInput, 'mask'> | null;
  grpoLoss: number | null;
  sftLoss: number | null;
  logits: Float32Array | null; // [N, V]
  logprobs: Float32Array | null; // [N], 0 at each sequence's last row
  routerLogits: Float32Array | null; // [moeLayers, N, E]
  greedyPrompt: number[] | null;
  greedyTokens: number[] | null; // the new tokens only
  gradsGrpoFile: string | null;
  gradsSftFile: string | null;
}

/** What the engine produced, in the same layout. */
export interface Outputs {
  logits: Float32Array | null;
  logprobs: Float32Array;
  routerLogits: Float32Array | null;
  grpoLoss: number | null;
  sftLoss: number | null;
  gradsGrpo: Map<string, Float32Array> | null;
  gradsSft: Map<string, Float32Array> | null;
  greedyTokens: number[] | null;
}

/** max|a - e| / max|e|: the error relative to the scale of the reference. */
export function maxRelativeError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) throw new RangeError(`length ${actual.length} != expected ${expected.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < expected.length; i++) {
    num = Math.max(num, Math.abs(actual[i] - expected[i]));
    den = Math.max(den, Math.abs(expected[i]));
  }
  return den > 0 ? num / den : num;
}

/** Per-row values [N] from a [B, T-1] reference array (row t predicts token t+1; last row 0). */
function rowsFrom(src: Float32Array, B: number, T: number, lens: number[]): Float32Array {
  const out = new Float32Array(lens.reduce((a, b) => a + b, 0));
  let o = 0;
  for (let b = 0; b < B; b++) for (let t = 0; t < lens[b]; t++, o++) out[o] = t < lens[b] - 1 ? src[b * (T - 1) + t] : 0;
  return out;
}

function klEstimator(def: string): 'k1' | 'k3' {
  if (def.startsWith('k3')) return 'k3';
  if (def.startsWith('k1')) return 'k1';
  throw new Error(`expected.json: unknown KL estimator '${def}' (k1 or k3)`);
}

function aggregation(def: string | undefined): 'token-mean' | 'seq-mean-token-mean' | 'seq-mean-token-sum-norm' {
  if (!def || def.startsWith('token-mean')) return 'token-mean';
  if (def.startsWith('seq-mean-token-mean')) return 'seq-mean-token-mean';
  if (def.startsWith('seq-mean-token-sum-norm')) return 'seq-mean-token-sum-norm';
  throw new Error(`expected.json: unknown aggregation '${def}'`);
}

export async function readReference(dir: string): Promise<Reference> {
  const meta = JSON.parse(await readFile(path.join(dir, 'expected.json'), 'utf8')) as ExpectedMeta;
  const exp = await SafetensorsFile.open(path.join(dir, 'expected.safetensors'));
  try {
    const has = (name: string) => exp.tensors.has(name);
    const ids = await exp.readInt32('input_ids');
    const [B, T] = exp.info('input_ids').shape;
    const lens = meta.seq_lens;
    const tokens: number[] = [];
    for (let b = 0; b < B; b++) for (let t = 0; t < lens[b]; t++) tokens.push(ids[b * T + t]);
    const batch: PackedBatch = { tokens: Int32Array.from(tokens), seqLens: Int32Array.from(lens) };
    const N = tokens.length;
    let logits: Float32Array | null = null;
    if (has('logits')) {
      const ref = await exp.read('logits');
      const V = exp.info('logits').shape[2];
      logits = new Float32Array(N * V);
      let o = 0;
      for (let b = 0; b < B; b++) for (let t = 0; t < lens[b]; t++, o++) logits.set(ref.subarray((b * T + t) * V, (b * T + t + 1) * V), o * V);
    }
    let routerLogits: Float32Array | null = null;
    if (has('router_logits') && exp.info('router_logits').shape.length === 4) {
      const [M, , , E] = exp.info('router_logits').shape;
      const ref = await exp.read('router_logits');
      routerLogits = new Float32Array(M * N * E);
      for (let m = 0; m < M; m++) {
        let o = 0;
        for (let b = 0; b < B; b++)
          for (let t = 0; t < lens[b]; t++, o++) routerLogits.set(ref.subarray(((m * B + b) * T + t) * E, ((m * B + b) * T + t + 1) * E), (m * N + o) * E);
      }
    }
    const mask = has('completion_mask') ? rowsFrom(await exp.read('completion_mask'), B, T, lens) : null;
    let grpo: Reference['grpo'] = null;
    if (mask && meta.grpo && has('advantages') && has('old_logprobs')) {
      const advPerSeq = await exp.read('advantages');
      const advantages = new Float32Array(N);
      let o = 0;
      for (let b = 0; b < B; b++) for (let t = 0; t < lens[b]; t++) advantages[o++] = advPerSeq[b];
      grpo = {
        type: 'grpo',
        advantages,
        oldLogprobs: rowsFrom(await exp.read('old_logprobs'), B, T, lens),
        refLogprobs: has('ref_logprobs') ? rowsFrom(await exp.read('ref_logprobs'), B, T, lens) : null,
        epsLow: meta.grpo.eps_low,
        epsHigh: meta.grpo.eps_high,
        beta: meta.grpo.beta,
        kl: klEstimator(meta.grpo.kl),
        aggregation: aggregation(meta.grpo.aggregation),
        auxLossCoef: 0, // the reference losses and gradients leave the load-balancing loss out
      };
    }
    let greedyPrompt: number[] | null = null;
    let greedyTokens: number[] | null = null;
    if (has('greedy_tokens')) {
      const greedy = Array.from(await exp.readInt32('greedy_tokens'));
      const plen = meta.prompt_lens[0];
      greedyPrompt = Array.from(ids.subarray(0, plen));
      greedyTokens = greedy.slice(plen);
    }
    const file = (name: string) => (existsSync(path.join(dir, name)) ? path.join(dir, name) : null);
    return {
      dir,
      meta,
      batch,
      mask,
      grpo,
      grpoLoss: meta.grpo?.value ?? null,
      sftLoss: meta.sft?.value ?? null,
      logits,
      logprobs: has('logprobs') ? rowsFrom(await exp.read('logprobs'), B, T, lens) : null,
      routerLogits,
      greedyPrompt,
      greedyTokens,
      gradsGrpoFile: grpo ? file('expected_grads_grpo.safetensors') : null,
      gradsSftFile: mask && meta.sft ? file('expected_grads_sft.safetensors') : null,
    };
  } finally {
    await exp.close();
  }
}

function copyGrads(engine: Engine): Map<string, Float32Array> {
  return new Map([...engine.gradsByName()].map(([n, g]) => [n, new Float32Array(g)]));
}

/** The engine's outputs for the reference inputs, on this one rank. */
export async function computeOutputs(engine: Engine, ref: Reference): Promise<Outputs> {
  const r = await engine.forward(ref.batch, { logits: ref.logits !== null, logprobs: true, routerLogits: ref.routerLogits !== null });
  const out: Outputs = {
    logits: ref.logits ? r.logits : null,
    logprobs: r.logprobs,
    routerLogits: ref.routerLogits ? r.routerLogits : null,
    grpoLoss: null,
    sftLoss: null,
    gradsGrpo: null,
    gradsSft: null,
    greedyTokens: null,
  };
  if (ref.grpo && ref.mask) {
    await engine.zeroGrad();
    out.grpoLoss = (await engine.forwardBackward(ref.batch, { ...ref.grpo, mask: ref.mask })).loss;
    if (ref.gradsGrpoFile) out.gradsGrpo = copyGrads(engine);
  }
  if (ref.mask && ref.sftLoss !== null) {
    await engine.zeroGrad();
    out.sftLoss = (await engine.forwardBackward(ref.batch, { type: 'sft', mask: ref.mask, auxLossCoef: 0 })).loss;
    if (ref.gradsSftFile) out.gradsSft = copyGrads(engine);
  }
  await engine.zeroGrad();
  if (ref.greedyPrompt && ref.greedyTokens) {
    const gen = createGenerator(engine, { numBlocks: Math.ceil((ref.greedyPrompt.length + ref.greedyTokens.length) / 16) + 2, blockSize: 16 });
    try {
      const [s] = await gen.generateAll({ prompt: ref.greedyPrompt, maxNewTokens: ref.greedyTokens.length, temperature: 0, seed: 0, requestId: 0 });
      out.greedyTokens = s.tokens;
    } finally {
      await gen.close();
    }
  }
  return out;
}

/**
 * Gradient error: per tensor, max|a - e| over the larger of the tensor's own max|e| and 1e-3 of the largest
 * gradient anywhere (so that an unused expert's all-but-zero gradient is not a division by ~0); the report
 * is the worst tensor. With tied embeddings the reference gradient is under the embedding's name, as ours.
 */
async function gradientError(grads: Map<string, Float32Array>, file: string): Promise<{ error: number; worst: string }> {
  const f = await SafetensorsFile.open(file);
  try {
    const expected = new Map<string, Float32Array>();
    let globalMax = 0;
    for (const name of grads.keys()) {
      const e = await f.read(name);
      expected.set(name, e);
      for (let i = 0; i < e.length; i++) globalMax = Math.max(globalMax, Math.abs(e[i]));
    }
    let worst = 0;
    let worstName = '';
    for (const [name, g] of grads) {
      const e = expected.get(name)!;
      let num = 0;
      let den = 1e-3 * globalMax;
      for (let i = 0; i < e.length; i++) {
        num = Math.max(num, Math.abs(g[i] - e[i]));
        den = Math.max(den, Math.abs(e[i]));
      }
      const rel = den > 0 ? num / den : num;
      if (rel >= worst) {
        worst = rel;
        worstName = name;
      }
    }
    return { error: worst, worst: worstName };
  } finally {
    await f.close();
  }
}

export async function compareOutputs(ref: Reference, out: Outputs, family: string): Promise<ModelOracleReport> {
  const report: ModelOracleReport = { family: ref.meta.family ?? family, errors: {}, worst_tensor: {}, ok: true };
  if (ref.logits && out.logits) report.errors.logits = maxRelativeError(out.logits, ref.logits);
  if (ref.logprobs) {
    const mine = new Float32Array(out.logprobs);
    let o = 0;
    for (const len of ref.batch.seqLens) {
      o += len;
      mine[o - 1] = 0;
    }
    report.errors.logprobs = maxRelativeError(mine, ref.logprobs);
  }
  if (ref.routerLogits && out.routerLogits) report.errors.router_logits = maxRelativeError(out.routerLogits, ref.routerLogits);
  if (ref.grpoLoss !== null && out.grpoLoss !== null) report.errors.grpo_loss = Math.abs(out.grpoLoss - ref.grpoLoss) / Math.abs(ref.grpoLoss);
  if (ref.sftLoss !== null && out.sftLoss !== null) report.errors.sft_loss = Math.abs(out.sftLoss - ref.sftLoss) / Math.abs(ref.sftLoss);
  if (ref.gradsGrpoFile && out.gradsGrpo) {
    const g = await gradientError(out.gradsGrpo, ref.gradsGrpoFile);
    report.errors.grads_grpo = g.error;
    report.worst_tensor.grads_grpo = g.worst;
  }
  if (ref.gradsSftFile && out.gradsSft) {
    const g = await gradientError(out.gradsSft, ref.gradsSftFile);
    report.errors.grads_sft = g.error;
    report.worst_tensor.grads_sft = g.worst;
  }
  if (ref.greedyTokens && out.greedyTokens) {
    report.greedy_match = out.greedyTokens.length === ref.greedyTokens.length && out.greedyTokens.every((t, i) => t === ref.greedyTokens![i]);
  }
  for (const [q, err] of Object.entries(report.errors) as [Quantity, number][]) {
    if (!(err <= TOLERANCES[q])) report.ok = false;
  }
  if (report.greedy_match === false) report.ok = false;
  return report;
}

export interface OracleOptions {
  /** RoPE frequency precision of the reference (see ParseConfigOptions.ropeFreqDtype); default float32. */
  ropeFreqDtype?: RopeFreqDtype;
}

export async function runModelOracle(dir: string, options: OracleOptions = {}): Promise<ModelOracleReport> {
  const ref = await readReference(dir);
  const engine = await Engine.fromHfFolder(dir, { ropeFreqDtype: options.ropeFreqDtype });
  const out = await computeOutputs(engine, ref);
  return compareOutputs(ref, out, engine.modelType);
}
