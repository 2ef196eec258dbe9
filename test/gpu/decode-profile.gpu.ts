// Where a decode step's time goes: the trainer's forward over R one-token sequences (the decode step's GEMM and
// expert shapes; attention over one key, the LM head on every row) on the Qwen1.5-MoE-A2.7B shape in a weights-only
// copy, with MOEPILOT_GPU_PROFILE=1 set by the caller so that the engine prints each pass's time per phase label
// (f.qkv, f.attn, f.o_proj, f.router, f.experts, f.shared, f.combine, lm_head) to stderr. The last of `--iters`
// passes per R is the one to read. Bundled by scripts/device/bundle.sh.
//
// Usage: MOEPILOT_GPU_PROFILE=1 MOEPILOT_ADDON=<moepilot.node> node decode-profile-gpu.mjs --layers 4 --rows 128,1024
import { Engine } from '../../src/engine/engine.ts';
import { parseHfConfig } from '../../src/hf/config.ts';
import { A2P7B_VOCAB, a2p7bConfig } from './a2p7b.ts';
import { arg } from './args.ts';

const layers = Number(arg('layers', '4'));
const rowsList = arg('rows', '128,1024').split(',').map(Number);
const iters = Number(arg('iters', '3'));

const engine = Engine.fromConfig(parseHfConfig(a2p7bConfig(layers), { source: 'bench config' }));
await engine.toDevice('cuda:0', { weightsOnly: true });
await engine.nativeEngine.fillParamsRandom(1234, 0.02);
for (const R of rowsList) {
  const tokens = Int32Array.from({ length: R }, (_, i) => (i * 7919) % A2P7B_VOCAB);
  const batch = { tokens, seqLens: new Int32Array(R).fill(1) };
  for (let i = 0; i < iters; i++) {
    const t = performance.now();
    const r = await engine.forward(batch, { logprobs: true });
    console.error(`rows ${R} pass ${i}: ${(performance.now() - t).toFixed(2)} ms wall, ${r.phases.totalMs.toFixed(2)} ms on the device`);
  }
}
await engine.dispose();
