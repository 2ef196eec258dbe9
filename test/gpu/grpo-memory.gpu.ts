// Peak device memory of a GRPO step against the group size G (16, 64, 256) with a fixed micro-batch: the
// Qwen1.5-MoE-A2.7B shape with `--layers` layers in a training copy on the GPU (fp32 weights + bf16 copy,
// gradients, AdamW state), random weights made on the device. One step = the rollout of `--prompts` prompts x G
// samples on the GPU (a fixed KV pool, as a rank's --kv-blocks; prompt 64, 64 new tokens, top-p 0.9), group-relative
// advantages from a stand-in reward (completion token parity: a real reward service is not the memory question), the
// GRPO loss over micro-batches of `--micro` sequences (forwardBackward each, gradients accumulating), and one AdamW
// step. The peak of each step is read from the engine's device-memory ledger (Engine.deviceMemory: every allocation
// the process makes on the card), reset before the step.
//
// What G may add: the rollout's per-iteration buffers (rows in flight) and nothing on the training side, whose
// activations are sized by the micro-batch. Goal: peaks within 5% of each other. Bundled by scripts/device/bundle.sh,
// run by bench/grpo-memory-gpu.sh.
//
// Usage: MOEPILOT_ADDON=<moepilot.node> node grpo-memory-gpu.mjs --layers 4 --groups 16,64,256 --gpu <name> --out result.json
import { writeFileSync } from 'node:fs';

import { Engine, type PackedBatch } from '../../src/engine/engine.ts';
import { createGenerator, type Sample } from '../../src/engine/generator.ts';
import { parseHfConfig } from '../../src/hf/config.ts';
import { A2P7B_VOCAB, a2p7bConfig } from './a2p7b.ts';
import { arg } from './args.ts';

const layers = Number(arg('layers', '4'));
const groupSizes = arg('groups', '16,64,256').split(',').map(Number);
const prompts = Number(arg('prompts', '2'));
const micro = Number(arg('micro', '16'));
const out = arg('out', 'grpo-memory-gpu.json');
const gpuName = arg('gpu', 'unknown');
const P = 64;
const NEW = 64;
const BS = 16;
const KV_BLOCKS = 4096; // the rank's fixed pool: 64k positions

const GiB = 2 ** 30;

function lcg(seed: number): () => number {
  let x = seed >>> 0;
  return () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
}

/** GRPO micro-batches of `micro` sequences (prompt + completion), advantages normalised within each prompt's group. */
function microBatches(promptsTokens: number[][], samples: Sample[][]): { batch: PackedBatch; mask: Float32Array; adv: Float32Array; old: Float32Array }[] {
  const seqs: { tokens: number[]; promptLen: number; logprobs: number[]; adv: number }[] = [];
  samples.forEach((group, g) => {
    const rewards = group.map((s) => s.tokens.filter((t) => t % 2 === 0).length / Math.max(s.tokens.length, 1));
    const mean = rewards.reduce((a, b) => a + b, 0) / rewards.length;
    const std = Math.sqrt(rewards.reduce((a, b) => a + (b - mean) ** 2, 0) / rewards.length);
    group.forEach((s, i) =>
      seqs.push({ tokens: [...promptsTokens[g], ...s.tokens], promptLen: promptsTokens[g].length, logprobs: s.logprobs, adv: (rewards[i] - mean) / (std + 1e-6) }),
    );
  });
  const mbs = [];
  for (let b = 0; b < seqs.length; b += micro) {
    const part = seqs.slice(b, b + micro);
    const N = part.reduce((a, s) => a + s.tokens.length, 0);
    const tokens = new Int32Array(N);
    const mask = new Float32Array(N);
    const adv = new Float32Array(N);
    const old = new Float32Array(N);
    let o = 0;
    for (const s of part) {
      tokens.set(s.tokens, o);
      // Row i predicts token i + 1: completion token j is predicted at row promptLen - 1 + j.
      for (let j = 0; j < s.logprobs.length; j++) {
        const r = o + s.promptLen - 1 + j;
        mask[r] = 1;
        adv[r] = s.adv;
        old[r] = s.logprobs[j];
      }
      o += s.tokens.length;
    }
    mbs.push({ batch: { tokens, seqLens: Int32Array.from(part.map((s) => s.tokens.length)) }, mask, adv, old });
  }
  return mbs;
}

async function main(): Promise<void> {
  const engine = Engine.fromConfig(parseHfConfig(a2p7bConfig(layers), { source: 'bench config' }));
  await engine.toDevice('cuda:0');
  await engine.nativeEngine.fillParamsRandom(1234, 0.02);
  const gen = createGenerator(engine, { numBlocks: KV_BLOCKS, blockSize: BS, stepsPerCall: NEW });
  const results: Record<string, unknown>[] = [];
  // A first step at the smallest G creates the optimizer state and every lazily sized buffer; steps are then measured
  // from the same starting state.
  const order = [groupSizes[0], ...groupSizes];
  for (let step = 0; step < order.length; step++) {
    const G = order[step];
    const warm = step === 0;
    const held = engine.deviceMemory({ resetPeak: true }).current;
    const rand = lcg(7 + G);
    const promptsTokens = Array.from({ length: prompts }, () => Array.from({ length: P }, () => rand() % A2P7B_VOCAB));
    const t0 = performance.now();
    const samples = await Promise.all(
      promptsTokens.map((prompt, i) => gen.generateAll({ prompt, n: G, maxNewTokens: NEW, temperature: 1, topP: 0.9, seed: 42, requestId: step * 1000 + i })),
    );
    const rolloutPeak = engine.deviceMemory().peak;
    const t1 = performance.now();
    const mbs = microBatches(promptsTokens, samples);
    const totalTokens = mbs.reduce((a, m) => a + m.mask.reduce((x, y) => x + y, 0), 0);
    await engine.zeroGrad();
    let loss = 0;
    for (const m of mbs) {
      const r = await engine.forwardBackward(m.batch, {
        type: 'grpo',
        mask: m.mask,
        advantages: m.adv,
        oldLogprobs: m.old,
        totalTokens,
        auxScale: m.mask.reduce((x, y) => x + y, 0) / totalTokens,
      });
      loss += r.loss;
    }
    const norm = await engine.adamwStep({ lr: 1e-6, maxGradNorm: 1 });
    const t2 = performance.now();
    const peak = engine.deviceMemory().peak;
    const r = {
      G,
      sequences: prompts * G,
      micro_batch_sequences: micro,
      micro_batches: mbs.length,
      trained_tokens: totalTokens,
      loss,
      grad_norm: norm,
      held_before_bytes: held,
      rollout_peak_bytes: rolloutPeak,
      step_peak_bytes: peak,
      rollout_ms: t1 - t0,
      train_ms: t2 - t1,
    };
    console.log(
      `${warm ? 'warm-up ' : ''}G=${G}: ${prompts * G} sequences, ${mbs.length} micro-batches of ${micro}; held ${(held / GiB).toFixed(2)} GiB before, ` +
        `rollout peak ${(rolloutPeak / GiB).toFixed(2)} GiB, step peak ${(peak / GiB).toFixed(2)} GiB; rollout ${(t1 - t0).toFixed(0)} ms, train ${(t2 - t1).toFixed(0)} ms`,
    );
    results.push({ warm, ...r });
  }
  const measured = results.filter((r) => !r.warm);
  const peaks = measured.map((r) => r.step_peak_bytes as number);
  const spread = (Math.max(...peaks) - Math.min(...peaks)) / Math.min(...peaks);
  console.log(`step peak spread over G=${groupSizes.join(',')}: ${(100 * spread).toFixed(2)}% (goal <= 5%)`);
  writeFileSync(
    out,
    JSON.stringify(
      {
        engine: 'moepilot-gpu GRPO step (rollout + micro-batched GRPO forward/backward + AdamW)',
        gpu: gpuName,
        layers,
        prompts_per_step: prompts,
        prompt_tokens: P,
        new_tokens: NEW,
        kv_blocks: KV_BLOCKS,
        block_size: BS,
        peak_spread: spread,
        goal: 'step peaks within 5% of each other at G = 16, 64, 256',
        steps: results,
      },
      null,
      2,
    ) + '\n',
  );
  await gen.close();
  await engine.dispose();
  process.exit(0);
}

try {
  await main();
} catch (e) {
  console.log(`grpo memory benchmark failed: ${(e as Error).stack ?? e}`);
  process.exit(1);
}
