// A short run of the whole demo path (`pilot demo` with 2 GRPO steps): tiny MoE, SFT, the full service stack with
// 2 expert-parallel ranks, export. Checks the summary line and what it points at, that the stack is gone after,
// and that `pilot trace` and `pilot generate` work on what the run left.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

import { REPO_ROOT } from '../../src/stack/stack.ts';
import { readStackState } from '../../src/stack/state.ts';

const pilot = join(REPO_ROOT, 'bin/pilot.js');
let home = '';
before(async () => {
  home = await mkdtemp(join(tmpdir(), 'pilot-demo-'));
});
after(() => rm(home, { recursive: true, force: true }));

const run = (args: string[]) => promisify(execFile)(process.execPath, [pilot, ...args], { cwd: home, env: { ...process.env, PILOT_HOME: home }, maxBuffer: 16 << 20 });

test('pilot demo (2 GRPO steps) runs through the stack and leaves metrics, traces and an HF export', { timeout: 170_000 }, async () => {
  const { stdout } = await run(['demo', '--steps', '2', '--sft-steps', '5', '--held-out', '40', '--prompts-per-step', '8', '--group-size', '4']);
  const lines = stdout.trimEnd().split('\n');
  const last = JSON.parse(lines[lines.length - 1]) as { summary: Record<string, unknown> };
  const s = last.summary;
  for (const k of ['sft_accuracy', 'grpo_accuracy']) {
    assert.equal(typeof s[k], 'number', k);
    assert.ok((s[k] as number) >= 0 && (s[k] as number) <= 1, `${k} in [0, 1]`);
  }
  assert.equal(s.steps, 2);
  assert.equal(s.ranks, 2);
  assert.equal(s.run_state, 'succeeded');
  assert.ok((s.seconds as number) > 0);
  assert.match(stdout, /rank-1 \(pid \d+\) serving/);
  assert.match(stdout, /state succeeded/);

  const metrics = (await readFile(s.metrics_file as string, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { step: number; run_id: string });
  assert.deepEqual(metrics.map((m) => m.step), [1, 2]);
  assert.ok(metrics.every((m) => m.run_id === s.run_id));

  const exported = await readdir(s.export_dir as string);
  for (const f of ['config.json', 'model.safetensors', 'tokenizer.json']) assert.ok(exported.includes(f), `export has ${f}`);

  // The stack is down: no state file, no service process.
  assert.equal(await readStackState(home), null);

  const trace = await run(['trace', s.run_id as string, '--step', '2', '--file', s.trace_file as string]);
  const tree = trace.stdout.split('\n');
  assert.equal(tree[0], `run ${s.run_id} step 2 (steps with spans: 1-2)`);
  assert.match(tree[1], /^step  .* \[coordinator\]$/);
  assert.match(trace.stdout, /RolloutService\/Generate .*\[rank-0\]/);
  assert.match(trace.stdout, /RolloutService\/Generate .*\[rank-1\]/);
  assert.match(trace.stdout, /TrainerService\/TrainBatch .*\[rank-1\]/);

  // The exported folder is a model `pilot generate` loads; its greedy answer is the format the task wants or not,
  // but it decodes with the exported tokenizer.
  const gen = await run(['generate', '--model', s.export_dir as string, '--prompt', 's38190=', '--temperature', '0', '--max-new-tokens', '6', '--json']);
  const sample = JSON.parse(gen.stdout.trim()) as { token_ids: number[]; text: string };
  assert.ok(sample.token_ids.length >= 1 && sample.token_ids.length <= 6);
  assert.equal(typeof sample.text, 'string');
  assert.ok(existsSync(join(home, 'logs', 'coordinator.log')));
});
