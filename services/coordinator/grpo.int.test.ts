// The whole services stack, each part its own process on loopback: a real nats-server, the reward service, the
// checkpoint service, two expert-parallel rank processes and the coordinator. A GRPO run of a few steps on the
// tiny qwen2_moe fixture: metrics arrive on WatchRun, checkpoints commit (and export), the span tree of a step
// holds every phase under one trace, bad input gets clear errors, and a coordinator killed with SIGKILL mid-run
// resumes from its last checkpoint with no prompt lost and none trained twice.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { InvalidArgumentError } from '../common/errors.ts';
import { createClient, type PromiseClient } from '../common/grpc-client.ts';
import { createPromptQueue } from '../common/nats/prompt-queue.ts';
import { promptSubject, RUN_STREAM } from '../common/nats/names.ts';
import { createRunEvents } from '../common/nats/run-events.ts';
import type { SpanRecord } from '../common/tracing.ts';
import { CheckpointServiceService } from '../../proto/gen/pilot/v1/checkpoint.ts';
import { RunServiceService, RunState, type RunConfig, type WatchRunResponse } from '../../proto/gen/pilot/v1/run.ts';
import { LossAggregation, KlEstimator } from '../../proto/gen/pilot/v1/trainer.ts';
import { startTestNatsServer, type TestNatsServer } from '../../test/harness/nats-server.ts';
import { freePort, startService, type ServiceProcess } from './test-processes.ts';

const MODEL = join(import.meta.dirname, '..', '..', 'test', 'fixtures', 'recomputed', 'qwen2_moe-tiny');
const DATASET = 'arith';
const ACK_WAIT_MS = 4000;

let dir: string;
let nats: TestNatsServer;
let nc: NatsConnection;
let reward: ServiceProcess;
let checkpoint: ServiceProcess;
const ranks: ServiceProcess[] = [];
let coordinator: ServiceProcess;
let coordinatorPort: number;
let client: PromiseClient<typeof RunServiceService>;
let ckpt: PromiseClient<typeof CheckpointServiceService>;

const spanFile = (name: string) => join(dir, `spans-${name}.jsonl`);

async function startCoordinator(): Promise<ServiceProcess> {
  return startService('coordinator', 'services/coordinator/main.ts', [
    '--host', '127.0.0.1',
    '--port', String(coordinatorPort),
    '--nats', nats.url,
    '--reward', `127.0.0.1:${reward.port}`,
    '--checkpoint', `127.0.0.1:${checkpoint.port}`,
    '--ranks', ranks.map((r) => `127.0.0.1:${r.port}`).join(','),
    '--ack-wait-ms', String(ACK_WAIT_MS),
    '--take-timeout-ms', '1000',
    '--call-timeout-ms', '60000',
    '--span-file', spanFile('coordinator'),
  ]);
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'grpo-int-'));
  nats = await startTestNatsServer();
  nc = await connect({ servers: nats.url });
  coordinatorPort = await freePort();
  [reward, checkpoint] = await Promise.all([
    startService('reward', 'services/reward/main.ts', ['--host', '127.0.0.1', '--port', '0', '--workers', '0', '--span-file', spanFile('reward')]),
    startService('checkpoint', 'services/checkpoint/main.ts', ['--host', '127.0.0.1', '--port', '0', '--root', join(dir, 'ckpt'), '--keep', '5', '--span-file', spanFile('checkpoint')]),
  ]);
  // The ranks meet at the coordinator's rendezvous when LoadModel first runs; they only need its address now.
  ranks.push(
    ...(await Promise.all(
      [0, 1].map((r) =>
        startService(`rank-${r}`, 'services/rank/main.ts', [
          '--host', '127.0.0.1', '--port', '0', '--rank', String(r), '--world-size', '2',
          '--rendezvous', `127.0.0.1:${coordinatorPort}`, '--kv-blocks', '256', '--span-file', spanFile(`rank-${r}`),
        ]),
      ),
    )),
  );
  coordinator = await startCoordinator();
  client = createClient({ tracer: null }, RunServiceService, { address: `127.0.0.1:${coordinatorPort}`, defaultTimeoutMs: 60_000, credentials: null });
  ckpt = createClient({ tracer: null }, CheckpointServiceService, { address: `127.0.0.1:${checkpoint.port}`, defaultTimeoutMs: 30_000, credentials: null });
});

after(async () => {
  client?.close();
  ckpt?.close();
  await Promise.all([coordinator, ...ranks, reward, checkpoint].filter(Boolean).map((p) => p.stop()));
  await nc?.close();
  await nats?.stop();
  if (process.env.KEEP_TEST_DIR) console.log(`kept ${dir}`);
  else await rm(dir, { recursive: true, force: true });
});

function config(overrides: Partial<RunConfig> = {}): RunConfig {
  return {
    name: 'grpo-int',
    modelDir: MODEL,
    dtype: 'f32',
    dataset: DATASET,
    groupSize: 4,
    promptsPerStep: 2,
    steps: 4,
    sampling: { temperature: 1, topK: 0, topP: 0, minP: 0, seed: undefined, maxNewTokens: 6, stop: [], stopTokenIds: [] },
    loss: { epsLow: 0.2, epsHigh: 0.28, beta: 0.05, kl: KlEstimator.KL_ESTIMATOR_K3, aggregation: LossAggregation.LOSS_AGGREGATION_TOKEN_MEAN, temperature: 0, normLength: 0 },
    advantage: { stdNormalize: true },
    dynamicSampling: undefined,
    mu: 1,
    // Each rank gets one prompt x G = 4 sequences per step: two micro-batches of at most 3.
    microBatchSize: 3,
    optimizer: { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 },
    checkpointEvery: 2,
    // A verifiable reward over this tokenizer's text: does the completion contain a vowel pair? Roughly half of
    // the random tiny model's completions do, so groups have signal; the math component scores the references.
    reward: {
      scorers: [
        { name: 'format', weight: 1, params: { pattern: '[aeiou][aeiou]' }, label: 'vowels' },
        { name: 'math', weight: 0.5, params: undefined, label: '' },
      ],
    },
    seed: 7,
    worldSize: 0,
    ...overrides,
  };
}

const prompt = (i: number) => ({
  id: `q${i}`,
  input: { $case: 'text' as const, value: `What is ${i} + ${i + 1}?` },
  referenceAnswer: String(2 * i + 1),
  metadata: { source: 'int-test' },
});

async function collect(stream: AsyncIterable<WatchRunResponse>, until: (u: WatchRunResponse) => boolean): Promise<WatchRunResponse[]> {
  const out: WatchRunResponse[] = [];
  for await (const u of stream) {
    out.push(u);
    if (until(u)) break;
  }
  return out;
}

const isEvent = (u: WatchRunResponse, kind: string) => u.update?.$case === 'event' && u.update.value.kind === kind;

async function readSpans(): Promise<SpanRecord[]> {
  const out: SpanRecord[] = [];
  for (const name of ['coordinator', 'reward', 'checkpoint', 'rank-0', 'rank-1']) {
    let text = '';
    try {
      text = await readFile(spanFile(name), 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n')) if (line.trim()) out.push(JSON.parse(line) as SpanRecord);
  }
  return out;
}

test('bad input gets clear errors and loses nothing already submitted', async () => {
  const first = await client.submitPrompts({ dataset: DATASET, prompts: [prompt(0), prompt(1)] });
  assert.deepEqual(first.acceptedIds, ['q0', 'q1']);
  await assert.rejects(
    client.submitPrompts({ dataset: DATASET, prompts: [prompt(2), { id: 'bad', input: { $case: 'text', value: '   ' }, referenceAnswer: '', metadata: {} }] }),
    (err: Error) => err instanceof InvalidArgumentError && /prompts\[1\].*"text" is empty/.test(err.message),
  );
  await assert.rejects(
    client.submitPrompts({ dataset: DATASET, prompts: [{ id: 'no input', input: undefined, referenceAnswer: '', metadata: {} }] }),
    /prompts\[0\]\.input: set text or messages/,
  );
  // Nothing of the rejected call was queued; the first two are still there.
  const again = await client.submitPrompts({ dataset: DATASET, prompts: [prompt(2)] });
  assert.equal(again.queueLength, 3);

  const expectInvalid = async (c: RunConfig, field: RegExp) =>
    assert.rejects(client.createRun({ config: c }), (err: Error) => {
      assert.ok(err instanceof InvalidArgumentError, `${err.name}: ${err.message}`);
      assert.match(err.message, field);
      return true;
    });
  await expectInvalid(config({ groupSize: 1 }), /config\.group_size: G must be at least 2/);
  await expectInvalid(config({ modelDir: join(dir, 'no-such-model') }), /config\.model_dir: .*no-such-model does not exist/);
  await expectInvalid(
    config({ reward: { scorers: [{ name: 'telepathy', weight: 1, params: undefined, label: '' }] } }),
    /config\.reward: .*telepathy/,
  );
  await expectInvalid(config({ worldSize: 3 }), /config\.world_size: is 3 but the coordinator drives 2 rank/);
  assert.equal((await client.listRuns({ pageSize: 0, pageToken: '', state: RunState.RUN_STATE_UNSPECIFIED })).runs.length, 0);
});

test('a GRPO run trains, checkpoints, survives a coordinator SIGKILL and loses no prompt', async () => {
  // q0..q2 are queued already; 9 prompts for 5 steps of 2, so the run drains the queue (the last step gets one)
  // whatever order the prompts come back in after the kill.
  await client.submitPrompts({ dataset: DATASET, prompts: [3, 4, 5, 6, 7, 8].map(prompt) });
  const { run } = await client.createRun({ config: config({ steps: 5 }) });
  assert.ok(run && run.state === RunState.RUN_STATE_RUNNING, JSON.stringify(run));
  const runId = run.id;

  // Follow the run until the step-2 checkpoint commits and step 3 has begun (the ranks write a checkpoint while the
  // next step runs, so either may come first), then kill the coordinator mid-step 3.
  const watch1 = client.watchRun({ runId, fromStep: 0 }, { timeoutMs: 120_000 });
  // Killed once step 3 holds its prompts: they are leased to a dead process, and come back after ack_wait.
  const seen = { committed2: false, started3: false };
  const before = await collect(watch1, (u) => {
    if (u.update?.$case === 'event' && u.update.value.step === 2 && u.update.value.kind === 'checkpoint_committed') seen.committed2 = true;
    if (u.update?.$case === 'event' && u.update.value.step === 3 && u.update.value.kind === 'step_started') seen.started3 = true;
    return seen.committed2 && seen.started3;
  });
  const m1 = before.filter((u) => u.update?.$case === 'metrics').map((u) => (u.update as { value: { step: number; rewardMean: number; tokens: number } }).value);
  assert.deepEqual(m1.map((m) => m.step).slice(0, 2), [1, 2]);
  for (const m of m1) {
    assert.ok(Number.isFinite(m.rewardMean) && m.tokens > 0, JSON.stringify(m));
  }
  // A moment later both ranks are inside step 3's rollout. (A kill in the microseconds between dispatching a
  // collective phase to rank 0 and to rank 1 would leave the ranks in a half-entered collective until their
  // communication timeout; that recovery is the ranks' business, not what this test is about.)
  await new Promise((r) => setTimeout(r, 150));
  await coordinator.kill();

  // The crash window between a checkpoint's commit and the publication of its step's metrics, made certain:
  // the newest committed step's metrics record is removed, and the resumed coordinator must publish it again
  // from the checkpoint's manifest. (The kill may also land after a later checkpoint on a fast machine.)
  const newest = (await ckpt.restore({ target: { $case: 'latestOfRun', value: runId } })).checkpoint!;
  const runEvents = await createRunEvents({ nc });
  const newestMetrics = (await runEvents.replay(runId, { kinds: ['metrics'] })).filter((r) => (r.data as { step: number }).step === newest.step);
  assert.ok(newestMetrics.length > 0, `no metrics record for step ${newest.step} before the kill`);
  const jsm = await jetstreamManager(nc);
  for (const r of newestMetrics) await jsm.streams.deleteMessage(RUN_STREAM, r.seq);

  // A prompt of the committed step-2 checkpoint delivered again (as after a crash between commit and ack):
  // published straight to the subject, bypassing the submit de-duplication.
  const step2 = (await ckpt.restore({ target: { $case: 'checkpointId', value: `${runId}:2` } })).checkpoint!;
  const ids2 = JSON.parse(step2.metadata.prompt_ids) as string[];
  assert.equal(ids2.length, 4);
  await jetstream(nc).publish(promptSubject(DATASET), JSON.stringify({ id: ids2[0], text: 'replayed', reference: null, metadata: {} }));

  coordinator = await startCoordinator();
  const watch2 = client.watchRun({ runId, fromStep: 0 }, { timeoutMs: 120_000 });
  const all = await collect(watch2, (u) => u.update?.$case === 'event' && u.update.value.kind === 'state' && u.update.value.state >= RunState.RUN_STATE_SUCCEEDED);
  const final = all[all.length - 1].update!;
  assert.equal(final.$case === 'event' && final.value.state, RunState.RUN_STATE_SUCCEEDED, JSON.stringify(all.filter((u) => u.update?.$case === 'event')));
  // The replay starts at the run's beginning and includes the resume.
  const kinds = all.filter((u) => u.update?.$case === 'event').map((u) => (u.update as { value: { kind: string } }).value.kind);
  assert.ok(kinds.includes('resumed') && kinds.includes('prompt_skipped'), kinds.join(','));
  const steps = all.filter((u) => u.update?.$case === 'metrics').map((u) => (u.update as { value: { step: number } }).value.step);
  // Every step has metrics; a step the killed coordinator finished past its last checkpoint appears twice (it ran
  // again), and the recovered record of the newest checkpoint's step comes after the records published before it.
  assert.deepEqual([...new Set(steps)].sort((a, b) => a - b), [1, 2, 3, 4, 5]);

  const got = (await client.getRun({ runId })).run!;
  assert.equal(got.state, RunState.RUN_STATE_SUCCEEDED);
  assert.equal(got.step, 5);
  assert.equal(got.latestCheckpointId, `${runId}:5`);
  const lm = got.lastMetrics!;
  assert.ok(lm.accuracy >= 0 && lm.accuracy <= 1, `accuracy ${lm.accuracy}`);
  assert.ok(Number.isFinite(lm.kl) && Number.isFinite(lm.entropy) && Number.isFinite(lm.gradNorm), JSON.stringify(lm));
  assert.ok(lm.extra['experts/L0/E0'] >= 0 && lm.extra['time/rollout'] > 0, JSON.stringify(lm.extra));

  // No prompt lost, none trained twice: the committed manifests hold each prompt at most once, and every prompt of
  // q0..q8 is either in one of them or still in the queue. (A step takes what the queue has: when the killed
  // coordinator's leases come back only after ack_wait, the resumed run may start a step with fewer prompts and end
  // before they return; they then wait in the queue for the next run.) The replayed copy was acked unseen.
  const cps = (await ckpt.list({ runId })).checkpoints;
  assert.deepEqual(cps.map((c) => c.step), [2, 4, 5]);
  const trained = cps.flatMap((c) => JSON.parse(c.metadata.prompt_ids) as string[]);
  assert.equal(new Set(trained).size, trained.length, `a prompt trained twice: ${trained.join(',')}`);
  const queue = await createPromptQueue({ nc }, { queue: DATASET, consumer: `coordinator-${DATASET}`, ackWaitMs: ACK_WAIT_MS });
  const submitted = ['q0', 'q1', 'q2', 'q3', 'q4', 'q5', 'q6', 'q7', 'q8'];
  const leftover: string[] = [];
  if (trained.length < submitted.length) {
    // The dead consumer's leases come back after ack_wait.
    for (const lease of await queue.take(submitted.length - trained.length, { timeoutMs: 3 * ACK_WAIT_MS })) {
      leftover.push(lease.prompt.id);
      await lease.ack();
    }
  }
  assert.deepEqual([...trained, ...leftover].sort(), submitted, `trained ${trained.join(',')}; left in the queue ${leftover.join(',')}`);
  const left = await queue.pending();
  assert.deepEqual([left.waiting, left.leased], [0, 0]);

  // The checkpoint restores (verified) and exports as a Hugging Face folder.
  const latest = (await ckpt.restore({ target: { $case: 'latestOfRun', value: runId } })).checkpoint!;
  assert.equal(latest.step, 5);
  assert.deepEqual([...new Set(latest.shards.map((s) => s.rank))].sort(), [0, 1]);
  const exported = await ckpt.export({ checkpointId: latest.id, outputDir: join(dir, 'export'), dtype: 'bf16' });
  assert.ok(exported.files.includes('model.safetensors') && exported.files.includes('tokenizer.json'), exported.files.join(','));

  // Span tree of one checkpoint step (4, or 2 when 4's metrics record is the one the resume recovered: the kill may
  // land after checkpoint 4 when the checkpoint writes lag behind the steps): every phase under the step span, rank
  // and reward server spans in the same trace, and the step's metrics record on NATS carrying that trace.
  const spans = await readSpans();
  const events = await createRunEvents({ nc });
  const metricRecords = await events.replay(runId, { kinds: ['metrics'] });
  const publishedIn = (step: number, traceId: string) =>
    metricRecords.some((r) => (r.data as { step: number }).step === step && (r.headers.traceparent ?? '').startsWith(`00-${traceId}-`));
  const stepSpan = [4, 2]
    .map((n) => spans.find((s) => s.name === 'step' && s.attributes.step === n && s.service === 'coordinator' && publishedIn(n, s.traceId)))
    .find((s) => s !== undefined);
  assert.ok(stepSpan, 'no span of step 4 or 2 whose trace published its metrics');
  const trace = spans.filter((s) => s.traceId === stepSpan.traceId);
  const byId = new Map(trace.map((s) => [s.spanId, s]));
  const under = (s: SpanRecord): boolean => {
    for (let p = s.parentSpanId; p !== null; p = byId.get(p)?.parentSpanId ?? null) if (p === stepSpan.spanId) return true;
    return false;
  };
  const inStep = trace.filter(under);
  const names = new Set(inStep.map((s) => s.name));
  for (const phase of ['rollout', 'reward', 'reference_logprobs', 'train_micro_batch', 'optimizer_step', 'checkpoint']) {
    assert.ok(names.has(phase), `phase ${phase} missing under step ${stepSpan.attributes.step}: ${[...names].join(', ')}`);
  }
  assert.equal(inStep.filter((s) => s.name === 'train_micro_batch').length, 2);
  const services = new Set(inStep.map((s) => s.service));
  for (const svc of ['reward', 'checkpoint', 'rank']) assert.ok(services.has(svc), `no ${svc} span under step ${stepSpan.attributes.step}: ${[...services].join(', ')}`);
  // The ranks' TrainBatch spans carry the engine's native phases (attention, experts, token exchange).
  const rankTrain = inStep.filter((s) => s.service === 'rank' && typeof s.attributes['engine.forward.attention_ms'] === 'number');
  assert.ok(rankTrain.length >= 2, 'rank spans with native phase attributes under the step');
  for (const k of ['engine.forward.experts_ms', 'engine.forward.alltoall_ms', 'engine.backward.attention_ms', 'engine.backward.alltoall_ms']) {
    assert.ok(rankTrain.every((s) => typeof s.attributes[k] === 'number'), `${k} on the rank's TrainBatch spans`);
  }
});

test('dynamic sampling drops zero-variance groups and draws more prompts, within max_draws', async () => {
  const ds = 'flat';
  // References no completion of the tiny model matches: every reward is 0, every group has zero variance.
  const prompts = [0, 1, 2, 3, 4].map((i) => ({ ...prompt(i), id: `flat${i}`, referenceAnswer: '123456789' }));
  await client.submitPrompts({ dataset: ds, prompts });
  const { run } = await client.createRun({
    config: config({
      name: 'dapo',
      dataset: ds,
      steps: 1,
      checkpointEvery: 0,
      dynamicSampling: { enabled: true, maxDraws: 1 },
      reward: { scorers: [{ name: 'math', weight: 1, params: undefined, label: '' }] },
    }),
  });
  const updates = await collect(client.watchRun({ runId: run!.id, fromStep: 0 }, { timeoutMs: 60_000 }), (u) =>
    u.update?.$case === 'event' && u.update.value.kind === 'state' && u.update.value.state >= RunState.RUN_STATE_SUCCEEDED,
  );
  const last = updates[updates.length - 1].update!;
  assert.equal(last.$case === 'event' && last.value.state, RunState.RUN_STATE_SUCCEEDED);
  const m = updates.find((u) => u.update?.$case === 'metrics')!.update as { value: { groupsKept: number; groupsFiltered: number; rewardMean: number } };
  // 2 prompts, all filtered; one more draw of 2, all filtered; then max_draws stops it.
  assert.equal(m.value.groupsFiltered, 4);
  assert.equal(m.value.groupsKept, 0);
  const [cp] = (await ckpt.list({ runId: run!.id })).checkpoints;
  assert.deepEqual((JSON.parse(cp.metadata.prompt_ids) as string[]).sort(), ['flat0', 'flat1', 'flat2', 'flat3']);
  const queue = await createPromptQueue({ nc }, { queue: ds, consumer: `coordinator-${ds}`, ackWaitMs: ACK_WAIT_MS });
  const left = await queue.pending();
  assert.deepEqual([left.waiting, left.leased], [1, 0]);
});

test('CancelRun stops a waiting run and hands its unsaved prompts back; ListRuns pages', async () => {
  const ds = 'cancel';
  await client.submitPrompts({ dataset: ds, prompts: [prompt(0), prompt(1)].map((p) => ({ ...p, id: `c-${p.id}` })) });
  const { run } = await client.createRun({ config: config({ name: 'cancel', dataset: ds, steps: 50, checkpointEvery: 0, mu: 2, loss: undefined }) });
  const runId = run!.id;
  // Step 1 trains on both prompts; step 2 finds the queue empty and waits.
  await collect(client.watchRun({ runId, fromStep: 0 }, { timeoutMs: 60_000 }), (u) => isEvent(u, 'waiting'));
  const cancelled = (await client.cancelRun({ runId, reason: 'test is done' })).run!;
  assert.equal(cancelled.state, RunState.RUN_STATE_CANCELLED);
  assert.equal(cancelled.step, 1);
  // Two policy updates on the step's rollouts (mu = 2), without a reference model (default beta 0).
  assert.ok(Number.isFinite(cancelled.lastMetrics!.loss) && cancelled.lastMetrics!.kl === 0, JSON.stringify(cancelled.lastMetrics));
  const spans = (await readSpans()).filter((x) => x.name === 'optimizer_step' && x.service === 'coordinator');
  const trace = spans.find((x) => x.attributes.update === 1)?.traceId;
  assert.ok(trace && spans.filter((x) => x.traceId === trace).length === 2, 'expected two optimizer steps in the cancelled run');
  await assert.rejects(client.cancelRun({ runId, reason: '' }), /already ended \(RUN_STATE_CANCELLED\)/);
  // Nothing was checkpointed, so the trained prompts go back to the queue for the next run.
  const queue = await createPromptQueue({ nc }, { queue: ds, consumer: `coordinator-${ds}`, ackWaitMs: ACK_WAIT_MS });
  const back = await queue.take(2, { timeoutMs: 5000 });
  assert.deepEqual(back.map((l) => l.prompt.id).sort(), ['c-q0', 'c-q1']);
  for (const l of back) l.nak();
  const page1 = await client.listRuns({ pageSize: 2, pageToken: '', state: RunState.RUN_STATE_UNSPECIFIED });
  assert.equal(page1.runs.length, 2);
  const page2 = await client.listRuns({ pageSize: 2, pageToken: page1.nextPageToken, state: RunState.RUN_STATE_UNSPECIFIED });
  assert.equal(page2.runs.length, 1);
  assert.equal(page2.nextPageToken, '');
  const onlyCancelled = await client.listRuns({ pageSize: 0, pageToken: '', state: RunState.RUN_STATE_CANCELLED });
  assert.deepEqual(onlyCancelled.runs.map((r) => r.id), [runId]);
});
