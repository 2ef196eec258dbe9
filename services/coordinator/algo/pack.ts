// Packing rollout samples into the trainer proto's layout (proto/pilot/v1/trainer.proto MicroBatch).
//
// Sequences (prompt + completion) are concatenated with no padding. Every per-token array is aligned with
// input_ids: position i holds the value for token i (its logprob given the tokens before it), so only
// completion tokens carry a mask of 1, an advantage and an old logprob; prompt positions are 0. The rank
// shifts to the engine's "row i predicts token i + 1" layout.
import type { Tensor } from '../../../proto/gen/pilot/v1/common.ts';
import type { MicroBatch, PackedSequences } from '../../../proto/gen/pilot/v1/trainer.ts';

export interface TrainSample {
  promptTokens: readonly number[];
  completionTokens: readonly number[];
  /** Rollout logprob of each completion token (same length as completionTokens). */
  logprobs: ArrayLike<number>;
  advantage: number;
}

export function f32Tensor(values: Float32Array, shape: number[] = [values.length]): Tensor {
  return { dtype: 'f32', shape, data: Buffer.from(values.buffer, values.byteOffset, values.byteLength) };
}

export function i32Tensor(values: Int32Array, shape: number[] = [values.length]): Tensor {
  return { dtype: 'i32', shape, data: Buffer.from(values.buffer, values.byteOffset, values.byteLength) };
}

export function u8Tensor(values: Uint8Array, shape: number[] = [values.length]): Tensor {
  return { dtype: 'u8', shape, data: Buffer.from(values.buffer, values.byteOffset, values.byteLength) };
}

/** Reads an f32 tensor (copying, so the result is aligned whatever the wire buffer's offset). */
export function readF32(t: Tensor | undefined, what: string): Float32Array {
  if (!t) throw new TypeError(`${what}: tensor missing`);
  if (t.dtype !== 'f32') throw new TypeError(`${what}: expected an f32 tensor, got ${t.dtype}`);
  if (t.data.length % 4 !== 0) throw new TypeError(`${what}: ${t.data.length} bytes is not a whole number of f32`);
  const out = new Float32Array(t.data.length / 4);
  new Uint8Array(out.buffer).set(t.data);
  return out;
}

/** Reads an i64 tensor (e.g. expert loads) as numbers. */
export function readI64(t: Tensor | undefined, what: string): number[] {
  if (!t) throw new TypeError(`${what}: tensor missing`);
  if (t.dtype !== 'i64') throw new TypeError(`${what}: expected an i64 tensor, got ${t.dtype}`);
  const buf = Buffer.from(t.data);
  const out: number[] = [];
  for (let o = 0; o + 8 <= buf.length; o += 8) out.push(Number(buf.readBigInt64LE(o)));
  return out;
}

/** input_ids, position_ids and cu_seqlens of token sequences. */
export function packSequences(seqs: readonly (readonly number[])[]): PackedSequences {
  const n = seqs.reduce((a, s) => a + s.length, 0);
  const ids = new Int32Array(n);
  const pos = new Int32Array(n);
  const cu = new Int32Array(seqs.length + 1);
  let at = 0;
  seqs.forEach((s, i) => {
    ids.set(s, at);
    for (let j = 0; j < s.length; j++) pos[at + j] = j;
    at += s.length;
    cu[i + 1] = at;
  });
  return { inputIds: i32Tensor(ids), positionIds: i32Tensor(pos), cuSeqlens: i32Tensor(cu) };
}

export interface PackedMicroBatch {
  microBatch: MicroBatch;
  /** Masked (completion) tokens in it. */
  tokens: number;
  sequences: number;
}

/** One micro-batch; an empty sample list gives an empty (zero-token) micro-batch for an idle rank. */
export function packMicroBatch(samples: readonly TrainSample[], refLogprobs: Float32Array | null = null): PackedMicroBatch {
  const seqs = samples.map((s, k) => {
    if (s.promptTokens.length < 1) throw new RangeError(`packMicroBatch: sample ${k} has an empty prompt`);
    if (s.logprobs.length !== s.completionTokens.length) {
      throw new RangeError(`packMicroBatch: sample ${k} has ${s.logprobs.length} logprobs for ${s.completionTokens.length} completion tokens`);
    }
    if (!Number.isFinite(s.advantage)) throw new RangeError(`packMicroBatch: sample ${k} advantage is not finite`);
    return [...s.promptTokens, ...s.completionTokens];
  });
  const sequences = packSequences(seqs);
  const n = seqs.reduce((a, s) => a + s.length, 0);
  const mask = new Uint8Array(n);
  const adv = new Float32Array(n);
  const old = new Float32Array(n);
  let at = 0;
  let tokens = 0;
  for (const s of samples) {
    const first = at + s.promptTokens.length;
    const T = s.completionTokens.length;
    mask.fill(1, first, first + T);
    adv.fill(s.advantage, first, first + T);
    for (let j = 0; j < T; j++) old[first + j] = s.logprobs[j];
    tokens += T;
    at += s.promptTokens.length + T;
  }
  if (refLogprobs !== null && refLogprobs.length !== n) {
    throw new RangeError(`packMicroBatch: ${refLogprobs.length} reference logprobs for ${n} tokens`);
  }
  return {
    microBatch: {
      sequences,
      lossMask: u8Tensor(mask),
      advantages: f32Tensor(adv),
      oldLogprobs: f32Tensor(old),
      refLogprobs: refLogprobs === null ? undefined : f32Tensor(refLogprobs),
    },
    tokens,
    sequences: samples.length,
  };
}
