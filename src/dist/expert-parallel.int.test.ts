// Expert + data parallelism over real processes (Gloo on loopback): 1, 2, 3 and 4 ranks give the one-rank
// logits, losses and gradients (8 experts over 3 ranks is an uneven split; 4 ranks over 3 sequences leave
// one rank idle), and several AdamW steps (ZeRO-1 for dense parameters) stay equal.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Engine } from '../engine/engine.ts';
import { computeOutputs, maxRelativeError, readReference } from '../oracle/model-oracle.ts';
import { runRanks } from './oracle-ranks.ts';

const fixtures = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures');

function gradError(a: Map<string, Float32Array>, b: Map<string, Float32Array>): number {
  let worst = 0;
  for (const [name, g] of b) worst = Math.max(worst, maxRelativeError(a.get(name)!, g));
  return worst;
}

for (const name of ['recomputed/qwen2_moe-tiny', 'qwen3_moe-tiny']) {
  test(`world sizes 1-4 give the one-rank results (${name})`, { timeout: 180_000 }, async () => {
    const dir = path.join(fixtures, name);
    const ref = await readReference(dir);
    const one = await computeOutputs(await Engine.fromHfFolder(dir), ref);
    for (const ranks of [1, 2, 3, 4]) {
      const { outputs: o } = await runRanks(dir, { ranks, timeoutMs: 30_000 });
      const tag = `${name} with ${ranks} ranks`;
      assert.ok(maxRelativeError(o.logits!, one.logits!) <= 1e-5, `${tag}: logits`);
      assert.ok(maxRelativeError(o.logprobs, one.logprobs) <= 1e-5, `${tag}: logprobs`);
      assert.ok(maxRelativeError(o.routerLogits!, one.routerLogits!) <= 1e-5, `${tag}: router logits`);
      assert.ok(Math.abs(o.grpoLoss! - one.grpoLoss!) <= 1e-5 * Math.abs(one.grpoLoss!), `${tag}: grpo loss`);
      assert.ok(Math.abs(o.sftLoss! - one.sftLoss!) <= 1e-5 * Math.abs(one.sftLoss!), `${tag}: sft loss`);
      assert.ok(gradError(o.gradsGrpo!, one.gradsGrpo!) <= 1e-5, `${tag}: grpo gradients ${gradError(o.gradsGrpo!, one.gradsGrpo!)}`);
      assert.ok(gradError(o.gradsSft!, one.gradsSft!) <= 1e-5, `${tag}: sft gradients`);
      // Rollout under expert parallelism: greedy tokens decoded collectively are the one-rank ones.
      assert.deepEqual(o.greedyTokens, one.greedyTokens, `${tag}: greedy decoding`);
    }
  });
}

test('several training steps stay equal across world sizes (ZeRO-1 AdamW, experts updated by their owner)', { timeout: 120_000 }, async () => {
  const dir = path.join(fixtures, 'recomputed/qwen2_moe-tiny');
  const steps = 3;
  const runs = [];
  for (const ranks of [1, 3]) runs.push(await runRanks(dir, { ranks, timeoutMs: 30_000, trainSteps: steps, lr: 1e-3 }));
  const [a, b] = runs.map((r) => r.trained!);
  assert.ok(maxRelativeError(b.logprobs, a.logprobs) <= 1e-5, `logprobs after ${steps} steps: ${maxRelativeError(b.logprobs, a.logprobs)}`);
  // Parameters: AdamW divides each gradient by its own running magnitude, so the 1e-6 relative noise of a
  // different summation order on an almost-zero gradient entry can move that entry by a good part of lr;
  // the bound is therefore 1e-4 of the parameters' scale (lr is 1e-3 of it), while outputs stay at 1e-5.
  let worst = 0;
  for (const [n, p] of a.params) worst = Math.max(worst, maxRelativeError(b.params.get(n)!, p));
  assert.ok(worst <= 1e-4, `parameters after ${steps} steps differ by ${worst}`);
  // And training moved them.
  const start = (await Engine.fromHfFolder(dir)).paramsByName();
  let moved = 0;
  for (const [n, p] of a.params) moved = Math.max(moved, maxRelativeError(p, start.get(n)!));
  assert.ok(moved > 1e-4, 'the optimizer steps changed the parameters');
});
