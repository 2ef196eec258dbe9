// Test support: the qwen2_moe-tiny fixture's inputs in the wire layout, built straight from
// expected.safetensors and expected.json (not through the service's own layout conversion).
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { SafetensorsFile } from '../../src/hf/safetensors.ts';
import type { MicroBatch, PackedSequences } from '../../proto/gen/pilot/v1/trainer.ts';
import { f32Tensor, i32Tensor, u8Tensor } from './tensors.ts';

export const FIXTURE_DIR = fileURLToPath(new URL('../../test/fixtures/recomputed/qwen2_moe-tiny', import.meta.url));

export interface Fixture {
  /** Per sequence: token ids, prompt length. */
  sequences: { ids: number[]; promptLen: number }[];
  /** Per sequence, aligned with its ids (entry j belongs to token j; entry 0 is 0). */
  oldLogprobs: number[][];
  refLogprobs: number[][];
  advantages: number[];
  greedyPrompt: number[];
  greedyTokens: number[];
  grpo: { epsLow: number; epsHigh: number; beta: number; value: number };
  maskedTokens: number;
}

export async function readFixture(dir = FIXTURE_DIR): Promise<Fixture> {
  const meta = JSON.parse(await readFile(join(dir, 'expected.json'), 'utf8')) as {
    seq_lens: number[];
    prompt_lens: number[];
    grpo: { eps_low: number; eps_high: number; beta: number; value: number; kl: string; aggregation: string };
  };
  if (!meta.grpo.kl.startsWith('k3') || !meta.grpo.aggregation.startsWith('token-mean')) throw new Error('fixture: expected a k3 token-mean GRPO loss');
  const st = await SafetensorsFile.open(join(dir, 'expected.safetensors'));
  try {
    const ids = await st.readInt32('input_ids');
    const [B, T] = st.info('input_ids').shape;
    const old = await st.read('old_logprobs');
    const ref = await st.read('ref_logprobs');
    const adv = await st.read('advantages');
    const greedy = Array.from(await st.readInt32('greedy_tokens'));
    const sequences = [];
    const oldLogprobs = [];
    const refLogprobs = [];
    let maskedTokens = 0;
    for (let b = 0; b < B; b++) {
      const len = meta.seq_lens[b];
      sequences.push({ ids: Array.from(ids.subarray(b * T, b * T + len)), promptLen: meta.prompt_lens[b] });
      // [b, t] is the logprob of token t + 1.
      oldLogprobs.push([0, ...Array.from(old.subarray(b * (T - 1), b * (T - 1) + len - 1))]);
      refLogprobs.push([0, ...Array.from(ref.subarray(b * (T - 1), b * (T - 1) + len - 1))]);
      maskedTokens += len - meta.prompt_lens[b];
    }
    const plen = meta.prompt_lens[0];
    return {
      sequences,
      oldLogprobs,
      refLogprobs,
      advantages: Array.from(adv),
      greedyPrompt: Array.from(ids.subarray(0, plen)),
      greedyTokens: greedy.slice(plen),
      grpo: { epsLow: meta.grpo.eps_low, epsHigh: meta.grpo.eps_high, beta: meta.grpo.beta, value: meta.grpo.value },
      maskedTokens,
    };
  } finally {
    await st.close();
  }
}

export function packSequences(seqs: readonly (readonly number[])[]): PackedSequences {
  const cu = [0];
  for (const s of seqs) cu.push(cu[cu.length - 1] + s.length);
  return {
    inputIds: i32Tensor(seqs.flat()),
    positionIds: i32Tensor(seqs.flatMap((s) => s.map((_, j) => j))),
    cuSeqlens: i32Tensor(cu),
  };
}

/** A GRPO micro-batch of the fixture's sequences `which`: loss on completion tokens. */
export function fixtureMicroBatch(f: Fixture, which: readonly number[]): MicroBatch {
  const seqs = which.map((b) => f.sequences[b]);
  return {
    sequences: packSequences(seqs.map((s) => s.ids)),
    lossMask: u8Tensor(seqs.flatMap((s) => s.ids.map((_, j) => (j >= s.promptLen ? 1 : 0)))),
    advantages: f32Tensor(which.flatMap((b) => f.sequences[b].ids.map(() => f.advantages[b]))),
    oldLogprobs: f32Tensor(which.flatMap((b) => f.oldLogprobs[b])),
    refLogprobs: f32Tensor(which.flatMap((b) => f.refLogprobs[b])),
  };
}

export function f32Values(t: { data: Buffer } | undefined): Float32Array {
  if (!t) throw new Error('tensor missing');
  return new Float32Array(new Uint8Array(t.data).buffer);
}
