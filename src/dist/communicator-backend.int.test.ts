// The backend option of createCommunicator on the real engine and a real rendezvous server over
// loopback gRPC. CPU builds have no NCCL: asking for it must fail at connect with an error that says
// so, and leave nothing hanging. (The NCCL backend itself is tested on GPUs by
// kernels/cuda/tests/gpu_comm_test.cpp through bench/ep-dispatch-gpu.sh.)
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import { createCommunicator } from './communicator.ts';
import { CommError } from './errors.ts';
import { loadCommAddon } from './native.ts';
import { createRendezvousService, type RendezvousService } from './rendezvous-server.ts';

let service: RendezvousService;
let server: grpc.Server;
let address: string;

before(async () => {
  service = createRendezvousService({ maxWaitMs: 10_000 });
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

test('an unknown backend or a negative device is rejected before anything connects', async () => {
  const base = { rank: 0, worldSize: 1, rendezvous: { address, group: 'backend-bad' } };
  await assert.rejects(createCommunicator({ ...base, backend: 'mpi' as never }), (e: unknown) => {
    assert.ok(e instanceof CommError);
    assert.equal(e.code, 'INVALID_ARGUMENT');
    assert.match(e.message, /backend must be 'gloo' or 'nccl', got 'mpi'/);
    return true;
  });
  await assert.rejects(createCommunicator({ ...base, backend: 'nccl', device: -1 }), /device must be a non-negative integer/);
});

test('backend gloo (explicit) connects and sums', async () => {
  const c = await createCommunicator({ rank: 0, worldSize: 1, backend: 'gloo', rendezvous: { address, group: 'backend-gloo' } });
  assert.deepEqual(Array.from(await c.allReduceSum(Float32Array.of(1.5, -2))), [1.5, -2]);
  await c.dispose();
});

test('backend nccl on an engine built without NCCL fails at connect, saying how to get it', async (t) => {
  const addon = loadCommAddon();
  if (addon.ncclAvailable === true) {
    t.skip('this engine has NCCL: the GPU test covers the backend');
    return;
  }
  assert.equal(addon.ncclAvailable, false);
  const started = Date.now();
  await assert.rejects(createCommunicator({ rank: 0, worldSize: 1, backend: 'nccl', rendezvous: { address, group: 'backend-nccl' } }, { addon }), (e: unknown) => {
    assert.ok(e instanceof CommError);
    assert.equal(e.code, 'INVALID_ARGUMENT');
    assert.match(e.message, /NCCL backend is not in this build/);
    assert.match(e.message, /NCCL_HOME/);
    return true;
  });
  assert.ok(Date.now() - started < 5_000, 'fails at once, without waiting for a timeout');
});
