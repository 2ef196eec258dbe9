// `pilot submit` and `pilot run` against a real stack (nats-server, coordinator, ranks, reward, checkpoint): a
// malformed prompt line is reported with its number and every valid line reaches the queue; a run file with mistakes
// is refused before anything is created, naming field and line.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

import { makeTinyModel } from '../../src/demo/make-model.ts';
import { createTask } from '../../src/demo/task.ts';
import { connectRunService } from '../../src/stack/connect.ts';
import { REPO_ROOT, startStack, type Stack } from '../../src/stack/stack.ts';

const pilot = join(REPO_ROOT, 'bin/pilot.js');
let dir = '';
let stack: Stack;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'pilot-cli-'));
  stack = await startStack({}, { stateDir: join(dir, '.pilot'), ranks: 1 });
});
after(async () => {
  await stack?.stop();
  await rm(dir, { recursive: true, force: true });
});

function runPilot(args: string[]) {
  // cwd holds .pilot/, as after `pilot up` there.
  return promisify(execFile)(process.execPath, [pilot, ...args], { cwd: dir, env: { ...process.env, PILOT_HOME: '' } });
}

test('pilot submit: bad lines are reported by number, the good ones are all queued', async () => {
  const file = join(dir, 'prompts.jsonl');
  await writeFile(
    file,
    [
      '{"prompt": "s3819=", "answer": "1389"}',
      '{"prompt": "r12=", "answer": "21", "metadata": {"kind": "reverse"}}',
      '{"prompt": "broken", "answer": ',
      '',
      '{"text": "12+30=", "reference": 42}',
      '{"answer": "no prompt"}',
    ].join('\n'),
  );
  const err = await runPilot(['submit', file, '--dataset', 'cli-test']).then(
    () => assert.fail('a file with bad lines exits non-zero'),
    (e: { code: number; stdout: string; stderr: string }) => e,
  );
  assert.equal(err.code, 1);
  assert.match(err.stderr, new RegExp(`${file}:3: not valid JSON`));
  assert.match(err.stderr, new RegExp(`${file}:6: missing "prompt"`));
  assert.match(err.stdout, /submitted 3 prompts to dataset "cli-test" \(queue length 3\); 2 bad lines skipped/);
  // The queue holds exactly the three good ones: one more submit makes it four.
  const client = await connectRunService(stack.state.stateDir);
  try {
    const r = await client.submitPrompts({ dataset: 'cli-test', prompts: [{ id: '', input: { $case: 'text', value: 'x' }, referenceAnswer: '1', metadata: {} }] });
    assert.equal(Number(r.queueLength), 4);
  } finally {
    client.close();
  }
});

test('pilot run: a bad run.yaml is refused with field and line; a server-side refusal is reported', async () => {
  const bad = join(dir, 'bad.yaml');
  await writeFile(bad, 'model_dir: ./nowhere\ngroup_size: 1\nprompts_per_step: 4\nsteps: 2\nreward:\n  scorers:\n    - name: math\n      wieght: 1\n');
  await assert.rejects(runPilot(['run', '--config', bad]), (e: { stderr: string }) => {
    assert.match(e.stderr, /bad\.yaml:2: group_size: must be >= 2, got 1/);
    assert.match(e.stderr, /bad\.yaml:8: reward\.scorers\[0\]\.wieght: unknown field \(did you mean weight\?\)/);
    return true;
  });
  // Valid YAML, but the coordinator finds no model there: its InvalidArgument comes back to the user.
  const good = join(dir, 'run.yaml');
  await writeFile(good, 'model_dir: ./nowhere\ngroup_size: 2\nprompts_per_step: 4\nsteps: 2\nreward:\n  scorers:\n    - name: math\n');
  await assert.rejects(runPilot(['run', '--config', good]), (e: { stderr: string }) => {
    assert.match(e.stderr, /model_dir.*nowhere does not exist/);
    return true;
  });
});

test('commands that need a stack say how to get one', async () => {
  const other = await mkdtemp(join(tmpdir(), 'pilot-nostack-'));
  try {
    await assert.rejects(
      promisify(execFile)(process.execPath, [pilot, 'watch', 'some-run'], { cwd: other, env: { ...process.env, PILOT_HOME: '' } }),
      /no running moe-pilot stack in .*\.pilot \(no stack\.json\); start one with "pilot up"/,
    );
  } finally {
    await rm(other, { recursive: true, force: true });
  }
});

test('pilot run, watch, export and trace: a 2-step run from the command line', async () => {
  const task = createTask({ kind: 'reverse', digits: 3, heldOut: 10, seed: 3 });
  const model = join(dir, 'model');
  await makeTinyModel(model, task.alphabet, { hidden: 32, headDim: 8, seed: 3 });
  const prompts = join(dir, 'reverse.jsonl');
  await writeFile(prompts, task.train.slice(0, 8).map((e) => JSON.stringify({ prompt: e.prompt, answer: e.answer })).join('\n') + '\n');
  assert.match((await runPilot(['submit', prompts, '--dataset', 'cli-run'])).stdout, /submitted 8 prompts/);
  const runYaml = join(dir, 'two-steps.yaml');
  await writeFile(
    runYaml,
    [
      'name: cli',
      'model_dir: ./model', // relative to the YAML file
      'dataset: cli-run',
      'group_size: 2',
      'prompts_per_step: 4',
      'steps: 2',
      'sampling: {temperature: 1.0, max_new_tokens: 4, seed: 5}',
      'optimizer: {lr: 0.001}',
      'reward: {scorers: [{name: math}]}',
      '',
    ].join('\n'),
  );
  const runId = (await runPilot(['run', '--config', runYaml])).stdout.trim();
  assert.match(runId, /^cli-[\w-]+$/);
  const metricsFile = join(dir, 'metrics.jsonl');
  const watch = await runPilot(['watch', runId, '--metrics-file', metricsFile]);
  assert.match(watch.stdout, /\[#{12}\.{12}\]\s+1\/2 reward/);
  assert.match(watch.stdout, /\[#{24}\] 2\/2 reward/);
  assert.match(watch.stdout, new RegExp(`run ${runId} succeeded at step 2`));
  const steps = (await readFile(metricsFile, 'utf8')).trim().split('\n').map((l) => (JSON.parse(l) as { step: number }).step);
  assert.deepEqual(steps, [1, 2]);

  const out = join(dir, 'exported');
  const exp = await runPilot(['export', runId, '--out', out, '--dtype', 'f32']);
  assert.match(exp.stdout, new RegExp(`exported ${runId}:2 to ${out}`));
  assert.ok((await readdir(out)).includes('model.safetensors'));
  await assert.rejects(runPilot(['export', 'no-such-run', '--out', out]), /no committed checkpoint or run named "no-such-run"/);

  // Without --file, trace reads the stack's span file.
  const trace = await runPilot(['trace', runId]);
  assert.match(trace.stdout, new RegExp(`^run ${runId} step 2 \\(steps with spans: 1-2\\)\nstep `));
});
