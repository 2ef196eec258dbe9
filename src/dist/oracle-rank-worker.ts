// One rank of a multi-process oracle run (src/dist/oracle-ranks.ts forks it): loads its block of experts,
// joins the others through the rendezvous service, computes the oracle's quantities for its share of the
// reference sequences (expert parallel, data parallel over sequences), optionally trains a few steps, and
// sends its pieces back over IPC. Every failure is reported as a message, never an unhandled exception.
import { Engine, expertBounds } from '../engine/engine.ts';
import { createGenerator } from '../engine/generator.ts';
import type { ExpertGradDtype, LossInput, PackedBatch } from '../engine/engine.ts';
import { readHfConfig, type RopeFreqDtype } from '../hf/config.ts';
import { readReference, type Reference } from '../oracle/model-oracle.ts';
import { type CommBackend, createCommunicator } from './communicator.ts';

export interface OracleWorkerConfig {
  dir: string;
  rank: number;
  worldSize: number;
  address: string;
  group: string;
  timeoutMs: number;
  trainSteps: number;
  lr: number;
  ropeFreqDtype: RopeFreqDtype;
  /** Collectives backend of the expert-parallel exchange: Gloo (CPU) or NCCL (one GPU per rank, host staging). */
  comm: CommBackend;
  /**
   * Run the engine on this rank's GPU (cuda:<rank>, the device the NCCL communicator takes) instead of the CPU:
   * needs comm 'nccl'. The greedy rollout then runs on the GPU rollout, collectively.
   */
  device?: boolean;
  /** With device: the routed experts' gradient precision on the GPU (toDevice's expertGradDtype; default float32). */
  expertGradDtype?: ExpertGradDtype;
  /** Expert bounds [ranks + 1] instead of the even split of expertBounds (uneven blocks). */
  bounds?: number[] | null;
  /** The rank of each reference sequence instead of round-robin (a rank given none runs idle). */
  assign?: number[] | null;
}

export interface OracleWorkerResult {
  type: 'result';
  rank: number;
  /** Global row index of each local row. */
  rows: number[];
  logits: Float32Array | null;
  logprobs: Float32Array;
  routerLogits: Float32Array | null; // [moeLayers, localN, E]
  grpoLoss: number | null;
  sftLoss: number | null;
  /** Dense tensors (rank 0 only, after the all-reduce) and this rank's expert tensors. */
  gradsGrpo: Record<string, Float32Array> | null;
  gradsSft: Record<string, Float32Array> | null;
  /** After trainSteps optimizer steps: logprobs of the local rows and the parameters this rank reports. */
  trainedLogprobs: Float32Array | null;
  trainedParams: Record<string, Float32Array> | null;
  /** Rank 0: greedy decoding of the reference prompt, generated collectively by all ranks. */
  greedyTokens: number[] | null;
}

export type OracleWorkerMessage = OracleWorkerResult | { type: 'error'; rank: number; message: string; name: string; code: string };

/** Sequences are dealt round-robin: sequence b goes to rank b % worldSize. */
export function localSequences(numSeqs: number, rank: number, worldSize: number): number[] {
  const out: number[] = [];
  for (let b = rank; b < numSeqs; b += worldSize) out.push(b);
  return out;
}

/** The local batch and the global row index of each local row. */
export function localSlice(batch: PackedBatch, seqs: number[]): { batch: PackedBatch; rows: number[] } {
  const offsets = [0];
  for (const l of batch.seqLens) offsets.push(offsets[offsets.length - 1] + l);
  const rows: number[] = [];
  for (const b of seqs) for (let i = offsets[b]; i < offsets[b + 1]; i++) rows.push(i);
  return {
    batch: { tokens: Int32Array.from(rows.map((i) => batch.tokens[i])), seqLens: Int32Array.from(seqs.map((b) => batch.seqLens[b])) },
    rows,
  };
}

const pick = (a: Float32Array, rows: number[]) => Float32Array.from(rows.map((i) => a[i]));

export function grpoLoss(ref: Reference, rows: number[]): LossInput | null {
  if (!ref.grpo || !ref.mask) return null;
  let total = 0;
  for (const m of ref.mask) total += m;
  return {
    ...ref.grpo,
    mask: pick(ref.mask, rows),
    advantages: pick(ref.grpo.advantages!, rows),
    oldLogprobs: pick(ref.grpo.oldLogprobs!, rows),
    refLogprobs: ref.grpo.refLogprobs ? pick(ref.grpo.refLogprobs, rows) : null,
    // Normalisers of the whole batch, so the ranks' shares add up to the one-rank loss.
    totalTokens: total,
    totalSeqs: ref.batch.seqLens.length,
  };
}

function reportedGrads(engine: Engine, rank: number): Record<string, Float32Array> {
  const out: Record<string, Float32Array> = {};
  const grads = engine.gradsByName();
  for (const p of engine.paramTable) if (p.kind === 'expert' || rank === 0) out[p.name] = new Float32Array(grads.get(p.name)!);
  return out;
}

async function run(config: OracleWorkerConfig): Promise<OracleWorkerResult> {
  const ref = await readReference(config.dir);
  const comm = await createCommunicator({
    rank: config.rank,
    worldSize: config.worldSize,
    rendezvous: { address: config.address, group: config.group, timeoutMs: config.timeoutMs },
    timeoutMs: config.timeoutMs,
    backend: config.comm,
  });
  try {
    const bounds = config.bounds ?? expertBounds((await readHfConfig(config.dir)).engine.numExperts, config.worldSize);
    const engine = await Engine.fromHfFolder(config.dir, {
      expertRange: [bounds[config.rank], bounds[config.rank + 1]],
      ropeFreqDtype: config.ropeFreqDtype,
    });
    engine.setParallel(comm, bounds);
    if (config.device) await engine.toDevice(`cuda:${config.rank}`, { expertGradDtype: config.expertGradDtype });
    // The host views of a GPU engine hold the values of the last syncToHost().
    const sync = async () => {
      if (config.device) await engine.syncToHost();
    };
    const seqs = config.assign
      ? config.assign.flatMap((r, b) => (r === config.rank ? [b] : []))
      : localSequences(ref.batch.seqLens.length, config.rank, config.worldSize);
    const { batch, rows } = localSlice(ref.batch, seqs);
    const fwd = await engine.forward(batch, { logits: ref.logits !== null, logprobs: true, routerLogits: ref.routerLogits !== null });
    const result: OracleWorkerResult = {
      type: 'result',
      rank: config.rank,
      rows,
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
    };
    const grpo = grpoLoss(ref, rows);
    if (grpo) {
      await engine.zeroGrad();
      result.grpoLoss = (await engine.forwardBackward(batch, grpo)).loss;
      await engine.allReduceDenseGrads();
      await sync();
      result.gradsGrpo = reportedGrads(engine, config.rank);
    }
    if (ref.mask && ref.sftLoss !== null) {
      let total = 0;
      for (const m of ref.mask) total += m;
      await engine.zeroGrad();
      result.sftLoss = (await engine.forwardBackward(batch, { type: 'sft', mask: pick(ref.mask, rows), totalTokens: total, auxLossCoef: 0 })).loss;
      await engine.allReduceDenseGrads();
      await sync();
      result.gradsSft = reportedGrads(engine, config.rank);
    }
    if (ref.greedyPrompt && ref.greedyTokens) {
      // Rollout under expert parallelism is collective: rank 0 decodes, the others take part with nothing.
      const gen = createGenerator(engine, { numBlocks: 8, blockSize: 16 });
      const requests =
        config.rank === 0 ? [{ prompt: ref.greedyPrompt, maxNewTokens: ref.greedyTokens.length, temperature: 0, seed: 0, requestId: 0 }] : [];
      for await (const s of gen.generateMany(requests)) result.greedyTokens = s.tokens;
      await gen.close();
    }
    if (config.trainSteps > 0 && grpo) {
      for (let s = 0; s < config.trainSteps; s++) {
        await engine.zeroGrad();
        await engine.forwardBackward(batch, { ...grpo, auxLossCoef: null });
        await engine.adamwStep({ lr: config.lr, maxGradNorm: 1, weightDecay: 0.01 });
      }
      result.trainedLogprobs = (await engine.forward(batch, { logprobs: true })).logprobs;
      await sync();
      const params = engine.paramsByName();
      result.trainedParams = {};
      for (const p of engine.paramTable) if (p.kind === 'expert' || config.rank === 0) result.trainedParams[p.name] = new Float32Array(params.get(p.name)!);
    }
    await engine.dispose();
    return result;
  } finally {
    await comm.dispose();
  }
}

// Forked with the configuration as JSON (also when this module is bundled into another entry point that forks
// itself as the worker, as test/gpu/ep-model.gpu.ts does).
if (process.send && process.argv[2]?.startsWith('{')) {
  const config = JSON.parse(process.argv[2] ?? '{}') as OracleWorkerConfig;
  run(config).then(
    (r) => process.send!(r, () => process.exit(0)),
    (e: unknown) => {
      const err = e as { message?: string; name?: string; code?: unknown };
      const m: OracleWorkerMessage = { type: 'error', rank: config.rank, message: String(err?.message ?? e), name: String(err?.name ?? 'Error'), code: String(err?.code ?? '') };
      process.send!(m, () => process.exit(1));
    },
  );
}
