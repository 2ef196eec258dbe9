// The bytes a rollout decode step must move at the Qwen2-MoE shape, for the memory-roofline figure of
// test/gpu/generate-bench.gpu.ts, and the routed experts a step's rows actually touch, from the routing the
// generator returns (Sample.experts). Random weights do not route uniformly: rows of one group start from the same
// prompt and pick overlapping experts, so a few sequences touch fewer experts than the uniform expectation, and a
// roofline built on that expectation can exceed 100%.

export interface StepBytes {
  weights: number;
  experts: number;
  kv: number;
  total: number;
}

/**
 * Bytes one decode step must move at B sequences in `groups` groups with `ctx` cached positions each (the first
 * `prompt` shared within a group): bf16 weights read once (attention, router, shared expert, LM head; the routed
 * experts the step's rows touch: `touched` per layer summed over the layers when given, else E (1 - (1 - K/E)^B)
 * per layer, the expectation under uniform routing), the KV cache read (shared prompt once per group) and the new
 * rows' K/V written. Logits are left out (an ideal kernel never writes them).
 */
export function stepBytes(
  hf: Record<string, unknown>,
  B: number,
  groups: number,
  prompt: number,
  ctx: number,
  touched?: number,
): StepBytes {
  const n = (k: string) => hf[k] as number;
  const layers = n('num_hidden_layers');
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
  const touchedAll = touched ?? layers * E * (1 - Math.pow(1 - K / E, B));
  const experts = touchedAll * 3 * H * C * 2;
  const rowBytes = layers * 2 * KVD * 2; // K and V of one position, every layer
  const kv = (groups * prompt + B * (ctx - prompt)) * rowBytes + B * rowBytes;
  return { weights, experts, kv, total: weights + experts + kv };
}

/**
 * Distinct routed experts touched by decode step t = 1 .. steps, summed over the MoE layers. Step t feeds row
 * prompt + t - 1 of every sample (completion token t - 1); `experts` holds each sample's routing as the generator
 * returns it, [rows, moeLayers, K] with rows = prompt + completion - 1. A sample too short for step t adds nothing.
 */
export function expertsTouchedPerStep(
  experts: readonly Int32Array[],
  prompt: number,
  moeLayers: number,
  K: number,
  steps: number,
): number[] {
  if (!Number.isInteger(moeLayers) || moeLayers < 1 || !Number.isInteger(K) || K < 1)
    throw new Error(`expertsTouchedPerStep: moeLayers and K must be positive integers, got ${moeLayers} and ${K}`);
  const perRow = moeLayers * K;
  for (const [i, e] of experts.entries())
    if (e.length % perRow !== 0)
      throw new Error(`expertsTouchedPerStep: sample ${i} holds ${e.length} ids, not a whole number of rows of ${perRow}`);
  const out: number[] = [];
  for (let t = 1; t <= steps; t++) {
    const row = prompt + t - 1;
    let total = 0;
    for (let l = 0; l < moeLayers; l++) {
      const seen = new Set<number>();
      for (const e of experts) {
        if ((row + 1) * perRow > e.length) continue;
        const base = row * perRow + l * K;
        for (let k = 0; k < K; k++) seen.add(e[base + k]);
      }
      total += seen.size;
    }
    out.push(total);
  }
  return out;
}
