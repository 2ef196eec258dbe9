// A few seconds of SubmitPrompts load against a real coordinator process and a real nats-server,
// then the queue check: every prompt the server accepted is in the JetStream stream. The coordinator
// needs no ranks to queue prompts (it calls them only when a run starts), so their addresses here
// point nowhere.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { startTestNatsServer, type TestNatsServer } from '../test/harness/nats-server.ts';
import { waitForServing } from '../services/common/grpc-probes.ts';
import { runLoad } from './load.ts';
import { checkQueue } from './verify-queue.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
let nats: TestNatsServer;
const coordinators: ChildProcess[] = [];
let address = '';

async function startCoordinator(extra: string[]): Promise<string> {
  const proc = spawn(
    process.execPath,
    ['--import', 'tsx', join(root, 'services/coordinator/main.ts'), '--host', '127.0.0.1', '--port', '0', '--nats', nats.url,
      '--reward', '127.0.0.1:1', '--checkpoint', '127.0.0.1:1', '--ranks', '127.0.0.1:1', ...extra],
    { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: '', PILOT_SPAN_FILE: '' } },
  );
  coordinators.push(proc);
  let addr = '';
  for await (const line of createInterface({ input: proc.stdout! })) {
    const event = JSON.parse(line) as { event: string; port: number };
    if (event.event === 'listening') {
      addr = `127.0.0.1:${event.port}`;
      break;
    }
  }
  await waitForServing(addr, 'pilot.v1.RunService', 15_000);
  return addr;
}

before(async () => {
  nats = await startTestNatsServer();
  address = await startCoordinator([]);
});

after(async () => {
  for (const c of coordinators) c.kill('SIGKILL');
  await nats?.stop();
});

test('batched and single-prompt submits: all answered, all stored, none lost', async () => {
  const batched = await runLoad({ address, target: { kind: 'submit', dataset: 'smoke-batch', batch: 20, promptChars: 64 }, concurrency: 4, workers: 2, durationMs: 1500 });
  assert.equal(batched.calls.errors, 0, JSON.stringify(batched.errorSamples));
  assert.ok(batched.calls.ok > 0);
  assert.equal(batched.units, batched.calls.ok * 20, 'every prompt of every call accepted');
  const single = await runLoad({ address, target: { kind: 'submit', dataset: 'smoke-single', batch: 1, promptChars: 32 }, mode: 'open', rate: 100, workers: 1, durationMs: 1000 });
  assert.equal(single.calls.ok, 100);
  for (const [dataset, accepted] of [['smoke-batch', batched.units], ['smoke-single', single.units]] as const) {
    const check = await checkQueue(nats.url, dataset, accepted);
    assert.equal(check.stored, accepted, `${dataset}: stored = accepted (ids are unique per call, so no duplicates)`);
    assert.ok(check.ok);
  }
});

test('an invalid dataset name is refused with INVALID_ARGUMENT, counted by code', async () => {
  const r = await runLoad({ address, target: { kind: 'submit', dataset: 'bad.name', batch: 1, promptChars: 16 }, concurrency: 1, workers: 1, maxCalls: 5 });
  assert.deepEqual(r.errorsByCode, { INVALID_ARGUMENT: 5 });
  assert.match(r.errorSamples.INVALID_ARGUMENT!, /dataset/);
});

test('past capacity SubmitPrompts answers RESOURCE_EXHAUSTED at once and loses nothing it accepted', async () => {
  // A coordinator that queues at most 100 prompts at a time, offered far more: 16 concurrent callers of 100.
  const small = await startCoordinator(['--max-prompts-in-flight', '100']);
  const r = await runLoad({ address: small, target: { kind: 'submit', dataset: 'smoke-overload', batch: 100, promptChars: 32 }, concurrency: 16, workers: 2, durationMs: 1500 });
  assert.ok((r.errorsByCode.RESOURCE_EXHAUSTED ?? 0) > 0, `expected refusals, got ${JSON.stringify(r.errorsByCode)}`);
  assert.deepEqual(Object.keys(r.errorsByCode), ['RESOURCE_EXHAUSTED'], JSON.stringify(r.errorSamples));
  assert.match(r.errorSamples.RESOURCE_EXHAUSTED!, /nothing of this call was queued/);
  assert.ok(r.calls.ok > 0, 'calls within capacity still go through');
  const check = await checkQueue(nats.url, 'smoke-overload', r.units);
  assert.equal(check.stored, r.units, 'stored = accepted: refused calls queued nothing, accepted ones are all there');
});
