// CPU benchmark: forward+backward tokens/s of a small MoE (random weights) on the engine's CPU backend,
// GRPO loss, 4 sequences x 128 tokens. Prints figures and writes bench/results/engine-cpu.json.
//   npx tsx bench/engine-cpu.ts
import { Engine } from '../src/engine/engine.ts';
import { parseHfConfig } from '../src/hf/config.ts';
import { median, writeResult } from './common.ts';

const config = {
  model_type: 'qwen2_moe', vocab_size: 4096, hidden_size: 256, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 4,
  head_dim: 32, intermediate_size: 512, moe_intermediate_size: 128, shared_expert_intermediate_size: 256, num_experts: 16,
  num_experts_per_tok: 4, norm_topk_prob: false, rms_norm_eps: 1e-6, rope_theta: 10000, max_position_embeddings: 1024,
  tie_word_embeddings: false, router_aux_loss_coef: 0.001,
};
const B = 4, T = 128;
const engine = Engine.fromConfig(parseHfConfig(config));
let seed = 1;
const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
const p = engine.params;
for (let i = 0; i < p.length; i++) p[i] = (rand() - 0.5) * 0.1;
for (const t of engine.paramTable) if (t.shape.length === 1) p.fill(1, t.offset, t.offset + t.numel);
const N = B * T;
const tokens = Int32Array.from({ length: N }, () => Math.floor(rand() * config.vocab_size));
const seqLens = Int32Array.from({ length: B }, () => T);
const mask = new Float32Array(N);
for (let b = 0; b < B; b++) mask.fill(1, b * T + T / 2, b * T + T - 1);
const loss = { type: 'grpo' as const, mask, advantages: Float32Array.from({ length: N }, (_, i) => (i < N / 2 ? 1 : -1)), oldLogprobs: new Float32Array(N).fill(-8) };
const times: number[] = [];
const fwd: number[] = [];
for (let it = 0; it < 6; it++) {
  let t0 = performance.now();
  await engine.forward({ tokens, seqLens }, { logprobs: true });
  fwd.push((performance.now() - t0) / 1000);
  await engine.zeroGrad();
  t0 = performance.now();
  await engine.forwardBackward({ tokens, seqLens }, loss);
  times.push((performance.now() - t0) / 1000);
}
const s = median(times.slice(1));
const f = median(fwd.slice(1));
const active = engine.paramTable.filter((t) => t.kind === 'dense').reduce((a, t) => a + t.numel, 0) +
  engine.paramTable.filter((t) => t.kind === 'expert').reduce((a, t) => a + t.numel, 0) * (config.num_experts_per_tok / config.num_experts);
const result = {
  benchmark: 'engine forward+backward, CPU backend',
  command: 'npx tsx bench/engine-cpu.ts',
  model: config,
  batch: { sequences: B, tokens_per_sequence: T },
  forward_backward_seconds: s,
  forward_backward_tokens_per_s: N / s,
  forward_seconds: f,
  forward_tokens_per_s: N / f,
  active_params: active,
  gflops_per_s: (6 * active * N) / s / 1e9,
};
console.log(JSON.stringify(result, null, 1));
console.log('wrote', writeResult('engine-cpu', result));
