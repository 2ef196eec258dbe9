// Expert + data parallelism inside the GPU engine: N GPU ranks (one process and one GPU each, NCCL, the engine's
// token exchange on device buffers) against the one-GPU engine, for each fixture and each split: logits, logprobs
// and router logits (the same bits: every forward kernel is row-invariant and the exchange moves the bf16 GEMM
// operands and fp32 outputs unchanged, combined in k order as on one GPU), GRPO and SFT losses (the ranks'
// shares add up to the one-GPU loss), every gradient (bf16 tolerance: dense gradients are summed over ranks and
// the backward GEMMs reduce in another order), and 3 AdamW steps (ZeRO-1: reduce-scatter, the dense shard, the
// all-gather; experts by their owner) giving the same logprobs and parameters within tolerance; and the GPU
// rollout under expert parallelism (rank 0 decodes greedily, the others step idle) giving the one-GPU tokens.
//
// Splits: 2 ranks even; 2 ranks uneven ([0, 3, 8]); 2 ranks with rank 1 idle (an empty batch in every call);
// 2 ranks uneven with the routed experts' gradients in bf16 (against the one-GPU engine's bf16 gradients);
// with 3 or more GPUs 3 ranks (8 experts over 3: [0, 3, 6, 8]); with 4 or more, 4 ranks (3 sequences: one idle).
// Prints one line per check; exit status 1 on any failure.
//
// Usage: MOEPILOT_ADDON=<moepilot.node> node ep-model-gpu.mjs [fixtures folder]
// (bundled by scripts/device/bundle.sh; the bundle forks itself as the ranks: oracle-rank-worker's entry point
// runs when the process is given a JSON configuration.)
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Engine, type ExpertGradDtype, type LossInput } from '../../src/engine/engine.ts';
import { createGenerator } from '../../src/engine/generator.ts';
import { readReference, type Outputs, type Reference } from '../../src/oracle/model-oracle.ts';
import { runRanks } from '../../src/dist/oracle-ranks.ts';
import { grpoLoss } from '../../src/dist/oracle-rank-worker.ts';

const TOL = { loss: 1e-6, grad: 1e-2, trained: 5e-3 };
const STEPS = 3;
const LR = 1e-3;
const FIXTURES = ['recomputed/qwen2_moe-tiny', 'qwen3_moe-tiny', 'mixtral-tiny'];

let failures = 0;
function report(ok: boolean, what: string, detail: string): void {
  if (!ok) failures++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}: ${detail}`);
}

function relL2(a: ArrayLike<number>, e: ArrayLike<number>, floor = 0): number {
  if (a.length !== e.length) return Infinity;
  let num = 0;
  let den = 0;
  for (let i = 0; i < e.length; i++) {
    num += (a[i] - e[i]) ** 2;
    den += e[i] * e[i];
  }
  const err = Math.sqrt(num) / Math.max(Math.sqrt(den), floor, 1e-30);
  return Number.isFinite(err) ? err : Infinity;
}

/** Elements whose bits differ (NaN-safe through the Float32 bit patterns). */
function bitDiffs(a: Float32Array, e: Float32Array): number {
  if (a.length !== e.length) return Infinity;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(e.buffer, e.byteOffset, e.length);
  let n = 0;
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) n++;
  return n;
}

function checkBits(what: string, got: Float32Array | null, want: Float32Array | null): void {
  if (!want) return;
  if (!got) return report(false, what, 'missing');
  const n = bitDiffs(got, want);
  report(n === 0, what, n === 0 ? `${want.length} values, same bits` : `${n} of ${want.length} values differ (rel L2 ${relL2(got, want).toExponential(3)})`);
}

// Every value of every routed expert's gradient a bf16 value (its low 16 bits zero): the ranks' engines kept them in bf16.
function checkBf16Grads(what: string, grads: Map<string, Float32Array> | null, experts: string[]): void {
  if (!grads) return report(false, what, 'missing');
  let values = 0;
  let wide = 0;
  for (const n of experts) {
    const g = grads.get(n);
    if (!g) return report(false, what, `no gradient for ${n}`);
    const bits = new Uint32Array(g.buffer, g.byteOffset, g.length);
    for (const b of bits) wide += b & 0xffff ? 1 : 0;
    values += g.length;
  }
  report(experts.length > 0 && wide === 0, what, `${experts.length} expert tensors, ${values} values, ${wide} not bf16`);
}

function checkScalar(what: string, got: number | null, want: number | null, tol: number): void {
  if (want === null) return;
  if (got === null) return report(false, what, 'missing');
  const err = Math.abs(got - want) / Math.max(Math.abs(want), 1e-12);
  report(err <= tol, what, `got ${got} want ${want} rel ${err.toExponential(3)} (tol ${tol})`);
}

/** Per tensor: rel L2 with a floor of 1e-2 of the largest tensor norm (an unused expert's ~0 gradient). */
function checkTensors(what: string, got: Map<string, Float32Array> | null, want: Map<string, Float32Array>, tol: number): void {
  if (!got) return report(false, what, 'missing');
  let maxNorm = 0;
  for (const e of want.values()) maxNorm = Math.max(maxNorm, Math.sqrt(e.reduce((s, x) => s + x * x, 0)));
  const errs = [...want].map(([name, e]) => ({ name, err: got.has(name) ? relL2(got.get(name)!, e, 1e-2 * maxNorm) : Infinity }));
  errs.sort((a, b) => b.err - a.err);
  const bad = errs.filter((x) => !(x.err <= tol)).length;
  const exact = [...want].filter(([name, e]) => got.has(name) && bitDiffs(got.get(name)!, e) === 0).length;
  report(bad === 0, what, `${want.size} tensors (${exact} same bits), ${bad} over ${tol}; worst ${errs.slice(0, 3).map((x) => `${x.name} ${x.err.toExponential(2)}`).join(', ')}`);
}

/** The oracle's outputs (model-oracle.ts), plus what the training steps and the start left. */
interface OneGpu extends Outputs {
  trainedLogprobs: Float32Array | null;
  trainedParams: Map<string, Float32Array> | null;
  startParams: Map<string, Float32Array>;
  /** The routed experts' parameter names. */
  experts: string[];
}

const copy = (m: Map<string, Float32Array>) => new Map([...m].map(([k, v]) => [k, new Float32Array(v)]));

/** The one-GPU engine (no set_parallel) doing what each rank of oracle-rank-worker does, on the whole batch. */
async function oneGpu(dir: string, ref: Reference, expertGradDtype: ExpertGradDtype): Promise<OneGpu> {
  const engine = await Engine.fromHfFolder(dir, { device: 'cuda:0', expertGradDtype });
  try {
    const startParams = copy(engine.paramsByName());
    const fwd = await engine.forward(ref.batch, { logits: ref.logits !== null, logprobs: true, routerLogits: ref.routerLogits !== null });
    const rows = Array.from({ length: ref.batch.tokens.length }, (_, i) => i);
    const out: OneGpu = {
      logits: ref.logits ? fwd.logits : null,
      logprobs: fwd.logprobs,
      routerLogits: ref.routerLogits ? fwd.routerLogits : null,
      grpoLoss: null,
      sftLoss: null,
      gradsGrpo: null,
      gradsSft: null,
      trainedLogprobs: null,
      trainedParams: null,
      greedyTokens: null,
      startParams,
      experts: engine.paramTable.filter((p) => p.kind === 'expert').map((p) => p.name),
    };
    const grpo: LossInput | null = grpoLoss(ref, rows);
    if (grpo) {
      await engine.zeroGrad();
      out.grpoLoss = (await engine.forwardBackward(ref.batch, grpo)).loss;
      await engine.syncToHost();
      out.gradsGrpo = copy(engine.gradsByName());
    }
    if (ref.mask && ref.sftLoss !== null) {
      let total = 0;
      for (const m of ref.mask) total += m;
      await engine.zeroGrad();
      out.sftLoss = (await engine.forwardBackward(ref.batch, { type: 'sft', mask: ref.mask, totalTokens: total, auxLossCoef: 0 })).loss;
      await engine.syncToHost();
      out.gradsSft = copy(engine.gradsByName());
    }
    if (ref.greedyPrompt && ref.greedyTokens) {
      // As oracle-rank-worker's rank 0 (8 blocks of 16).
      const gen = createGenerator(engine, { numBlocks: 8, blockSize: 16 });
      try {
        const [s] = await gen.generateAll({ prompt: ref.greedyPrompt, maxNewTokens: ref.greedyTokens.length, temperature: 0, seed: 0, requestId: 0 });
        out.greedyTokens = s.tokens;
      } finally {
        await gen.close();
      }
    }
    if (grpo) {
      for (let s = 0; s < STEPS; s++) {
        await engine.zeroGrad();
        await engine.forwardBackward(ref.batch, { ...grpo, auxLossCoef: null });
        await engine.adamwStep({ lr: LR, maxGradNorm: 1, weightDecay: 0.01 });
      }
      out.trainedLogprobs = (await engine.forward(ref.batch, { logprobs: true })).logprobs;
      await engine.syncToHost();
      out.trainedParams = copy(engine.paramsByName());
    }
    return out;
  } finally {
    await engine.dispose();
  }
}

interface Split {
  name: string;
  ranks: number;
  bounds?: number[];
  assign?: number[];
  /** The routed experts' gradient precision, on every rank and on the one-GPU engine it is compared with. */
  expertGrads?: ExpertGradDtype;
}

function splits(gpus: number, numSeqs: number): Split[] {
  const out: Split[] = [
    { name: '2 ranks', ranks: 2 },
    { name: '2 ranks uneven [0,3,8]', ranks: 2, bounds: [0, 3, 8] },
    { name: '2 ranks, rank 1 idle', ranks: 2, assign: Array(numSeqs).fill(0) },
    { name: '2 ranks uneven [0,3,8], bf16 expert grads', ranks: 2, bounds: [0, 3, 8], expertGrads: 'bfloat16' },
  ];
  if (gpus >= 3) out.push({ name: '3 ranks (8 experts: [0,3,6,8])', ranks: 3 });
  if (gpus >= 4) out.push({ name: `4 ranks (${numSeqs} sequences)`, ranks: 4 });
  return out;
}

async function main(): Promise<void> {
  const fixturesDir = process.argv[2] ?? path.join(process.env.REPO_ROOT ?? process.cwd(), 'test/fixtures');
  const gpus = Number(process.env.GPUS ?? execFileSync('nvidia-smi', ['-L'], { encoding: 'utf8' }).trim().split('\n').length);
  if (gpus < 2) {
    console.log(`ep-model: ${gpus} GPU(s): needs 2 or more`);
    process.exit(2);
  }
  process.env.NCCL_NVLS_ENABLE ??= '0';
  const self = fileURLToPath(import.meta.url);
  const worker = { path: self, execArgv: self.endsWith('.ts') ? ['--import', 'tsx'] : [] };
  console.log(`ep-model: ${gpus} GPUs`);
  for (const fixture of FIXTURES) {
    const dir = path.join(fixturesDir, fixture);
    const ref = await readReference(dir);
    const oneByDtype = new Map<ExpertGradDtype, OneGpu>();
    for (const split of splits(gpus, ref.batch.seqLens.length)) {
      const tag = `${fixture} ${split.name}`;
      const dtype = split.expertGrads ?? 'float32';
      if (!oneByDtype.has(dtype)) oneByDtype.set(dtype, await oneGpu(dir, ref, dtype));
      const one = oneByDtype.get(dtype)!;
      let run;
      try {
        run = await runRanks(dir, {
          ranks: split.ranks,
          comm: 'nccl',
          device: true,
          bounds: split.bounds,
          assign: split.assign,
          expertGradDtype: split.expertGrads,
          trainSteps: STEPS,
          lr: LR,
          timeoutMs: 120_000,
          worker,
        });
      } catch (e) {
        report(false, tag, `ranks failed: ${(e as Error).message}`);
        continue;
      }
      const o = run.outputs;
      checkBits(`${tag}: logits`, o.logits, one.logits);
      checkBits(`${tag}: logprobs`, o.logprobs, one.logprobs);
      checkBits(`${tag}: router logits`, o.routerLogits, one.routerLogits);
      checkScalar(`${tag}: grpo loss`, o.grpoLoss, one.grpoLoss, TOL.loss);
      checkScalar(`${tag}: sft loss`, o.sftLoss, one.sftLoss, TOL.loss);
      if (one.gradsGrpo) checkTensors(`${tag}: grpo gradients`, o.gradsGrpo, one.gradsGrpo, TOL.grad);
      if (one.gradsSft) checkTensors(`${tag}: sft gradients`, o.gradsSft, one.gradsSft, TOL.grad);
      if (dtype === 'bfloat16' && one.gradsGrpo) checkBf16Grads(`${tag}: grpo expert gradients held in bf16`, o.gradsGrpo, one.experts);
      if (one.greedyTokens) {
        const same = JSON.stringify(o.greedyTokens) === JSON.stringify(one.greedyTokens);
        report(same, `${tag}: greedy rollout (GPU, expert parallel)`, same ? `${one.greedyTokens.length} tokens equal` : `got ${JSON.stringify(o.greedyTokens)} want ${JSON.stringify(one.greedyTokens)}`);
      }
      if (one.trainedLogprobs && one.trainedParams) {
        const t = run.trained;
        if (!t) {
          report(false, `${tag}: after ${STEPS} AdamW steps`, 'missing');
          continue;
        }
        const e = relL2(t.logprobs, one.trainedLogprobs);
        report(e <= TOL.trained, `${tag}: logprobs after ${STEPS} AdamW steps`, `rel L2 ${e.toExponential(3)} (tol ${TOL.trained}; ${bitDiffs(t.logprobs, one.trainedLogprobs)} values differ in bits)`);
        checkTensors(`${tag}: parameters after ${STEPS} AdamW steps`, t.params, one.trainedParams, TOL.trained);
        // The comparison above means something only if the steps moved the parameters well past its tolerance: a
        // rank that skipped its update would then fail it.
        let moved = 0;
        for (const [n, p] of one.trainedParams) moved = Math.max(moved, relL2(p, one.startParams.get(n)!));
        report(moved > 4 * TOL.trained, `${tag}: training moved the parameters`, `largest per-tensor rel L2 change ${moved.toExponential(3)} (must exceed ${4 * TOL.trained})`);
      }
    }
  }
  console.log(`ep-model: ${failures} failure(s)`);
  process.exit(failures ? 1 : 0);
}

// The bundle is also each rank's entry point (forked with a JSON configuration): then only the worker runs.
if (!process.argv[2]?.startsWith('{')) {
  main().catch((e: unknown) => {
    console.error(e);
    process.exit(1);
  });
}
