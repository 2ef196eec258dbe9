// Training throughput of the GPU engine at Qwen1.5-MoE-A2.7B widths (hidden 2048, 16 heads, 60 experts top-4,
// expert hidden 1408, shared expert 5632, vocab 151936) with fewer layers, random weights made on the device:
// forward+backward tokens/s on 4 x 512 tokens, the per-phase times the engine reports, an AdamW step, and MFU
// = 6 x active params x tokens/s / 989e12 (H100 SXM dense bf16 peak). Bundled by scripts/device/bundle.sh and
// run by bench/train-gpu.sh on the GPU machine.
//
// --expert-grads bfloat16: the routed experts' gradients in bf16 (toDevice's expertGradDtype; default float32).
//
// Usage: MOEPILOT_ADDON=<moepilot.node> node train-gpu.mjs --layers 4 [--expert-grads bfloat16] --out result.json
import { writeFileSync } from 'node:fs';

import { Engine, buildLossSpec, type ExpertGradDtype } from '../../src/engine/engine.ts';
import { parseHfConfig } from '../../src/hf/config.ts';
import { A2P7B_VOCAB, a2p7bConfig } from './a2p7b.ts';
import { arg } from './args.ts';

const layers = Number(arg('layers', '4'));
const iters = Number(arg('iters', '4'));
const out = arg('out', 'train-gpu-engine.json');
const expertGradDtype = arg('expert-grads', 'float32') as ExpertGradDtype;
const B = 4;
const T = 512;

const hf = a2p7bConfig(layers);

function activeParams(): { perLayer: number; lmHead: number; total: number } {
  const C = 2048;
  const attn = 4 * C * C + 3 * C; // q, k, v, o (+ q/k/v biases)
  const router = 60 * C;
  const shared = 3 * 5632 * C + C;
  const routed = 4 * 3 * 1408 * C;
  const perLayer = attn + router + shared + routed + 2 * C;
  const lmHead = 151936 * C;
  return { perLayer, lmHead, total: perLayer * layers + lmHead };
}

async function main(): Promise<void> {
  const t0 = performance.now();
  const parsed = parseHfConfig(hf, { source: 'bench config' });
  const engine = Engine.fromConfig(parsed);
  await engine.toDevice('cuda:0', { expertGradDtype });
  await engine.nativeEngine.fillParamsRandom(1234, 0.02);
  const setupS = (performance.now() - t0) / 1000;
  // Random tokens (a fixed LCG), 4 sequences of 512.
  const tokens = new Int32Array(B * T);
  let x = 12345;
  for (let i = 0; i < tokens.length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    tokens[i] = x % A2P7B_VOCAB;
  }
  const seqLens = Int32Array.from({ length: B }, () => T);
  const mask = new Float32Array(B * T).fill(1);
  for (let b = 0; b < B; b++) mask[(b + 1) * T - 1] = 0;
  const batch = { tokens, seqLens };
  const loss = { type: 'sft' as const, mask };

  // Warm-up (allocations, cuBLASLt plans, the JS engine's optimised code: one call left the first timed calls'
  // JS ~0.4 ms slower than later ones on H100 hosts), then timed iterations.
  await engine.zeroGrad();
  let r = await engine.forwardBackward(batch, loss);
  for (let i = 0; i < 3; i++) {
    await engine.zeroGrad();
    r = await engine.forwardBackward(batch, loss);
  }
  const times: number[] = [];
  const callsBefore = engine.nativeCallTimes()['moepilot.forwardBackward'];
  for (let i = 0; i < iters; i++) {
    await engine.zeroGrad();
    const s = performance.now();
    r = await engine.forwardBackward(batch, loss);
    times.push(performance.now() - s);
  }
  // Where each timed call's time went outside the engine: queued for libuv's pool, running, resolving (ms, means).
  const callsAfter = engine.nativeCallTimes()['moepilot.forwardBackward'];
  const callMs = (k: 'queuedMs' | 'runMs' | 'resolveMs') => (callsAfter[k] - (callsBefore?.[k] ?? 0)) / iters;
  const nativeCall = { queued_ms: callMs('queuedMs'), run_ms: callMs('runMs'), resolve_ms: callMs('resolveMs') };
  // The same calls made on the native binding directly (no batch and loss checks, no call queue), alternating with
  // calls through the engine: the JS wrapper's share of a call is the difference; the binding's own synchronous
  // part (argument conversion) is timed apart.
  const native = engine.nativeEngine;
  const spec = buildLossSpec(loss, batch);
  const nativeBatch = { tokens, seqLens, replayExperts: null };
  const direct: number[] = [];
  const directSync: number[] = [];
  const alternate: number[] = [];
  let directRun = 0;
  for (let i = 0; i < iters; i++) {
    await engine.zeroGrad();
    const e0 = performance.now();
    await engine.forwardBackward(batch, loss);
    alternate.push(performance.now() - e0);
    await engine.zeroGrad();
    const before = engine.nativeCallTimes()['moepilot.forwardBackward'].runMs;
    const s0 = performance.now();
    const p = native.forwardBackward(nativeBatch, spec);
    directSync.push(performance.now() - s0);
    await p;
    direct.push(performance.now() - s0);
    directRun += engine.nativeCallTimes()['moepilot.forwardBackward'].runMs - before;
  }
  const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
  const directCall = {
    call_ms: median(direct),
    sync_part_ms: median(directSync),
    run_ms: directRun / iters,
    engine_call_ms: median(alternate),
  };
  times.sort((a, b) => a - b);
  const ms = median(times);
  const fwdTimes: number[] = [];
  for (let i = 0; i < iters; i++) {
    const s = performance.now();
    await engine.forward(batch, { logprobs: true });
    fwdTimes.push(performance.now() - s);
  }
  const fwdMs = median(fwdTimes);
  let adamwMs: number | null = null;
  try {
    await engine.adamwStep({ lr: 1e-5, maxGradNorm: 1 });
    const s = performance.now();
    await engine.adamwStep({ lr: 1e-5, maxGradNorm: 1 });
    adamwMs = performance.now() - s;
  } catch (e) {
    console.log(`adamw step failed: ${(e as Error).message}`);
  }
  const tokS = (B * T) / (ms / 1000);
  const ap = activeParams();
  const mfu = (6 * ap.total * tokS) / 989e12;
  const result = {
    engine: 'moepilot-gpu',
    layers,
    batch: `${B}x${T}`,
    expert_grad_dtype: expertGradDtype,
    fwd_bwd_ms: ms,
    fwd_bwd_ms_all: times,
    forward_ms: fwdMs,
    tokens_per_s: tokS,
    active_params: ap.total,
    active_params_per_layer: ap.perLayer,
    lm_head_params: ap.lmHead,
    mfu,
    mfu_def: '6 * active params (attention + router + shared + 4 routed experts per layer, plus LM head) * tokens/s / 989e12',
    loss: r.loss,
    native_call_ms: nativeCall,
    direct_native_call_ms: directCall,
    forward_phases_ms: r.forwardPhases,
    backward_phases_ms: r.backwardPhases,
    adamw_step_ms: adamwMs,
    setup_s: setupS,
  };
  console.log(
    `engine: ${layers} layers, ${B}x${T} tokens, ${expertGradDtype} expert grads: fwd+bwd ${ms.toFixed(1)} ms (${tokS.toFixed(0)} tok/s, MFU ${(100 * mfu).toFixed(1)}%), ` +
      `forward ${fwdMs.toFixed(1)} ms, adamw ${adamwMs?.toFixed(1)} ms, loss ${r.loss.toFixed(4)}`,
  );
  console.log(`native call (means of the timed calls) ${JSON.stringify(nativeCall)}`);
  console.log(`direct native calls (medians; run: mean) ${JSON.stringify(directCall)}`);
  console.log(`forward phases ${JSON.stringify(r.forwardPhases)}`);
  console.log(`backward phases ${JSON.stringify(r.backwardPhases)}`);
  writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
  await engine.dispose();
  process.exit(0);
}

try {
  await main();
} catch (e) {
  console.log(`engine benchmark failed: ${(e as Error).stack ?? e}`);
  process.exit(1);
}
