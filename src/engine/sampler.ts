// Typed wrapper over the native token sampler (kernels/gen/sampling.h, bound in
// kernels/addon/sampler_binding.cpp). This layer validates every parameter and fills defaults, then hands the
// native side a flat, fully specified object; the semantics of each filter and of the random streams are
// documented once, in sampling.h.
import { createRequire } from "node:module";
import { DEFAULT_ADDON_PATH } from "./native.ts";

/** Fully specified parameters of one row, as the native side receives them. */
export interface SamplingParams {
  /** >= 0; 0 = greedy (argmax, lowest index on ties; logprob at temperature 1). */
  temperature: number;
  /** Integer >= 0; 0 = off. Ties at the k-th largest probability are all kept. */
  topK: number;
  /** In (0, 1]; 1 = off. Applied over the top-k set renormalised. */
  topP: number;
  /** In [0, 1); 0 = off. Keeps tokens with prob >= minP * max prob. */
  minP: number;
  /** Philox key, [0, 2^64). */
  seed: bigint;
  /** Counter words 2-3, [0, 2^64). */
  requestId: bigint;
  /** Which of a request's samples (GRPO group member), [0, 65536). */
  sampleIndex: number;
  /** Decode step, [0, 2^32). */
  step: number;
}

/** What callers pass: the filters default to off and temperature to 1; the stream identity is required. */
export interface SamplingParamsInput {
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  seed: bigint | number;
  requestId: bigint | number;
  sampleIndex: number;
  step: number;
}

export interface SampleBatch {
  /** [rows] sampled token ids. */
  tokens: Int32Array;
  /** [rows] log_softmax(logits / temperature)[token] over the full vocabulary (temperature 1 when greedy). */
  logprobs: Float32Array;
  /** [rows] random draws the rejection sampler used (1 = first draw accepted, 0 = greedy). */
  rounds: Int32Array;
}

/** The addon's functions, as bound natively (internal: use `createSampler`). */
export interface SamplerNative {
  sampleRows(logits: Float32Array, vocab: number, params: SamplingParams[]): Promise<SampleBatch>;
  filteredProbs(logits: Float32Array, params: SamplingParams): Float64Array;
  philox4x32(counter: Uint32Array, key: Uint32Array): Uint32Array;
}

export interface Sampler {
  /**
   * Samples one token per row of `logits` [rows * vocab] (row-major), rows = params.length. Each row's result
   * depends only on its logits and params, never on the rest of the batch. The logits are read in place:
   * do not modify them until the promise settles.
   */
  sampleRows(logits: Float32Array, vocab: number, params: readonly SamplingParamsInput[]): Promise<SampleBatch>;
  /** Test oracle: the exact filtered, renormalised distribution of one row [vocab], found by sorting. */
  filteredProbs(logits: Float32Array, params: SamplingParamsInput): Float64Array;
}

export const SAMPLING_DEFAULTS = { temperature: 1, topK: 0, topP: 1, minP: 0 } as const;
/** sampleIndex must be below this (16 bits of the Philox counter). */
export const MAX_SAMPLE_INDEX = 65536;

/** A sampling parameter or argument is invalid; the message names the field and the allowed range. */
export class SamplingParamsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SamplingParamsError";
  }
}

const FIELDS = new Set(["temperature", "topK", "topP", "minP", "seed", "requestId", "sampleIndex", "step"]);
const U64_MAX = (1n << 64n) - 1n;
const INT32_MAX = 2 ** 31 - 1;
const U32_MAX = 2 ** 32 - 1;

function fail(where: string, message: string): never {
  throw new SamplingParamsError(`${where}: ${message}`);
}

function finite(where: string, name: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isFinite(v)) fail(where, `${name} must be a finite number, got ${String(v)}`);
  return v;
}

function integer(where: string, name: string, v: unknown, min: number, max: number): number {
  const x = finite(where, name, v);
  if (!Number.isInteger(x) || x < min || x > max) fail(where, `${name} must be an integer in [${min}, ${max}], got ${x}`);
  return x;
}

function u64(where: string, name: string, v: unknown): bigint {
  let x: bigint;
  if (typeof v === "bigint") x = v;
  else if (typeof v === "number" && Number.isSafeInteger(v)) x = BigInt(v);
  else fail(where, `${name} must be a bigint or a safe integer, got ${String(v)}`);
  if (x < 0n || x > U64_MAX) fail(where, `${name} must be in [0, 2^64), got ${x}`);
  return x;
}

/** Validates one row's parameters and fills defaults; `where` names the row in error messages. */
export function resolveSamplingParams(input: SamplingParamsInput, where = "sampling params"): SamplingParams {
  if (typeof input !== "object" || input === null) fail(where, "must be an object");
  for (const key of Object.keys(input)) {
    if (!FIELDS.has(key)) fail(where, `unknown field '${key}' (expected one of ${[...FIELDS].join(", ")})`);
  }
  const temperature = finite(where, "temperature", input.temperature ?? SAMPLING_DEFAULTS.temperature);
  if (temperature < 0) fail(where, `temperature must be >= 0 (0 = greedy), got ${temperature}`);
  const topK = integer(where, "topK", input.topK ?? SAMPLING_DEFAULTS.topK, 0, INT32_MAX);
  const topP = finite(where, "topP", input.topP ?? SAMPLING_DEFAULTS.topP);
  if (!(topP > 0 && topP <= 1)) fail(where, `topP must be in (0, 1] (1 = off), got ${topP}`);
  const minP = finite(where, "minP", input.minP ?? SAMPLING_DEFAULTS.minP);
  if (!(minP >= 0 && minP < 1)) fail(where, `minP must be in [0, 1) (0 = off), got ${minP}`);
  if (input.seed === undefined) fail(where, "seed is required");
  if (input.requestId === undefined) fail(where, "requestId is required");
  return {
    temperature,
    topK,
    topP,
    minP,
    seed: u64(where, "seed", input.seed),
    requestId: u64(where, "requestId", input.requestId),
    sampleIndex: integer(where, "sampleIndex", input.sampleIndex, 0, MAX_SAMPLE_INDEX - 1),
    step: integer(where, "step", input.step, 0, U32_MAX),
  };
}

function checkLogits(logits: Float32Array, vocab: number, rows: number): void {
  if (!(logits instanceof Float32Array)) throw new SamplingParamsError("logits must be a Float32Array");
  if (!Number.isInteger(vocab) || vocab < 1 || vocab > INT32_MAX) {
    throw new SamplingParamsError(`vocab must be a positive integer, got ${vocab}`);
  }
  if (logits.length !== rows * vocab) {
    throw new SamplingParamsError(
      `logits has ${logits.length} elements, expected rows * vocab = ${rows} * ${vocab} = ${rows * vocab}`,
    );
  }
}

/** Loads the native addon (built by scripts/build-native.sh) and returns its sampler functions. */
export function loadSamplerNative(addonPath: string = DEFAULT_ADDON_PATH): SamplerNative {
  const addon = createRequire(import.meta.url)(addonPath) as Partial<SamplerNative>;
  if (typeof addon.sampleRows !== "function" || typeof addon.filteredProbs !== "function") {
    throw new Error(`${addonPath} has no sampler functions: rebuild it with scripts/build-native.sh`);
  }
  return addon as SamplerNative;
}

export function createSampler(deps: { native: SamplerNative }): Sampler {
  const { native } = deps;
  return {
    sampleRows(logits, vocab, params) {
      try {
        checkLogits(logits, vocab, params.length);
        const resolved = params.map((p, r) => resolveSamplingParams(p, `params[${r}]`));
        return native.sampleRows(logits, vocab, resolved);
      } catch (e) {
        return Promise.reject(e);
      }
    },
    filteredProbs(logits, params) {
      checkLogits(logits, logits.length, 1);
      return native.filteredProbs(logits, resolveSamplingParams(params));
    },
  };
}
