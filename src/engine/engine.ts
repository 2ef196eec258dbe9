// The user-facing engine: a model loaded from a Hugging Face folder into the native engine's flat
// parameter buffer, with typed, validated calls. TypeScript fills every default and checks every length
// here; the native side receives fully specified objects and only converts them.
//
// Calls are serialised on a promise chain: the native side holds one mutex per engine, and a second
// call queued behind it would block a libuv thread (or, for zeroGrad, the event loop) until the first ends.
import { copyFile, mkdir, readdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import {
  isNonParameterTensor,
  parseExpertTensorName,
  readHfConfig,
  type EngineModelConfig,
  type ModelType,
  type ParsedHfConfig,
  type RopeFreqDtype,
} from '../hf/config.ts';
import { SafetensorsCheckpoint, fmtShape, writeSafetensorsFolder, type TensorToWrite } from '../hf/safetensors.ts';
import {
  loadNative,
  toEngineError,
  type NativeAdamW,
  type NativeBatch,
  type NativeCallTimes,
  type NativeEngine,
  type NativeForwardRequest,
  type NativeForwardResult,
  type NativeLossResult,
  type NativeLossSpec,
  type NativeParamInfo,
  type NativeOptimizerState,
} from './native.ts';

export type ParamInfo = Readonly<NativeParamInfo>;
export type ForwardRequest = NativeForwardRequest;
export type ForwardResult = NativeForwardResult;
export type LossResult = NativeLossResult;
export type AdamWOptions = NativeAdamW;
export type LossType = NativeLossSpec['type'];
export type KlEstimator = NativeLossSpec['kl'];
export type Aggregation = NativeLossSpec['aggregation'];

/** Packed sequences: sequence b is tokens[offset_b .. offset_b + seqLens[b]). */
export interface PackedBatch {
  tokens: Int32Array;
  seqLens: Int32Array;
  /** Router replay: the experts to use instead of the router's top-k, [moeLayers, N, K]. */
  replayExperts?: Int32Array | null;
}

/**
 * A loss as the caller gives it: type and mask are required, GRPO needs advantages and oldLogprobs.
 * Per-row arrays are [N]: row i is the prediction of tokens[i + 1] (mask 0 at each sequence's last row).
 */
export interface LossInput {
  type: LossType;
  mask: Float32Array;
  advantages?: Float32Array | null;
  oldLogprobs?: Float32Array | null;
  /** Needed when beta > 0. */
  refLogprobs?: Float32Array | null;
  epsLow?: number;
  epsHigh?: number;
  beta?: number;
  kl?: KlEstimator;
  aggregation?: Aggregation;
  /** Normalisers over the whole global batch; null: this micro-batch's own. */
  totalTokens?: number | null;
  totalSeqs?: number | null;
  normLength?: number | null;
  /** Logprobs of logits / temperature (the rollout's sampling temperature); default 1. */
  temperature?: number;
  /** null: the config's router_aux_loss_coef. */
  auxLossCoef?: number | null;
  auxScale?: number;
}

export const FORWARD_DEFAULTS: Readonly<ForwardRequest> = { logits: false, logprobs: false, routerLogits: false, experts: false, entropy: false, temperature: 1 };
export const LOSS_DEFAULTS = { epsLow: 0.2, epsHigh: 0.28, beta: 0, kl: 'k3', aggregation: 'token-mean', auxScale: 1, temperature: 1 } as const;
export const ADAMW_DEFAULTS: Readonly<AdamWOptions> = { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 0 };

const AGGREGATIONS: readonly Aggregation[] = ['token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'];
const KL_ESTIMATORS: readonly KlEstimator[] = ['k1', 'k3'];

/** Tokenizer and generation files copied along with the weights. */
export const SIDE_FILES = [
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'added_tokens.json',
  'vocab.json',
  'merges.txt',
  'tokenizer.model',
  'chat_template.jinja',
  'chat_template.json',
  'generation_config.json',
] as const;

export class WeightsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'WeightsError';
  }
}

export interface FromHfOptions {
  /** Local experts [begin, end); default all. */
  expertRange?: readonly [number, number];
  /** RoPE frequency precision (see ParseConfigOptions.ropeFreqDtype); default float32. */
  ropeFreqDtype?: RopeFreqDtype;
  /** Path of moepilot.node; default kernels/build/moepilot.node. */
  addonPath?: string;
  /** Tensor reads in flight while loading; default 8. */
  readConcurrency?: number;
  /** Where the model runs: 'cpu' (default), 'cuda' or 'cuda:N' (moved there after loading; CUDA builds only). */
  device?: string;
  /** With a GPU device: keep only the weights there (see ToDeviceOptions.weightsOnly). */
  weightsOnly?: boolean;
  /** With a GPU device: the routed experts' gradient precision (see ToDeviceOptions.expertGradDtype). */
  expertGradDtype?: ExpertGradDtype;
}

/** Precision of the routed experts' gradients on a GPU. */
export type ExpertGradDtype = 'float32' | 'bfloat16';
export function isExpertGradDtype(v: unknown): v is ExpertGradDtype {
  return v === 'float32' || v === 'bfloat16';
}

export interface ToDeviceOptions {
  /**
   * The GPU holds the bf16 weights (fp32 for the dense tensors) and nothing for training: forward passes and
   * rollout only, at about a sixth of the memory (a policy served for rollout, a model whose training state would
   * not fit one card). Training calls then reject with an EngineError (INVALID_ARGUMENT).
   */
  weightsOnly?: boolean;
  /**
   * The routed experts' gradients on the GPU: 'float32' (default) or 'bfloat16' (the dense gradients stay fp32).
   * bfloat16 halves the experts' gradient memory and the bytes of their weight-gradient products, which bound them;
   * each backward adds its product with one rounding, so micro-batches accumulate in bf16 (the precision a bf16
   * model's gradients have in PyTorch). AdamW and the gradient norm read them widened; grads() widens them too.
   */
  expertGradDtype?: ExpertGradDtype;
}

/** Bytes the engine holds on its GPU: now, and the most since the last reset. */
export interface DeviceMemory {
  current: number;
  peak: number;
}

/** 'cpu' -> -1, 'cuda' -> 0, 'cuda:N' -> N. */
export function parseDevice(device: string): number {
  if (device === 'cpu') return -1;
  const m = /^cuda(?::(\d+))?$/.exec(device);
  if (!m) throw new TypeError(`device must be 'cpu', 'cuda' or 'cuda:N', got '${String(device)}'`);
  return m[1] === undefined ? 0 : Number(m[1]);
}

export interface SaveHfOptions {
  dtype?: 'f32' | 'bf16';
  /** Split into shards with an index above this many bytes; default 5 GB. */
  maxShardBytes?: number;
}

export class Engine {
  private readonly native: NativeEngine;
  // Views of the native buffers, made on first use (a model over 4 GiB has none: Node's limit on external buffers).
  private paramViewCache: Float32Array | null = null;
  private gradViewCache: Float32Array | null = null;
  private paramsByNameCache: Map<string, Float32Array> | null = null;
  private gradsByNameCache: Map<string, Float32Array> | null = null;
  private readonly table: readonly ParamInfo[];
  private readonly moeLayers: number;
  private tail: Promise<unknown> = Promise.resolve();
  private disposed = false;
  private parallel = false;

  /** The parsed config.json (a frozen copy: the native engine was built from it). */
  readonly parsed: Readonly<ParsedHfConfig>;

  private constructor(
    parsed: ParsedHfConfig,
    native: NativeEngine,
    /** Folder the model came from (tokenizer files are copied from it on save); null when built from a config. */
    readonly sourceDir: string | null,
  ) {
    this.parsed = deepFreeze(structuredClone(parsed));
    this.native = native;
    this.table = Object.freeze(native.paramTable().map((p) => Object.freeze({ ...p, shape: Object.freeze([...p.shape]) as number[] })));
    this.moeLayers = parsed.engine.layerIsMoe.filter(Boolean).length;
  }

  /** An engine with zero parameters for a parsed config (tests, or weights filled by the caller). */
  static fromConfig(parsed: ParsedHfConfig, options: { addonPath?: string } = {}): Engine {
    return new Engine(parsed, constructNative(parsed, options.addonPath), null);
  }

  /** Reads config.json and the safetensors weights of a Hugging Face model folder. */
  static async fromHfFolder(dir: string, options: FromHfOptions = {}): Promise<Engine> {
    const concurrency = options.readConcurrency ?? 8;
    const deviceIndex = parseDevice(options.device ?? 'cpu');
    if (!Number.isInteger(concurrency) || concurrency < 1) throw new RangeError(`fromHfFolder: readConcurrency must be an integer >= 1, got ${concurrency}`);
    const parsed = await readHfConfig(dir, { expertRange: options.expertRange, ropeFreqDtype: options.ropeFreqDtype });
    const engine = new Engine(parsed, constructNative(parsed, options.addonPath), resolve(dir));
    const ckpt = await SafetensorsCheckpoint.open(dir);
    try {
      engine.checkTensorNames(ckpt, dir);
      await engine.loadWeights(ckpt, concurrency);
    } finally {
      await ckpt.close();
    }
    if (options.weightsOnly && deviceIndex < 0) throw new TypeError('fromHfFolder: weightsOnly needs a GPU device');
    if (options.expertGradDtype !== undefined && deviceIndex < 0)
      throw new TypeError('fromHfFolder: expertGradDtype needs a GPU device (the CPU engine keeps fp32 gradients)');
    if (deviceIndex >= 0)
      await engine.toDevice(options.device!, { weightsOnly: options.weightsOnly, expertGradDtype: options.expertGradDtype });
    return engine;
  }

  /**
   * Moves the model to a GPU ('cuda' or 'cuda:N'): parameters, gradients and optimizer state are uploaded, and
   * from then on every call runs there. The host views (params, grads, optimizerState) keep the values of the
   * last syncToHost(); saveHfFolder syncs first. Expert parallelism (setParallel, before or after toDevice but
   * before the first optimizer step) needs an NCCL communicator on the same GPU (one GPU per rank); the GPU
   * rollout then steps collectively (every rank while any has rows).
   */
  async toDevice(device: string, options: ToDeviceOptions = {}): Promise<void> {
    const index = parseDevice(device);
    if (index < 0) throw new TypeError(`toDevice: '${device}' is not a GPU; engines start on the CPU`);
    const dtype = options.expertGradDtype ?? 'float32';
    if (!isExpertGradDtype(dtype))
      throw new TypeError(`toDevice: expertGradDtype must be 'float32' or 'bfloat16', got '${String(dtype)}'`);
    if (dtype === 'bfloat16' && options.weightsOnly)
      throw new TypeError('toDevice: expertGradDtype bfloat16 needs gradients (not with weightsOnly)');
    const weightsOnly = options.weightsOnly === true;
    return this.enqueue(() =>
      dtype === 'bfloat16' ? this.native.toDevice(index, weightsOnly, true) : this.native.toDevice(index, weightsOnly),
    );
  }

  /**
   * Device memory the engine holds (every allocation of this process on its GPU), now and at most since the last
   * reset; `resetPeak` starts a new window (a step's peak). Zeros on the CPU.
   */
  deviceMemory(options: { resetPeak?: boolean } = {}): DeviceMemory {
    this.checkAlive();
    return this.native.deviceMemory(options.resetPeak === true);
  }

  /** 'cpu' or 'cuda:N'. */
  get device(): string {
    this.checkAlive();
    const d = this.native.device();
    return d < 0 ? 'cpu' : `cuda:${d}`;
  }

  /** Downloads parameters, gradients and optimizer state into the host views (no-op on the CPU). */
  async syncToHost(): Promise<void> {
    return this.enqueue(async () => {
      if (this.native.device() >= 0) await this.native.syncToHost();
    });
  }

  /**
   * The native calls' time so far, by call name (every engine and generator of this process): queued for a thread,
   * running, waiting for the event loop. Differences of two readings show where a phase's time went.
   */
  nativeCallTimes(): Record<string, NativeCallTimes> {
    this.checkAlive();
    return this.native.callTimes();
  }

  /**
   * Uploads the host views (parameters, gradients, optimizer state) to the GPU after they were written, e.g. a
   * checkpoint restored into them (no-op on the CPU).
   */
  async syncToDevice(): Promise<void> {
    return this.enqueue(async () => {
      if (this.native.device() >= 0) await this.native.syncToDevice();
    });
  }

  get config(): EngineModelConfig {
    return this.parsed.engine;
  }
  get modelType(): ModelType {
    return this.parsed.modelType;
  }
  get paramTable(): readonly ParamInfo[] {
    return this.table;
  }
  private get paramView(): Float32Array {
    if (this.paramViewCache === null) {
      try {
        this.paramViewCache = this.native.params();
      } catch (e) {
        throw toEngineError(e);
      }
    }
    return this.paramViewCache;
  }
  private get gradView(): Float32Array {
    if (this.gradViewCache === null) {
      try {
        this.gradViewCache = this.native.grads();
      } catch (e) {
        throw toEngineError(e);
      }
    }
    return this.gradViewCache;
  }

  /**
   * The flat parameter buffer (a view of native memory; do not read it while a call is in flight). One view holds at
   * most 4 GiB (1 Gi floats): a larger rank's parameters are read tensor by tensor through paramsByName.
   */
  get params(): Float32Array {
    this.checkAlive();
    return this.paramView;
  }
  /** The flat gradient buffer, same layout as params (the same 4 GiB limit; gradsByName has none). */
  get grads(): Float32Array {
    this.checkAlive();
    return this.gradView;
  }
  /** Number of parameters this engine holds (its experts and the dense ones). */
  get paramCount(): number {
    return this.table.reduce((a, p) => a + p.numel, 0);
  }
  /** Number of MoE layers (the leading dimension of routerLogits, experts and replayExperts). */
  get moeLayerCount(): number {
    return this.moeLayers;
  }

  /** Each parameter tensor as its own view of native memory (no 4 GiB limit on the whole). */
  paramsByName(): Map<string, Float32Array> {
    this.checkAlive();
    if (this.paramsByNameCache === null) this.paramsByNameCache = this.byName('params');
    return this.paramsByNameCache;
  }
  gradsByName(): Map<string, Float32Array> {
    this.checkAlive();
    if (this.gradsByNameCache === null) this.gradsByNameCache = this.byName('grads');
    return this.gradsByNameCache;
  }
  private byName(which: 'params' | 'grads'): Map<string, Float32Array> {
    try {
      return new Map(this.table.map((p) => [p.name, this.native[which](p.offset, p.numel)]));
    } catch (e) {
      throw toEngineError(e);
    }
  }

  async forward(batch: PackedBatch, request: Partial<ForwardRequest> = {}): Promise<ForwardResult> {
    const b = this.checkBatch(batch);
    const req: ForwardRequest = { ...FORWARD_DEFAULTS };
    for (const [k, v] of Object.entries(request)) {
      if (!(k in FORWARD_DEFAULTS)) throw new TypeError(`forward request: unknown field '${k}' (known: ${Object.keys(FORWARD_DEFAULTS).join(', ')})`);
      if (v === undefined) continue;
      if (k === 'temperature') {
        if (typeof v !== 'number' || !(v > 0) || !Number.isFinite(v)) throw new RangeError(`forward request: temperature must be a number > 0, got ${String(v)}`);
        req.temperature = v;
        continue;
      }
      if (typeof v !== 'boolean') throw new TypeError(`forward request: field '${k}' must be a boolean`);
      (req as unknown as Record<string, boolean>)[k] = v;
    }
    return this.enqueue(() => this.native.forward(b, req));
  }

  async forwardBackward(batch: PackedBatch, loss: LossInput): Promise<LossResult> {
    const b = this.checkBatch(batch);
    const spec = buildLossSpec(loss, b);
    return this.enqueue(() => this.native.forwardBackward(b, spec));
  }

  async zeroGrad(): Promise<void> {
    return this.enqueue(async () => this.native.zeroGrad());
  }

  /** Clips the global gradient norm (when maxGradNorm > 0) and takes one AdamW step; returns the pre-clip norm. */
  async adamwStep(options: Partial<AdamWOptions> = {}): Promise<number> {
    const o: AdamWOptions = { ...ADAMW_DEFAULTS };
    for (const [k, v] of Object.entries(options)) {
      if (!(k in ADAMW_DEFAULTS)) throw new TypeError(`adamw: unknown option '${k}' (known: ${Object.keys(ADAMW_DEFAULTS).join(', ')})`);
      if (v === undefined) continue;
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new TypeError(`adamw: option '${k}' must be a finite number`);
      o[k as keyof AdamWOptions] = v;
    }
    if (o.lr < 0) throw new RangeError(`adamw: lr must be >= 0, got ${o.lr}`);
    if (o.beta1 < 0 || o.beta1 >= 1) throw new RangeError(`adamw: beta1 must be in [0, 1), got ${o.beta1}`);
    if (o.beta2 < 0 || o.beta2 >= 1) throw new RangeError(`adamw: beta2 must be in [0, 1), got ${o.beta2}`);
    if (o.eps <= 0) throw new RangeError(`adamw: eps must be > 0, got ${o.eps}`);
    if (o.weightDecay < 0) throw new RangeError(`adamw: weightDecay must be >= 0, got ${o.weightDecay}`);
    return this.enqueue(() => this.native.adamwStep(o));
  }

  /**
   * Writes a Hugging Face folder: config.json (the source's, dtype updated), the weights under their hub
   * names, and the source folder's tokenizer and generation files.
   */
  async saveHfFolder(dir: string, options: SaveHfOptions = {}): Promise<string[]> {
    const dtype = options.dtype ?? 'f32';
    if (dtype !== 'f32' && dtype !== 'bf16') throw new TypeError(`saveHfFolder: dtype must be 'f32' or 'bf16', got '${String(dtype)}'`);
    const c = this.config;
    if (c.expertBegin !== 0 || c.expertEnd !== c.numExperts) {
      throw new WeightsError(
        `saveHfFolder: this engine holds experts [${c.expertBegin}, ${c.expertEnd}) of ${c.numExperts}; a Hugging Face folder needs all of them`,
      );
    }
    return this.enqueue(async () => {
      if (this.native.device() >= 0) await this.native.syncToHost();
      await mkdir(dir, { recursive: true });
      const params = this.paramsByName();
      const tensors: TensorToWrite[] = this.table.map((p) => ({ name: p.name, shape: p.shape, data: params.get(p.name)! }));
      const written = await writeSafetensorsFolder(dir, tensors, { dtype: dtype === 'bf16' ? 'BF16' : 'F32', maxShardBytes: options.maxShardBytes });
      const config: Record<string, unknown> = { ...this.parsed.raw };
      const dtypeName = dtype === 'bf16' ? 'bfloat16' : 'float32';
      let dtypeSet = false;
      for (const k of ['dtype', 'torch_dtype']) {
        if (k in config) {
          config[k] = dtypeName;
          dtypeSet = true;
        }
      }
      if (!dtypeSet) config.torch_dtype = dtypeName;
      await writeFile(join(dir, 'config.json'), JSON.stringify(config, null, 2) + '\n');
      written.push('config.json');
      if (this.sourceDir && resolve(dir) !== this.sourceDir) {
        const present = new Set(await readdir(this.sourceDir));
        for (const f of SIDE_FILES) {
          if (!present.has(f)) continue;
          await copyFile(join(this.sourceDir, f), join(dir, f));
          written.push(f);
        }
      }
      return written;
    });
  }

  /**
   * Expert + data parallelism: this engine (holding experts [bounds[r], bounds[r+1]) as rank r) trains on its
   * own sequences with the other ranks of `communicator`. From then on forward, forwardBackward and
   * adamwStep are collective: every rank makes the same calls in the same order (an idle rank passes an
   * empty batch).
   */
  setParallel(communicator: { native: object; worldSize: number; rank: number }, expertBounds: readonly number[]): void {
    this.checkAlive();
    try {
      this.native.setParallel(communicator.native, Int32Array.from(expertBounds));
    } catch (e) {
      throw toEngineError(e);
    }
    this.parallel = true;
  }

  /**
   * This rank's AdamW state as zero-copy views (for checkpoints: read after an optimizer step, write before
   * the next one, then setOptimizerSteps). Allocated on first use; layout fixed for the engine's lifetime. Each
   * moment buffer comes in views of at most chunkFloats floats (default 2^28; tests pass less).
   */
  optimizerState(chunkFloats?: number): NativeOptimizerState {
    this.checkAlive();
    try {
      return this.native.optimizerState(chunkFloats);
    } catch (e) {
      throw toEngineError(e);
    }
  }

  /** Restores the AdamW step count (bias correction) after loading optimizer state. */
  setOptimizerSteps(steps: number): void {
    this.checkAlive();
    this.native.setOptimizerSteps(steps);
  }

  /** Whether setParallel made this engine one rank of an expert-parallel group. */
  get isParallel(): boolean {
    return this.parallel;
  }

  /** Sums the dense gradients over the ranks (full-batch gradients everywhere; for checks). */
  allReduceDenseGrads(): Promise<void> {
    return this.enqueue(() => this.native.allReduceDenseGrads());
  }

  /**
   * Runs `fn` in this engine's call order (after calls already made, before later ones): the rollout's
   * generation steps go through here so that they never interleave with a training step.
   * `fn` receives the native engine object (for native classes built on it, such as the Generator).
   */
  exclusive<T>(fn: (native: NativeEngine) => Promise<T>): Promise<T> {
    return this.enqueue(() => fn(this.native));
  }

  /** The native engine object, for constructing native classes over it (the Generator). */
  get nativeEngine(): NativeEngine {
    this.checkAlive();
    return this.native;
  }

  /** Waits for calls in flight, then refuses further use. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.tail;
  }

  private checkAlive(): void {
    if (this.disposed) throw new Error('engine is disposed');
  }

  private enqueue<T>(fn: () => Promise<T>): Promise<T> {
    this.checkAlive();
    const p = this.tail.then(async () => {
      try {
        return await fn();
      } catch (e) {
        throw toEngineError(e);
      }
    });
    this.tail = p.catch(() => undefined);
    return p;
  }

  private checkBatch(batch: PackedBatch): NativeBatch {
    const { tokens, seqLens } = batch;
    if (!(tokens instanceof Int32Array)) throw new TypeError('batch.tokens must be an Int32Array');
    if (!(seqLens instanceof Int32Array)) throw new TypeError('batch.seqLens must be an Int32Array');
    // An idle rank of a parallel group still joins the token exchanges, with an empty batch.
    if (seqLens.length === 0 && !this.parallel) throw new RangeError('batch: seqLens is empty');
    let n = 0;
    seqLens.forEach((l, b) => {
      if (l < 1) throw new RangeError(`batch: seqLens[${b}] is ${l}; every sequence needs at least one token`);
      n += l;
    });
    if (n !== tokens.length) throw new RangeError(`batch: seqLens sum to ${n} but tokens has ${tokens.length} entries`);
    const V = this.config.vocab;
    for (let i = 0; i < tokens.length; i++) {
      if (tokens[i] < 0 || tokens[i] >= V) throw new RangeError(`batch: tokens[${i}] = ${tokens[i]} is outside the vocabulary [0, ${V})`);
    }
    const replay = batch.replayExperts ?? null;
    if (replay !== null) {
      if (!(replay instanceof Int32Array)) throw new TypeError('batch.replayExperts must be an Int32Array or null');
      const want = this.moeLayers * n * this.config.topK;
      if (replay.length !== want) {
        throw new RangeError(`batch: replayExperts has ${replay.length} entries, expected moeLayers*N*topK = ${this.moeLayers}*${n}*${this.config.topK} = ${want}`);
      }
      const E = this.config.numExperts;
      for (let i = 0; i < replay.length; i++) {
        if (replay[i] < 0 || replay[i] >= E) throw new RangeError(`batch: replayExperts[${i}] = ${replay[i]} is outside [0, ${E})`);
      }
    }
    return { tokens, seqLens, replayExperts: replay };
  }

  // Every parameter must be in the files with its shape; every file tensor must be a parameter of this
  // model (experts outside this process's range are expected and skipped).
  private checkTensorNames(ckpt: SafetensorsCheckpoint, dir: string): void {
    const names = new Set(this.table.map((p) => p.name));
    for (const p of this.table) {
      const t = ckpt.tensors.get(p.name);
      if (!t) throw new WeightsError(`tensor ${p.name} is missing from ${dir} (no safetensors file holds it)`);
      if (t.shape.length !== p.shape.length || t.shape.some((d, i) => d !== p.shape[i])) {
        throw new WeightsError(`${ckpt.fileOf(p.name)}: tensor ${p.name} has shape ${fmtShape(t.shape)}, expected ${fmtShape(p.shape)}`);
      }
    }
    const c = this.config;
    for (const name of ckpt.tensors.keys()) {
      if (names.has(name) || isNonParameterTensor(name)) continue;
      if (name === 'lm_head.weight' && c.tieEmbeddings) continue;
      const ex = parseExpertTensorName(name);
      if (ex && ex.expert < c.numExperts && (ex.expert < c.expertBegin || ex.expert >= c.expertEnd)) {
        // Another process's expert: valid if the same tensor of a local expert exists.
        const local = name.replace(`.experts.${ex.expert}.`, `.experts.${c.expertBegin}.`);
        if (names.has(local)) continue;
      }
      throw new WeightsError(`${ckpt.fileOf(name)}: unexpected tensor ${name} (not a parameter of this ${this.modelType} model)`);
    }
  }

  private async loadWeights(ckpt: SafetensorsCheckpoint, concurrency: number): Promise<void> {
    let next = 0;
    const params = this.paramsByName();
    const worker = async () => {
      while (next < this.table.length) {
        const p = this.table[next++];
        await ckpt.read(p.name, params.get(p.name)!);
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
  }
}

function constructNative(parsed: ParsedHfConfig, addonPath: string | undefined): NativeEngine {
  const addon = loadNative(addonPath);
  try {
    return new addon.Engine(parsed.engine);
  } catch (e) {
    throw toEngineError(e);
  }
}

function deepFreeze<T>(o: T): T {
  if (typeof o === 'object' && o !== null && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o)) deepFreeze(v);
  }
  return o;
}

function checkRows(name: string, a: unknown, n: number, finite = true): Float32Array {
  if (!(a instanceof Float32Array)) throw new TypeError(`loss: ${name} must be a Float32Array`);
  if (a.length !== n) throw new RangeError(`loss: ${name} has ${a.length} entries, expected N = ${n}`);
  if (finite) {
    for (let i = 0; i < n; i++) if (!Number.isFinite(a[i])) throw new RangeError(`loss: ${name}[${i}] is not finite`);
  }
  return a;
}

function checkNumber(name: string, v: unknown, min: number): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min) throw new RangeError(`loss: ${name} must be a number >= ${min}, got ${String(v)}`);
  return v;
}

function checkPositive(name: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) throw new RangeError(`loss: ${name} must be a number > 0, got ${String(v)}`);
  return v;
}

const LOSS_FIELDS = new Set([
  'type', 'mask', 'advantages', 'oldLogprobs', 'refLogprobs', 'epsLow', 'epsHigh', 'beta', 'kl', 'aggregation',
  'totalTokens', 'totalSeqs', 'normLength', 'temperature', 'auxLossCoef', 'auxScale',
]);

/** Validates a loss against a batch and fills defaults, giving the native side a fully specified spec. */
export function buildLossSpec(loss: LossInput, batch: Pick<PackedBatch, 'tokens' | 'seqLens'>): NativeLossSpec {
  for (const k of Object.keys(loss)) if (!LOSS_FIELDS.has(k)) throw new TypeError(`loss: unknown field '${k}'`);
  if (loss.type !== 'sft' && loss.type !== 'grpo') throw new TypeError(`loss: type must be 'sft' or 'grpo', got '${String(loss.type)}'`);
  const n = batch.tokens.length;
  const mask = checkRows('mask', loss.mask, n);
  // Each sequence's last row has no next token to predict.
  let end = 0;
  for (let b = 0; b < batch.seqLens.length; b++) {
    end += batch.seqLens[b];
    if (mask[end - 1] !== 0) throw new RangeError(`loss: mask must be 0 at the last row of each sequence (row ${end - 1}, sequence ${b})`);
  }
  const aggregation = loss.aggregation ?? LOSS_DEFAULTS.aggregation;
  if (!AGGREGATIONS.includes(aggregation)) throw new TypeError(`loss: aggregation must be one of ${AGGREGATIONS.join(', ')}, got '${String(aggregation)}'`);
  const kl = loss.kl ?? LOSS_DEFAULTS.kl;
  if (!KL_ESTIMATORS.includes(kl)) throw new TypeError(`loss: kl must be one of ${KL_ESTIMATORS.join(', ')}, got '${String(kl)}'`);
  const epsLow = checkNumber('epsLow', loss.epsLow ?? LOSS_DEFAULTS.epsLow, 0);
  const epsHigh = checkNumber('epsHigh', loss.epsHigh ?? LOSS_DEFAULTS.epsHigh, 0);
  const beta = checkNumber('beta', loss.beta ?? LOSS_DEFAULTS.beta, 0);
  const grpo = loss.type === 'grpo';
  let advantages: Float32Array | null = null;
  let oldLogprobs: Float32Array | null = null;
  let refLogprobs: Float32Array | null = null;
  if (grpo) {
    advantages = checkRows('advantages', loss.advantages, n);
    oldLogprobs = checkRows('oldLogprobs', loss.oldLogprobs, n);
    if (loss.refLogprobs != null) refLogprobs = checkRows('refLogprobs', loss.refLogprobs, n);
    else if (beta > 0) throw new RangeError('loss: refLogprobs are required when beta > 0');
  } else {
    for (const k of ['advantages', 'oldLogprobs', 'refLogprobs'] as const) {
      if (loss[k] != null) throw new TypeError(`loss: ${k} is only used by the grpo loss`);
    }
  }
  const optTotal = (name: string, v: number | null | undefined) => (v == null ? 0 : checkNumber(name, v, 0));
  const auxLossCoef = loss.auxLossCoef == null ? -1 : checkNumber('auxLossCoef', loss.auxLossCoef, 0);
  return {
    type: loss.type,
    mask,
    advantages,
    oldLogprobs,
    refLogprobs,
    epsLow,
    epsHigh,
    beta,
    kl,
    aggregation,
    totalTokens: optTotal('totalTokens', loss.totalTokens),
    totalSeqs: optTotal('totalSeqs', loss.totalSeqs),
    normLength: optTotal('normLength', loss.normLength),
    temperature: checkPositive('temperature', loss.temperature ?? LOSS_DEFAULTS.temperature),
    auxLossCoef,
    auxScale: checkNumber('auxScale', loss.auxScale ?? LOSS_DEFAULTS.auxScale, 0),
  };
}

/**
 * Contiguous expert blocks over `ranks` ranks: bounds [ranks + 1], rank r owning [bounds[r], bounds[r+1]).
 * Uneven splits put the extra experts on the first ranks (60 experts over 8 ranks: 8,8,8,8,7,7,7,7).
 */
export function expertBounds(numExperts: number, ranks: number): number[] {
  if (!Number.isInteger(ranks) || ranks < 1) throw new RangeError(`expertBounds: ranks must be an integer >= 1, got ${ranks}`);
  if (numExperts < ranks) throw new RangeError(`expertBounds: ${numExperts} experts cannot be split over ${ranks} ranks (each rank needs one)`);
  const base = Math.floor(numExperts / ranks);
  const extra = numExperts % ranks;
  const bounds = [0];
  for (let r = 0; r < ranks; r++) bounds.push(bounds[r] + base + (r < extra ? 1 : 0));
  return bounds;
}

/** Packs padded rows [B][T] with real lengths into a batch. */
export function packBatch(padded: readonly ArrayLike<number>[], lengths: ArrayLike<number>): PackedBatch {
  if (padded.length !== lengths.length) throw new RangeError(`packBatch: ${padded.length} rows but ${lengths.length} lengths`);
  const seqLens = new Int32Array(padded.length);
  let n = 0;
  for (let b = 0; b < padded.length; b++) {
    const l = lengths[b];
    if (!Number.isInteger(l) || l < 1 || l > padded[b].length) {
      throw new RangeError(`packBatch: lengths[${b}] = ${l} must be an integer in [1, ${padded[b].length}]`);
    }
    seqLens[b] = l;
    n += l;
  }
  const tokens = new Int32Array(n);
  let o = 0;
  for (let b = 0; b < padded.length; b++) {
    for (let i = 0; i < seqLens[b]; i++) tokens[o++] = padded[b][i];
  }
  return { tokens, seqLens };
}

/** Packs per-sequence values (each at least seqLens[b] long; extra padding ignored) into one [N] array. */
export function packRows(rows: readonly ArrayLike<number>[], seqLens: Int32Array): Float32Array {
  if (rows.length !== seqLens.length) throw new RangeError(`packRows: ${rows.length} rows but ${seqLens.length} sequences`);
  let n = 0;
  for (let b = 0; b < rows.length; b++) {
    if (rows[b].length < seqLens[b]) throw new RangeError(`packRows: row ${b} has ${rows[b].length} values, sequence has ${seqLens[b]}`);
    n += seqLens[b];
  }
  const out = new Float32Array(n);
  let o = 0;
  for (let b = 0; b < rows.length; b++) for (let i = 0; i < seqLens[b]; i++) out[o++] = rows[b][i];
  return out;
}

/**
 * Splits a packed per-row array ([N] or [N, width]) into one view per sequence. For per-token outputs
 * (logprobs, entropy), entry i of sequence b is the prediction of its token i + 1; the last is 0.
 */
export function unpackRows<T extends Float32Array | Int32Array>(values: T, seqLens: Int32Array, width = 1): T[] {
  const n = seqLens.reduce((a, b) => a + b, 0);
  if (values.length !== n * width) throw new RangeError(`unpackRows: ${values.length} values, expected N*width = ${n}*${width}`);
  const out: T[] = [];
  let o = 0;
  for (const l of seqLens) {
    out.push(values.subarray(o * width, (o + l) * width) as T);
    o += l;
  }
  return out;
}

