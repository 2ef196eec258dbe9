// The communicator's contract inside one process (two ranks as two communicators of this process,
// over a real gRPC rendezvous server and real Gloo sockets): bad input, abort, use after dispose,
// the native handle, an unreachable rendezvous service.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import { type Communicator, createCommunicator } from './communicator.ts';
import { CommError, RendezvousError } from './errors.ts';
import { loadCommAddon } from './native.ts';
import { createRendezvousService, type RendezvousService } from './rendezvous-server.ts';

let service: RendezvousService;
let server: grpc.Server;
let address: string;
let seq = 0;

before(async () => {
  service = createRendezvousService();
  server = new grpc.Server();
  service.addTo(server);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  address = `127.0.0.1:${port}`;
});

after(() => {
  service.close();
  server.forceShutdown();
});

async function pair(timeoutMs = 5_000): Promise<[Communicator, Communicator]> {
  const group = `contract-${seq++}`;
  const make = (rank: number) => createCommunicator({ rank, worldSize: 2, rendezvous: { address, group }, timeoutMs });
  const [a, b] = await Promise.all([make(0), make(1)]);
  return [a, b];
}

function rejectsWith(p: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  return assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof CommError, `expected a CommError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
    return true;
  });
}

describe('communicator contract (two ranks in one process)', { timeout: 60_000 }, () => {
  test('bad options are rejected before anything connects, naming the field', async () => {
    const base = { rank: 0, worldSize: 2, rendezvous: { address: '127.0.0.1:1', group: 'g' } };
    await rejectsWith(createCommunicator({ ...base, rank: 2 }), 'INVALID_ARGUMENT', /rank must be an integer in \[0, 2\), got 2/);
    await rejectsWith(createCommunicator({ ...base, worldSize: 0 }), 'INVALID_ARGUMENT', /worldSize/);
    await rejectsWith(createCommunicator({ ...base, rendezvous: { address: '', group: 'g' } }), 'INVALID_ARGUMENT', /rendezvous.address/);
    await rejectsWith(createCommunicator({ ...base, rendezvous: { address: 'x:1', group: '' } }), 'INVALID_ARGUMENT', /rendezvous.group/);
    await rejectsWith(createCommunicator({ ...base, timeoutMs: -5 }), 'INVALID_ARGUMENT', /timeoutMs must be a positive number/);
  });

  test('an unreachable rendezvous service fails within the bound with a clear error', async () => {
    const started = Date.now();
    await assert.rejects(
      createCommunicator({ rank: 0, worldSize: 2, rendezvous: { address: '127.0.0.1:1', group: 'nobody', timeoutMs: 1_000 }, timeoutMs: 1_000 }),
      (e: unknown) => {
        assert.ok(e instanceof RendezvousError, String(e));
        assert.match(e.message, /rendezvous join of rank 0 to group 'nobody' failed/);
        return true;
      },
    );
    assert.ok(Date.now() - started < 10_000);
  });

  test('collectives, argument errors that leave the communicator usable, the native handle, abort and dispose', async () => {
    const [a, b] = await pair();
    assert.equal(a.generation, b.generation);
    const addon = loadCommAddon();
    assert.deepEqual(addon.communicatorInfo(a), { rank: 0, size: 2, timeoutMs: 5_000, aborted: false });
    assert.deepEqual(addon.communicatorInfo(b.native), { rank: 1, size: 2, timeoutMs: 5_000, aborted: false });
    assert.throws(() => addon.communicatorInfo({}), (e: Error) => e.name === 'EngineError' && /not a Communicator/.test(e.message));

    const [sa, sb] = await Promise.all([a.allReduceSum(Float32Array.of(1, 2, 3)), b.allReduceSum(Float32Array.of(10, 20, 30))]);
    assert.deepEqual([...sa], [11, 22, 33]);
    assert.deepEqual([...sb], [11, 22, 33]);

    // Argument errors are caught before any communication: both ranks stay in step.
    await rejectsWith(a.allToAllV(new Float32Array(3), [1, 1]), 'INVALID_ARGUMENT', /send has 3 elements but sendCounts sum to 2/);
    await rejectsWith(a.allToAllV(new Float32Array(2), [1, 1, 0]), 'INVALID_ARGUMENT', /one per rank \(2\)/);
    await rejectsWith(a.reduceScatterSum(new Float32Array(3)), 'INVALID_ARGUMENT', /equal blocks/);
    await rejectsWith(a.allGather(new Float32Array(2), [1, 2]), 'INVALID_ARGUMENT', /counts\[0\] is 1/);
    await rejectsWith(a.broadcast(new Float32Array(2), 2), 'INVALID_ARGUMENT', /root must be in \[0, 2\)/);
    const [ga, gb] = await Promise.all([a.allGather(Int32Array.of(5)), b.allGather(Int32Array.of(6, 7))]);
    assert.deepEqual([...ga], [5, 6, 7]);
    assert.deepEqual([...gb], [5, 6, 7]);

    // Several calls queued at once run in call order on each rank.
    const queued = await Promise.all([
      a.broadcast(Float64Array.of(1.5), 0), a.allReduceSum(Int32Array.of(1)), a.barrier(),
      b.broadcast(Float64Array.of(0), 0), b.allReduceSum(Int32Array.of(2)), b.barrier(),
    ]);
    assert.deepEqual([...(queued[0] as Float64Array)], [1.5]);
    assert.deepEqual([...(queued[3] as Float64Array)], [1.5]);
    assert.deepEqual([...(queued[1] as Int32Array)], [3]);

    // Aborting one rank: its next call fails at once; the peer's fails fast (connection closed).
    a.abort('contract test');
    assert.equal(addon.communicatorInfo(a).aborted, true);
    const t0 = Date.now();
    await rejectsWith(a.barrier(), 'COMM', /communicator is aborted \(contract test \(rank 0\)\)/);
    await assert.rejects(b.allReduceSum(Float32Array.of(1)), (e: unknown) => e instanceof CommError);
    assert.ok(Date.now() - t0 < 5_000 + 2_000);

    await a.dispose();
    await a.dispose(); // twice is fine
    await rejectsWith(a.barrier(), 'COMM', /disposed/);
    assert.throws(() => addon.communicatorInfo(a), /not connected or already disposed/);
    await b.dispose();
  });

  test('peers can be reached through an interface name or a host name; bad ones fail with the reason', async () => {
    for (const where of [{ iface: 'lo' }, { host: 'localhost' }]) {
      const group = `where-${seq++}`;
      const make = (rank: number) => createCommunicator({ rank, worldSize: 2, rendezvous: { address, group }, timeoutMs: 5_000, ...where });
      const [a, b] = await Promise.all([make(0), make(1)]);
      const [x, y] = await Promise.all([a.allReduceSum(Int32Array.of(4)), b.allReduceSum(Int32Array.of(5))]);
      assert.deepEqual([[...x], [...y]], [[9], [9]], JSON.stringify(where));
      await Promise.all([a.dispose(), b.dispose()]);
    }
    // Both ranks fail while creating their device (after meeting), each with the reason.
    for (const [where, code, message] of [
      [{ host: 'no-such-host.invalid' }, 'INVALID_ARGUMENT', /cannot resolve host 'no-such-host.invalid'/],
      [{ iface: 'no-such-if0' }, 'COMM', /Unable to find address for: no-such-if0/],
    ] as const) {
      const group = `where-${seq++}`;
      const make = (rank: number) => createCommunicator({ rank, worldSize: 2, rendezvous: { address, group }, timeoutMs: 5_000, ...where });
      const results = await Promise.allSettled([make(0), make(1)]);
      for (const r of results) {
        assert.equal(r.status, 'rejected');
        if (r.status === 'rejected') {
          assert.ok(r.reason instanceof CommError);
          assert.equal(r.reason.code, code, r.reason.message);
          assert.match(r.reason.message, /failed while creating the TCP device/);
          assert.match(r.reason.message, message);
        }
      }
    }
  });

  // Gloo asserts (and the process aborts) when a message is larger than the receive posted for it;
  // messages travel on size-derived slots, so disagreeing ranks time out instead.
  test('ranks that disagree on sizes fail with TIMEOUT naming the peer, and the process lives on', async () => {
    {
      const [a, b] = await pair(1_500);
      const results = await Promise.allSettled([a.allReduceSum(new Float32Array(10)), b.allReduceSum(new Float32Array(5000))]);
      // Both wait for data that never comes; the first to time out aborts, closing its sockets, so the other
      // may see the connection close just before its own timeout: TIMEOUT for one, TIMEOUT or COMM for the other.
      let timeouts = 0;
      for (const r of results) {
        assert.equal(r.status, 'rejected');
        if (r.status === 'rejected') {
          assert.ok(r.reason.code === 'TIMEOUT' || r.reason.code === 'COMM', r.reason.message);
          if (r.reason.code === 'TIMEOUT') {
            timeouts++;
            assert.match(r.reason.message, /all_reduce_sum.*called a different collective or size/);
          }
        }
      }
      assert.ok(timeouts >= 1, 'at least one rank reports the timeout');
      await Promise.all([a.dispose(), b.dispose()]);
    }
    {
      const [a, b] = await pair(1_500);
      // Rank 1 sends 3 elements to rank 0, which expects 2.
      const results = await Promise.allSettled([
        a.allToAllV(new Float32Array(3), [1, 2], [1, 2]),
        b.allToAllV(new Float32Array(4), [3, 1], [2, 1]),
      ]);
      // As above: the rank that times out first aborts, so the other may see the connection close first (COMM).
      const expected = [
        /all_to_all_v.* on rank 0 of 2 \(pair with rank 1\).*no data from rank 1/,
        /on rank 1 of 2 \(pair with rank 0\).*(data not taken by|no data from) rank 0/,
      ];
      let timeouts = 0;
      results.forEach((r, rank) => {
        assert.equal(r.status, 'rejected');
        if (r.status === 'rejected') {
          assert.ok(r.reason.code === 'TIMEOUT' || r.reason.code === 'COMM', r.reason.message);
          if (r.reason.code === 'TIMEOUT') {
            timeouts++;
            assert.match(r.reason.message, expected[rank]);
          }
        }
      });
      assert.ok(timeouts >= 1, 'at least one rank reports the timeout');
      await Promise.all([a.dispose(), b.dispose()]);
    }
  });

  test('dispose waits for the calls queued before it', async () => {
    const [a, b] = await pair();
    const pa = a.allReduceSum(Float64Array.of(0.25));
    const da = a.dispose();
    const pb = b.allReduceSum(Float64Array.of(0.5));
    assert.deepEqual([...(await pa)], [0.75]);
    assert.deepEqual([...(await pb)], [0.75]);
    await da;
    await b.dispose();
  });
});
