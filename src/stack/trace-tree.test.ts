import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';

import type { SpanRecord } from '../../services/common/tracing.ts';
import { traceRun } from '../cli/commands/trace.ts';
import { formatTrees, readSpanFiles, stepsOfRun, stepTrees } from './trace-tree.ts';

const T0 = 1_700_000_000_000_000_000n;
let n = 0;
function span(name: string, service: string, parent: SpanRecord | null, startMs: number, durMs: number, attributes: Record<string, unknown> = {}, error?: string): SpanRecord {
  const start = T0 + BigInt(Math.round(startMs * 1e6));
  return {
    traceId: 'a'.repeat(32),
    spanId: (++n).toString(16).padStart(16, '0'),
    parentSpanId: parent?.spanId ?? null,
    name,
    kind: 'INTERNAL',
    startTimeUnixNano: start.toString(),
    endTimeUnixNano: (start + BigInt(Math.round(durMs * 1e6))).toString(),
    durationMs: durMs,
    status: error ? { code: 'ERROR', message: error } : { code: 'UNSET' },
    attributes,
    events: [],
    service,
  };
}

// A run span with two steps under it, each with rollout (two rank calls), reward, train; and another run's step.
const run = span('run', 'coordinator', null, 0, 5000, { 'run.id': 'r1', 'run.steps': 2 });
const step1 = span('step', 'coordinator', run, 10, 2000, { 'run.id': 'r1', step: 1 });
const rollout1 = span('rollout', 'coordinator', step1, 20, 1200, { step: 1 });
const gen0 = span('pilot.v1.RolloutService/Generate', 'rank-0', rollout1, 25, 1100);
const gen1 = span('pilot.v1.RolloutService/Generate', 'rank-1', rollout1, 26, 1150);
const reward1 = span('reward', 'coordinator', step1, 1230, 40.5, { step: 1 });
const train1 = span('train', 'coordinator', step1, 1280, 700, {}, 'rank 1 failed');
const step2 = span('step', 'coordinator', run, 2100, 1800, { 'run.id': 'r1', step: 2 });
const rollout2 = span('rollout', 'coordinator', step2, 2110, 900, { step: 2 });
const other = span('step', 'coordinator', null, 0, 10, { 'run.id': 'r2', step: 1 });
// Written out of order (as concurrent processes append), with a torn last line.
const ALL = [gen1, reward1, step1, run, train1, gen0, rollout1, step2, rollout2, other];

let dir = '';
let file = '';
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'pilot-trace-'));
  file = join(dir, 'spans.jsonl');
  await writeFile(file, ALL.map((s) => JSON.stringify(s)).join('\n') + '\n{"traceId": "tor');
});
after(() => rm(dir, { recursive: true, force: true }));

test('reads a span file, skipping a torn line', async () => {
  const { spans, issues } = await readSpanFiles([file]);
  assert.equal(spans.length, ALL.length);
  assert.equal(issues.length, 1);
  assert.equal(issues[0].line, ALL.length + 1);
  assert.deepEqual(stepsOfRun(spans, 'r1'), [1, 2]);
});

test('the tree of a step holds exactly its spans, children in start order, with durations', async () => {
  const { spans } = await readSpanFiles([file]);
  const trees = stepTrees(spans, 'r1', 1);
  assert.equal(trees.length, 1);
  assert.equal(trees[0].span.spanId, step1.spanId);
  assert.deepEqual(trees[0].children.map((c) => c.span.name), ['rollout', 'reward', 'train']);
  assert.deepEqual(trees[0].children[0].children.map((c) => c.span.service), ['rank-0', 'rank-1']);
  assert.equal(
    formatTrees(trees),
    [
      'step  2.00 s  [coordinator]',
      '├─ rollout  1.20 s  [coordinator]  +10.0 ms',
      '│  ├─ pilot.v1.RolloutService/Generate  1.10 s  [rank-0]  +15.0 ms',
      '│  └─ pilot.v1.RolloutService/Generate  1.15 s  [rank-1]  +16.0 ms',
      '├─ reward  40.5 ms  [coordinator]  +1.22 s',
      '└─ train  700.0 ms  [coordinator]  +1.27 s  ERROR: rank 1 failed',
    ].join('\n'),
  );
});

test('traceRun picks the last step by default and explains a missing run or step', async () => {
  const last = await traceRun([file], 'r1');
  assert.equal(last.step, 2);
  assert.equal(last.text.split('\n').length, 2);
  assert.equal(last.skipped, 1);
  await assert.rejects(traceRun([file], 'r1', 5), /no spans for step 5; steps with spans: 1-2/);
  await assert.rejects(traceRun([file], 'nope'), /runs with spans: r1, r2/);
  await assert.rejects(traceRun([join(dir, 'missing.jsonl')], 'r1'), /span file not found/);
});

test('pilot trace prints the tree of the requested step', async () => {
  const root = join(import.meta.dirname, '../..');
  const { stdout } = await promisify(execFile)(process.execPath, [join(root, 'bin/pilot.js'), 'trace', 'r1', '--step', '1', '--file', file]);
  const lines = stdout.trimEnd().split('\n');
  assert.equal(lines[0], 'run r1 step 1 (steps with spans: 1-2)');
  assert.equal(lines[1], 'step  2.00 s  [coordinator]');
  assert.equal(lines.length, 7);
});
