// Wire tensors (pilot.v1.Tensor: little-endian bytes + dtype + shape) to typed arrays and back, and the
// conversion between the proto's packed layout and the engine's.
//
// Layouts. The proto aligns every per-token array with input_ids: entry j of a sequence belongs to its
// token j (loss_mask[j] = 1 when token j is a trained completion token, logprobs[j] = log p(token j |
// tokens < j), so entry 0 of each sequence is 0). The engine works on rows: row i is the prediction of
// token i + 1 of its sequence, and the last row of each sequence predicts nothing. So proto entry j + 1
// is engine row j, and the engine's last row of each sequence is 0.
import { InvalidArgumentError } from '../common/errors.ts';
import type { Tensor } from '../../proto/gen/pilot/v1/common.ts';
import type { PackedSequences } from '../../proto/gen/pilot/v1/trainer.ts';
import type { PackedBatch } from '../../src/engine/engine.ts';

const BYTES: Readonly<Record<string, number>> = { f32: 4, i32: 4, u8: 1, i64: 8 };

function checkShape(field: string, t: Tensor, length: number): void {
  if (t.shape.length === 0) return; // shape may be left out for a 1-D tensor
  const numel = t.shape.reduce((a, b) => a * Number(b), 1);
  if (t.shape.length !== 1 || numel !== length) {
    throw new InvalidArgumentError(field, `shape [${t.shape.join(', ')}] does not match its ${length} values (expected a 1-D tensor)`);
  }
}

function bytesOf(field: string, t: Tensor, dtype: string): Uint8Array {
  const size = BYTES[dtype];
  if (t.data.length % size !== 0) throw new InvalidArgumentError(field, `${t.data.length} bytes is not a whole number of ${dtype} values`);
  // Copied: the wire buffer need not be aligned for a typed-array view.
  return new Uint8Array(t.data);
}

/** A 1-D i32 tensor. */
export function readI32(field: string, t: Tensor | undefined): Int32Array {
  if (!t) throw new InvalidArgumentError(field, 'is required (an i32 tensor)');
  if (t.dtype !== 'i32') throw new InvalidArgumentError(field, `dtype must be "i32", got "${t.dtype}"`);
  const out = new Int32Array(bytesOf(field, t, 'i32').buffer);
  checkShape(field, t, out.length);
  return out;
}

/** A 1-D f32 tensor with finite values. */
export function readF32(field: string, t: Tensor | undefined): Float32Array {
  if (!t) throw new InvalidArgumentError(field, 'is required (an f32 tensor)');
  if (t.dtype !== 'f32') throw new InvalidArgumentError(field, `dtype must be "f32", got "${t.dtype}"`);
  const out = new Float32Array(bytesOf(field, t, 'f32').buffer);
  checkShape(field, t, out.length);
  for (let i = 0; i < out.length; i++) if (!Number.isFinite(out[i])) throw new InvalidArgumentError(field, `value ${i} is not finite (${out[i]})`);
  return out;
}

/** A 1-D 0/1 mask: u8 as the proto says, or f32 holding 0 and 1. */
export function readMask(field: string, t: Tensor | undefined): Float32Array {
  if (!t) throw new InvalidArgumentError(field, 'is required (a u8 tensor)');
  let out: Float32Array;
  if (t.dtype === 'u8') out = Float32Array.from(bytesOf(field, t, 'u8'));
  else if (t.dtype === 'f32') out = readF32(field, t);
  else throw new InvalidArgumentError(field, `dtype must be "u8", got "${t.dtype}"`);
  checkShape(field, t, out.length);
  for (let i = 0; i < out.length; i++) if (out[i] !== 0 && out[i] !== 1) throw new InvalidArgumentError(field, `value ${i} is ${out[i]}; a mask holds 0 or 1`);
  return out;
}

export function f32Tensor(values: ArrayLike<number>, shape: number[] = [values.length]): Tensor {
  const a = values instanceof Float32Array ? values : Float32Array.from(values);
  return { dtype: 'f32', shape, data: Buffer.from(a.buffer, a.byteOffset, a.byteLength) };
}

export function i32Tensor(values: ArrayLike<number>, shape: number[] = [values.length]): Tensor {
  const a = values instanceof Int32Array ? values : Int32Array.from(values);
  return { dtype: 'i32', shape, data: Buffer.from(a.buffer, a.byteOffset, a.byteLength) };
}

export function i64Tensor(values: ArrayLike<number>, shape: number[]): Tensor {
  const a = BigInt64Array.from(Array.from(values, (v) => BigInt(v)));
  return { dtype: 'i64', shape, data: Buffer.from(a.buffer, a.byteOffset, a.byteLength) };
}

export function u8Tensor(values: ArrayLike<number>): Tensor {
  const a = Uint8Array.from(values);
  return { dtype: 'u8', shape: [a.length], data: Buffer.from(a.buffer, a.byteOffset, a.byteLength) };
}

/**
 * The engine batch of a proto PackedSequences: sequences from cu_seqlens, token ids checked against the
 * vocabulary, position_ids (optional) checked to restart at 0 for every sequence. An unset or empty
 * message is an empty batch (an idle rank's share).
 */
export function readPacked(field: string, p: PackedSequences | undefined, vocab: number): PackedBatch {
  if (!p || (!p.inputIds && !p.cuSeqlens)) return { tokens: new Int32Array(0), seqLens: new Int32Array(0) };
  const tokens = readI32(`${field}.input_ids`, p.inputIds);
  const cu = readI32(`${field}.cu_seqlens`, p.cuSeqlens);
  if (cu.length === 0) {
    if (tokens.length !== 0) throw new InvalidArgumentError(`${field}.cu_seqlens`, `is empty but input_ids has ${tokens.length} tokens`);
    return { tokens, seqLens: new Int32Array(0) };
  }
  if (cu[0] !== 0) throw new InvalidArgumentError(`${field}.cu_seqlens`, `must start at 0, got ${cu[0]}`);
  const seqLens = new Int32Array(cu.length - 1);
  for (let s = 0; s < seqLens.length; s++) {
    seqLens[s] = cu[s + 1] - cu[s];
    if (seqLens[s] < 1) throw new InvalidArgumentError(`${field}.cu_seqlens`, `sequence ${s} is empty or negative (${cu[s]} .. ${cu[s + 1]})`);
  }
  if (cu[cu.length - 1] !== tokens.length) {
    throw new InvalidArgumentError(`${field}.cu_seqlens`, `ends at ${cu[cu.length - 1]} but input_ids has ${tokens.length} tokens`);
  }
  for (let i = 0; i < tokens.length; i++) {
    if (tokens[i] < 0 || tokens[i] >= vocab) throw new InvalidArgumentError(`${field}.input_ids`, `token ${i} is ${tokens[i]}, outside the vocabulary [0, ${vocab})`);
  }
  if (p.positionIds && p.positionIds.data.length > 0) {
    const pos = readI32(`${field}.position_ids`, p.positionIds);
    if (pos.length !== tokens.length) throw new InvalidArgumentError(`${field}.position_ids`, `has ${pos.length} entries, input_ids ${tokens.length}`);
    for (let s = 0; s < seqLens.length; s++) {
      for (let j = 0; j < seqLens[s]; j++) {
        if (pos[cu[s] + j] !== j) {
          throw new InvalidArgumentError(`${field}.position_ids`, `entry ${cu[s] + j} is ${pos[cu[s] + j]}, expected ${j} (positions restart at 0 for every sequence)`);
        }
      }
    }
  }
  return { tokens, seqLens };
}

/**
 * Proto layout (aligned with input_ids) -> engine rows: row j of a sequence takes entry j + 1; the last
 * row is 0. With `firstMustBeZero`, entry 0 of a sequence must be 0 (a mask cannot train a token that
 * nothing predicts).
 */
export function toRows(field: string, values: Float32Array, seqLens: Int32Array, firstMustBeZero: boolean): Float32Array {
  const n = seqLens.reduce((a, b) => a + b, 0);
  if (values.length !== n) throw new InvalidArgumentError(field, `has ${values.length} entries, input_ids has ${n}`);
  const out = new Float32Array(n);
  let o = 0;
  for (let s = 0; s < seqLens.length; s++) {
    if (firstMustBeZero && values[o] !== 0) {
      throw new InvalidArgumentError(field, `entry ${o} (the first token of sequence ${s}) is ${values[o]}; the first token of a sequence is never predicted, so it cannot be trained`);
    }
    for (let j = 0; j + 1 < seqLens[s]; j++) out[o + j] = values[o + j + 1];
    o += seqLens[s];
  }
  return out;
}

/** Engine rows -> proto layout: entry j + 1 of a sequence takes row j; entry 0 is 0. */
export function fromRows(rows: Float32Array, seqLens: Int32Array): Float32Array {
  const out = new Float32Array(rows.length);
  let o = 0;
  for (let s = 0; s < seqLens.length; s++) {
    for (let j = 0; j + 1 < seqLens[s]; j++) out[o + j + 1] = rows[o + j];
    o += seqLens[s];
  }
  return out;
}
