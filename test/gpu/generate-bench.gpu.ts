// Rollout throughput of the GPU engine (createGenerator on an engine on a device) at Qwen1.5-MoE-A2.7B widths
// (hidden 2048, 16 heads, 60 experts top-4, expert hidden 1408, shared expert 5632, vocab 151936; 24 layers by
// default), random weights made on the device in a weights-only copy (bf16 weights, fp32 dense tensors: ~36 GB at 24
// layers; a training copy's fp32 weights, gradients and AdamW state would not fit one card):
// prompts of 64 random tokens, 64 new tokens each (no stop tokens: every sample runs to the length), top-p 0.9,
// GRPO groups of 16 samples sharing their prompt, at 1, 8 and 64 prompts (16, 128 and 1024 sequences).
//
// Per configuration: a warm-up run (buffers, CUDA graph capture), then the timed full run (prefill + 64 tokens)
// and a run of 1 new token (prefill + first token); decode = full - first-token run, over 63 tokens per sequence.
// Also the bytes a decode step must move (weights read once per step, experts touched by the step's rows, the KV
// cache read with each group's shared prompt once, K/V written): bench/generate-gpu-hf.py divides them by the
// measured bandwidth for the fraction of the memory roofline. Bundled by scripts/device/bundle.sh, run by
// bench/generate-gpu.sh.
//
// Usage: MOEPILOT_ADDON=<moepilot.node> node generate-bench-gpu.mjs --layers 4 --groups 1,8,64 --out result.json
import { writeFileSync } from 'node:fs';

import { Engine } from '../../src/engine/engine.ts';
import { createGenerator, type GenerateRequest } from '../../src/engine/generator.ts';
import { parseHfConfig } from '../../src/hf/config.ts';
import { A2P7B_VOCAB, a2p7bConfig } from './a2p7b.ts';
import { arg } from './args.ts';

const layers = Number(arg('layers', '24'));
const groupsList = arg('groups', '1,8,64').split(',').map(Number);
const graphs = arg('graphs', '1') !== '0';
const out = arg('out', 'generate-gpu-engine.json');
const G = 16; // samples per prompt
const P = 64; // prompt tokens
const NEW = 64; // new tokens
const BS = 16; // KV block size

const hf = a2p7bConfig(layers);

/**
 * Bytes one decode step must move at B sequences in `groups` groups with `ctx` cached positions each (the first
 * P shared within a group): bf16 weights read once (attention, router, shared expert, LM head; the routed
 * experts the step's rows touch, E (1 - (1 - K/E)^B) of them per layer under uniform routing), the KV cache read
 * (shared prompt once per group) and the new rows' K/V written. Logits are left out (an ideal kernel never
 * writes them).
 */
function stepBytes(B: number, groups: number, ctx: number): { weights: number; experts: number; kv: number; total: number } {
  const n = (k: string) => hf[k] as number;
  const C = n('hidden_size');
  const E = n('num_experts');
  const K = n('num_experts_per_tok');
  const H = n('moe_intermediate_size');
  const HS = n('shared_expert_intermediate_size');
  const V = n('vocab_size');
  const KVD = n('num_key_value_heads') * (C / n('num_attention_heads'));
  const attn = (4 * C * C + 3 * C) * 2;
  const perLayer = attn + E * C * 2 + (3 * HS * C + C) * 2;
  const weights = layers * perLayer + V * C * 2;
  const touched = E * (1 - Math.pow(1 - K / E, B));
  const experts = layers * touched * 3 * H * C * 2;
  const rowBytes = layers * 2 * KVD * 2; // K and V of one position, every layer
  const kv = (groups * P + B * (ctx - P)) * rowBytes + B * rowBytes;
  return { weights, experts, kv, total: weights + experts + kv };
}

function lcg(seed: number): () => number {
  let x = seed >>> 0;
  return () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
}

async function main(): Promise<void> {
  const t0 = performance.now();
  const parsed = parseHfConfig(hf, { source: 'bench config' });
  const engine = Engine.fromConfig(parsed);
  await engine.toDevice('cuda:0', { weightsOnly: true });
  await engine.nativeEngine.fillParamsRandom(1234, 0.02);
  const setupS = (performance.now() - t0) / 1000;
  const results: unknown[] = [];
  for (const groups of groupsList) {
    const B = groups * G;
    const rand = lcg(1000 + groups);
    const prompts = Array.from({ length: groups }, () => Array.from({ length: P }, () => rand() % A2P7B_VOCAB));
    let rid = groups * 1_000_000;
    const reqs = (maxNewTokens: number): GenerateRequest[] =>
      prompts.map((prompt) => ({ prompt, n: G, maxNewTokens, temperature: 1, topP: 0.9, seed: 42, requestId: rid++ }));
    // The worst-case reservation (Generator::blocks_needed): the prompt's blocks once, each sample's own.
    const perGroup = Math.floor(P / BS) + (P % BS ? 1 : 0) + G * Math.ceil((P % BS + NEW - 1) / BS);
    const numBlocks = groups * perGroup + 8;
    const gen = createGenerator(engine, { numBlocks, blockSize: BS, stepsPerCall: NEW, cudaGraphs: graphs });
    const run = async (maxNew: number): Promise<{ ms: number; tokens: number }> => {
      const s = performance.now();
      const all = await Promise.all(reqs(maxNew).map((r) => gen.generateAll(r)));
      const ms = performance.now() - s;
      return { ms, tokens: all.flat().reduce((a, x) => a + x.tokens.length, 0) };
    };
    const heldBefore = engine.deviceMemory({ resetPeak: true }).current;
    await run(NEW); // warm-up: buffers, graph capture
    await run(1);
    const full = await run(NEW);
    const first = await run(1);
    const decodeMs = full.ms - first.ms;
    const decodeTokens = full.tokens - first.tokens;
    let bytes = 0;
    for (let t = 1; t < NEW; t++) bytes += stepBytes(B, groups, P + t).total; // step t feeds token t - 1 at position P + t - 1
    const r = {
      sequences: B,
      groups,
      prompt_tokens: P,
      new_tokens: NEW,
      full_ms: full.ms,
      tokens: full.tokens,
      tokens_per_s: full.tokens / (full.ms / 1000),
      first_token_ms: first.ms,
      decode_ms: decodeMs,
      decode_tokens_per_s: decodeTokens / (decodeMs / 1000),
      decode_steps: NEW - 1,
      decode_bytes: bytes,
      step_bytes_first: stepBytes(B, groups, P + 1),
      step_bytes_last: stepBytes(B, groups, P + NEW - 1),
      num_blocks: numBlocks,
      // Device memory: the weights (held before), and the peak over the four runs (KV cache, rollout buffers, graphs).
      weights_bytes: heldBefore,
      peak_device_bytes: engine.deviceMemory().peak,
    };
    console.log(
      `engine: ${layers} layers, ${B} sequences (${groups} x ${G}): ${full.tokens} tokens in ${full.ms.toFixed(0)} ms ` +
        `(${r.tokens_per_s.toFixed(0)} tok/s); prefill + first token ${first.ms.toFixed(0)} ms; decode ` +
        `${r.decode_tokens_per_s.toFixed(0)} tok/s, ${(decodeMs / (NEW - 1)).toFixed(2)} ms/step, ${(bytes / (NEW - 1) / 2 ** 20).toFixed(0)} MiB/step; ` +
        `device memory ${(heldBefore / 2 ** 30).toFixed(1)} GiB held, peak ${(r.peak_device_bytes / 2 ** 30).toFixed(1)} GiB`,
    );
    results.push(r);
    await gen.close();
  }
  writeFileSync(
    out,
    JSON.stringify(
      {
        engine: 'moepilot-gpu rollout',
        layers,
        cuda_graphs: graphs,
        samples_per_prompt: G,
        block_size: BS,
        sampling: 'temperature 1, top-p 0.9',
        setup_s: setupS,
        bytes_def: 'bf16 weights once per step (experts touched under uniform routing) + KV read (shared prompt once per group) + KV written',
        configs: results,
      },
      null,
      2,
    ) + '\n',
  );
  await engine.dispose();
  process.exit(0);
}

try {
  await main();
} catch (e) {
  console.log(`engine benchmark failed: ${(e as Error).stack ?? e}`);
  process.exit(1);
}
