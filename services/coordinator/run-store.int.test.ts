// Run records against a real nats-server: changes made back to back (a step's checkpoint noted, then the run's
// final state, without waiting in between) all land, in memory and in the stream a restarted coordinator reads.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { startTestNatsServer, type TestNatsServer } from '../../test/harness/nats-server.ts';
import { createRunStore } from './run-store.ts';

interface Rec {
  id: string;
  state: string;
  step: number;
  latestCheckpointId: string;
}

let server: TestNatsServer;
let nc: NatsConnection;

before(async () => {
  server = await startTestNatsServer();
  nc = await connect({ servers: server.url });
});

after(async () => {
  await nc.close();
  await server.stop();
});

test('changes made back to back all land, in order, in memory and in the stream', async () => {
  const store = await createRunStore<Rec>({ nc }, { stream: 'TEST_RUN_STATE_ORDER' });
  await store.put({ id: 'r1', state: 'running', step: 4, latestCheckpointId: 'r1:4' });
  // As the GRPO loop's callbacks fire them: not awaited one by one.
  const writes = [
    store.update('r1', (cur) => ({ ...cur, step: 6 })),
    store.update('r1', (cur) => ({ ...cur, latestCheckpointId: 'r1:6' })),
    store.update('r1', (cur) => ({ ...cur, state: 'succeeded' })),
  ];
  const results = await Promise.all(writes);
  const want = { id: 'r1', state: 'succeeded', step: 6, latestCheckpointId: 'r1:6' };
  assert.deepEqual(results[2], want);
  assert.deepEqual(results[1], { ...want, state: 'running' }, 'each change sees the ones made before it');
  assert.deepEqual(store.get('r1'), want);
  // What a restarted coordinator reads back.
  const reopened = await createRunStore<Rec>({ nc }, { stream: 'TEST_RUN_STATE_ORDER' });
  assert.deepEqual(reopened.get('r1'), want);
});

test('a change to an unknown run is refused', async () => {
  const store = await createRunStore<Rec>({ nc }, { stream: 'TEST_RUN_STATE_ORDER' });
  await assert.rejects(store.update('nope', (cur) => cur), /no run nope/);
});
