// Expert parallelism at the 8-rank shape of one GPU node, on CPU ranks: scripts/ep-stack-cpu.sh runs the EP drill
// (the whole stack, GRPO, a coordinator SIGKILL and resume) on a tiny random qwen2_moe with 60 experts top-4, so 8
// ranks hold 8 or 7 experts each. On the fixed-seed first step (the same weights at 4 and at 8 ranks) both sample
// the same completions (rollout is batch-invariant), route the same tokens to each expert, and reach the same loss
// and gradient norm up to fp32 summation order (src/stack/ep-compare.ts).
// Later steps are only checked to run: the ranks' dense gradients are summed in a different order at 4 and 8 ranks,
// so after one optimizer step the weights differ in their last bits and a sample may part at a near-tie; and after
// the coordinator's SIGKILL, redelivered prompts may change a step's batch.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { compareFirstStep, formatCheck, type DrillStep } from './ep-compare.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');


test('EP=8 over 60 experts runs the drill and matches EP=4 on the fixed-seed step', { timeout: 240_000 }, async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'ep-scaling-'));
  try {
    const runs: Record<number, { ranks: number; state: string; per_step: DrillStep[]; crash: { after_checkpoint_step: number } }> = {};
    for (const ranks of [4, 8]) {
      const out = path.join(dir, `ep${ranks}.json`);
      await run('bash', [path.join(root, 'scripts/ep-stack-cpu.sh'), out], {
        cwd: root,
        env: { ...process.env, RANKS: String(ranks), EXPERTS: '60', TOP_K: '4', STEPS: '4', NODE_OPTIONS: '' },
        timeout: 200_000,
      });
      runs[ranks] = JSON.parse(readFileSync(out, 'utf8'));
      assert.equal(runs[ranks].state, 'succeeded');
      assert.equal(runs[ranks].crash.after_checkpoint_step, 2);
    }
    const b = runs[8].per_step;
    assert.deepEqual(b.map((s) => s.step), [1, 2, 3, 4]);
    for (let i = 0; i < b.length; i++) {
      // Every expert of every layer is listed, whichever rank holds it (and each layer's imbalance).
      const experts = Object.keys(b[i].expert_load ?? {}).filter((k) => /^experts\/L\d+\/E\d+$/.test(k));
      assert.equal(experts.length, 2 * 60);
    }
    // The traced steps say where each rank call's time went (the addon's clock on the rank spans).
    const traced = (runs[8] as unknown as { traced_steps: { step: number; native_ms_max_over_ranks: Record<string, Record<string, number>> }[] }).traced_steps;
    assert.ok(traced.length >= 3, `traced steps: ${traced.map((t) => t.step).join(', ')}`);
    for (const t of traced) {
      for (const call of ['generate', 'train_batch']) {
        const n = t.native_ms_max_over_ranks[call];
        assert.ok(n.calls >= 1 && n.run_ms > 0 && n.queued_ms >= 0 && n.resolve_ms >= 0, `step ${t.step} ${call}: ${JSON.stringify(n)}`);
      }
    }
    const cmp = compareFirstStep(runs[4], runs[8], 1e-5);
    assert.ok(cmp.ok, `step 1 at EP=8 against EP=4:\n${cmp.checks.map(formatCheck).join('\n')}`);
    assert.deepEqual(cmp.checks.map((c) => c.what), ['completion_tokens', 'trained_tokens', 'reward_mean', 'loss', 'pg_loss', 'entropy', 'grad_norm', 'tokens per expert per layer']);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
