// The shared gRPC bootstrap over real loopback servers: handlers as async functions, status
// mapping, trace propagation, deadline propagation to child calls, streams and graceful shutdown.
// The services are the real pilot.v1 definitions with small test handlers.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CancelledError, DeadlineExceededError, InternalError, InvalidArgumentError, NotFoundError, UnavailableError } from './errors.ts';
import { callDeadline, createClient } from './grpc-client.ts';
import { createGrpcServer, pilotProtoFiles, type GrpcServer, type ServiceImpl } from './grpc-server.ts';
import { checkHealth } from './grpc-probes.ts';
import { createTracing, type SpanRecord } from './tracing.ts';
import { RewardServiceService } from '../../proto/gen/pilot/v1/reward.ts';
import { FinishReason, RolloutServiceService, type GenerateResponse } from '../../proto/gen/pilot/v1/rollout.ts';

const dir = mkdtempSync(join(tmpdir(), 'grpc-int-'));
const spanFile = join(dir, 'spans.jsonl');
const tracing = createTracing({ serviceName: 'grpc-int', otlpEndpoint: null, spanFile });
const servers: GrpcServer[] = [];
const closers: (() => void)[] = [];

after(async () => {
  for (const close of closers) close();
  await Promise.all(servers.map((s) => s.shutdown()));
  await tracing.shutdown();
});

function serverConfig() {
  const { protoRoot, files } = pilotProtoFiles();
  return { host: '127.0.0.1', port: 0, credentials: null, reflectionProtoFiles: files, protoRoot, shutdownGraceMs: 2000 };
}

async function startReward(impl: ServiceImpl<typeof RewardServiceService>): Promise<string> {
  const server = createGrpcServer({ tracer: tracing.tracer }, serverConfig());
  server.addService(RewardServiceService, impl);
  servers.push(server);
  return `127.0.0.1:${await server.start()}`;
}

function rewardClient(address: string, defaultTimeoutMs = 5000) {
  const client = createClient({ tracer: tracing.tracer }, RewardServiceService, { address, defaultTimeoutMs, credentials: null });
  closers.push(() => client.close());
  return client;
}

const deadlineMs = (d: Date | number) => (d instanceof Date ? d.getTime() : d);

test('callDeadline uses the timeout, an absolute deadline, and never exceeds the parent', () => {
  const parent = { getDeadline: () => new Date(10_500) };
  assert.equal(callDeadline(1000, null, 10_000).getTime(), 11_000);
  assert.equal(callDeadline(1000, parent, 10_000).getTime(), 10_500);
  assert.equal(callDeadline(100, parent, 10_000).getTime(), 10_100);
  assert.equal(callDeadline(1000, { getDeadline: () => Infinity }, 10_000).getTime(), 11_000);
  assert.equal(callDeadline(1000, null, 10_000, new Date(12_000)).getTime(), 12_000);
  assert.throws(() => callDeadline(0, null), InvalidArgumentError);
});

test('client and server spans of one call share a trace, the server span a child of the client span', async () => {
  const address = await startReward({ score: async () => ({ scores: [] }) });
  const client = rewardClient(address);
  await client.score({ items: [], spec: undefined });
  await tracing.forceFlush();
  const spans: SpanRecord[] = readFileSync(spanFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  const clientSpan = spans.find((s) => s.kind === 'CLIENT' && s.name === 'pilot.v1.RewardService/Score');
  assert.ok(clientSpan);
  const serverSpan = spans.find((s) => s.kind === 'SERVER' && s.parentSpanId === clientSpan.spanId);
  assert.ok(serverSpan, 'server span parented by the client span');
  assert.equal(serverSpan.traceId, clientSpan.traceId);
  assert.equal(serverSpan.attributes['rpc.service'], 'pilot.v1.RewardService');
  assert.equal(serverSpan.attributes['rpc.method'], 'Score');
  assert.equal(serverSpan.attributes['rpc.grpc.status_code'], 0);
  assert.equal(clientSpan.attributes['rpc.grpc.status_code'], 0);
});

test('thrown errors reach the client as the same class with the message', async () => {
  const address = await startReward({
    score: async (request) => {
      if (request.items.length === 0) throw new NotFoundError('nothing to score for run r1');
      if (request.items.length === 1) throw new TypeError('cannot read x of undefined');
      throw new InvalidArgumentError('items[1].completion', 'must not be empty');
    },
  });
  const client = rewardClient(address);
  const item = { completion: '', referenceAnswer: '', metadata: {}, completionTokens: 0, prompt: '' };
  await assert.rejects(client.score({ items: [], spec: undefined }), (e: unknown) =>
    e instanceof NotFoundError && e.message === 'Score: nothing to score for run r1');
  await assert.rejects(client.score({ items: [item], spec: undefined }), (e: unknown) =>
    e instanceof InternalError && e.message === 'Score: TypeError: cannot read x of undefined');
  await assert.rejects(client.score({ items: [item, item], spec: undefined }), (e: unknown) =>
    e instanceof InvalidArgumentError && e.message === 'Score: items[1].completion: must not be empty');
});

test('a child call inherits the deadline of the call being served and is cancelled with it', async () => {
  let childSawAbort = false;
  const child = await startReward({
    score: async (request, ctx) => {
      if (request.items.length > 0) {
        // Slow: outlives the parent's deadline unless cancelled.
        await sleep(2000, undefined, { signal: ctx.signal }).catch(() => {
          childSawAbort = true;
        });
      }
      return { scores: [{ score: deadlineMs(ctx.call.getDeadline()), components: {} }] };
    },
  });
  const childClient = rewardClient(child, 60_000);
  const parent = await startReward({
    score: async (request, ctx) => {
      const answer = await childClient.score(request, { parent: ctx.call });
      return { scores: [answer.scores[0], { score: deadlineMs(ctx.call.getDeadline()), components: {} }] };
    },
  });
  const client = rewardClient(parent);
  const sent = Date.now();
  const response = await client.score({ items: [], spec: undefined }, { timeoutMs: 3000 });
  const [childDeadline, parentDeadline] = response.scores.map((s) => s.score);
  // The child's own default (60 s) is capped by the parent's (about 3 s).
  // (Deadlines cross the wire as relative grpc-timeout values: allow a few ms of rounding.)
  assert.ok(Math.abs(childDeadline - parentDeadline) < 100, `child ${childDeadline} vs parent ${parentDeadline}`);
  assert.ok(parentDeadline - sent <= 3100 && parentDeadline - sent > 2000, `parent deadline in ${parentDeadline - sent} ms`);

  const item = { completion: '', referenceAnswer: '', metadata: {}, completionTokens: 0, prompt: '' };
  await assert.rejects(client.score({ items: [item], spec: undefined }, { timeoutMs: 300 }), DeadlineExceededError);
  // The child learns about it well before its 2 s of work would end.
  for (let i = 0; i < 40 && !childSawAbort; i += 1) await sleep(25);
  assert.equal(childSawAbort, true);
});

test('server streams deliver every message, map errors after partial output, and cancel on break', async () => {
  let abortedByClient = false;
  const server = createGrpcServer({ tracer: tracing.tracer }, serverConfig());
  server.addService(RolloutServiceService, {
    async *generate(request, ctx) {
      for (let i = 0; i < request.n; i += 1) {
        if (request.prompts[0]?.promptId === 'fail' && i === 2) throw new UnavailableError('rank 1 went away');
        if (ctx.signal.aborted) {
          abortedByClient = true;
          return;
        }
        const sample: GenerateResponse = {
          promptId: request.prompts[0]?.promptId ?? '',
          sampleIndex: i,
          tokenIds: [i, i + 1],
          text: `s${i}`,
          logprobs: { dtype: 'f32', shape: [2], data: Buffer.from(new Float32Array([-0.5, -1.5]).buffer) },
          finishReason: FinishReason.FINISH_REASON_EOS,
          promptTokens: 3,
          experts: undefined,
        };
        yield sample;
        await sleep(5);
      }
    },
  });
  servers.push(server);
  const address = `127.0.0.1:${await server.start()}`;
  const client = createClient({ tracer: tracing.tracer }, RolloutServiceService, { address, defaultTimeoutMs: 5000, credentials: null });
  closers.push(() => client.close());
  const request = (promptId: string, n: number) => ({
    prompts: [{ promptId, input: { $case: 'text' as const, value: 'hi' }, applyChatTemplate: false }],
    n,
    sampling: undefined,
    returnExperts: false,
    returnText: true,
  });

  const got: GenerateResponse[] = [];
  for await (const sample of client.generate(request('p', 5))) got.push(sample);
  assert.deepEqual(got.map((s) => s.sampleIndex), [0, 1, 2, 3, 4]);
  assert.deepEqual([...new Float32Array(new Uint8Array(got[1].logprobs!.data).buffer)], [-0.5, -1.5]);

  const partial: number[] = [];
  await assert.rejects(
    (async () => {
      for await (const sample of client.generate(request('fail', 5))) partial.push(sample.sampleIndex);
    })(),
    (e: unknown) => e instanceof UnavailableError && e.message === 'Generate: rank 1 went away',
  );
  assert.deepEqual(partial, [0, 1]);

  for await (const sample of client.generate(request('p', 1000))) if (sample.sampleIndex === 1) break;
  for (let i = 0; i < 40 && !abortedByClient; i += 1) await sleep(25);
  assert.equal(abortedByClient, true);
});

test('an aborted signal cancels a unary call', async () => {
  const address = await startReward({ score: async (_r, ctx) => { await sleep(1000, undefined, { signal: ctx.signal }).catch(() => {}); return { scores: [] }; } });
  const client = rewardClient(address);
  const controller = new AbortController();
  const call = client.score({ items: [], spec: undefined }, { signal: controller.signal });
  setTimeout(() => controller.abort(), 50);
  await assert.rejects(call, CancelledError);
});

test('shutdown lets calls in flight finish, reports NOT_SERVING and refuses new calls', async () => {
  const server = createGrpcServer({ tracer: null }, serverConfig());
  server.addService(RewardServiceService, { score: async () => { await sleep(300); return { scores: [{ score: 1, components: {} }] }; } });
  const address = `127.0.0.1:${await server.start()}`;
  assert.equal(await checkHealth(address, 'pilot.v1.RewardService', 1000), 'SERVING');
  server.setStatus('pilot.v1.RewardService', 'NOT_SERVING');
  assert.equal(await checkHealth(address, 'pilot.v1.RewardService', 1000), 'NOT_SERVING');
  server.setStatus('pilot.v1.RewardService', 'SERVING');
  const client = rewardClient(address);
  const inFlight = client.score({ items: [], spec: undefined });
  await sleep(50);
  await server.shutdown();
  assert.equal((await inFlight).scores[0].score, 1);
  await assert.rejects(client.score({ items: [], spec: undefined }, { timeoutMs: 500 }), (e: unknown) =>
    e instanceof UnavailableError || e instanceof DeadlineExceededError);
});

test('addService checks the implementation against the definition', () => {
  const server = createGrpcServer({ tracer: null }, serverConfig());
  assert.throws(() => server.addService(RewardServiceService, {} as never), /impl\.score: pilot\.v1\.RewardService has no handler for method score/);
  void server.shutdown();
});
