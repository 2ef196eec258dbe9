// The stack as the GPU machine runs it: bundled (scripts/device/bundle-cli.mjs, no node_modules, no tsx), started by
// the bundled driver test/gpu/ep-stack.ts, which submits prompts, runs GRPO over expert-parallel ranks, kills the
// coordinator with SIGKILL after the first checkpoint (Stack.crashAndRestart) and follows the resumed run to the
// end. Here on CPU ranks and the fixture model; scripts/device/ep-stack.sh runs the same driver on GPU ranks.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { defaultAddonPath } from '../dist/native.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

test('the bundled stack runs GRPO on expert-parallel ranks and resumes after a coordinator SIGKILL', { timeout: 240_000 }, async () => {
  const out = mkdtempSync(path.join(tmpdir(), 'pilot-stack-bundle-'));
  try {
    // Only what the GPU machine's drill carries (scripts/device/ep-stack.sh): the services and the driver.
    await run(process.execPath, [path.join(root, 'scripts/device/bundle-cli.mjs'), out, '--only', 'stack']);
    const result = path.join(out, 'result.json');
    await run(
      process.execPath,
      [
        path.join(out, 'ep-stack.mjs'),
        '--model', path.join(root, 'test/fixtures/qwen2_moe-tiny'),
        '--ranks', '2', '--device', 'cpu', '--steps', '6', '--checkpoint-every', '2',
        '--prompts-per-step', '4', '--group-size', '4', '--max-new-tokens', '8', '--micro-batch', '8',
        '--state-dir', path.join(out, 'state'), '--out', result,
      ],
      { cwd: out, env: { ...process.env, MOEPILOT_ADDON: defaultAddonPath, NODE_OPTIONS: '' }, timeout: 200_000 },
    );
    const r = JSON.parse(readFileSync(result, 'utf8'));
    assert.equal(r.state, 'succeeded', JSON.stringify(r.error ?? r.events));
    assert.equal(r.crash.after_checkpoint_step, 2);
    assert.match(r.crash.resumed_events[0].message, /resumed from checkpoint .*:2/);
    assert.deepEqual(r.per_step.map((s: { step: number }) => s.step), [1, 2, 3, 4, 5, 6]);
    for (const s of r.per_step) {
      assert.ok(s.trained_tokens > 0 && s.rollout_tokens_per_s > 0 && Object.keys(s.expert_load).length > 0, JSON.stringify(s));
      // The ranks exchange rows in every training pass: bytes and time from their spans.
      assert.ok(s.alltoall_in_step && s.alltoall_in_step.bytes_all_ranks > 0 && s.alltoall_in_step.busbw_gb_s > 0, JSON.stringify(s.alltoall_in_step));
    }
    assert.match(r.latest_checkpoint, /:6$/);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
