// The rank service: one process per device, holding the engine with the policy weights and serving both
// RolloutService (Generate) and TrainerService on it, so rollout always samples from the weights the last
// OptimizerStep produced, with no copy or reload.
//
// Collective phases (worldSize > 1). The ranks form one expert-parallel group (rank r holds experts
// [bounds[r], bounds[r+1]) of expertBounds(E, W), dense weights replicated). Every call that runs the
// model is then a COLLECTIVE PHASE: the coordinator makes the same call on every rank at once, in the
// same order on every rank, each rank with its own share of the work:
//   - LoadModel: all ranks (they meet through the rendezvous service to build the communicator);
//   - Generate: all ranks, each with its own prompts; a rank may get zero prompts and still takes part
//     (its stream then ends with no samples when every rank is done);
//   - TrainBatch, ComputeLogprobs: all ranks, each with its own sequences; a rank may get no micro-batch or
//     empty ones (the ranks agree on the number of micro-batches first and pad with empty ones);
//   - OptimizerStep: all ranks (gradient reduce-scatter, ZeRO-1 update, norm).
// SaveShard, LoadShard and GetMetrics are local. Calls are serialised on each rank in arrival order, so
// the coordinator must not issue two phases concurrently. A request a rank refuses (INVALID_ARGUMENT...)
// still takes part in its phase with no work, so the other ranks are not stranded; and a phase past its
// deadline still runs (stopping one rank would strand the others until the communicator times out).
// With one rank, Generate, TrainBatch and ComputeLogprobs may overlap (the engine queues their native
// calls); LoadModel, LoadShard and OptimizerStep wait for them and run alone, so a rollout never mixes
// two versions of the weights.
//
// Gradient rule: gradients accumulate over every micro-batch of every TrainBatch call with the same
// `step` until OptimizerStep, which applies them and zeroes them. The first TrainBatch of a step (the first
// after LoadModel, LoadShard or OptimizerStep, or one whose `step` differs from the pending one: a step
// that never got its OptimizerStep is discarded) zeroes the gradients before its first micro-batch.
//
// Loss normalisers: global_tokens / global_sequences count the whole step over all ranks and
// micro-batches, so the ranks' gradients add up to one pass over the batch; 0 means "this call's own"
// (right only for one rank and one call). TrainBatch and ComputeLogprobs compute logprobs of
// logits / temperature (the request's; the rollout's sampling temperature). LossMetrics.loss is this rank's share of the step's loss (the sum
// over ranks is the batch loss); kl, entropy, clip fractions and approx_kl are means over this rank's
// masked tokens, with the raw sums in `extra` for exact aggregation.
import { createHash } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { SpanStatusCode, trace, type Tracer } from '@opentelemetry/api';
import {
  CancelledError,
  DeadlineExceededError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  ResourceExhaustedError,
} from '../common/errors.ts';
import type { ServiceImpl } from '../common/grpc-server.ts';
import type { Tensor } from '../../proto/gen/pilot/v1/common.ts';
import {
  FinishReason,
  type GenerateRequest,
  type GenerateResponse,
  type RolloutServiceService,
} from '../../proto/gen/pilot/v1/rollout.ts';
import {
  KlEstimator,
  LogprobModel,
  LossAggregation,
  type AwaitShardRequest,
  type ComputeLogprobsRequest,
  type ComputeLogprobsResponse,
  type GetMetricsResponse,
  type LoadModelRequest,
  type LoadModelResponse,
  type LoadShardRequest,
  type LoadShardResponse,
  type LossMetrics,
  type ModelInfo,
  type OptimizerStepRequest,
  type OptimizerStepResponse,
  type SaveShardRequest,
  type SaveShardResponse,
  type TrainBatchRequest,
  type TrainBatchResponse,
  type TrainerServiceService,
} from '../../proto/gen/pilot/v1/trainer.ts';
import { createCommunicator, type Communicator } from '../../src/dist/communicator.ts';
import { Engine, expertBounds, isExpertGradDtype, parseDevice, type Aggregation, type ExpertGradDtype, type PackedBatch } from '../../src/engine/engine.ts';
import type { NativePhaseTimes } from '../../src/engine/native.ts';
import { createGenerator, type GenerateRequest as EngineGenerateRequest, type Generator, type Sample } from '../../src/engine/generator.ts';
import { readHfConfig, type ParsedHfConfig } from '../../src/hf/config.ts';
import { loadTokenizer, type Tokenizer } from '../../src/tokenizer/index.ts';
import { loadShard, snapshotShard, writeShard, type ShardFileInfo } from './shard.ts';
import { nativeTimeAttributes } from './native-times.ts';
import { f32Tensor, fromRows, i32Tensor, i64Tensor, readF32, readMask, readPacked, toRows } from './tensors.ts';

export interface RankServiceConfig {
  rank: number;
  worldSize: number;
  /** Where the ranks meet (the coordinator hosts it); required when worldSize > 1. */
  rendezvous: { address: string; group: string; timeoutMs: number } | null;
  /** Bound on every collective between ranks (ms). */
  commTimeoutMs: number;
  /**
   * Where the other ranks reach this one for the collectives: a host name or IP, or a network interface
   * name (wins when set). null, null: 127.0.0.1 (all ranks on one machine).
   */
  commHost?: string | null;
  commIface?: string | null;
  /** KV cache blocks of the generator (allocated at LoadModel). */
  kvBlocks: number;
  /** Tokens per KV block. */
  blockSize: number;
  /** Most prompts one Generate call may carry. */
  maxPrompts: number;
  /**
   * One rank alone: samples queued or generating over all Generate calls at most; a call past it gets
   * RESOURCE_EXHAUSTED at once instead of waiting behind an unbounded queue. Default 8192.
   */
  maxQueuedSamples?: number;
  /** Path of moepilot.node; null: kernels/build/moepilot.node. */
  addonPath: string | null;
  /**
   * Where the policy trains: 'cpu' (default) or 'cuda' / 'cuda:N' (the engine's CUDA backend, bf16). The rollout
   * runs there too (the generator's GPU backend); a reference model runs on the CPU. With world size > 1 the ranks'
   * group is an NCCL communicator on that GPU (the GPU engine exchanges device buffers): every rank of the group
   * must be on a GPU, one GPU each.
   */
  device?: string | null;
  /**
   * With a GPU device: the routed experts' gradients in 'bfloat16' (half their memory and the bytes of their
   * weight-gradient products; micro-batches accumulate in bf16) or 'float32' (default). See ToDeviceOptions.
   */
  expertGradDtype?: ExpertGradDtype;
}

export interface RankServiceDeps {
  tracer: Tracer | null;
  /**
   * sha256 of a shard file (a HashPool's: on its threads, several files at once): the files LoadShard reads, and
   * the files SaveShard writes, hashed as they are flushed so that a background save leaves the event loop to the
   * calls it runs behind. Absent: on the service's thread.
   */
  hashFile?: (path: string) => Promise<string>;
}

export interface RankService {
  readonly rollout: ServiceImpl<typeof RolloutServiceService>;
  readonly trainer: ServiceImpl<typeof TrainerServiceService>;
  /** LoadModel without a gRPC call (main.ts's MODEL_DIR). */
  loadModel(request: LoadModelRequest, signal?: AbortSignal): Promise<LoadModelResponse>;
  /** Whether a model is loaded. */
  readonly loaded: boolean;
  /** Waits for work in flight, frees the model and leaves the process group. */
  dispose(): Promise<void>;
}

interface Loaded {
  dir: string;
  /** LoadModel's seed: the base of the sampling seeds the rank picks itself. */
  seed: number;
  generateCalls: number;
  parsed: ParsedHfConfig;
  engine: Engine;
  reference: Engine | null;
  generator: Generator;
  tokenizer: Tokenizer | null;
  bounds: number[];
  info: ModelInfo;
}

interface Counters {
  samplesGenerated: number;
  tokensGenerated: number;
  tokensTrained: number;
  trainBatches: number;
  microBatches: number;
  optimizerSteps: number;
  skippedSteps: number;
}

// ---- a small FIFO read/write lock: shared work may overlap, exclusive work runs alone ----

interface Lock {
  run<T>(exclusive: boolean, fn: () => Promise<T>): Promise<T>;
  /** Acquires and returns the release function (for work that spans an async generator). */
  acquire(exclusive: boolean): Promise<() => void>;
}

function createLock(): Lock {
  let active = 0;
  let exclusiveHeld = false;
  const waiting: { exclusive: boolean; go: () => void }[] = [];
  const pump = () => {
    while (waiting.length > 0 && !exclusiveHeld) {
      const w = waiting[0];
      if (w.exclusive) {
        if (active > 0) return;
        exclusiveHeld = true;
      }
      active++;
      waiting.shift();
      w.go();
    }
  };
  async function acquire(exclusive: boolean): Promise<() => void> {
    await new Promise<void>((go) => {
      waiting.push({ exclusive, go });
      pump();
    });
    let released = false;
    return () => {
      if (released) return;
      released = true;
      active--;
      if (exclusive) exclusiveHeld = false;
      pump();
    };
  }
  return {
    acquire,
    async run(exclusive, fn) {
      const release = await acquire(exclusive);
      try {
        return await fn();
      } finally {
        release();
      }
    },
  };
}

// ---- helpers ----

function checkSignal(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new DeadlineExceededError(`${what}: the call was cancelled or its deadline passed before the work started`);
}

/** The engine's own argument checks (RangeError/TypeError) become INVALID_ARGUMENT. */
async function engineCall<T>(what: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof RangeError || e instanceof TypeError) throw new InvalidArgumentError(null, `${what}: ${e.message}`, { cause: e });
    throw e;
  }
}

/** A stable 64-bit random-stream id for a prompt: the same prompt id and seed give the same samples. */
export function requestIdOf(promptId: string): bigint {
  return createHash('sha256').update(promptId).digest().readBigUInt64LE(0);
}

const AGGREGATIONS: Readonly<Record<number, Aggregation>> = {
  [LossAggregation.LOSS_AGGREGATION_UNSPECIFIED]: 'token-mean',
  [LossAggregation.LOSS_AGGREGATION_TOKEN_MEAN]: 'token-mean',
  [LossAggregation.LOSS_AGGREGATION_SEQ_MEAN_TOKEN_MEAN]: 'seq-mean-token-mean',
  [LossAggregation.LOSS_AGGREGATION_SEQ_MEAN_TOKEN_SUM]: 'seq-mean-token-sum-norm',
};

interface TrainMicroBatch {
  batch: PackedBatch;
  mask: Float32Array;
  advantages: Float32Array;
  oldLogprobs: Float32Array;
  refLogprobs: Float32Array | null;
}

/**
 * Per-row weights of the aggregation (loss = sum_i w_i * per_token_i), as the engine computes them
 * (kernels/model/forward.cpp), to split the KL term out of the loss for pg_loss.
 */
function aggregationWeights(agg: Aggregation, mask: Float32Array, seqLens: Int32Array, totalTokens: number, totalSeqs: number, normLength: number): Float64Array {
  const w = new Float64Array(mask.length);
  const seqTokens: number[] = [];
  let o = 0;
  let tokens = 0;
  for (const l of seqLens) {
    let t = 0;
    for (let i = o; i < o + l; i++) t += mask[i];
    seqTokens.push(t);
    tokens += t;
    o += l;
  }
  const S = totalSeqs > 0 ? totalSeqs : seqLens.length;
  o = 0;
  seqLens.forEach((l, b) => {
    for (let i = o; i < o + l; i++) {
      if (agg === 'token-mean') {
        const D = totalTokens > 0 ? totalTokens : tokens;
        w[i] = D > 0 ? mask[i] / D : 0;
      } else if (agg === 'seq-mean-token-mean') {
        w[i] = seqTokens[b] > 0 ? mask[i] / (seqTokens[b] * S) : 0;
      } else {
        const Ln = normLength > 0 ? normLength : Math.max(0, ...seqTokens);
        w[i] = Ln > 0 ? mask[i] / (S * Ln) : 0;
      }
    }
    o += l;
  });
  return w;
}

function finishReasonOf(s: Sample, eos: ReadonlySet<number>): FinishReason {
  switch (s.finishReason) {
    case 'stop':
      return s.tokens.length > 0 && eos.has(s.tokens[s.tokens.length - 1]) ? FinishReason.FINISH_REASON_EOS : FinishReason.FINISH_REASON_STOP;
    case 'stop_string':
      return FinishReason.FINISH_REASON_STOP;
    case 'length':
      return FinishReason.FINISH_REASON_LENGTH;
    default:
      return FinishReason.FINISH_REASON_ABORTED;
  }
}

/** The text with everything from the first stop string on removed. */
function cutAtStop(text: string, stops: readonly string[]): string {
  let cut = text.length;
  for (const s of stops) {
    const i = text.indexOf(s);
    if (i >= 0 && i < cut) cut = i;
  }
  return text.slice(0, cut);
}

function modelInfo(parsed: ParsedHfConfig, engine: Engine, rank: number, worldSize: number): ModelInfo {
  const c = engine.config;
  let dense = 0;
  let expert = 0;
  for (const p of engine.paramTable) {
    if (p.kind === 'expert') expert += p.numel;
    else dense += p.numel;
  }
  const local = c.expertEnd - c.expertBegin;
  const raw = parsed.raw as { architectures?: unknown };
  const arch = Array.isArray(raw.architectures) && typeof raw.architectures[0] === 'string' ? raw.architectures[0] : parsed.modelType;
  return {
    architecture: arch,
    numLayers: c.layers,
    hiddenSize: c.hidden,
    numExperts: c.numExperts,
    expertsPerToken: c.topK,
    vocabSize: c.vocab,
    // The whole model's count (every expert), not only this rank's block.
    numParameters: dense + (local > 0 ? (expert / local) * c.numExperts : 0),
    rank,
    worldSize,
  };
}

// ---- the service ----

export function createRankService(deps: RankServiceDeps, config: RankServiceConfig): RankService {
  const { rank, worldSize } = config;
  if (!Number.isInteger(worldSize) || worldSize < 1) throw new InvalidArgumentError('worldSize', `must be an integer >= 1, got ${worldSize}`);
  if (!Number.isInteger(rank) || rank < 0 || rank >= worldSize) throw new InvalidArgumentError('rank', `must be an integer in [0, ${worldSize}), got ${rank}`);
  if (worldSize > 1 && !config.rendezvous) throw new InvalidArgumentError('rendezvous', `worldSize ${worldSize} needs a rendezvous address`);
  if (!Number.isInteger(config.kvBlocks) || config.kvBlocks < 1) throw new InvalidArgumentError('kvBlocks', `must be an integer >= 1, got ${config.kvBlocks}`);
  if (!Number.isInteger(config.blockSize) || config.blockSize < 1) throw new InvalidArgumentError('blockSize', `must be an integer >= 1, got ${config.blockSize}`);
  // The policy's device: null for the CPU. Validated here so that a bad flag fails at start, not at LoadModel.
  let device: string | null = null;
  if (config.device != null && config.device !== 'cpu') {
    try {
      parseDevice(config.device);
    } catch (e) {
      throw new InvalidArgumentError('device', (e as Error).message);
    }
    device = config.device;
  }
  const expertGradDtype = config.expertGradDtype ?? 'float32';
  if (!isExpertGradDtype(expertGradDtype))
    throw new InvalidArgumentError('expertGradDtype', `must be 'float32' or 'bfloat16', got '${String(expertGradDtype)}'`);
  if (expertGradDtype === 'bfloat16' && device === null)
    throw new InvalidArgumentError('expertGradDtype', 'bfloat16 expert gradients need a GPU device (the CPU engine keeps fp32 gradients)');
  const parallel = worldSize > 1;
  const lock = createLock();
  let comm: Communicator | null = null;
  let loaded: Loaded | null = null;
  let disposed = false;
  // Optimizer state of the step: the `step` whose gradients are accumulating (null: none), and the step
  // of the last OptimizerStep (or of the loaded shard).
  let pendingStep: number | null = null;
  let step = 0;
  let lastLoss: LossMetrics | undefined;
  let expertLoad: Float64Array | null = null; // [moeLayers * E] since the last GetMetrics
  const counters: Counters = { samplesGenerated: 0, tokensGenerated: 0, tokensTrained: 0, trainBatches: 0, microBatches: 0, optimizerSteps: 0, skippedSteps: 0 };

  const span = () => trace.getActiveSpan();
  // Model work: exclusive with several ranks (phases are collective and must not interleave).
  const runPhase = <T>(fn: () => Promise<T>) => lock.run(parallel, fn);
  // Before a collective phase: with one rank a call past its deadline does not start; with several it
  // joins anyway (the other ranks would otherwise wait for it until the communicator times out).
  const checkStart = (signal: AbortSignal, what: string) => {
    if (!parallel) checkSignal(signal, what);
  };

  /**
   * With several ranks, a request this rank refuses (INVALID_ARGUMENT and the like) still takes part in
   * the collective phase with no work, so the other ranks are not stranded; the refusal is answered after.
   */
  async function refuseInPhase(error: unknown, idle: () => Promise<unknown>): Promise<never> {
    if (parallel && loaded) await runPhase(idle).catch(() => undefined);
    throw error;
  }

  function model(): Loaded {
    if (disposed) throw new FailedPreconditionError('the rank service is shutting down');
    if (!loaded) throw new FailedPreconditionError('no model is loaded: call LoadModel first');
    return loaded;
  }

  /** With several ranks: the largest count over the ranks, so every rank makes as many collective calls. */
  async function agreeCount(count: number): Promise<number> {
    if (!parallel) return count;
    const all = await comm!.allGather(Int32Array.of(count), Array(worldSize).fill(1));
    return Math.max(...all);
  }

  // The load-balancing loss of micro-batch k is one loss over the tokens every rank brings to it (the engine
  // reduces its expert counts and probability mass over the group), and its gradient reaches each rank's tokens
  // through the scale that rank passes. So every rank must pass the same scale, the global micro-batch's share of
  // the step's masked tokens: per rank, its own share would shrink the loss's gradient by the number of ranks.
  async function globalMasked(mbs: readonly { mask: Float32Array }[]): Promise<Float64Array> {
    const own = Float64Array.from(mbs, (mb) => mb.mask.reduce((a, x) => a + x, 0));
    return parallel ? comm!.allReduceSum(own) : own;
  }

  // Background SaveShards by dir (resolved): the write of each, kept until AwaitShard takes its files. A GPU
  // engine's write reads the engine's host buffers, so whatever refreshes or frees them waits for the writes first
  // (settledWrites).
  const backgroundWrites = new Map<string, Promise<ShardFileInfo[]>>();
  async function settledWrites(): Promise<void> {
    await Promise.allSettled(backgroundWrites.values());
  }

  async function freeModel(): Promise<void> {
    await settledWrites();
    const old = loaded;
    loaded = null;
    if (!old) return;
    await old.generator.close();
    await old.engine.dispose();
    await old.reference?.dispose();
  }

  async function loadEngine(dir: string, bounds: number[], device: string | null): Promise<Engine> {
    let engine: Engine;
    try {
      engine = await Engine.fromHfFolder(dir, { expertRange: [bounds[rank], bounds[rank + 1]], addonPath: config.addonPath ?? undefined });
    } catch (e) {
      const err = e as Error & { code?: unknown };
      if (err?.name === 'EngineError' && err.code !== 'INVALID_ARGUMENT' && err.code !== 'IO') throw e;
      throw new InvalidArgumentError('model_dir', `${dir} is not a loadable model folder: ${err?.message ?? String(e)}`, { cause: e });
    }
    if (!device) return engine;
    try {
      await engine.toDevice(device, { expertGradDtype });
      return engine;
    } catch (e) {
      await engine.dispose().catch(() => undefined);
      const err = e as Error & { code?: unknown };
      if (err?.name === 'EngineError' && err.code !== 'INVALID_ARGUMENT') throw e;
      throw new InvalidArgumentError('device', `${device}: ${err?.message ?? String(e)}`, { cause: e });
    }
  }

  async function loadModel(req: LoadModelRequest, signal?: AbortSignal): Promise<LoadModelResponse> {
    if (disposed) throw new FailedPreconditionError('the rank service is shutting down');
    if (!req.modelDir) throw new InvalidArgumentError('model_dir', 'is required (a Hugging Face model folder)');
    const dir = resolve(req.modelDir);
    if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new InvalidArgumentError('model_dir', `${req.modelDir} does not exist or is not a folder`);
    const computeDtype = device ? 'bf16' : 'f32';
    if (req.dtype !== '' && req.dtype !== computeDtype) {
      throw new InvalidArgumentError(
        'dtype',
        `this rank's engine computes in ${computeDtype} (${device ?? 'cpu'}); "${req.dtype}" is not supported (leave it empty or "${computeDtype}")`,
      );
    }
    checkSignal(signal, 'LoadModel');
    // A LoadModel replaces the group. A collective still waiting on the old one (its coordinator died between
    // dispatching a phase to the ranks) would hold the lock until the communication timeout: abort it, so that
    // the phase fails now and the new model loads at once.
    if (parallel && comm) {
      try {
        comm.abort('LoadModel: a new model and group replace this one');
      } catch {
        // already disposed: nothing waits on it
      }
    }
    return lock.run(true, async () => {
      const started = performance.now();
      let parsed: ParsedHfConfig;
      try {
        parsed = await readHfConfig(dir);
      } catch (e) {
        throw new InvalidArgumentError('model_dir', `${req.modelDir} is not a valid model folder: ${(e as Error).message}`, { cause: e });
      }
      let bounds: number[];
      try {
        bounds = expertBounds(parsed.engine.numExperts, worldSize);
      } catch (e) {
        throw new InvalidArgumentError('model_dir', `${req.modelDir}: ${(e as Error).message}`, { cause: e });
      }
      // The old model goes first, so the new one never needs memory for both.
      await freeModel();
      pendingStep = null;
      step = 0;
      lastLoss = undefined;
      expertLoad = null;
      const engine = await loadEngine(dir, bounds, device);
      const reference = req.keepReference ? await loadEngine(dir, bounds, null) : null;
      let tokenizer: Tokenizer | null = null;
      if (existsSync(join(dir, 'tokenizer.json'))) {
        try {
          tokenizer = await loadTokenizer(dir);
        } catch (e) {
          throw new InvalidArgumentError('model_dir', `${req.modelDir}: tokenizer: ${(e as Error).message}`, { cause: e });
        }
      }
      if (parallel) {
        // A fresh group for every LoadModel: a communicator that failed (a peer lost, a timeout) stays
        // aborted, so loading again is also how the ranks recover.
        await comm?.dispose().catch(() => undefined);
        comm = null;
        comm = await createCommunicator({
          rank,
          worldSize,
          rendezvous: { address: config.rendezvous!.address, group: config.rendezvous!.group, timeoutMs: config.rendezvous!.timeoutMs },
          timeoutMs: config.commTimeoutMs,
          host: config.commHost ?? null,
          iface: config.commIface ?? null,
          // A GPU engine's exchanges pass device buffers: NCCL on the policy's GPU. (The CPU reference engine runs
          // its collectives over the same group: NCCL stages host buffers.)
          ...(device ? { backend: 'nccl' as const, device: parseDevice(device) } : {}),
        });
        engine.setParallel(comm, bounds);
        reference?.setParallel(comm, bounds);
      }
      const generator = createGenerator(engine, { numBlocks: config.kvBlocks, blockSize: config.blockSize, decoder: tokenizer, addonPath: config.addonPath ?? undefined });
      const info = modelInfo(parsed, engine, rank, worldSize);
      loaded = { dir, seed: req.seed, generateCalls: 0, parsed, engine, reference, generator, tokenizer, bounds, info };
      span()?.setAttributes({
        'rank.model_dir': dir,
        'rank.expert_begin': bounds[rank],
        'rank.expert_end': bounds[rank + 1],
        'rank.keep_reference': req.keepReference,
        'rank.load_ms': performance.now() - started,
      });
      return { info };
    });
  }

  // ---- Generate ----

  let samplesQueued = 0;

  function buildRequests(m: Loaded, req: GenerateRequest): { requests: EngineGenerateRequest[]; promptIds: Map<bigint, string>; stops: string[]; eos: Set<number> } {
    if (!Number.isInteger(req.n) || req.n < 1) throw new InvalidArgumentError('n', `samples per prompt must be >= 1, got ${req.n}`);
    if (req.prompts.length > config.maxPrompts) throw new ResourceExhaustedError(`prompts: at most ${config.maxPrompts} prompts per Generate call, got ${req.prompts.length}`);
    const s = req.sampling;
    if (!s) throw new InvalidArgumentError('sampling', 'is required (at least max_new_tokens)');
    if (!Number.isInteger(s.maxNewTokens) || s.maxNewTokens < 1) throw new InvalidArgumentError('sampling.max_new_tokens', `must be >= 1, got ${s.maxNewTokens}`);
    if (!(s.temperature >= 0) || !Number.isFinite(s.temperature)) throw new InvalidArgumentError('sampling.temperature', `must be >= 0, got ${s.temperature}`);
    if (!Number.isInteger(s.topK) || s.topK < 0) throw new InvalidArgumentError('sampling.top_k', `must be >= 0, got ${s.topK}`);
    if (!(s.topP >= 0 && s.topP <= 1)) throw new InvalidArgumentError('sampling.top_p', `must be in [0, 1], got ${s.topP}`);
    if (!(s.minP >= 0 && s.minP < 1)) throw new InvalidArgumentError('sampling.min_p', `must be in [0, 1), got ${s.minP}`);
    if (s.stop.some((x) => x.length === 0)) throw new InvalidArgumentError('sampling.stop', 'stop strings must not be empty');
    if (s.stop.length > 0 && !m.tokenizer) throw new InvalidArgumentError('sampling.stop', `stop strings need a tokenizer and ${m.dir} has no tokenizer.json`);
    const V = m.engine.config.vocab;
    for (const id of s.stopTokenIds) if (!(id >= 0 && id < V)) throw new InvalidArgumentError('sampling.stop_token_ids', `${id} is outside the vocabulary [0, ${V})`);
    const eos = new Set(m.tokenizer?.eosTokenIds ?? []);
    const stopIds = [...new Set([...eos, ...s.stopTokenIds])];
    // Unset: the rank picks one from LoadModel's seed and a call counter, so a whole run replays for a seed.
    const seed = s.seed !== undefined ? BigInt(s.seed) : createHash('sha256').update(`${m.seed}/${rank}/${m.generateCalls++}`).digest().readBigUInt64LE(0);
    const promptIds = new Map<bigint, string>();
    const requests = req.prompts.map((p, i): EngineGenerateRequest => {
      const field = `prompts[${i}]`;
      if (!p.promptId) throw new InvalidArgumentError(`${field}.prompt_id`, 'is required (it names the prompt on every sample)');
      let ids: number[];
      if (p.input?.$case === 'tokenIds') {
        if (p.applyChatTemplate) throw new InvalidArgumentError(`${field}.apply_chat_template`, 'applies to text prompts only; token ids are already templated');
        ids = p.input.value.ids;
        ids.forEach((id, j) => {
          if (!(id >= 0 && id < V)) throw new InvalidArgumentError(`${field}.token_ids.ids`, `id ${j} is ${id}, outside the vocabulary [0, ${V})`);
        });
      } else if (p.input?.$case === 'text') {
        if (!m.tokenizer) throw new InvalidArgumentError(`${field}.text`, `text prompts need a tokenizer and ${m.dir} has no tokenizer.json`);
        if (p.applyChatTemplate) {
          let rendered: string;
          try {
            rendered = m.tokenizer.applyChatTemplate([{ role: 'user', content: p.input.value }], { addGenerationPrompt: true });
          } catch (e) {
            throw new InvalidArgumentError(`${field}.apply_chat_template`, (e as Error).message, { cause: e });
          }
          ids = m.tokenizer.encode(rendered, { addSpecialTokens: false });
        } else {
          ids = m.tokenizer.encode(p.input.value);
        }
      } else {
        throw new InvalidArgumentError(`${field}.input`, 'needs token_ids or text');
      }
      if (ids.length === 0) throw new InvalidArgumentError(field, 'the prompt has no tokens');
      const requestId = requestIdOf(p.promptId);
      if (promptIds.has(requestId)) throw new InvalidArgumentError(`${field}.prompt_id`, `"${p.promptId}" is given twice`);
      promptIds.set(requestId, p.promptId);
      const need = m.generator.blocksNeeded(ids.length, req.n, s.maxNewTokens);
      if (need > config.kvBlocks) {
        throw new ResourceExhaustedError(`${field}: ${ids.length} prompt tokens with n = ${req.n} and max_new_tokens = ${s.maxNewTokens} need ${need} KV blocks; the rank has ${config.kvBlocks}`);
      }
      return {
        prompt: ids,
        n: req.n,
        maxNewTokens: s.maxNewTokens,
        temperature: s.temperature,
        topK: s.topK,
        topP: s.topP === 0 ? 1 : s.topP,
        minP: s.minP,
        seed,
        requestId,
        stopTokenIds: stopIds,
        stopStrings: s.stop,
        returnExperts: req.returnExperts,
      };
    });
    return { requests, promptIds, stops: s.stop, eos };
  }

  async function* generate(req: GenerateRequest, signal: AbortSignal): AsyncGenerator<GenerateResponse> {
    const m = model();
    let built: ReturnType<typeof buildRequests>;
    try {
      built = buildRequests(m, req);
    } catch (e) {
      return await refuseInPhase(e, async () => {
        for await (const _ of m.generator.generateMany([])) void _;
      });
    }
    const { requests, promptIds, stops, eos } = built;
    const promptLens = new Map(requests.map((r) => [BigInt(r.requestId), r.prompt.length]));
    checkStart(signal, 'Generate');
    // Backpressure (one rank: with several, the coordinator drives collective phases one at a time).
    const wanted = requests.reduce((a, r) => a + (r.n ?? 1), 0);
    const maxQueued = config.maxQueuedSamples ?? 8192;
    if (!parallel && samplesQueued > 0 && samplesQueued + wanted > maxQueued) {
      throw new ResourceExhaustedError(`${samplesQueued} samples are queued or generating (limit ${maxQueued}); retry after a backoff`);
    }
    samplesQueued += wanted;
    try {
      yield* generateAdmitted(m, req, built, promptLens, signal);
    } finally {
      samplesQueued -= wanted;
    }
  }

  async function* generateAdmitted(
    m: Loaded,
    req: GenerateRequest,
    built: ReturnType<typeof buildRequests>,
    promptLens: Map<bigint, number>,
    signal: AbortSignal,
  ): AsyncGenerator<GenerateResponse> {
    const { requests, promptIds, stops, eos } = built;
    const release = await lock.acquire(parallel);
    const started = performance.now();
    const calls0 = m.engine.nativeCallTimes();
    let samples = 0;
    let tokens = 0;
    let done = false;
    const cancelAll = () => {
      for (const r of requests) m.generator.cancel(r.requestId);
    };
    signal.addEventListener('abort', cancelAll, { once: true });
    try {
      if (loaded !== m) throw new FailedPreconditionError('the model was replaced while this call waited');
      const moeLayers = m.engine.moeLayerCount;
      const K = m.engine.config.topK;
      const it = m.generator.generateMany(requests)[Symbol.asyncIterator]();
      try {
        for (;;) {
          const r = await it.next();
          if (r.done) {
            done = true;
            break;
          }
          const s = r.value;
          samples++;
          tokens += s.tokens.length;
          counters.samplesGenerated++;
          counters.tokensGenerated += s.tokens.length;
          if (signal.aborted) continue; // nobody to send to; the phase still has to end on every rank
          yield {
            promptId: promptIds.get(s.requestId)!,
            sampleIndex: s.sampleIndex,
            tokenIds: s.tokens,
            text: req.returnText && s.text !== null ? cutAtStop(s.text, stops) : '',
            logprobs: f32Tensor(s.logprobs),
            finishReason: finishReasonOf(s, eos),
            promptTokens: promptLens.get(s.requestId)!,
            experts: s.experts ? i32Tensor(s.experts, [s.experts.length / (moeLayers * K), moeLayers, K]) : undefined,
          };
        }
      } finally {
        // The caller went away mid-stream: stop the samples and let the phase end (with several ranks the
        // others are still in it) before the next call may run.
        if (!done) {
          cancelAll();
          for (;;) if ((await it.next()).done) break;
        }
      }
      span()?.setAttributes({ 'rank.prompts': requests.length, 'rank.samples': samples, 'rank.tokens': tokens, 'rank.generate_ms': performance.now() - started, ...nativeTimeAttributes(calls0, m.engine.nativeCallTimes()) });
      if (signal.aborted) throw new CancelledError('Generate cancelled or past its deadline');
    } finally {
      signal.removeEventListener('abort', cancelAll);
      release();
    }
  }

  // ---- TrainBatch ----

  function parseMicroBatches(m: Loaded, req: TrainBatchRequest, beta: number): TrainMicroBatch[] {
    const V = m.engine.config.vocab;
    return req.microBatches.map((mb, i) => {
      const f = `micro_batches[${i}]`;
      const batch = readPacked(`${f}.sequences`, mb.sequences, V);
      const n = batch.tokens.length;
      if (n === 0) {
        return { batch, mask: new Float32Array(0), advantages: new Float32Array(0), oldLogprobs: new Float32Array(0), refLogprobs: beta > 0 ? new Float32Array(0) : null };
      }
      const mask = toRows(`${f}.loss_mask`, readMask(`${f}.loss_mask`, mb.lossMask), batch.seqLens, true);
      const advantages = toRows(`${f}.advantages`, readF32(`${f}.advantages`, mb.advantages), batch.seqLens, false);
      const oldLogprobs = toRows(`${f}.old_logprobs`, readF32(`${f}.old_logprobs`, mb.oldLogprobs), batch.seqLens, false);
      let refLogprobs: Float32Array | null = null;
      if (beta > 0) {
        if (!mb.refLogprobs || mb.refLogprobs.data.length === 0) throw new InvalidArgumentError(`${f}.ref_logprobs`, `are required when loss.beta > 0 (beta = ${beta})`);
        refLogprobs = toRows(`${f}.ref_logprobs`, readF32(`${f}.ref_logprobs`, mb.refLogprobs), batch.seqLens, false);
      }
      return { batch, mask, advantages, oldLogprobs, refLogprobs };
    });
  }

  // An idle part in a TrainBatch phase (a rank that refused its request): empty micro-batches, as many as
  // the others run; its experts still get the gradients of the other ranks' tokens.
  async function idleTrain(m: Loaded, stepOfRequest: number): Promise<void> {
    const count = await agreeCount(0);
    if (pendingStep !== stepOfRequest) {
      await m.engine.zeroGrad();
      pendingStep = stepOfRequest;
    }
    const none = new Float32Array(0);
    await globalMasked(Array.from({ length: count }, () => ({ mask: none })));
    for (let i = 0; i < count; i++) {
      await m.engine.forwardBackward({ tokens: new Int32Array(0), seqLens: new Int32Array(0) }, { type: 'grpo', mask: none, advantages: none, oldLogprobs: none, auxScale: 0 });
    }
  }

  async function trainBatch(req: TrainBatchRequest, signal: AbortSignal): Promise<TrainBatchResponse> {
    const m = model();
    let v: ReturnType<typeof validateTrain>;
    try {
      v = validateTrain(m, req);
    } catch (e) {
      return refuseInPhase(e, () => idleTrain(m, req.step));
    }
    const { lp, aggregation, kl, mbs, totalTokens, totalSeqs, normLength, temperature } = v;
    checkStart(signal, 'TrainBatch');
    return runPhase(async () => {
      if (loaded !== m) throw new FailedPreconditionError('the model was replaced while this call waited');
      const started = performance.now();
      const calls0 = m.engine.nativeCallTimes();
      const count = await agreeCount(mbs.length);
      while (mbs.length < count) {
        mbs.push({ batch: { tokens: new Int32Array(0), seqLens: new Int32Array(0) }, mask: new Float32Array(0), advantages: new Float32Array(0), oldLogprobs: new Float32Array(0), refLogprobs: lp.beta > 0 ? new Float32Array(0) : null });
      }
      if (pendingStep !== req.step) {
        await m.engine.zeroGrad();
        pendingStep = req.step;
      }
      const masked = await globalMasked(mbs);
      const sums = { loss: 0, klTerm: 0, aux: 0, tokens: 0, kl: 0, clipLow: 0, clipHigh: 0, ratio: 0, entropy: 0, logprob: 0, approxKl: 0 };
      let expertTokens: Float64Array | null = null;
      // The engine's own phases (attention, expert compute, token exchange, LM head), summed over the
      // micro-batches, go on this call's span.
      const native: Record<string, number> = {};
      const addPhases = (pass: string, p: NativePhaseTimes) => {
        for (const [k, v] of Object.entries(p)) {
          const key = `engine.${pass}.${k.replace(/Ms$/, '_ms').replace(/Bytes$/, '_bytes')}`;
          native[key] = (native[key] ?? 0) + v;
        }
      };
      let run = 0;
      for (const [k, mb] of mbs.entries()) {
        if (mb.batch.tokens.length === 0 && !parallel) continue;
        // One rank alone may stop between micro-batches; with several, stopping would strand the others.
        if (!parallel && signal.aborted) throw new DeadlineExceededError(`TrainBatch: deadline passed after ${run} of ${mbs.length} micro-batches (the step's gradients are incomplete)`);
        // The load-balancing loss of a micro-batch is weighted by its share of the step's masked tokens (over
        // every rank: globalMasked), so the shares over micro-batches add up to one (a token-weighted mean).
        const auxScale = totalTokens > 0 ? masked[k] / totalTokens : 0;
        const r = await engineCall('TrainBatch', () =>
          m.engine.forwardBackward(mb.batch, {
            type: 'grpo',
            mask: mb.mask,
            advantages: mb.advantages,
            oldLogprobs: mb.oldLogprobs,
            refLogprobs: mb.refLogprobs,
            epsLow: lp.epsLow,
            epsHigh: lp.epsHigh,
            beta: lp.beta,
            kl,
            aggregation,
            totalTokens,
            totalSeqs,
            normLength,
            temperature,
            auxLossCoef: null,
            auxScale,
          }),
        );
        run++;
        addPhases('forward', r.forwardPhases);
        addPhases('backward', r.backwardPhases);
        sums.loss += r.loss;
        sums.aux += r.auxLoss;
        sums.tokens += r.tokens;
        sums.kl += r.klSum;
        sums.clipLow += r.clipLowCount;
        sums.clipHigh += r.clipHighCount;
        sums.ratio += r.ratioSum;
        sums.entropy += r.entropySum;
        sums.logprob += r.logprobSum;
        for (let i = 0; i < mb.mask.length; i++) {
          if (mb.mask[i] === 0) continue;
          const d = r.logprobs[i] - mb.oldLogprobs[i];
          sums.approxKl += mb.mask[i] * (Math.exp(d) - 1 - d);
        }
        if (mb.refLogprobs && lp.beta > 0 && mb.mask.length > 0) {
          const w = aggregationWeights(aggregation, mb.mask, mb.batch.seqLens, totalTokens, totalSeqs, normLength);
          for (let i = 0; i < w.length; i++) {
            if (w[i] === 0) continue;
            const d = mb.refLogprobs[i] - r.logprobs[i];
            sums.klTerm += w[i] * lp.beta * (kl === 'k3' ? Math.exp(d) - d - 1 : -d);
          }
        }
        expertTokens ??= new Float64Array(r.expertTokens.length);
        for (let i = 0; i < r.expertTokens.length; i++) expertTokens[i] += r.expertTokens[i];
      }
      const seconds = (performance.now() - started) / 1000;
      const t = sums.tokens;
      const mean = (x: number) => (t > 0 ? x / t : 0);
      const extra: Record<string, number> = {
        kl_sum: sums.kl,
        entropy_sum: sums.entropy,
        clip_low_count: sums.clipLow,
        clip_high_count: sums.clipHigh,
        ratio_sum: sums.ratio,
        logprob_sum: sums.logprob,
        approx_kl_sum: sums.approxKl,
        micro_batches: run,
        global_tokens: totalTokens,
        global_sequences: totalSeqs,
      };
      const moeLayers = m.engine.moeLayerCount;
      if (expertTokens && moeLayers > 0) {
        const E = expertTokens.length / moeLayers;
        for (let l = 0; l < moeLayers; l++) for (let e = 0; e < E; e++) extra[`expert_tokens.${l}.${e}`] = expertTokens[l * E + e];
        expertLoad ??= new Float64Array(expertTokens.length);
        for (let i = 0; i < expertTokens.length; i++) expertLoad[i] += expertTokens[i];
      }
      const metrics: LossMetrics = {
        loss: sums.loss,
        pgLoss: sums.loss - sums.klTerm,
        kl: mean(sums.kl),
        entropy: mean(sums.entropy),
        clipFractionLow: mean(sums.clipLow),
        clipFractionHigh: mean(sums.clipHigh),
        approxKl: mean(sums.approxKl),
        tokens: t,
        auxLoss: run > 0 ? sums.aux / run : 0,
        extra,
      };
      counters.tokensTrained += t;
      counters.trainBatches++;
      counters.microBatches += run;
      lastLoss = metrics;
      span()?.setAttributes({ 'rank.step': req.step, 'rank.micro_batches': run, 'rank.tokens': t, 'rank.loss': sums.loss, 'rank.train_ms': seconds * 1000, ...native, ...nativeTimeAttributes(calls0, m.engine.nativeCallTimes()) });
      return { metrics, seconds };
    });
  }

  function validateTrain(m: Loaded, req: TrainBatchRequest) {
    const lp = req.loss;
    if (!lp) throw new InvalidArgumentError('loss', 'is required');
    if (!(lp.epsLow >= 0) || !(lp.epsHigh >= 0)) throw new InvalidArgumentError('loss', `eps_low and eps_high must be >= 0, got ${lp.epsLow} and ${lp.epsHigh}`);
    if (!(lp.beta >= 0) || !Number.isFinite(lp.beta)) throw new InvalidArgumentError('loss.beta', `must be >= 0, got ${lp.beta}`);
    const aggregation = AGGREGATIONS[lp.aggregation];
    if (!aggregation) throw new InvalidArgumentError('loss.aggregation', `unknown value ${lp.aggregation}`);
    let kl: 'k1' | 'k3';
    if (lp.kl === KlEstimator.KL_ESTIMATOR_K1) kl = 'k1';
    else if (lp.kl === KlEstimator.KL_ESTIMATOR_K3 || lp.kl === KlEstimator.KL_ESTIMATOR_UNSPECIFIED) kl = 'k3';
    else throw new InvalidArgumentError('loss.kl', 'the engine implements the k1 and k3 estimators (k2 is not available)');
    const mbs = parseMicroBatches(m, req, lp.beta);
    // Normalisers: the request's global counts, else this call's own.
    let ownTokens = 0;
    let ownSeqs = 0;
    let maxSeqTokens = 0;
    for (const mb of mbs) {
      ownSeqs += mb.batch.seqLens.length;
      let o = 0;
      for (const l of mb.batch.seqLens) {
        let t = 0;
        for (let i = o; i < o + l; i++) t += mb.mask[i];
        ownTokens += t;
        maxSeqTokens = Math.max(maxSeqTokens, t);
        o += l;
      }
    }
    const totalTokens = req.globalTokens > 0 ? req.globalTokens : ownTokens;
    const totalSeqs = req.globalSequences > 0 ? req.globalSequences : ownSeqs;
    if (req.globalTokens > 0 && ownTokens > req.globalTokens) {
      throw new InvalidArgumentError('global_tokens', `is ${req.globalTokens} but this rank's micro-batches alone have ${ownTokens} masked tokens`);
    }
    if (req.globalSequences > 0 && ownSeqs > req.globalSequences) {
      throw new InvalidArgumentError('global_sequences', `is ${req.globalSequences} but this rank's micro-batches alone have ${ownSeqs} sequences`);
    }
    // seq-mean-token-sum: the request's constant length, else the longest masked sequence of this call.
    const normLength = lp.normLength > 0 ? lp.normLength : maxSeqTokens;
    const temperature = lp.temperature === 0 ? 1 : lp.temperature;
    if (!(temperature > 0) || !Number.isFinite(temperature)) throw new InvalidArgumentError('loss.temperature', `must be > 0, got ${lp.temperature}`);
    return { lp, aggregation, kl, mbs, totalTokens, totalSeqs, normLength, temperature };
  }

  // ---- OptimizerStep ----

  async function optimizerStep(req: OptimizerStepRequest, signal: AbortSignal): Promise<OptimizerStepResponse> {
    const m = model();
    const a = req.adamw;
    if (!a) throw new InvalidArgumentError('adamw', 'is required');
    const bad = (name: string, v: number, rule: string) => new InvalidArgumentError(`adamw.${name}`, `must be ${rule}, got ${v}`);
    if (!(a.lr >= 0) || !Number.isFinite(a.lr)) throw bad('lr', a.lr, '>= 0');
    if (!(a.beta1 >= 0 && a.beta1 < 1)) throw bad('beta1', a.beta1, 'in [0, 1)');
    if (!(a.beta2 >= 0 && a.beta2 < 1)) throw bad('beta2', a.beta2, 'in [0, 1)');
    if (!(a.eps > 0) || !Number.isFinite(a.eps)) throw bad('eps', a.eps, '> 0');
    if (!(a.weightDecay >= 0) || !Number.isFinite(a.weightDecay)) throw bad('weight_decay', a.weightDecay, '>= 0');
    if (!(a.maxGradNorm >= 0) || !Number.isFinite(a.maxGradNorm)) throw bad('max_grad_norm', a.maxGradNorm, '>= 0 (0 = no clipping)');
    checkStart(signal, 'OptimizerStep');
    // Exclusive even with one rank: a rollout in flight finishes on the weights it started with.
    return lock.run(true, async () => {
      if (loaded !== m) throw new FailedPreconditionError('the model was replaced while this call waited');
      const started = performance.now();
      const calls0 = m.engine.nativeCallTimes();
      let gradNorm: number;
      let skipped = false;
      try {
        gradNorm = await m.engine.adamwStep({ lr: a.lr, beta1: a.beta1, beta2: a.beta2, eps: a.eps, weightDecay: a.weightDecay, maxGradNorm: a.maxGradNorm });
      } catch (e) {
        // The engine refuses a non-finite gradient norm before touching any weight (the norm is reduced
        // over the ranks first, so every rank skips together).
        const err = e as Error & { code?: unknown };
        if (!(err?.name === 'EngineError' && err.code === 'INVALID_ARGUMENT' && /not finite/.test(err.message))) throw e;
        gradNorm = Number.NaN;
        skipped = true;
      }
      await m.engine.zeroGrad();
      pendingStep = null;
      if (skipped) counters.skippedSteps++;
      else {
        counters.optimizerSteps++;
        step = req.step;
      }
      span()?.setAttributes({ 'rank.step': req.step, 'rank.grad_norm': gradNorm, 'rank.skipped': skipped, 'rank.optimizer_ms': performance.now() - started, ...nativeTimeAttributes(calls0, m.engine.nativeCallTimes()) });
      return { gradNorm, lr: a.lr, skipped };
    });
  }

  // ---- ComputeLogprobs ----

  async function computeLogprobs(req: ComputeLogprobsRequest, signal: AbortSignal): Promise<ComputeLogprobsResponse> {
    const m = model();
    const temperature = req.temperature > 0 ? req.temperature : 1;
    let engine: Engine;
    let batches: PackedBatch[];
    try {
      if (req.model === LogprobModel.LOGPROB_MODEL_POLICY) engine = m.engine;
      else if (req.model === LogprobModel.LOGPROB_MODEL_REFERENCE) {
        if (!m.reference) throw new FailedPreconditionError('no reference model: LoadModel was called without keep_reference');
        engine = m.reference;
      } else throw new InvalidArgumentError('model', 'must be LOGPROB_MODEL_POLICY or LOGPROB_MODEL_REFERENCE');
      const V = m.engine.config.vocab;
      batches = req.batches.map((b, i) => readPacked(`batches[${i}]`, b, V));
      if (!(req.temperature >= 0) || !Number.isFinite(req.temperature)) throw new InvalidArgumentError('temperature', `must be >= 0, got ${req.temperature}`);
    } catch (e) {
      // Idle part: empty forwards, as many as the other ranks run.
      return refuseInPhase(e, async () => {
        const count = await agreeCount(0);
        for (let i = 0; i < count; i++) await m.engine.forward({ tokens: new Int32Array(0), seqLens: new Int32Array(0) }, { logprobs: true });
      });
    }
    checkStart(signal, 'ComputeLogprobs');
    return runPhase(async () => {
      if (loaded !== m) throw new FailedPreconditionError('the model was replaced while this call waited');
      const started = performance.now();
      const count = await agreeCount(batches.length);
      const out: Tensor[] = [];
      for (let i = 0; i < count; i++) {
        const b = batches[i] ?? { tokens: new Int32Array(0), seqLens: new Int32Array(0) };
        if (b.tokens.length === 0 && !parallel) {
          out.push(f32Tensor(new Float32Array(0)));
          continue;
        }
        if (!parallel && signal.aborted) throw new DeadlineExceededError(`ComputeLogprobs: deadline passed after ${i} of ${count} batches`);
        const r = await engineCall('ComputeLogprobs', () => engine.forward(b, { logprobs: true, temperature }));
        if (i < batches.length) out.push(f32Tensor(fromRows(r.logprobs, b.seqLens)));
      }
      span()?.setAttributes({ 'rank.batches': batches.length, 'rank.logprob_model': req.model, 'rank.logprobs_ms': performance.now() - started });
      return { logprobs: out };
    });
  }

  // ---- shards ----

  const shardResponse = (files: ShardFileInfo[]): SaveShardResponse => ({ rank, files: files.map((f) => ({ path: f.path, sizeBytes: f.sizeBytes, sha256: f.sha256 })) });

  async function saveShardCall(req: SaveShardRequest, signal: AbortSignal): Promise<SaveShardResponse> {
    const m = model();
    if (!req.dir) throw new InvalidArgumentError('dir', 'is required');
    checkSignal(signal, 'SaveShard');
    // One write at a time: a GPU engine's snapshot is its host buffers, which the next sync overwrites.
    await settledWrites();
    return runPhase(async () => {
      span()?.setAttributes({ 'rank.shard_dir': req.dir, 'rank.include_optimizer': req.includeOptimizer, 'rank.shard_background': req.background });
      const info = { rank, worldSize, step, includeOptimizer: req.includeOptimizer };
      // Captured in the engine's call order, so no training step writes the weights while they are read. A GPU
      // engine's host views hold the last download: refreshed first, they are the snapshot (training runs on the
      // device). A CPU engine's are its live weights: a background save copies them; a plain one writes before
      // the engine runs anything else.
      const started = performance.now();
      let exclusiveAt = 0;
      let downloadMs = 0;
      const saved = await m.engine.exclusive(async (native) => {
        exclusiveAt = performance.now();
        const onGpu = native.device() >= 0;
        // The shard holds parameters and optimizer state; the gradients stay on the device.
        if (onGpu) await native.syncToHost({ gradients: false });
        downloadMs = performance.now() - exclusiveAt;
        const snap = snapshotShard(m.engine, { ...info, copy: req.background && !onGpu });
        return req.background ? { snap } : { files: await writeShard(snap, req.dir, { hashFile: deps.hashFile }) };
      });
      if (saved.files) {
        span()?.setAttributes({ 'rank.shard_files': saved.files.length });
        return shardResponse(saved.files);
      }
      // Written while later calls (the next step's training) run; AwaitShard reports it.
      const write = writeShard(saved.snap, req.dir, { hashFile: deps.hashFile });
      write.catch(() => undefined);  // reported by AwaitShard
      backgroundWrites.set(resolve(req.dir), write);
      span()?.setAttributes({ 'rank.snapshot_ms': performance.now() - started, 'rank.snapshot_wait_ms': exclusiveAt - started, 'rank.snapshot_download_ms': downloadMs });
      return { rank, files: [] };
    });
  }

  async function awaitShardCall(req: AwaitShardRequest): Promise<SaveShardResponse> {
    if (!req.dir) throw new InvalidArgumentError('dir', 'is required');
    const key = resolve(req.dir);
    const write = backgroundWrites.get(key);
    if (!write) throw new NotFoundError(`no background SaveShard into ${req.dir} (or its files were already taken)`);
    try {
      const files = await write;
      span()?.setAttributes({ 'rank.shard_dir': req.dir, 'rank.shard_files': files.length });
      return shardResponse(files);
    } finally {
      if (backgroundWrites.get(key) === write) backgroundWrites.delete(key);
    }
  }

  async function loadShardCall(req: LoadShardRequest, signal: AbortSignal): Promise<LoadShardResponse> {
    const m = model();
    checkSignal(signal, 'LoadShard');
    await settledWrites();  // they read the host views LoadShard overwrites
    return lock.run(true, async () => {
      // The shard is read into the host views; a GPU engine then takes them up.
      const r = await m.engine.exclusive(async (native) => {
        const loadedShard = await loadShard(m.engine, req.files, { rank, worldSize, includeOptimizer: req.includeOptimizer, hashFile: deps.hashFile });
        if (native.device() >= 0) await native.syncToDevice();
        return loadedShard;
      });
      step = r.step;
      pendingStep = null;
      await m.engine.zeroGrad();
      span()?.setAttributes({ 'rank.shard_files': req.files.length, 'rank.step': r.step });
      return { step: r.step };
    });
  }

  async function getMetrics(): Promise<GetMetricsResponse> {
    const mem = process.memoryUsage();
    const out: GetMetricsResponse = {
      step,
      tokensTrained: counters.tokensTrained,
      memoryBytes: mem.rss,
      // maxRSS is in KiB.
      peakMemoryBytes: process.resourceUsage().maxRSS * 1024,
      lastLoss,
      expertLoad: undefined,
      counters: {
        samples_generated: counters.samplesGenerated,
        tokens_generated: counters.tokensGenerated,
        tokens_trained: counters.tokensTrained,
        train_batches: counters.trainBatches,
        micro_batches: counters.microBatches,
        optimizer_steps: counters.optimizerSteps,
        skipped_steps: counters.skippedSteps,
        rank,
        world_size: worldSize,
        model_loaded: loaded ? 1 : 0,
      },
    };
    if (loaded) {
      const st = loaded.generator.stats();
      Object.assign(out.counters, {
        params_local: loaded.engine.paramCount,
        params_total: loaded.info.numParameters,
        kv_blocks_total: st.numBlocks,
        kv_blocks_free: st.freeBlocks,
        kv_blocks_used: st.numBlocks - st.freeBlocks,
        active_samples: st.activeSamples,
        waiting_groups: st.waitingGroups,
        expert_begin: loaded.bounds[rank],
        expert_end: loaded.bounds[rank + 1],
      });
      const L = loaded.engine.moeLayerCount;
      const E = loaded.engine.config.numExperts;
      out.expertLoad = i64Tensor(expertLoad ?? new Float64Array(L * E), [L, expertLoad ? expertLoad.length / Math.max(1, L) : E]);
      expertLoad = null;
    }
    return out;
  }

  const service: RankService = {
    rollout: {
      generate: (req, ctx) => generate(req, ctx.signal),
    },
    trainer: {
      loadModel: (req, ctx) => loadModel(req, ctx.signal),
      trainBatch: (req, ctx) => trainBatch(req, ctx.signal),
      optimizerStep: (req, ctx) => optimizerStep(req, ctx.signal),
      computeLogprobs: (req, ctx) => computeLogprobs(req, ctx.signal),
      saveShard: (req, ctx) => saveShardCall(req, ctx.signal),
      awaitShard: (req) => awaitShardCall(req),
      loadShard: (req, ctx) => loadShardCall(req, ctx.signal),
      getMetrics: () => getMetrics(),
    },
    // Outside a gRPC call (main.ts's MODEL_DIR) the load gets a span of its own.
    loadModel(req, signal) {
      const tracer = deps.tracer;
      if (!tracer) return loadModel(req, signal);
      return tracer.startActiveSpan('rank/LoadModel', async (s) => {
        try {
          return await loadModel(req, signal);
        } catch (e) {
          s.recordException(e as Error);
          s.setStatus({ code: SpanStatusCode.ERROR, message: (e as Error).message });
          throw e;
        } finally {
          s.end();
        }
      });
    },
    get loaded() {
      return loaded !== null;
    },
    async dispose() {
      if (disposed) return;
      disposed = true;
      await lock.run(true, async () => {
        await freeModel();
        await comm?.dispose();
        comm = null;
      });
    },
  };
  return service;
}
