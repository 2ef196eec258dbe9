// A few seconds of real load against the real reward service process (loopback gRPC), through the
// library and through the CLI, as CI runs it. The reward service is the one server that needs no
// model and no NATS, so the generator itself is what this checks.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { waitForServing } from '../services/common/grpc-probes.ts';
import { runLoad } from './load.ts';
import { renderHtml } from './report.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
let reward: ChildProcess;
let address = '';

before(async () => {
  reward = spawn(process.execPath, ['--import', 'tsx', join(root, 'services/reward/main.ts'), '--host', '127.0.0.1', '--port', '0', '--workers', '1'], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: '', PILOT_SPAN_FILE: '' },
  });
  for await (const line of createInterface({ input: reward.stdout! })) {
    const event = JSON.parse(line) as { event: string; port: number };
    if (event.event === 'listening') {
      address = `127.0.0.1:${event.port}`;
      break;
    }
  }
  await waitForServing(address, 'pilot.v1.RewardService', 10_000);
});

after(() => {
  reward?.kill('SIGKILL');
});

test('closed loop: every call answered, bounded by count, latencies recorded', async () => {
  const r = await runLoad({ address, target: { kind: 'score', batch: 8, scorer: 'math' }, mode: 'closed', concurrency: 4, workers: 2, durationMs: 5000, maxCalls: 400 });
  assert.equal(r.calls.sent, 400);
  assert.equal(r.calls.ok, 400);
  assert.deepEqual(r.errorsByCode, {});
  assert.equal(r.units, 400 * 8, 'each Score call answers one score per item');
  assert.ok(r.latencyMs.p50 > 0 && r.latencyMs.p50 <= r.latencyMs.p99 && r.latencyMs.p99 <= r.latencyMs.max);
  assert.ok(r.throughput.unitsPerS > 0);
});

test('open loop: sends at the asked rate for the duration', async () => {
  const r = await runLoad({ address, target: { kind: 'score', batch: 1, scorer: 'math' }, mode: 'open', rate: 200, workers: 2, durationMs: 1500 });
  // 200/s for 1.5 s = 300 scheduled calls; every one is sent (the cap is far away) and answered.
  assert.equal(r.calls.sent + r.calls.skipped, 300);
  assert.equal(r.calls.skipped, 0);
  assert.equal(r.calls.ok, 300);
  assert.ok(r.elapsedS >= 1.4 && r.elapsedS < 5, `elapsed ${r.elapsedS}`);
  const html = renderHtml(r, 'smoke');
  assert.equal(html.match(/<svg /g)?.length, 3);
  assert.ok(!/NaN|undefined|Infinity/.test(html), 'no broken numbers in the plot');
});

test('errors are counted by status code with a sample message', async () => {
  const r = await runLoad({ address, target: { kind: 'score', batch: 1, scorer: 'no-such-scorer' }, concurrency: 2, workers: 1, maxCalls: 20 });
  assert.equal(r.calls.ok, 0);
  assert.deepEqual(r.errorsByCode, { INVALID_ARGUMENT: 20 });
  assert.match(r.errorSamples.INVALID_ARGUMENT!, /no-such-scorer/);
});

test('an address where nothing listens fails fast, naming it', async () => {
  await assert.rejects(
    runLoad({ address: '127.0.0.1:1', target: { kind: 'score', batch: 1, scorer: 'math' }, concurrency: 1, workers: 1, connectTimeoutMs: 500, durationMs: 500 }),
    /cannot connect to 127\.0\.0\.1:1/,
  );
});

test('the CLI writes the JSON and HTML reports of each step', () => {
  const dir = mkdtempSync(join(tmpdir(), 'loadtest-cli-'));
  const out = spawnSync(
    process.execPath,
    ['--import', 'tsx', join(root, 'loadtest/main.ts'), '--address', address, '--target', 'score', '--concurrency', '1,2', '--count', '50',
      '--workers', '2', '--out', join(dir, 'r.json'), '--html', join(dir, 'r.html')],
    { encoding: 'utf8', timeout: 60_000 },
  );
  assert.equal(out.status, 0, out.stderr);
  assert.equal(out.stdout.trim().split('\n').length, 2);
  const report = JSON.parse(readFileSync(join(dir, 'r.json'), 'utf8')) as { command: string; runs: { concurrency: number; calls: { ok: number } }[] };
  assert.deepEqual(report.runs.map((r) => [r.concurrency, r.calls.ok]), [[1, 50], [2, 50]]);
  assert.match(report.command, /loadtest\/main\.ts --address/);
  assert.equal(readFileSync(join(dir, 'r.html'), 'utf8').match(/<svg /g)?.length, 6);
  const bad = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'loadtest/main.ts'), '--address', '192.168.1.1:50051', '--target', 'score', '--concurrency', '1'], { encoding: 'utf8' });
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /not loopback/);
});
