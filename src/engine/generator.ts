// Rollout generation: the user-facing scheduler over the native Generator (kernels/gen/generator.h).
//
// Requests (a prompt with n samples: a GRPO group) are queued natively and admitted when the paged KV cache
// can hold their worst case, so a request that does not fit waits and nothing is truncated. One driver loop
// runs native steps (each off the event loop, in the engine's call order) and streams every sample as soon
// as it finishes. Stop strings are found here on the decoded text; the sample is then cancelled natively and
// cut at the stop string.
import type { Engine } from './engine.ts';
import { loadNative } from './native.ts';
import type { NativeGenerator, NativeSampleEvent } from './native.ts';
import { MAX_SAMPLE_INDEX, resolveSamplingParams } from './sampler.ts';

/** What the generator needs of a tokenizer: decoding ids to text (for stop strings and output text). */
export interface TextDecoder {
  decode(ids: readonly number[], options?: { skipSpecialTokens?: boolean }): string;
}

export interface GenerateRequest {
  /** Prompt token ids (already templated and encoded). */
  prompt: readonly number[] | Int32Array;
  /** Samples of this prompt (the GRPO group size G); default 1. */
  n?: number;
  maxNewTokens: number;
  /** 0 = greedy; default 1. */
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  /** Random stream identity: (seed, requestId, sample index, step) fixes every draw. */
  seed: bigint | number;
  requestId: bigint | number;
  /** Token ids that end a sample (eos and extras); the stop token is kept in the output. */
  stopTokenIds?: readonly number[];
  /** Strings that end a sample; the output text and tokens are cut at the first one (needs a decoder). */
  stopStrings?: readonly string[];
  /** Return the experts chosen per token per MoE layer (router replay for training). */
  returnExperts?: boolean;
}

export type FinishReason = 'stop' | 'length' | 'stop_string' | 'cancelled';

export interface Sample {
  requestId: bigint;
  sampleIndex: number;
  /** Completion token ids (prompt excluded). */
  tokens: number[];
  /** log_softmax(logits / temperature)[token] of each completion token (temperature 1 when greedy). */
  logprobs: number[];
  /** Decoded completion (when a decoder was given). */
  text: string | null;
  finishReason: FinishReason;
  /**
   * Experts of each row fed through the model, [rows, moeLayers, K], rows = prompt length + completion
   * length - 1 (the last completion token is never fed); only with returnExperts.
   */
  experts: Int32Array | null;
}

export interface GeneratorOptions {
  /** KV cache blocks (all allocated at start-up). */
  numBlocks: number;
  /** Tokens per block; default 16. */
  blockSize?: number;
  /**
   * On an engine on a GPU (the rollout then runs there, KV cache on the device): decode iterations under CUDA
   * graphs; default true. false runs every iteration eagerly (the same bits; tests compare both). Ignored on the CPU.
   */
  cudaGraphs?: boolean;
  /** Decode steps per native call; default 8 (a call also ends when a sample finishes). */
  stepsPerCall?: number;
  decoder?: TextDecoder | null;
  addonPath?: string;
}

export interface Generator {
  /** Streams the request's samples as they finish (in finishing order). One rank only (see generateMany). */
  generate(request: GenerateRequest): AsyncIterable<Sample>;
  /**
   * Streams the samples of several requests as they finish. With expert parallelism this is one rank's part
   * of a collective rollout phase: every rank must call it (with its own requests, possibly none), and it
   * ends on all ranks together once no rank has work left, since every rank's decode steps exchange tokens
   * with the others'.
   */
  generateMany(requests: readonly GenerateRequest[]): AsyncIterable<Sample>;
  /** All samples of a request, ordered by sample index. */
  generateAll(request: GenerateRequest): Promise<Sample[]>;
  /** Distinct KV blocks the request's running samples hold now (shared prompt blocks counted once). */
  stats(): { numBlocks: number; freeBlocks: number; reservedBlocks: number; activeSamples: number; waitingGroups: number };
  /** KV blocks held now by a running request (for memory accounting and its test). */
  requestBlocks(requestId: bigint | number): number;
  blocksNeeded(promptLen: number, n: number, maxNewTokens: number): number;
  /** Cancels every sample of a request still running. */
  cancel(requestId: bigint | number): void;
  /** Stops accepting work, waits for the loop to drain. */
  close(): Promise<void>;
}

interface SampleState {
  requestId: bigint;
  sampleIndex: number;
  tokens: number[];
  logprobs: number[];
  experts: number[] | null;
  stopReason: FinishReason | null;
}

interface GroupState {
  groupId: number;
  requestId: bigint;
  promptLen: number;
  samples: Map<number, SampleState>;
  promptExperts: Int32Array | null;
  stopStrings: readonly string[];
  returnExperts: boolean;
  deliver: (s: Sample) => void;
  fail: (e: unknown) => void;
  remaining: number;
}

export class GenerateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GenerateError';
  }
}

export function createGenerator(engine: Engine, options: GeneratorOptions): Generator {
  const blockSize = options.blockSize ?? 16;
  const stepsPerCall = options.stepsPerCall ?? 8;
  if (!Number.isInteger(options.numBlocks) || options.numBlocks < 1) throw new GenerateError(`numBlocks must be an integer >= 1, got ${options.numBlocks}`);
  if (!Number.isInteger(blockSize) || blockSize < 1) throw new GenerateError(`blockSize must be an integer >= 1, got ${blockSize}`);
  if (!Number.isInteger(stepsPerCall) || stepsPerCall < 1) throw new GenerateError(`stepsPerCall must be an integer >= 1, got ${stepsPerCall}`);
  const addon = loadNative(options.addonPath);
  const cudaGraphs = options.cudaGraphs ?? true;
  if (typeof cudaGraphs !== 'boolean') throw new GenerateError(`cudaGraphs must be a boolean, got ${String(cudaGraphs)}`);
  const native: NativeGenerator = new addon.Generator(engine.nativeEngine, { numBlocks: options.numBlocks, blockSize, cudaGraphs });
  const decoder = options.decoder ?? null;
  const groups = new Map<number, GroupState>();
  const groupOfSample = new Map<number, GroupState>();
  // Cancels are applied right before the next native step (never while one runs, so the event loop never
  // waits on the generator's lock).
  const pendingCancels: number[] = [];
  let nextGroupId = 1;
  let nextSampleId = 1;
  let loop: Promise<void> | null = null;
  let closed = false;
  // With expert parallelism: whether some rank may still have work in the current phase.
  let globalActive = false;
  const loopWaiters: (() => void)[] = [];

  function finishSample(g: GroupState, sampleId: number, reason: FinishReason): void {
    const s = g.samples.get(sampleId)!;
    g.samples.delete(sampleId);
    groupOfSample.delete(sampleId);
    let experts: Int32Array | null = null;
    if (g.returnExperts && g.promptExperts && s.experts) {
      experts = new Int32Array(g.promptExperts.length + s.experts.length);
      experts.set(g.promptExperts, 0);
      experts.set(s.experts, g.promptExperts.length);
      const perRow = g.promptLen > 0 ? g.promptExperts.length / g.promptLen : 0;
      const rows = g.promptLen + s.tokens.length - 1;
      experts = experts.subarray(0, Math.max(rows, g.promptLen) * perRow);
    }
    g.deliver({
      requestId: s.requestId,
      sampleIndex: s.sampleIndex,
      tokens: s.tokens,
      logprobs: s.logprobs,
      text: decoder ? decoder.decode(s.tokens, { skipSpecialTokens: false }) : null,
      finishReason: reason,
      experts,
    });
    if (--g.remaining === 0) groups.delete(g.groupId);
  }

  // Finds the first stop string in the sample's text; on a hit cuts tokens to the shortest prefix whose text
  // contains it and returns true.
  function applyStopStrings(g: GroupState, s: SampleState): boolean {
    if (!decoder || g.stopStrings.length === 0) return false;
    const text = decoder.decode(s.tokens, { skipSpecialTokens: false });
    if (!g.stopStrings.some((st) => text.includes(st))) return false;
    let cut = s.tokens.length;
    for (let n = 1; n <= s.tokens.length; n++) {
      const t = decoder.decode(s.tokens.slice(0, n), { skipSpecialTokens: false });
      if (g.stopStrings.some((st) => t.includes(st))) {
        cut = n;
        break;
      }
    }
    s.tokens.length = cut;
    s.logprobs.length = cut;
    return true;
  }

  function onEvent(ev: NativeSampleEvent): void {
    const g = groupOfSample.get(ev.sampleId);
    if (!g) return;
    const s = g.samples.get(ev.sampleId)!;
    if (s.stopReason) {
      if (ev.finished) finishSample(g, ev.sampleId, s.stopReason);
      return;
    }
    for (let i = 0; i < ev.tokens.length; i++) {
      s.tokens.push(ev.tokens[i]);
      s.logprobs.push(ev.logprobs[i]);
    }
    if (s.experts) for (let i = 0; i < ev.experts.length; i++) s.experts.push(ev.experts[i]);
    if (ev.finished === 'cancelled') {
      finishSample(g, ev.sampleId, 'cancelled');
      return;
    }
    if (applyStopStrings(g, s)) {
      s.stopReason = 'stop_string';
      if (ev.finished) finishSample(g, ev.sampleId, 'stop_string');
      else pendingCancels.push(ev.sampleId);
      return;
    }
    if (ev.finished) finishSample(g, ev.sampleId, ev.finished);
  }

  async function drive(): Promise<void> {
    try {
      while (groups.size > 0 || globalActive) {
        const r = await engine.exclusive(() => {
          for (const id of pendingCancels.splice(0)) native.cancel(id);
          return native.step(stepsPerCall);
        });
        globalActive = engine.isParallel && r.globalActive;
        for (const p of r.prefills) {
          const g = groups.get(p.groupId);
          if (g) g.promptExperts = p.experts;
        }
        for (const ev of r.events) onEvent(ev);
      }
    } catch (e) {
      for (const g of groups.values()) g.fail(e);
      groups.clear();
      groupOfSample.clear();
    } finally {
      loop = null;
      globalActive = false;
      for (const w of loopWaiters.splice(0)) w();
    }
  }

  function startLoop(): void {
    if (!loop) loop = drive();
  }

  function submit(req: GenerateRequest, deliver: (s: Sample) => void, fail: (e: unknown) => void): void {
    if (closed) throw new GenerateError('generator is closed');
    const n = req.n ?? 1;
    if (!Number.isInteger(n) || n < 1 || n > MAX_SAMPLE_INDEX) throw new GenerateError(`n must be an integer in [1, ${MAX_SAMPLE_INDEX}], got ${n}`);
    if (!Number.isInteger(req.maxNewTokens) || req.maxNewTokens < 1) throw new GenerateError(`maxNewTokens must be an integer >= 1, got ${req.maxNewTokens}`);
    if (req.prompt.length === 0) throw new GenerateError('prompt is empty');
    if (req.stopStrings?.length && !decoder) throw new GenerateError('stopStrings need a decoder (a tokenizer)');
    if (req.stopStrings?.some((s) => s.length === 0)) throw new GenerateError('stopStrings must not contain an empty string');
    const groupId = nextGroupId++;
    const g: GroupState = {
      groupId,
      requestId: BigInt(req.requestId),
      promptLen: req.prompt.length,
      samples: new Map(),
      promptExperts: null,
      stopStrings: req.stopStrings ?? [],
      returnExperts: req.returnExperts ?? false,
      deliver,
      fail,
      remaining: n,
    };
    const samples = [];
    for (let i = 0; i < n; i++) {
      const p = resolveSamplingParams(
        { temperature: req.temperature, topK: req.topK, topP: req.topP, minP: req.minP, seed: req.seed, requestId: req.requestId, sampleIndex: i, step: 0 },
        `request ${String(req.requestId)}`,
      );
      const sampleId = nextSampleId++;
      samples.push({ sampleId, ...p });
      g.samples.set(sampleId, { requestId: g.requestId, sampleIndex: i, tokens: [], logprobs: [], experts: g.returnExperts ? [] : null, stopReason: null });
    }
    // Validated natively too (vocabulary, cache size): an error here queues nothing.
    native.addGroup({
      groupId,
      prompt: Int32Array.from(req.prompt),
      samples,
      maxNewTokens: req.maxNewTokens,
      stopIds: Int32Array.from(req.stopTokenIds ?? []),
      wantExperts: g.returnExperts,
    });
    groups.set(groupId, g);
    for (const id of g.samples.keys()) groupOfSample.set(id, g);
  }

  function generate(req: GenerateRequest): AsyncIterable<Sample> {
    if (engine.isParallel) throw new GenerateError('with expert parallelism rollout is collective: use generateMany on every rank');
    return stream([req], false);
  }

  // Samples of `reqs` as they finish; `collective` also waits for the phase to end on every rank.
  function stream(reqs: readonly GenerateRequest[], collective: boolean): AsyncIterable<Sample> {
    const ready: Sample[] = [];
    let error: unknown = null;
    let wake: (() => void) | null = null;
    let total = 0;
    let started = false;
    let phaseDone = !collective;
    const start = () => {
      started = true;
      for (const req of reqs) {
        submit(
          req,
          (s) => {
            ready.push(s);
            wake?.();
          },
          (e) => {
            error = e;
            wake?.();
          },
        );
        total += req.n ?? 1;
      }
      if (collective) {
        globalActive = true; // step at least once: the first step's exchange meets the other ranks
        loopWaiters.push(() => {
          phaseDone = true;
          wake?.();
        });
      }
      startLoop();
    };
    return {
      [Symbol.asyncIterator]() {
        let delivered = 0;
        return {
          async next(): Promise<IteratorResult<Sample>> {
            if (!started) start();
            while (ready.length === 0 && error === null && (delivered < total || !phaseDone)) await new Promise<void>((r) => (wake = r));
            if (ready.length > 0) {
              delivered++;
              return { value: ready.shift()!, done: false };
            }
            if (error !== null) throw error;
            return { value: undefined, done: true };
          },
        };
      },
    };
  }

  return {
    generate,
    generateMany(requests) {
      return stream(requests, engine.isParallel);
    },
    async generateAll(req) {
      const out: Sample[] = [];
      for await (const s of generate(req)) out.push(s);
      return out.sort((a, b) => a.sampleIndex - b.sampleIndex);
    },
    stats() {
      const s = native.stats();
      return { numBlocks: s.numBlocks, freeBlocks: s.freeBlocks, reservedBlocks: s.reservedBlocks, activeSamples: s.activeSamples, waitingGroups: s.waitingGroups };
    },
    requestBlocks(requestId) {
      const id = BigInt(requestId);
      let total = 0;
      for (const g of groups.values()) if (g.requestId === id) total += native.groupBlocks(g.groupId);
      return total;
    },
    blocksNeeded(promptLen, n, maxNewTokens) {
      return native.blocksNeeded(promptLen, n, maxNewTokens);
    },
    cancel(requestId) {
      const id = BigInt(requestId);
      for (const g of groups.values()) {
        if (g.requestId !== id) continue;
        for (const [sampleId, s] of g.samples) {
          if (s.stopReason) continue;
          s.stopReason = 'cancelled';
          pendingCancels.push(sampleId);
        }
      }
    },
    async close() {
      closed = true;
      while (loop) await loop;
    },
  };
}
