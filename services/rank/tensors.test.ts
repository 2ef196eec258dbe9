// The wire <-> engine layout conversions and tensor checks, on hand-written cases.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InvalidArgumentError } from '../common/errors.ts';
import { f32Tensor, fromRows, i32Tensor, readF32, readI32, readMask, readPacked, toRows, u8Tensor } from './tensors.ts';

const lens = Int32Array.from([3, 2]);

test('toRows shifts each sequence left by one and zeroes its last row', () => {
  // Sequence A: tokens a0 a1 a2, sequence B: b0 b1; entry j belongs to token j.
  const wire = Float32Array.from([0, 11, 12, 0, 21]);
  assert.deepEqual(Array.from(toRows('x', wire, lens, false)), [11, 12, 0, 21, 0]);
  assert.deepEqual(Array.from(fromRows(Float32Array.from([11, 12, 0, 21, 0]), lens)), [0, 11, 12, 0, 21]);
});

test('toRows refuses a trained first token and a length mismatch', () => {
  assert.throws(() => toRows('loss_mask', Float32Array.from([0, 1, 1, 1, 1]), lens, true), (e: Error) => e instanceof InvalidArgumentError && /loss_mask: entry 3 \(the first token of sequence 1\)/.test(e.message));
  assert.throws(() => toRows('adv', new Float32Array(4), lens, false), /adv: has 4 entries, input_ids has 5/);
});

test('readPacked reads cu_seqlens and checks positions and the vocabulary', () => {
  const p = { inputIds: i32Tensor([5, 6, 7, 8, 9]), positionIds: i32Tensor([0, 1, 2, 0, 1]), cuSeqlens: i32Tensor([0, 3, 5]) };
  const b = readPacked('b', p, 10);
  assert.deepEqual(Array.from(b.seqLens), [3, 2]);
  assert.deepEqual(Array.from(b.tokens), [5, 6, 7, 8, 9]);
  assert.throws(() => readPacked('b', p, 9), /b\.input_ids: token 4 is 9, outside the vocabulary \[0, 9\)/);
  assert.throws(() => readPacked('b', { ...p, positionIds: i32Tensor([0, 1, 2, 3, 4]) }, 10), /b\.position_ids: entry 3 is 3, expected 0/);
  assert.throws(() => readPacked('b', { ...p, cuSeqlens: i32Tensor([0, 3, 3, 5]) }, 10), /sequence 1 is empty/);
  assert.throws(() => readPacked('b', { ...p, cuSeqlens: i32Tensor([1, 5]) }, 10), /must start at 0/);
  assert.equal(readPacked('b', undefined, 10).tokens.length, 0);
});

test('tensor dtypes, shapes and values are checked', () => {
  assert.throws(() => readI32('t', f32Tensor([1])), /t: dtype must be "i32", got "f32"/);
  assert.throws(() => readF32('t', f32Tensor([1, Number.NaN])), /t: value 1 is not finite/);
  assert.throws(() => readF32('t', { ...f32Tensor([1, 2]), shape: [3] }), /shape \[3\] does not match its 2 values/);
  assert.throws(() => readF32('t', { dtype: 'f32', shape: [], data: Buffer.alloc(6) }), /6 bytes is not a whole number of f32 values/);
  assert.throws(() => readMask('m', u8Tensor([0, 2])), /m: value 1 is 2; a mask holds 0 or 1/);
  assert.deepEqual(Array.from(readMask('m', u8Tensor([0, 1]))), [0, 1]);
  assert.throws(() => readF32('t', undefined), /t: is required/);
});
