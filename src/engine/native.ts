// The typed binding of the native addon (kernels/build/moepilot.node). Internal: the user-facing class
// is engine.ts. The shapes here mirror kernels/addon/engine_binding.cpp field for field.
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, resolve } from 'node:path';
import type { EngineModelConfig } from '../hf/config.ts';

/** The addon this checkout builds; MOEPILOT_ADDON points elsewhere (another build folder, a bundled script). */
export const DEFAULT_ADDON_PATH =
  process.env.MOEPILOT_ADDON || resolve(dirname(fileURLToPath(import.meta.url)), '../../kernels/build/moepilot.node');

export interface NativeParamInfo {
  name: string;
  offset: number;
  numel: number;
  shape: number[];
  kind: 'dense' | 'expert';
  layer: number;
  expert: number;
}

export interface NativeBatch {
  tokens: Int32Array;
  seqLens: Int32Array;
  replayExperts: Int32Array | null;
}

export interface NativeForwardRequest {
  logits: boolean;
  logprobs: boolean;
  routerLogits: boolean;
  experts: boolean;
  entropy: boolean;
  /** Logprobs and entropy of logits / temperature: the distribution the rollout sampled from. */
  temperature: number;
}

/** Wall time of a pass's phases (ms): attention, routed-expert compute, token exchange between ranks, LM head. */
export interface NativePhaseTimes {
  attentionMs: number;
  expertsMs: number;
  alltoallMs: number;
  /** Bytes this rank handed to the token exchanges (all-to-all size, own share included). */
  alltoallBytes: number;
  lmHeadMs: number;
  totalMs: number;
}

export interface NativeForwardResult {
  logits: Float32Array;
  logprobs: Float32Array;
  routerLogits: Float32Array;
  entropy: Float32Array;
  experts: Int32Array;
  expertTokens: Int32Array;
  phases: NativePhaseTimes;
}

export interface NativeLossSpec {
  type: 'sft' | 'grpo';
  mask: Float32Array;
  advantages: Float32Array | null;
  oldLogprobs: Float32Array | null;
  refLogprobs: Float32Array | null;
  epsLow: number;
  epsHigh: number;
  beta: number;
  kl: 'k1' | 'k3';
  aggregation: 'token-mean' | 'seq-mean-token-mean' | 'seq-mean-token-sum-norm';
  totalTokens: number;
  totalSeqs: number;
  normLength: number;
  /** Logprobs of logits / temperature, as the rollout sampled them. */
  temperature: number;
  auxLossCoef: number;
  auxScale: number;
}

export interface NativeLossResult {
  loss: number;
  auxLoss: number;
  tokens: number;
  klSum: number;
  clipLowCount: number;
  clipHighCount: number;
  ratioSum: number;
  entropySum: number;
  logprobSum: number;
  logprobs: Float32Array;
  expertTokens: Int32Array;
  forwardPhases: NativePhaseTimes;
  backwardPhases: NativePhaseTimes;
}

export interface NativeAdamW {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  maxGradNorm: number;
}

export interface NativeEngine {
  paramTable(): NativeParamInfo[];
  /** A view of the flat parameters, all of them or [offset, offset + count); one view holds at most 4 GiB. */
  params(offset?: number, count?: number): Float32Array;
  grads(offset?: number, count?: number): Float32Array;
  forward(batch: NativeBatch, request: NativeForwardRequest): Promise<NativeForwardResult>;
  forwardBackward(batch: NativeBatch, loss: NativeLossSpec): Promise<NativeLossResult>;
  zeroGrad(): void;
  adamwStep(options: NativeAdamW): Promise<number>;
  /** Expert + data parallelism over a connected communicator's native object. */
  setParallel(communicator: object, expertBounds: Int32Array): void;
  allReduceDenseGrads(): Promise<void>;
  optimizerState(chunkFloats?: number): NativeOptimizerState;
  setOptimizerSteps(steps: number): void;
  /** Moves the model to GPU `device` (parameters, gradients, optimizer state; the weights alone with weightsOnly); CUDA builds only. */
  toDevice(device: number, weightsOnly?: boolean, expertGradsBf16?: boolean): Promise<void>;
  /** Bytes held on the engine's GPU, now and at most since the last reset (zeros on the CPU). */
  deviceMemory(resetPeak?: boolean): { current: number; peak: number };
  /** Downloads parameters, gradients (unless `gradients: false`) and optimizer state into the host buffers (a GPU engine). */
  syncToHost(options?: { gradients?: boolean }): Promise<void>;
  /** Every native object's long calls so far, by call name (the addon's clock: kernels/addon/async.h). */
  callTimes(): Record<string, NativeCallTimes>;
  /** Uploads the host buffers to the GPU (after they were written, e.g. a restored checkpoint). */
  syncToDevice(): Promise<void>;
  /** The GPU index, or -1 on the CPU. */
  device(): number;
  /** Benchmarks: fills a GPU engine's parameters on the device (norms 1, biases 0, matrices uniform in +-scale). */
  fillParamsRandom(seed: number, scale: number): Promise<void>;
}

/**
 * AdamW state of one rank: its shard [denseBegin, denseEnd) of the dense range (ZeRO-1) and its experts. Each moment
 * buffer comes as consecutive views of at most chunkFloats floats (default 2^28): a rank's state may exceed the 4 GiB
 * one view holds.
 */
export interface NativeOptimizerState {
  step: number;
  denseBegin: number;
  denseEnd: number;
  denseM: Float32Array[];
  denseV: Float32Array[];
  expertM: Float32Array[];
  expertV: Float32Array[];
}

export interface NativeSampleSpec {
  sampleId: number;
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  seed: bigint;
  requestId: bigint;
  sampleIndex: number;
  step: number;
}

export interface NativeGroupSpec {
  groupId: number;
  prompt: Int32Array;
  samples: NativeSampleSpec[];
  maxNewTokens: number;
  stopIds: Int32Array;
  wantExperts: boolean;
}

export interface NativeSampleEvent {
  sampleId: number;
  groupId: number;
  tokens: Int32Array;
  logprobs: Float32Array;
  /** [rows fed this step, moeLayers, K] */
  experts: Int32Array;
  finished: '' | 'stop' | 'length' | 'cancelled';
}

export interface NativeStepResult {
  events: NativeSampleEvent[];
  /** Experts of each newly prefilled prompt, [P, moeLayers, K] (groups that asked for them). */
  prefills: { groupId: number; experts: Int32Array }[];
  /** Whether any rank may still have work (keep stepping while true). */
  globalActive: boolean;
}

export interface NativeGeneratorStats {
  blockSize: number;
  numBlocks: number;
  freeBlocks: number;
  reservedBlocks: number;
  activeSamples: number;
  waitingGroups: number;
}

export interface NativeGenerator {
  addGroup(group: NativeGroupSpec): void;
  step(maxSteps: number): Promise<NativeStepResult>;
  cancel(sampleId: number): void;
  stats(): NativeGeneratorStats;
  groupBlocks(groupId: number): number;
  blocksNeeded(promptLen: number, n: number, maxNewTokens: number): number;
}

/**
 * Sums over the long native calls of one name: time queued for a thread of libuv's pool (shared with file I/O),
 * running there, and waiting for the event loop to take the result.
 */
export interface NativeCallTimes {
  calls: number;
  queuedMs: number;
  runMs: number;
  resolveMs: number;
}

export interface NativeAddon {
  Engine: new (config: EngineModelConfig) => NativeEngine;
  Generator: new (engine: NativeEngine, options: { numBlocks: number; blockSize: number; cudaGraphs?: boolean | null }) => NativeGenerator;
}

/** An error raised by the native engine; `code` is its stable code (INVALID_ARGUMENT, IO, INTERNAL, ...). */
export class EngineError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
    this.name = 'EngineError';
  }
}

/** Turns the addon's errors (plain Errors named "EngineError" with a code) into EngineError; others pass. */
export function toEngineError(e: unknown): unknown {
  if (e instanceof Error && e.name === 'EngineError' && !(e instanceof EngineError)) {
    const code = typeof (e as { code?: unknown }).code === 'string' ? (e as unknown as { code: string }).code : 'INTERNAL';
    const out = new EngineError(e.message, code);
    if (e.stack) out.stack = e.stack;
    return out;
  }
  return e;
}

/** Loads the addon (cached by Node per path). */
export function loadNative(path: string = DEFAULT_ADDON_PATH): NativeAddon {
  if (!existsSync(path)) {
    throw new Error(`native engine not built: ${path} is missing; run npm run build:native`);
  }
  const require = createRequire(import.meta.url);
  const addon = require(path) as NativeAddon;
  if (typeof addon?.Engine !== 'function') throw new Error(`${path} does not export Engine; rebuild with npm run build:native`);
  return addon;
}
