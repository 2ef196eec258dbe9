// Rollout throughput of the GPU engine (createGenerator on an engine on a device) at Qwen1.5-MoE-A2.7B widths
// (hidden 2048, 16 heads, 60 experts top-4, expert hidden 1408, shared expert 5632, vocab 151936; 24 layers by
// default), random weights made on the device in a weights-only copy (bf16 weights, fp32 dense tensors: ~36 GB at 24
// layers; a training copy's fp32 weights, gradients and AdamW state would not fit one card):
// prompts of 64 random tokens, 64 new tokens each (no stop tokens: every sample runs to the length), top-p 0.9,
// GRPO groups of 16 samples sharing their prompt, at 1, 8 and 64 prompts (16, 128 and 1024 sequences).
//
// Per configuration: a warm-up run (buffers, CUDA graph capture), then --repeats (default 3) pairs of timed runs, a
// full run (prefill + 64 tokens) and a run of 1 new token (prefill + first token); each figure is the median of its
// runs (all of them are in the JSON: a shared machine's noise shows there), decode = full - first-token run, over 63
// tokens per sequence.
// Also the bytes a decode step must move (test/gpu/rollout-bytes.ts: weights read once per step, experts touched by
// the step's rows, the KV cache read with each group's shared prompt once, K/V written): bench/generate-gpu-hf.py
// divides them by the measured bandwidth for the fraction of the memory roofline. decode_bytes counts the experts
// uniform routing would touch (the definition HF's figure shares); decode_bytes_routed those the engine's rows did
// touch, from an untimed rerun of the full run's requests with their routing returned (the same streams, so the same
// tokens). Bundled by scripts/device/bundle.sh, run by bench/generate-gpu.sh.
//
// Usage: MOEPILOT_ADDON=<moepilot.node> node generate-bench-gpu.mjs --layers 4 --groups 1,8,64 [--repeats 3]
//        --out result.json
import { writeFileSync } from 'node:fs';

import { Engine } from '../../src/engine/engine.ts';
import { createGenerator, type GenerateRequest } from '../../src/engine/generator.ts';
import { parseHfConfig } from '../../src/hf/config.ts';
import { A2P7B_VOCAB, a2p7bConfig } from './a2p7b.ts';
import { arg } from './args.ts';
import { expertsTouchedPerStep, stepBytes } from './rollout-bytes.ts';

const layers = Number(arg('layers', '24'));
const groupsList = arg('groups', '1,8,64').split(',').map(Number);
const graphs = arg('graphs', '1') !== '0';
const repeats = Number(arg('repeats', '3'));
if (!Number.isInteger(repeats) || repeats < 1) {
  throw new Error(`--repeats must be a positive integer, got ${arg('repeats', '3')}`);
}
const out = arg('out', 'generate-gpu-engine.json');
const G = 16; // samples per prompt
const P = 64; // prompt tokens
const NEW = 64; // new tokens
const BS = 16; // KV block size

const hf = a2p7bConfig(layers);

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
    const reqs = (maxNewTokens: number, firstId = rid, returnExperts = false): GenerateRequest[] => {
      rid = Math.max(rid, firstId + prompts.length);
      return prompts.map((prompt, i) => ({
        prompt,
        n: G,
        maxNewTokens,
        temperature: 1,
        topP: 0.9,
        seed: 42,
        requestId: firstId + i,
        returnExperts,
      }));
    };
    // The worst-case reservation (Generator::blocks_needed): the prompt's blocks once, each sample's own.
    const perGroup = Math.floor(P / BS) + (P % BS ? 1 : 0) + G * Math.ceil((P % BS + NEW - 1) / BS);
    const numBlocks = groups * perGroup + 8;
    const gen = createGenerator(engine, { numBlocks, blockSize: BS, stepsPerCall: NEW, cudaGraphs: graphs });
    const run = async (maxNew: number, firstId = rid): Promise<{ ms: number; tokens: number; firstId: number }> => {
      const s = performance.now();
      const all = await Promise.all(reqs(maxNew, firstId).map((r) => gen.generateAll(r)));
      const ms = performance.now() - s;
      return { ms, tokens: all.flat().reduce((a, x) => a + x.tokens.length, 0), firstId };
    };
    const heldBefore = engine.deviceMemory({ resetPeak: true }).current;
    await run(NEW); // warm-up: buffers, graph capture
    await run(1);
    const fulls: Awaited<ReturnType<typeof run>>[] = [];
    const firsts: Awaited<ReturnType<typeof run>>[] = [];
    for (let i = 0; i < repeats; i++) {
      fulls.push(await run(NEW));
      firsts.push(await run(1));
    }
    const median = <T extends { ms: number }>(xs: T[]): T => [...xs].sort((a, b) => a.ms - b.ms)[(xs.length - 1) >> 1];
    const full = median(fulls);
    const first = median(firsts);
    const decodeMs = full.ms - first.ms;
    const decodeTokens = full.tokens - first.tokens;
    // The full run's requests again, untimed, with their routing: the experts each decode step touched.
    const routed = (await Promise.all(reqs(NEW, full.firstId, true).map((r) => gen.generateAll(r)))).flat();
    const moeLayers = layers; // every layer of this shape is MoE
    const K = hf.num_experts_per_tok as number;
    const touched = expertsTouchedPerStep(
      routed.map((x) => x.experts ?? new Int32Array(0)),
      P,
      moeLayers,
      K,
      NEW - 1,
    );
    let bytes = 0;
    let bytesRouted = 0;
    for (let t = 1; t < NEW; t++) {
      // step t feeds token t - 1 at position P + t - 1
      bytes += stepBytes(hf, B, groups, P, P + t).total;
      bytesRouted += stepBytes(hf, B, groups, P, P + t, touched[t - 1]).total;
    }
    const E = hf.num_experts as number;
    const uniformPerLayer = E * (1 - Math.pow(1 - K / E, B));
    const r = {
      sequences: B,
      groups,
      prompt_tokens: P,
      new_tokens: NEW,
      full_ms: full.ms,
      full_ms_all: fulls.map((x) => x.ms),
      tokens: full.tokens,
      tokens_per_s: full.tokens / (full.ms / 1000),
      first_token_ms: first.ms,
      first_token_ms_all: firsts.map((x) => x.ms),
      decode_ms: decodeMs,
      decode_tokens_per_s: decodeTokens / (decodeMs / 1000),
      decode_steps: NEW - 1,
      decode_bytes: bytes,
      decode_bytes_routed: bytesRouted,
      experts_touched_per_layer: touched.reduce((a, x) => a + x, 0) / touched.length / moeLayers,
      experts_touched_per_layer_uniform: uniformPerLayer,
      step_bytes_first: stepBytes(hf, B, groups, P, P + 1),
      step_bytes_last: stepBytes(hf, B, groups, P, P + NEW - 1),
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
        repeats,
        samples_per_prompt: G,
        block_size: BS,
        sampling: 'temperature 1, top-p 0.9',
        setup_s: setupS,
        bytes_def:
          'bf16 weights once per step (decode_bytes: experts touched under uniform routing; decode_bytes_routed: those ' +
          "the engine's rows touched) + KV read (shared prompt once per group) + KV written",
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
