// The rendezvous service over real gRPC on loopback: rounds and generations, waiting gets, and the
// errors a rank sees when others are missing or it holds a stale generation.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import { RendezvousError } from './errors.ts';
import { createRendezvousClient, type RendezvousClient } from './rendezvous-client.ts';
import { createRendezvousService, type RendezvousService } from './rendezvous-server.ts';

let service: RendezvousService;
let server: grpc.Server;
let client: RendezvousClient;
let seq = 0;

before(async () => {
  service = createRendezvousService({ maxWaitMs: 10_000 });
  server = new grpc.Server();
  service.addTo(server);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  client = createRendezvousClient({ address: `127.0.0.1:${port}` });
});

after(() => {
  client.close();
  service.close();
  server.forceShutdown();
});

function fails(p: Promise<unknown>, code: string, grpcCode: grpc.status, message: RegExp): Promise<void> {
  return assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof RendezvousError, String(e));
    assert.equal(e.code, code, e.message);
    assert.equal(e.grpcCode, grpcCode, e.message);
    assert.match(e.message, message);
    return true;
  });
}

const bytes = (s: string) => new TextEncoder().encode(s);
const text = (b: Uint8Array) => new TextDecoder().decode(b);

describe('rendezvous service', () => {
  test('a round completes when all ranks joined; keys are shared within its generation and gets wait for them', async () => {
    const group = `g${seq++}`;
    const gens = await Promise.all([0, 1, 2].map((rank) => client.join({ group, rank, worldSize: 3, timeoutMs: 5_000 })));
    assert.equal(new Set(gens).size, 1);
    const gen = gens[0];
    const waiting = client.get(group, gen, ['a', 'b'], 5_000);
    await client.set(group, gen, 'a', bytes('alpha'), 1_000);
    await new Promise((r) => setTimeout(r, 50));
    await client.set(group, gen, 'b', bytes('beta'), 1_000);
    assert.deepEqual((await waiting).map(text), ['alpha', 'beta']);
    assert.deepEqual((await client.get(group, gen, ['b'], 100)).map(text), ['beta']);
  });

  test('a missing rank fails every waiting rank with one error naming it; a retry with it gets a new, clean generation', async () => {
    const group = `g${seq++}`;
    const first = await Promise.all([0, 1, 2].map((rank) => client.join({ group, rank, worldSize: 3, timeoutMs: 5_000 })));
    await client.set(group, first[0], 'k', bytes('old'), 1_000);
    const started = Date.now();
    const attempts = [0, 2].map((rank) => client.join({ group, rank, worldSize: 3, timeoutMs: 500 }));
    for (const a of attempts) await fails(a, 'TIMEOUT', grpc.status.DEADLINE_EXCEEDED, /rank 1 did not join \(joined: 0, 2\)/);
    assert.ok(Date.now() - started < 3_000);
    const second = await Promise.all([0, 1, 2].map((rank) => client.join({ group, rank, worldSize: 3, timeoutMs: 5_000 })));
    assert.equal(second[0], first[0] + 1);
    await fails(client.get(group, second[0], ['k'], 200), 'TIMEOUT', grpc.status.DEADLINE_EXCEEDED, /keys k of group .* were not set within 200 ms/);
    await fails(client.get(group, first[0], ['k'], 200), 'COMM', grpc.status.FAILED_PRECONDITION, /generation 1 of group .* is stale \(current 2\)/);
    await fails(client.set(group, first[0], 'k', bytes('x'), 200), 'COMM', grpc.status.FAILED_PRECONDITION, /stale/);
  });

  test('a get of a generation that a new round replaces is aborted, not left waiting', async () => {
    const group = `g${seq++}`;
    const [gen] = await Promise.all([0, 1].map((rank) => client.join({ group, rank, worldSize: 2, timeoutMs: 5_000 })));
    const waiting = fails(client.get(group, gen, ['never'], 5_000), 'COMM', grpc.status.ABORTED, /moved on to generation/);
    await Promise.all([0, 1].map((rank) => client.join({ group, rank, worldSize: 2, timeoutMs: 5_000 })));
    await waiting;
  });

  test('bad joins are refused with the reason', async () => {
    const group = `g${seq++}`;
    await fails(client.join({ group, rank: 3, worldSize: 3, timeoutMs: 100 }), 'INVALID_ARGUMENT', grpc.status.INVALID_ARGUMENT, /rank must be in \[0, 3\), got 3/);
    await fails(client.join({ group: '', rank: 0, worldSize: 1, timeoutMs: 100 }), 'INVALID_ARGUMENT', grpc.status.INVALID_ARGUMENT, /group must not be empty/);
    const waiting = client.join({ group, rank: 0, worldSize: 2, timeoutMs: 2_000 });
    await new Promise((r) => setTimeout(r, 50));
    await fails(client.join({ group, rank: 1, worldSize: 3, timeoutMs: 100 }), 'INVALID_ARGUMENT', grpc.status.INVALID_ARGUMENT, /meeting with world size 2; rank 1 asked for 3/);
    // The same rank joining again supersedes its earlier call.
    const superseded = fails(waiting, 'COMM', grpc.status.ABORTED, /superseded/);
    const again = client.join({ group, rank: 0, worldSize: 2, timeoutMs: 2_000 });
    await superseded;
    const other = client.join({ group, rank: 1, worldSize: 2, timeoutMs: 2_000 });
    const [g0, g1] = await Promise.all([again, other]);
    assert.equal(g0, g1);
  });

  test('set and get before any completed round are refused', async () => {
    await fails(client.get('unknown-group', 1, ['k'], 100), 'COMM', grpc.status.FAILED_PRECONDITION, /has not completed a Join/);
  });
});
