// The reward server over real gRPC on loopback: health, reflection, scoring, validation errors,
// deadlines, and the external scorer calling a second reward server.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError } from '../common/errors.ts';
import { createClient } from '../common/grpc-client.ts';
import { checkHealth, listServicesByReflection, reflectFilesForSymbol } from '../common/grpc-probes.ts';
import { createTracing, type SpanRecord } from '../common/tracing.ts';
import { RewardServiceService, type ScoreRequest } from '../../proto/gen/pilot/v1/reward.ts';
import { createRewardServer, type RewardServer, type RewardServerConfig } from './server.ts';

const dir = mkdtempSync(join(tmpdir(), 'reward-int-'));
const spanFile = join(dir, 'spans.jsonl');
const tracing = createTracing({ serviceName: 'reward-test', otlpEndpoint: null, spanFile });

const config = (overrides: Partial<RewardServerConfig> = {}): RewardServerConfig => ({
  host: '127.0.0.1',
  port: 0,
  workers: 2,
  maxItems: 100,
  externalTimeoutMs: 5000,
  shutdownGraceMs: 1000,
  serverCredentials: null,
  clientCredentials: null,
  ...overrides,
});

let server: RewardServer;
let remote: RewardServer;
let address: string;
let remoteAddress: string;
let client: ReturnType<typeof createClient<typeof RewardServiceService>>;

before(async () => {
  server = createRewardServer({ tracer: tracing.tracer }, config());
  remote = createRewardServer({ tracer: tracing.tracer }, config({ workers: 0 }));
  address = `127.0.0.1:${await server.start()}`;
  remoteAddress = `127.0.0.1:${await remote.start()}`;
  client = createClient({ tracer: tracing.tracer }, RewardServiceService, { address, defaultTimeoutMs: 10_000, credentials: null });
});

after(async () => {
  client.close();
  await server.shutdown();
  await remote.shutdown();
  await tracing.shutdown();
});

const mathRequest = (): ScoreRequest => ({
  items: [
    { completion: 'So the answer is \\boxed{\\frac{1}{2}}.', referenceAnswer: '0.5', metadata: {}, completionTokens: 50, prompt: '' },
    { completion: '<think>hm</think> #### 1,234', referenceAnswer: '1234', metadata: { id: 'b' }, completionTokens: 95, prompt: '' },
    { completion: 'I give up', referenceAnswer: '7', metadata: {}, completionTokens: 120, prompt: '' },
  ],
  spec: {
    scorers: [
      { name: 'math', weight: 1, params: undefined, label: '' },
      { name: 'format', weight: 0.25, params: { tags: ['think'] }, label: '' },
      { name: 'overlong', weight: 1, params: { max_length: 100, cache_length: 10 }, label: '' },
    ],
  },
});

test('health reports SERVING for the server and for RewardService', async () => {
  assert.equal(await checkHealth(address, '', 2000), 'SERVING');
  assert.equal(await checkHealth(address, 'pilot.v1.RewardService', 2000), 'SERVING');
  await assert.rejects(checkHealth(address, 'pilot.v1.Nope', 2000), /NOT_FOUND|unknown/i);
});

test('reflection lists the services and resolves the message types', async () => {
  const services = await listServicesByReflection(address, 2000);
  // Only what is served: not the other pilot.v1 services of the .proto files.
  assert.deepEqual(services, ['grpc.health.v1.Health', 'pilot.v1.RewardService']);
  // reward.proto and its import (google/protobuf/struct.proto).
  assert.ok((await reflectFilesForSymbol(address, 'pilot.v1.ScoreRequest', 2000)) >= 1);
});

test('Score returns weighted scores with every component', async () => {
  const response = await client.score(mathRequest());
  assert.equal(response.scores.length, 3);
  const [a, b, c] = response.scores;
  assert.deepEqual(a.components, { math: 1, format: 0, overlong: 0 });
  assert.equal(a.score, 1);
  assert.deepEqual(b.components, { math: 1, format: 1, overlong: -0.5 });
  assert.equal(b.score, 1 + 0.25 - 0.5);
  assert.deepEqual(c.components, { math: 0, format: 0, overlong: -1 });
  assert.equal(c.score, -1);
});

test('an unknown scorer is INVALID_ARGUMENT naming the field and the valid names', async () => {
  const request = mathRequest();
  request.spec!.scorers[1].name = 'fromat';
  await assert.rejects(client.score(request), (error: unknown) => {
    assert.ok(error instanceof InvalidArgumentError, String(error));
    assert.match(error.message, /spec\.scorers\[1\]\.name: unknown scorer "fromat"; valid names: external, format, math, overlong/);
    return true;
  });
});

test('bad params, a missing spec and duplicate labels are INVALID_ARGUMENT', async () => {
  const bad = mathRequest();
  bad.spec!.scorers[2].params = { max_length: 10, cache_length: 20 };
  await assert.rejects(client.score(bad), /spec\.scorers\[2\]\.params\.cache_length: must be <= max_length/);
  await assert.rejects(client.score({ items: [], spec: undefined }), (e: unknown) => e instanceof InvalidArgumentError && /spec: is required/.test(e.message));
  const dup = mathRequest();
  dup.spec!.scorers[1] = { name: 'math', weight: 1, params: undefined, label: '' };
  await assert.rejects(client.score(dup), /spec\.scorers\[1\]\.label: duplicate label "math"/);
  dup.spec!.scorers[1].label = 'math2';
  const ok = await client.score(dup);
  assert.deepEqual(Object.keys(ok.scores[0].components).sort(), ['math', 'math2', 'overlong']);
});

test('a batch over the limit is RESOURCE_EXHAUSTED', async () => {
  const request = mathRequest();
  request.items = Array.from({ length: 101 }, () => request.items[0]);
  await assert.rejects(client.score(request), (e: unknown) => e instanceof ResourceExhaustedError);
});

test('a call with an expired deadline is DEADLINE_EXCEEDED', async () => {
  await assert.rejects(client.score(mathRequest(), { deadline: new Date(Date.now() - 1000) }), (e: unknown) => e instanceof DeadlineExceededError);
  // And a deadline too short for a large batch on the server.
  const big = mathRequest();
  big.items = Array.from({ length: 100 }, (_, i) => ({ ...big.items[0], completion: 'x '.repeat(2000) + i }));
  await assert.rejects(client.score(big, { timeoutMs: 1 }), (e: unknown) => e instanceof DeadlineExceededError);
});

test('external scorer delegates to another RewardService and joins its trace', async () => {
  const request = mathRequest();
  request.spec = {
    scorers: [
      { name: 'math', weight: 1, params: undefined, label: '' },
      {
        name: 'external',
        weight: 2,
        label: 'judge',
        params: { address: remoteAddress, spec: { scorers: [{ name: 'format', weight: 3, params: { tags: ['think'] } }] } },
      },
    ],
  };
  const response = await client.score(request);
  assert.deepEqual(response.scores.map((s) => s.components), [
    { math: 1, judge: 0 },
    { math: 1, judge: 3 },
    { math: 0, judge: 0 },
  ]);
  assert.equal(response.scores[1].score, 1 + 2 * 3);

  // The remote's validation error comes back as INVALID_ARGUMENT that says where it came from.
  const badRemote = structuredClone(request);
  (badRemote.spec!.scorers[1].params as { spec: { scorers: { name: string }[] } }).spec.scorers[0].name = 'nope';
  await assert.rejects(client.score(badRemote), (e: unknown) =>
    e instanceof InvalidArgumentError && e.message.includes(`external scorer at ${remoteAddress}`) && e.message.includes('unknown scorer "nope"'));

  // An unreachable remote is UNAVAILABLE.
  const down = structuredClone(request);
  (down.spec!.scorers[1].params as { address: string }).address = '127.0.0.1:1';
  await assert.rejects(client.score(down), /UNAVAILABLE|external scorer at 127\.0\.0\.1:1/);

  await tracing.forceFlush();
  const spans: SpanRecord[] = readFileSync(spanFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  // Find the first external call's chain: client -> server -> client (external) -> remote server.
  const remoteServer = spans.find((s) => s.name === 'pilot.v1.RewardService/Score' && s.kind === 'SERVER' &&
    spans.some((p) => p.spanId === s.parentSpanId && p.kind === 'CLIENT' &&
      spans.some((q) => q.spanId === p.parentSpanId && q.kind === 'SERVER')));
  assert.ok(remoteServer, 'remote server span with a client parent inside a server span');
  const chain = spans.filter((s) => s.traceId === remoteServer.traceId);
  assert.ok(chain.length >= 4, `one trace across both servers, got ${chain.length} spans`);
  assert.ok(chain.some((s) => s.kind === 'CLIENT' && s.parentSpanId === null), 'the test client span is the root');
});
