// A second opinion on the backward pass: central finite differences of the loss on a handful of
// parameters (one per kind of tensor), against the engine's analytic gradients, for each model family.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Engine } from '../src/engine/engine.ts';
import type { LossInput, PackedBatch } from '../src/engine/engine.ts';

const fixtures = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures');

function batchFor(vocab: number): PackedBatch {
  // Three sequences of different lengths, fixed pseudo-random tokens.
  const lens = [11, 7, 4];
  let x = 12345;
  const tokens = Int32Array.from({ length: lens.reduce((a, b) => a + b, 0) }, () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return 3 + (x % (vocab - 3));
  });
  return { tokens, seqLens: Int32Array.from(lens) };
}

function lossesFor(batch: PackedBatch): LossInput[] {
  const N = batch.tokens.length;
  const mask = new Float32Array(N);
  const adv = new Float32Array(N);
  const old = new Float32Array(N);
  const ref = new Float32Array(N);
  let o = 0;
  batch.seqLens.forEach((len, b) => {
    for (let t = 0; t < len; t++, o++) {
      mask[o] = t >= 2 && t < len - 1 ? 1 : 0;
      adv[o] = [0.9, -0.6, 0.4][b];
      old[o] = -6.2 + 0.05 * ((t * 7) % 5);
      ref[o] = -6.3 + 0.04 * ((t * 3) % 4);
    }
  });
  return [
    { type: 'sft', mask, auxLossCoef: 0.05 },
    { type: 'grpo', mask, advantages: adv, oldLogprobs: old, refLogprobs: ref, beta: 0.1, kl: 'k3', aggregation: 'seq-mean-token-mean', auxLossCoef: 0.05 },
  ];
}

// One parameter element per kind of tensor: the element with the largest analytic gradient in the first
// tensor whose name matches.
const KINDS = [/self_attn\.q_proj\.weight/, /self_attn\.k_norm|self_attn\.k_proj\.bias|self_attn\.v_proj\.weight/, /o_proj/, /(mlp|block_sparse_moe)\.gate\.weight/,
  /experts\.\d+\.(gate_proj|w1)/, /experts\.\d+\.(down_proj|w2)/, /shared_expert_gate|mlp\.up_proj|input_layernorm/, /model\.norm|lm_head|embed_tokens/];

for (const family of ['qwen2_moe-tiny', 'qwen3_moe-tiny', 'mixtral-tiny', 'qwen2_moe-sparse-step']) {
  const dir = path.join(fixtures, family);
  test(`finite differences agree with the backward pass (${family})`, { skip: !existsSync(dir) && `${dir} not present` }, async () => {
    const engine = await Engine.fromHfFolder(dir);
    const batch = batchFor(engine.config.vocab);
    for (const loss of lossesFor(batch)) {
      await engine.zeroGrad();
      await engine.forwardBackward(batch, loss);
      const grads = engine.gradsByName();
      const params = engine.paramsByName();
      const picks: { name: string; i: number; g: number }[] = [];
      for (const re of KINDS) {
        const name = [...grads.keys()].find((n) => re.test(n));
        if (!name) continue;
        const g = grads.get(name)!;
        let best = 0;
        for (let i = 1; i < g.length; i++) if (Math.abs(g[i]) > Math.abs(g[best])) best = i;
        picks.push({ name, i: best, g: g[best] });
      }
      assert.ok(picks.length >= 6, `only ${picks.length} kinds of tensor found`);
      // Top-k routing makes the loss piecewise smooth: a step that flips a token's expert choice crosses a
      // kink. Two step sizes that disagree mean a kink was crossed; such an element is skipped (and counted).
      let checked = 0;
      let kinks = 0;
      for (const p of picks) {
        const w = params.get(p.name)!;
        const orig = w[p.i];
        const at = async (v: number) => {
          w[p.i] = v;
          await engine.zeroGrad();
          // The reported loss leaves the load-balancing term out; the gradient includes coef * aux.
          const r = await engine.forwardBackward(batch, loss);
          return r.loss + (loss.auxLossCoef ?? 0) * r.auxLoss;
        };
        const fdAt = async (h: number) => ((await at(orig + h)) - (await at(orig - h))) / (2 * h);
        // Steps of about 1% of a weight's size, at most 1e-3 (norm weights near 1 would otherwise move
        // enough to flip routing decisions); float32 losses make much smaller steps noisy.
        const h = 1e-2 * Math.min(Math.max(Math.abs(orig), 0.05), 0.1);
        const fd1 = await fdAt(h);
        const fd2 = await fdAt(2 * h);
        w[p.i] = orig;
        if (Math.abs(fd1 - fd2) > 0.05 * Math.max(Math.abs(fd1), Math.abs(fd2), 1e-3)) {
          kinks++;
          continue;
        }
        const rel = Math.abs(fd1 - p.g) / Math.max(Math.abs(p.g), 1e-3);
        assert.ok(rel < 2e-2, `${family} ${loss.type}: ${p.name}[${p.i}] analytic ${p.g} vs finite difference ${fd1} (rel ${rel.toExponential(2)})`);
        checked++;
      }
      assert.ok(checked >= 5 && kinks <= 2, `${family} ${loss.type}: ${checked} elements checked, ${kinks} skipped at routing kinks`);
    }
  });
}
