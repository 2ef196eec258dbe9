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
  assert.ok(saved.state.denseV.some((v) => v > 0));
  const b = await Engine.fromHfFolder(dir);
  b.params.set(saved.params);
  const st = b.optimizerState();
  for (const k of ['denseM', 'denseV', 'expertM', 'expertV'] as const) st[k].set(saved.state[k]);
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
