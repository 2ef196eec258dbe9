// The container health probe against a real gRPC server on loopback, run as compose runs it (a process).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createGrpcServer, type GrpcServer } from '../services/common/grpc-server.ts';
import { RewardServiceService } from '../proto/gen/pilot/v1/reward.ts';
import { probe } from './health-probe.ts';

const script = fileURLToPath(new URL('./health-probe.ts', import.meta.url));
let server: GrpcServer;
let address = '';

before(async () => {
  server = createGrpcServer({ tracer: null }, { host: '127.0.0.1', port: 0, credentials: null, reflectionProtoFiles: [], protoRoot: '', shutdownGraceMs: 100 });
  server.addService(RewardServiceService, { score: async () => ({ scores: [] }) });
  address = `127.0.0.1:${await server.start()}`;
});
after(() => server.shutdown());

// Asynchronous: the server under probe lives in this process, so its event loop must keep running.
function runProbe(...args: string[]): Promise<{ status: number | null; stderr: string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', script, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, HEALTH_PROBE_TIMEOUT_MS: '2000' } });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve) => child.on('exit', (status) => resolve({ status, stderr })));
}

test('exits 0 when every named service is SERVING, 1 naming the one that is not', async () => {
  assert.equal((await runProbe(address, 'pilot.v1.RewardService')).status, 0);
  assert.equal((await runProbe(address)).status, 0, 'no service: the whole server');
  const missing = await runProbe(address, 'pilot.v1.RewardService', 'pilot.v1.RolloutService');
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /pilot\.v1\.RolloutService=/);
});

test('NOT_SERVING (draining) and no server at all fail; bad arguments exit 2', async () => {
  server.setStatus('pilot.v1.RewardService', 'NOT_SERVING');
  const draining = await probe(address, ['pilot.v1.RewardService'], 2000);
  assert.deepEqual(draining, { ok: false, statuses: { 'pilot.v1.RewardService': 'NOT_SERVING' } });
  server.setStatus('pilot.v1.RewardService', 'SERVING');
  const down = await runProbe('127.0.0.1:1', 'pilot.v1.RewardService');
  assert.equal(down.status, 1);
  assert.match(down.stderr, /127\.0\.0\.1:1/);
  const bad = await runProbe('not-an-address');
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /expected host:port/);
});
