// `pilot generate --json` in its own process on the recomputed qwen2_moe-tiny fixture: greedy decoding from the
// fixture's greedy prompt gives exactly the fixture's greedy tokens (HF generate, float64).
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { SafetensorsFile } from '../../src/hf/safetensors.ts';

const root = join(import.meta.dirname, '../..');
const fixture = join(root, 'test/fixtures/recomputed/qwen2_moe-tiny');
const run = (args: string[]) => promisify(execFile)(process.execPath, [join(root, 'bin/pilot.js'), 'generate', ...args], { cwd: root });

test('pilot generate --json, greedy, equals the fixture greedy tokens', async () => {
  const meta = JSON.parse(await readFile(join(fixture, 'expected.json'), 'utf8')) as { prompt_lens: number[] };
  const f = await SafetensorsFile.open(join(fixture, 'expected.safetensors'));
  const greedy = Array.from(await f.readInt32('greedy_tokens'));
  await f.close();
  const plen = meta.prompt_lens[0];
  const expected = greedy.slice(plen);
  assert.ok(expected.length > 0);
  const { stdout } = await run([
    '--model', fixture,
    '--prompt-ids', greedy.slice(0, plen).join(','),
    '--temperature', '0',
    '--max-new-tokens', String(expected.length),
    // The reference was made with min_new_tokens = max_new_tokens: no stop at eos.
    '--ignore-eos',
    '--json',
  ]);
  const lines = stdout.trim().split('\n');
  assert.equal(lines.length, 1, 'one JSON object per sample');
  const s = JSON.parse(lines[0]) as { index: number; token_ids: number[]; logprobs: number[]; finish_reason: string; prompt_tokens: number };
  assert.deepEqual(s.token_ids, expected);
  assert.equal(s.index, 0);
  assert.equal(s.prompt_tokens, plen);
  assert.equal(s.finish_reason, 'length');
  assert.equal(s.logprobs.length, expected.length);
});

test('pilot generate samples n completions from a text prompt, reproducible by seed', async () => {
  const args = ['--model', fixture, '--prompt', 'The quick brown fox', '--n', '3', '--max-new-tokens', '6', '--temperature', '1', '--top-k', '50', '--seed', '11', '--json'];
  const a = (await run(args)).stdout.trim().split('\n').map((l) => JSON.parse(l) as { index: number; token_ids: number[] });
  const b = (await run(args)).stdout.trim().split('\n').map((l) => JSON.parse(l) as { index: number; token_ids: number[] });
  assert.deepEqual(a.map((s) => s.index), [0, 1, 2]);
  assert.deepEqual(a, b);
  assert.ok(new Set(a.map((s) => s.token_ids.join(','))).size > 1, 'samples of one prompt differ');
});

test('pilot generate rejects a bad option with a clear message', async () => {
  await assert.rejects(run(['--model', fixture, '--prompt', 'x', '--top-p', '2']), (err: { stderr: string; code: number }) => {
    assert.match(err.stderr, /--top-p must be a number in \[0, 1\], got "2"/);
    assert.notEqual(err.code, 0);
    return true;
  });
  await assert.rejects(run(['--model', fixture]), /give either --prompt or --prompt-ids/);
});
