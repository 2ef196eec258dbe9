// Real processes, real gRPC, real Gloo over TCP loopback: N ranks (forked workers) meet through a
// rendezvous server in this process and run every collective; then the failure paths: a rank that
// never arrives, a rank killed inside a collective, a rank that never enters one.
import assert from 'node:assert/strict';
import { type ChildProcess, fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import * as data from './comm-test-data.ts';
import type { WorkerConfig, WorkerMessage } from './comm-test-worker.ts';
import { createRendezvousClient } from './rendezvous-client.ts';
import { createRendezvousService, type RendezvousService } from './rendezvous-server.ts';

const workerPath = fileURLToPath(new URL('./comm-test-worker.ts', import.meta.url));

interface Worker {
  child: ChildProcess;
  next(type: WorkerMessage['type'], timeoutMs?: number): Promise<WorkerMessage>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  send(m: string): void;
}

function spawnRank(config: WorkerConfig): Worker {
  const child = fork(workerPath, [JSON.stringify(config)], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const inbox: WorkerMessage[] = [];
  const waiting: Array<() => void> = [];
  child.on('message', (m) => {
    inbox.push(m as WorkerMessage);
    waiting.splice(0).forEach((w) => w());
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => {
      resolve({ code, signal });
      waiting.splice(0).forEach((w) => w());
    }),
  );
  let gone = false;
  void exited.then(() => (gone = true));
  const next = async (type: WorkerMessage['type'], timeoutMs = 30_000): Promise<WorkerMessage> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = inbox.findIndex((m) => m.type === type || (m.type === 'error' && m.phase === 'unexpected'));
      if (i >= 0) {
        const m = inbox.splice(i, 1)[0];
        if (m.type === 'error' && m.phase === 'unexpected' && type !== 'error') assert.fail(`rank ${config.rank} failed: ${m.message}`);
        return m;
      }
      if (gone) assert.fail(`rank ${config.rank} exited before sending '${type}' (inbox: ${JSON.stringify(inbox).slice(0, 500)})`);
      if (Date.now() > deadline) assert.fail(`rank ${config.rank} sent no '${type}' within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 200);
        waiting.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  };
  return { child, next, exited, send: (m) => child.send(m) };
}

let service: RendezvousService;
let server: grpc.Server;
let address: string;
let groupSeq = 0;
const spawned: Worker[] = [];

function config(rank: number, worldSize: number, group: string, extra: Partial<WorkerConfig> = {}): WorkerConfig {
  return { scenario: 'collectives', rank, worldSize, address, group, timeoutMs: 20_000, joinTimeoutMs: 20_000, op: null, ...extra };
}
function rank(c: WorkerConfig): Worker {
  const w = spawnRank(c);
  spawned.push(w);
  return w;
}

before(async () => {
  service = createRendezvousService({ maxWaitMs: 60_000 });
  server = new grpc.Server();
  service.addTo(server);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  address = `127.0.0.1:${port}`;
});

after(async () => {
  for (const w of spawned) if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill('SIGKILL');
  service.close();
  server.forceShutdown();
});

// What rank `me` must receive from each collective, computed with plain loops from the inputs.
function expected(me: number, n: number): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  const a2a: number[] = [];
  for (let s = 0; s < n; s++) for (let i = 0; i < data.a2aCount(s, me); i++) a2a.push(data.a2aValue(s, me, i));
  out.allToAllVF32 = a2a;
  out.allToAllVI32 = a2a;
  const sumOver = (len: number, offset: number) =>
    Array.from({ length: len }, (_, i) => {
      let s = 0;
      for (let r = 0; r < n; r++) s += data.reduceValue(r, offset + i);
      return s;
    });
  out.allReduceF32 = sumOver(data.reduceLength, 0);
  out.allReduceF64 = sumOver(1000, 0);
  out.allReduceI32 = sumOver(777, 0);
  let offset = 0;
  for (let r = 0; r < me; r++) offset += data.scatterCount(r);
  out.reduceScatter = sumOver(data.scatterCount(me), offset);
  out.reduceScatterEqual = sumOver(3, 3 * me);
  const gathered: number[] = [];
  for (let r = 0; r < n; r++) for (let i = 0; i < data.gatherCount(r); i++) gathered.push(data.gatherValue(r, i));
  out.allGather = gathered;
  out.allGatherExchanged = gathered;
  out.broadcast = Array.from({ length: data.broadcastLength }, (_, i) => data.broadcastValue(i));
  return out;
}

describe('communicator over Gloo, one process per rank', { timeout: 120_000 }, () => {
  for (const n of [2, 3, 4]) {
    test(`${n} ranks run every collective with uneven counts and get exact results`, async () => {
      const group = `collectives-${n}-${groupSeq++}`;
      const workers = Array.from({ length: n }, (_, r) => rank(config(r, n, group)));
      const messages = await Promise.all(workers.map((w) => w.next('results')));
      messages.forEach((m, r) => {
        assert.equal(m.type, 'results');
        if (m.type !== 'results') return;
        const want = expected(r, n);
        assert.deepEqual(Object.keys(m.results).sort(), Object.keys(want).sort());
        for (const [op, values] of Object.entries(want)) assert.deepEqual(m.results[op], values, `rank ${r} of ${n}: ${op}`);
        assert.equal(m.generation, messages[0].type === 'results' ? messages[0].generation : -1, 'all ranks share one generation');
      });
      for (const w of workers) assert.deepEqual(await w.exited, { code: 0, signal: null });
    });
  }

  test('a rank that never arrives fails the others within the bound, naming it; starting it and retrying works', async (t) => {
    const n = 3;
    const group = `missing-${groupSeq++}`;
    const joinTimeoutMs = 3_000;
    const present = [0, 1].map((r) => rank(config(r, n, group, { scenario: 'retry', joinTimeoutMs })));
    const errors = await Promise.all(present.map((w) => w.next('error', 15_000)));
    for (const e of errors) {
      assert.equal(e.type, 'error');
      if (e.type === 'error') t.diagnostic(`${e.code} after ${e.elapsedMs} ms: ${e.message}`);
      if (e.type !== 'error') continue;
      assert.equal(e.phase, 'rendezvous');
      assert.equal(e.code, 'TIMEOUT');
      assert.match(e.message, /rank 2 did not join/);
      assert.match(e.message, new RegExp(`group '${group}'`));
      assert.ok(e.elapsedMs >= joinTimeoutMs / 3 && e.elapsedMs < joinTimeoutMs + 5_000, `failed after ${e.elapsedMs} ms`);
    }
    // The missing rank comes up; the two that failed retry in the same processes.
    const late = rank(config(2, n, group, { joinTimeoutMs: 15_000 }));
    present.forEach((w) => w.send('retry'));
    const results = await Promise.all([...present, late].map((w) => w.next('results')));
    results.forEach((m, r) => {
      assert.equal(m.type, 'results');
      if (m.type === 'results') assert.deepEqual(m.results.allToAllVF32, expected(r, n).allToAllVF32);
    });
    for (const w of [...present, late]) assert.deepEqual(await w.exited, { code: 0, signal: null });
  });

  test('a rank that joins but never connects makes the others fail in the connection phase within the bound', async (t) => {
    const n = 3;
    const group = `half-${groupSeq++}`;
    const timeoutMs = 3_000;
    const workers = [0, 1].map((r) => rank(config(r, n, group, { timeoutMs, joinTimeoutMs: 15_000 })));
    // Rank 2 is this test: it joins the round, then never publishes its address.
    const client = createRendezvousClient({ address });
    try {
      const generation = await client.join({ group, rank: 2, worldSize: n, timeoutMs: 15_000 });
      assert.ok(generation >= 1);
      for (const w of workers) {
        const e = await w.next('error', 20_000);
        assert.equal(e.type, 'error');
        if (e.type !== 'error') continue;
        t.diagnostic(`${e.code} after ${e.elapsedMs} ms: ${e.message}`);
        assert.equal(e.phase, 'rendezvous');
        assert.equal(e.code, 'TIMEOUT');
        assert.match(e.message, /connecting to all peers/);
        assert.match(e.message, /waiting for the address of rank 2/);
        assert.ok(e.elapsedMs < timeoutMs + 6_000, `failed after ${e.elapsedMs} ms`);
      }
      for (const w of workers) assert.deepEqual(await w.exited, { code: 0, signal: null });
    } finally {
      client.close();
    }
  });

  for (const op of ['allReduceSum', 'allToAllV'] as const) {
    test(`killing a rank while the others wait in ${op} fails them with a COMM error, fast, and later calls fail at once`, async (t) => {
      const n = 3;
      const group = `kill-${op}-${groupSeq++}`;
      const timeoutMs = 20_000;
      const survivors = [0, 1].map((r) => rank(config(r, n, group, { scenario: 'fail-in-op', op, timeoutMs })));
      const victim = rank(config(2, n, group, { scenario: 'idle', timeoutMs }));
      await Promise.all([...survivors, victim].map((w) => w.next('connected')));
      survivors.forEach((w) => w.send('go'));
      await Promise.all(survivors.map((w) => w.next('entering')));
      await new Promise((r) => setTimeout(r, 300)); // let them block inside the collective
      victim.child.kill('SIGKILL');
      for (const [r, w] of survivors.entries()) {
        const e = await w.next('error', timeoutMs + 10_000);
        assert.equal(e.type, 'error');
        if (e.type !== 'error') continue;
        t.diagnostic(`rank ${r}: ${e.code} after ${e.elapsedMs} ms: ${e.message}`);
        assert.equal(e.phase, 'collective', e.message);
        assert.equal(e.name, 'CommError');
        assert.ok(e.code === 'COMM' || e.code === 'TIMEOUT', e.code);
        assert.match(e.message, op === 'allReduceSum' ? /all_reduce_sum/ : /all_to_all_v/);
        // The victim is named; a survivor that heard of it through the other survivor names both.
        assert.match(e.message, new RegExp(`rank ${r} of 3 \\((pair with rank 2|pairs with ranks (\\d+, )*2)\\)`));
        assert.ok(e.elapsedMs < timeoutMs, `survivor ${r} failed only after ${e.elapsedMs} ms`);
        const a = await w.next('after-abort');
        assert.equal(a.type, 'after-abort');
        if (a.type !== 'after-abort') continue;
        assert.equal(a.code, 'COMM');
        assert.match(a.message, /aborted/);
        assert.ok(a.elapsedMs < 3_000, `a call after the failure took ${a.elapsedMs} ms`);
        assert.deepEqual(await w.exited, { code: 0, signal: null });
      }
      assert.equal((await victim.exited).signal, 'SIGKILL');
    });
  }

  // The peer only learns of the abort through the connection it waits on; here it may wait on the
  // idle rank, so it is allowed its timeout (kept short).
  test('abort() while blocked in a collective fails the call here at once, and the peer within its timeout', async (t) => {
    const n = 3;
    const group = `abort-${groupSeq++}`;
    const timeoutMs = 4_000;
    const aborting = rank(config(0, n, group, { scenario: 'abort-in-op', op: 'allReduceSum', timeoutMs }));
    const waiting = rank(config(1, n, group, { scenario: 'fail-in-op', op: 'allReduceSum', timeoutMs }));
    const idle = rank(config(2, n, group, { scenario: 'idle', timeoutMs }));
    await Promise.all([aborting, waiting, idle].map((w) => w.next('connected')));
    [aborting, waiting].forEach((w) => w.send('go'));
    for (const w of [aborting, waiting]) {
      const e = await w.next('error', timeoutMs + 10_000);
      assert.equal(e.type, 'error');
      if (e.type !== 'error') continue;
      t.diagnostic(`${e.code} after ${e.elapsedMs} ms: ${e.message}`);
      assert.equal(e.phase, 'collective', e.message);
      if (w === aborting) {
        assert.equal(e.code, 'COMM');
        assert.match(e.message, /all_reduce_sum.* on rank 0 of 3 interrupted: communicator aborted \(test aborts/);
        assert.ok(e.elapsedMs < 3_000, `the aborted call returned only after ${e.elapsedMs} ms`);
      } else {
        assert.ok(e.elapsedMs < timeoutMs + 2_000, `the peer failed only after ${e.elapsedMs} ms`);
      }
      const a = await w.next('after-abort');
      assert.equal(a.type === 'after-abort' && a.code, 'COMM');
    }
    idle.send('done');
    for (const w of [aborting, waiting, idle]) assert.deepEqual(await w.exited, { code: 0, signal: null });
  });

  test('a rank that is alive but never enters the collective makes the others time out with TIMEOUT', async (t) => {
    const n = 3;
    const group = `stall-${groupSeq++}`;
    const timeoutMs = 2_000;
    const survivors = [0, 1].map((r) => rank(config(r, n, group, { scenario: 'fail-in-op', op: 'allReduceSum', timeoutMs })));
    const idle = rank(config(2, n, group, { scenario: 'idle', timeoutMs }));
    await Promise.all([...survivors, idle].map((w) => w.next('connected')));
    survivors.forEach((w) => w.send('go'));
    for (const w of survivors) {
      const e = await w.next('error', 15_000);
      assert.equal(e.type, 'error');
      if (e.type !== 'error') continue;
      t.diagnostic(`${e.code} after ${e.elapsedMs} ms: ${e.message}`);
      assert.equal(e.phase, 'collective', e.message);
      assert.match(e.message, /all_reduce_sum/);
      assert.ok(e.elapsedMs < timeoutMs + 3_000, `failed after ${e.elapsedMs} ms`);
      assert.ok(e.code === 'TIMEOUT' || e.code === 'COMM', e.code);
      await w.next('after-abort');
    }
    idle.send('done');
    for (const w of [...survivors, idle]) assert.equal((await w.exited).signal, null);
  });
});
