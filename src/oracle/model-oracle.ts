// The oracle check: runs the engine on a reference folder (model files + expected.safetensors +
// expected.json, optionally expected_grads_*.safetensors, see test/fixtures/README) and measures the
// maximum relative error of every quantity it finds against the reference.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import { Engine } from '../engine/engine.ts';
import type { LossInput, PackedBatch } from '../engine/engine.ts';
import { createGenerator } from '../engine/generator.ts';
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

/** The reference's batch: [B, T] right-padded ids with lengths, packed. */
function packedBatch(ids: Int32Array, B: number, T: number, lens: number[]): PackedBatch {
  const tokens: number[] = [];
  for (let b = 0; b < B; b++) for (let t = 0; t < lens[b]; t++) tokens.push(ids[b * T + t]);
  return { tokens: Int32Array.from(tokens), seqLens: Int32Array.from(lens) };
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

/**
 * Gradient error: per tensor, max|a - e| over the larger of the tensor's own max|e| and 1e-3 of the largest
 * gradient anywhere (so that an unused expert's all-but-zero gradient is not a division by ~0); the report
 * is the worst tensor.
 */
async function gradientError(engine: Engine, file: string): Promise<{ error: number; worst: string }> {
  const f = await SafetensorsFile.open(file);
  try {
    const grads = engine.gradsByName();
    const expected = new Map<string, Float32Array>();
    let globalMax = 0;
    for (const name of grads.keys()) {
      const e = await f.read(name);
      expected.set(name, e);
      for (let i = 0; i < e.length; i++) globalMax = Math.max(globalMax, Math.abs(e[i]));
    }
    // Tied embeddings: one tensor, whose reference gradient is under the embedding's name.
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

export async function runModelOracle(dir: string, options: { engine?: Engine } = {}): Promise<ModelOracleReport> {
  const metaPath = path.join(dir, 'expected.json');
  const meta = JSON.parse(await readFile(metaPath, 'utf8')) as ExpectedMeta;
  const engine = options.engine ?? (await Engine.fromHfFolder(dir));
  const exp = await SafetensorsFile.open(path.join(dir, 'expected.safetensors'));
  const report: ModelOracleReport = { family: meta.family ?? engine.modelType, errors: {}, worst_tensor: {}, ok: true };
  try {
    const ids = await exp.readInt32('input_ids');
    const [B, T] = exp.info('input_ids').shape;
    const lens = meta.seq_lens;
    const batch = packedBatch(ids, B, T, lens);
    const N = batch.tokens.length;
    const V = engine.config.vocab;
    const E = engine.config.numExperts;
    const has = (name: string) => exp.tensors.has(name);
    const r = await engine.forward(batch, { logits: has('logits'), logprobs: true, routerLogits: has('router_logits') });

    if (has('logits')) {
      const ref = await exp.read('logits');
      const flat = new Float32Array(N * V);
      let o = 0;
      for (let b = 0; b < B; b++) for (let t = 0; t < lens[b]; t++, o++) flat.set(ref.subarray((b * T + t) * V, (b * T + t + 1) * V), o * V);
      report.errors.logits = maxRelativeError(r.logits, flat);
    }
    if (has('logprobs')) {
      const ref = rowsFrom(await exp.read('logprobs'), B, T, lens);
      const mine = new Float32Array(r.logprobs);
      let o = 0;
      for (let b = 0; b < B; b++) {
        o += lens[b];
        mine[o - 1] = 0;
      }
      report.errors.logprobs = maxRelativeError(mine, ref);
    }
    if (has('router_logits') && engine.moeLayerCount > 0) {
      const ref = await exp.read('router_logits');
      const flat = new Float32Array(engine.moeLayerCount * N * E);
      for (let m = 0; m < engine.moeLayerCount; m++) {
        let o = 0;
        for (let b = 0; b < B; b++)
          for (let t = 0; t < lens[b]; t++, o++) flat.set(ref.subarray(((m * B + b) * T + t) * E, ((m * B + b) * T + t + 1) * E), (m * N + o) * E);
      }
      report.errors.router_logits = maxRelativeError(r.routerLogits, flat);
    }

    const mask = has('completion_mask') ? rowsFrom(await exp.read('completion_mask'), B, T, lens) : null;
    if (mask && meta.grpo && has('advantages') && has('old_logprobs')) {
      const advPerSeq = await exp.read('advantages');
      const advantages = new Float32Array(N);
      let o = 0;
      for (let b = 0; b < B; b++) for (let t = 0; t < lens[b]; t++) advantages[o++] = advPerSeq[b];
      const loss: LossInput = {
        type: 'grpo',
        mask,
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
      await engine.zeroGrad();
      const lr = await engine.forwardBackward(batch, loss);
      report.errors.grpo_loss = Math.abs(lr.loss - meta.grpo.value) / Math.abs(meta.grpo.value);
      const gfile = path.join(dir, 'expected_grads_grpo.safetensors');
      if (existsSync(gfile)) {
        const g = await gradientError(engine, gfile);
        report.errors.grads_grpo = g.error;
        report.worst_tensor.grads_grpo = g.worst;
      }
    }
    if (mask && meta.sft) {
      await engine.zeroGrad();
      const lr = await engine.forwardBackward(batch, { type: 'sft', mask, auxLossCoef: 0 });
      report.errors.sft_loss = Math.abs(lr.loss - meta.sft.value) / Math.abs(meta.sft.value);
      const gfile = path.join(dir, 'expected_grads_sft.safetensors');
      if (existsSync(gfile)) {
        const g = await gradientError(engine, gfile);
        report.errors.grads_sft = g.error;
        report.worst_tensor.grads_sft = g.worst;
      }
    }
    await engine.zeroGrad();

    if (has('greedy_tokens')) {
      const greedy = Array.from(await exp.readInt32('greedy_tokens'));
      const plen = meta.prompt_lens[0];
      const gen = createGenerator(engine, { numBlocks: Math.ceil(greedy.length / 16) + 2, blockSize: 16 });
      const [s] = await gen.generateAll({
        prompt: Array.from(ids.subarray(0, plen)),
        maxNewTokens: greedy.length - plen,
        temperature: 0,
        seed: 0,
        requestId: 0,
      });
      await gen.close();
      report.greedy_match = s.tokens.length === greedy.length - plen && s.tokens.every((t, i) => t === greedy[plen + i]);
    }
  } finally {
    await exp.close();
  }
  for (const [q, err] of Object.entries(report.errors) as [Quantity, number][]) {
    if (!(err <= TOLERANCES[q])) report.ok = false;
  }
  if (report.greedy_match === false) report.ok = false;
  return report;
}
