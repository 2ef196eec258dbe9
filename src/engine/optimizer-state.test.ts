// AdamW state survives a checkpoint: an engine restored from parameters + optimizer state + step count
// continues exactly like the one that never stopped.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Engine } from './engine.ts';

const dir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures/qwen3_moe-tiny');

async function step(e: Engine): Promise<void> {
  const tokens = Int32Array.from({ length: 12 }, (_, i) => 5 + ((i * 37) % 400));
  const mask = new Float32Array(12).fill(1);
  mask[11] = 0;
  await e.zeroGrad();
  await e.forwardBackward({ tokens, seqLens: Int32Array.from([12]) }, { type: 'sft', mask });
  await e.adamwStep({ lr: 1e-3, weightDecay: 0.1, maxGradNorm: 1 });
}

test('optimizer state and step count restore exactly', async () => {
  const a = await Engine.fromHfFolder(dir);
  await step(a);
  await step(a);
  const saved = { params: new Float32Array(a.params), state: structuredClone(a.optimizerState()) };
  assert.equal(saved.state.step, 2);
  assert.ok(saved.state.denseV.some((chunk) => chunk.some((v) => v > 0)));
  const b = await Engine.fromHfFolder(dir);
  b.params.set(saved.params);
  const st = b.optimizerState();
  for (const k of ['denseM', 'denseV', 'expertM', 'expertV'] as const) st[k].forEach((chunk, i) => chunk.set(saved.state[k][i]));
  b.setOptimizerSteps(saved.state.step);
  await step(a);
  await step(b);
  assert.deepEqual(b.params, a.params);
  // Without the state the third step differs.
  const c = await Engine.fromHfFolder(dir);
  c.params.set(saved.params);
  await step(c);
  assert.notDeepEqual(c.params, a.params);
});

test('optimizer state comes in chunks of the size asked for, covering the same memory', async () => {
  const a = await Engine.fromHfFolder(dir);
  await step(a);
  const whole = a.optimizerState();
  const pieces = a.optimizerState(1000);
  for (const k of ['denseM', 'denseV', 'expertM', 'expertV'] as const) {
    const n = whole[k].reduce((t, c) => t + c.length, 0);
    assert.ok(n > 0, `${k} is empty`);
    assert.equal(whole[k].length, 1, `${k}: one chunk by default at this size`);
    assert.equal(pieces[k].length, Math.ceil(n / 1000), `${k}: ${n} floats in chunks of 1000`);
    assert.ok(pieces[k].slice(0, -1).every((c) => c.length === 1000));
    const joined = new Float32Array(n);
    let at = 0;
    for (const c of pieces[k]) joined.set(c, (at += c.length) - c.length);
    assert.deepEqual(joined, whole[k][0]);
    // Views, not copies: a write through a chunk shows in the whole.
    pieces[k][pieces[k].length - 1][0] = 12345;
    assert.equal(whole[k][0][(pieces[k].length - 1) * 1000], 12345);
  }
  assert.ok(pieces.expertM.length > 1 && pieces.denseM.length > 1, 'the state spans several chunks of 1000');
  assert.throws(() => a.optimizerState(0), /chunkFloats must be a number in \[1, 2\^30\]/);
});

test('parameters and gradients by name are views of the flat buffers; ranges are checked', async () => {
  const a = await Engine.fromHfFolder(dir);
  await step(a);
  const params = a.paramsByName(), grads = a.gradsByName();
  assert.equal(a.paramCount, a.params.length);
  for (const p of a.paramTable) {
    assert.deepEqual(params.get(p.name), a.params.subarray(p.offset, p.offset + p.numel));
    assert.deepEqual(grads.get(p.name), a.grads.subarray(p.offset, p.offset + p.numel));
  }
  const first = a.paramTable[0];
  params.get(first.name)![0] = 7.5;
  assert.equal(a.params[first.offset], 7.5);
  assert.throws(() => a.nativeEngine.params(a.paramCount - 1, 2), /is not a range of the/);
  assert.throws(() => a.nativeEngine.grads(-1, 1), /is not a range of the/);
  assert.throws(() => a.nativeEngine.params(1.5, 1), /is not a range of the/);
});
