// Two rank processes (services/rank/main.ts, as launchers run it) forming one expert-parallel group through a
// rendezvous service hosted here, checked against a one-rank service in this process on the same data:
// collective Generate with prompts on one rank only, TrainBatch with an empty micro-batch on one rank,
// OptimizerStep, ComputeLogprobs, then SIGTERM.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { createClient, type PromiseClient } from '../common/grpc-client.ts';
import { waitForServing } from '../common/grpc-probes.ts';
import { RolloutServiceService, type GenerateRequest, type GenerateResponse } from '../../proto/gen/pilot/v1/rollout.ts';
import {
  KlEstimator,
  LogprobModel,
  LossAggregation,
  TrainerServiceService,
  type ComputeLogprobsRequest,
  type LossParams,
  type MicroBatch,
  type TrainBatchRequest,
} from '../../proto/gen/pilot/v1/trainer.ts';
import { createRendezvousService, type RendezvousService } from '../../src/dist/rendezvous-server.ts';
import { createRankServer, type RankServer } from './server.ts';
import { f32Tensor } from './tensors.ts';
import { FIXTURE_DIR, f32Values, fixtureMicroBatch, packSequences, readFixture, type Fixture } from './test-fixture.ts';

const main = fileURLToPath(new URL('./main.ts', import.meta.url));
const WORLD = 2;

interface RankProc {
  child: ChildProcess;
  rollout: PromiseClient<typeof RolloutServiceService>;
  trainer: PromiseClient<typeof TrainerServiceService>;
}

let rendezvous: RendezvousService;
let rendezvousServer: grpc.Server;
let ranks: RankProc[] = [];
let single: RankServer;
let one: { rollout: PromiseClient<typeof RolloutServiceService>; trainer: PromiseClient<typeof TrainerServiceService> };
let fx: Fixture;
const tmp = mkdtempSync(join(tmpdir(), 'rank-two-'));
const spanFile = (r: number) => join(tmp, `spans-${r}.jsonl`);
const modelDir = join(tmp, 'model');
const auxModelDir = join(tmp, 'model-aux');

async function startRank(rank: number, address: string): Promise<RankProc> {
  const child = spawn(process.execPath, ['--import', 'tsx', main, '--host', '127.0.0.1', '--port', '0', '--kv-blocks', '32', '--comm-timeout-ms', '30000'], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, RANK: String(rank), WORLD_SIZE: String(WORLD), RENDEZVOUS_ADDR: address, PILOT_GROUP: `rank-test-${process.pid}`, PILOT_SPAN_FILE: spanFile(rank), OTEL_EXPORTER_OTLP_ENDPOINT: '' },
  });
  const lines = createInterface({ input: child.stdout! });
  let port = 0;
  for await (const line of lines) {
    const event = JSON.parse(line) as { event: string; port: number; rank: number };
    if (event.event === 'listening') {
      assert.equal(event.rank, rank);
      port = event.port;
      break;
    }
  }
  assert.ok(port > 0, `rank ${rank} did not report its port`);
  const addr = `127.0.0.1:${port}`;
  await waitForServing(addr, 'pilot.v1.TrainerService', 10000);
  return {
    child,
    rollout: createClient({ tracer: null }, RolloutServiceService, { address: addr, defaultTimeoutMs: 60000, credentials: null }),
    trainer: createClient({ tracer: null }, TrainerServiceService, { address: addr, defaultTimeoutMs: 60000, credentials: null }),
  };
}

async function collect(client: PromiseClient<typeof RolloutServiceService>, req: GenerateRequest): Promise<GenerateResponse[]> {
  const out: GenerateResponse[] = [];
  for await (const r of client.generate(req)) out.push(r);
  return out;
}

function greedy(prompts: { id: string; ids: number[] }[], maxNewTokens: number): GenerateRequest {
  return {
    prompts: prompts.map((p) => ({ promptId: p.id, input: { $case: 'tokenIds' as const, value: { ids: p.ids } }, applyChatTemplate: false })),
    n: 1,
    sampling: { temperature: 0, topK: 0, topP: 0, minP: 0, seed: 3, maxNewTokens, stop: [], stopTokenIds: [] },
    returnExperts: false,
    returnText: false,
  };
}

function loss(): LossParams {
  return { epsLow: fx.grpo.epsLow, epsHigh: fx.grpo.epsHigh, beta: fx.grpo.beta, kl: KlEstimator.KL_ESTIMATOR_K3, aggregation: LossAggregation.LOSS_AGGREGATION_TOKEN_MEAN, temperature: 0, normLength: 0 };
}

function train(step: number, microBatches: MicroBatch[]): TrainBatchRequest {
  return { step, microBatches, loss: loss(), globalTokens: fx.maskedTokens, globalSequences: fx.sequences.length };
}

const EMPTY: MicroBatch = { sequences: undefined, lossMask: undefined, advantages: undefined, oldLogprobs: undefined, refLogprobs: undefined };
const ADAMW = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, maxGradNorm: 1 };

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

before(async () => {
  fx = await readFixture();
  // The fixture model without the load-balancing loss (that loss is not additive over how a rank's batch is split
  // into micro-batches), and with a large one (for the test of ranks that split one micro-batch between them).
  for (const [dir, coef] of [[modelDir, 0], [auxModelDir, 1]] as const) {
    cpSync(FIXTURE_DIR, dir, { recursive: true });
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    cfg.router_aux_loss_coef = coef;
    writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg));
  }
  rendezvous = createRendezvousService({ maxWaitMs: 60_000 });
  rendezvousServer = new grpc.Server();
  rendezvous.addTo(rendezvousServer);
  const port = await new Promise<number>((resolve, reject) =>
    rendezvousServer.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  ranks = await Promise.all([0, 1].map((r) => startRank(r, `127.0.0.1:${port}`)));
  // The one-rank baseline, in this process.
  single = createRankServer(
    { tracer: null },
    { host: '127.0.0.1', port: 0, rank: 0, worldSize: 1, rendezvous: null, commTimeoutMs: 30000, kvBlocks: 32, blockSize: 16, maxPrompts: 64, addonPath: null, shutdownGraceMs: 1000, serverCredentials: null, maxMessageBytes: 64 << 20 },
  );
  const address = `127.0.0.1:${await single.start()}`;
  one = {
    rollout: createClient({ tracer: null }, RolloutServiceService, { address, defaultTimeoutMs: 60000, credentials: null }),
    trainer: createClient({ tracer: null }, TrainerServiceService, { address, defaultTimeoutMs: 60000, credentials: null }),
  };
});

after(async () => {
  for (const r of ranks) {
    r.rollout.close();
    r.trainer.close();
    if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill('SIGKILL');
  }
  one.rollout.close();
  one.trainer.close();
  await single.shutdown();
  rendezvous.close();
  rendezvousServer.forceShutdown();
  rmSync(tmp, { recursive: true, force: true });
});

describe('two rank processes, expert parallel', () => {
  test('LoadModel on both: each rank holds its block of experts', async () => {
    const infos = await Promise.all(ranks.map((r) => r.trainer.loadModel({ modelDir, dtype: '', seed: 0, keepReference: true })));
    await one.trainer.loadModel({ modelDir, dtype: '', seed: 0, keepReference: false });
    assert.deepEqual(infos.map((i) => [i.info!.rank, i.info!.worldSize]), [[0, 2], [1, 2]]);
    const metrics = await Promise.all(ranks.map((r) => r.trainer.getMetrics({})));
    assert.deepEqual(metrics.map((m) => [m.counters.expert_begin, m.counters.expert_end]), [[0, 4], [4, 8]]);
    // Both hold the dense weights and 4 of the 8 experts: fewer parameters than the whole model.
    assert.equal(metrics[0].counters.params_local, metrics[1].counters.params_local);
    assert.ok(metrics[0].counters.params_local < infos[0].info!.numParameters);
  });

  test('a collective Generate with prompts on rank 0 only: greedy equals the fixture, rank 1 streams nothing', async () => {
    const [s0, s1] = await Promise.all([
      collect(ranks[0].rollout, greedy([{ id: 'g', ids: fx.greedyPrompt }], fx.greedyTokens.length)),
      collect(ranks[1].rollout, greedy([], fx.greedyTokens.length)),
    ]);
    assert.equal(s1.length, 0);
    assert.equal(s0.length, 1);
    assert.deepEqual(s0[0].tokenIds, fx.greedyTokens);
  });

  test('TrainBatch with an empty micro-batch on rank 1, then OptimizerStep on both, matches one rank', async () => {
    const [r0, r1] = await Promise.all([
      ranks[0].trainer.trainBatch(train(1, [fixtureMicroBatch(fx, [0, 2])])),
      ranks[1].trainer.trainBatch(train(1, [fixtureMicroBatch(fx, [1]), EMPTY])),
    ]);
    const total = r0.metrics!.loss + r1.metrics!.loss;
    assert.ok(Math.abs(total - fx.grpo.value) < 1e-5, `sum of the ranks' losses ${total} vs ${fx.grpo.value}`);
    assert.equal(r0.metrics!.tokens + r1.metrics!.tokens, fx.maskedTokens);
    const base = await one.trainer.trainBatch(train(1, [fixtureMicroBatch(fx, [0, 1, 2])]));
    assert.ok(Math.abs(base.metrics!.loss - total) < 1e-6);

    const [o0, o1] = await Promise.all(ranks.map((r) => r.trainer.optimizerStep({ step: 1, adamw: ADAMW })));
    const ob = await one.trainer.optimizerStep({ step: 1, adamw: ADAMW });
    assert.equal(o0.skipped || o1.skipped || ob.skipped, false);
    assert.equal(o0.gradNorm, o1.gradNorm, 'the norm is reduced over the ranks');
    assert.ok(Math.abs(o0.gradNorm - ob.gradNorm) / ob.gradNorm < 1e-5, `grad norm ${o0.gradNorm} vs one rank ${ob.gradNorm}`);
  });

  test('after the step: collective ComputeLogprobs (rank 1 with no batch) and Generate follow the new weights', async () => {
    const seq = [...fx.greedyPrompt, ...fx.greedyTokens];
    const req = (batches: number[][], model = LogprobModel.LOGPROB_MODEL_POLICY): ComputeLogprobsRequest => ({ batches: batches.map((s) => packSequences([s])), model, temperature: 0 });
    const [p0, p1] = await Promise.all([ranks[0].trainer.computeLogprobs(req([seq])), ranks[1].trainer.computeLogprobs(req([]))]);
    assert.equal(p1.logprobs.length, 0);
    const base = await one.trainer.computeLogprobs(req([seq]));
    const two = f32Values(p0.logprobs[0]);
    assert.ok(maxAbsDiff(two, f32Values(base.logprobs[0])) < 1e-4, `two ranks vs one rank after the step: ${maxAbsDiff(two, f32Values(base.logprobs[0]))}`);
    // The frozen reference (EP too) still gives the pre-step logprobs; the policy moved.
    const [ref0] = await Promise.all([ranks[0].trainer.computeLogprobs(req([seq], LogprobModel.LOGPROB_MODEL_REFERENCE)), ranks[1].trainer.computeLogprobs(req([], LogprobModel.LOGPROB_MODEL_REFERENCE))]);
    assert.ok(maxAbsDiff(f32Values(ref0.logprobs[0]), two) > 1e-4);
    // Rollout on the updated weights: its logprobs are the trainer's for the same sequence, on every rank.
    const [g0, g1] = await Promise.all([
      collect(ranks[0].rollout, greedy([], 6)),
      collect(ranks[1].rollout, greedy([{ id: 'a', ids: fx.greedyPrompt }, { id: 'b', ids: fx.sequences[1].ids.slice(0, 4) }], 6)),
    ]);
    assert.equal(g0.length, 0);
    assert.deepEqual(g1.map((s) => s.promptId).sort(), ['a', 'b']);
    const a = g1.find((s) => s.promptId === 'a')!;
    const full = [...fx.greedyPrompt, ...a.tokenIds];
    const [c0, c1] = await Promise.all([ranks[0].trainer.computeLogprobs(req([])), ranks[1].trainer.computeLogprobs(req([full]))]);
    assert.equal(c0.logprobs.length, 0);
    assert.deepEqual(Array.from(f32Values(a.logprobs)), Array.from(f32Values(c1.logprobs[0]).subarray(fx.greedyPrompt.length)));
  });

  test('a request one rank refuses still takes part in the phase: the other rank completes, the group stays usable', async () => {
    const bad = { ...fixtureMicroBatch(fx, [1]), advantages: f32Tensor([1, 2]) };
    const [t0, t1] = await Promise.allSettled([
      ranks[0].trainer.trainBatch(train(2, [fixtureMicroBatch(fx, [0, 2])])),
      ranks[1].trainer.trainBatch(train(2, [bad])),
    ]);
    assert.equal(t0.status, 'fulfilled');
    assert.equal(t1.status, 'rejected');
    assert.equal((t1 as PromiseRejectedResult).reason.code, grpc.status.INVALID_ARGUMENT);
    assert.match((t1 as PromiseRejectedResult).reason.message, /micro_batches\[0\]\.advantages: has 2 entries/);
    const [g0, g1] = await Promise.allSettled([
      collect(ranks[0].rollout, greedy([{ id: 'x', ids: fx.greedyPrompt }], 3)),
      collect(ranks[1].rollout, { ...greedy([{ id: 'y', ids: fx.greedyPrompt }], 3), n: 0 }),
    ]);
    assert.equal(g0.status, 'fulfilled');
    assert.equal((g0 as PromiseFulfilledResult<GenerateResponse[]>).value.length, 1);
    assert.equal((g1 as PromiseRejectedResult).reason.code, grpc.status.INVALID_ARGUMENT);
    const seq = fx.sequences[2].ids;
    const [c0, c1] = await Promise.all(ranks.map((r) => r.trainer.computeLogprobs({ batches: [packSequences([seq])], model: LogprobModel.LOGPROB_MODEL_POLICY, temperature: 0 })));
    assert.deepEqual(f32Values(c0.logprobs[0]), f32Values(c1.logprobs[0]));
  });

  test("SaveShard on both ranks, then LoadShard from rank 0's and each rank's own files restores the weights", async () => {
    const seq = fx.sequences[0].ids;
    const logprobs = async () => {
      const [c0, c1] = await Promise.all([
        ranks[0].trainer.computeLogprobs({ batches: [packSequences([seq])], model: LogprobModel.LOGPROB_MODEL_POLICY, temperature: 0 }),
        ranks[1].trainer.computeLogprobs({ batches: [], model: LogprobModel.LOGPROB_MODEL_POLICY, temperature: 0 }),
      ]);
      assert.equal(c1.logprobs.length, 0);
      return f32Values(c0.logprobs[0]);
    };
    const saved = await logprobs();
    const shards = await Promise.all(ranks.map((r) => r.trainer.saveShard({ dir: join(tmp, 'ckpt'), includeOptimizer: false, background: false })));
    assert.deepEqual(shards.map((s) => s.rank), [0, 1]);
    // Rank 0's file holds the dense tensors too.
    assert.ok(shards[0].files[0].sizeBytes > shards[1].files[0].sizeBytes);
    await Promise.all(ranks.map((r) => r.trainer.trainBatch(train(3, [fixtureMicroBatch(fx, [0])]))));
    await Promise.all(ranks.map((r) => r.trainer.optimizerStep({ step: 3, adamw: ADAMW })));
    assert.ok(maxAbsDiff(await logprobs(), saved) > 1e-5);
    // Rank 1 alone lacks the dense tensors.
    await assert.rejects(ranks[1].trainer.loadShard({ files: shards[1].files, includeOptimizer: false }), (e: Error & { code?: number }) => {
      assert.equal(e.code, grpc.status.INVALID_ARGUMENT);
      assert.match(e.message, /give rank 0's shard/);
      return true;
    });
    const steps = await Promise.all(ranks.map((r, i) => r.trainer.loadShard({ files: [...shards[0].files, ...(i === 0 ? [] : shards[i].files)], includeOptimizer: false })));
    assert.deepEqual(steps.map((s) => s.step), [1, 1]);
    assert.deepEqual(await logprobs(), saved);
  });

  test("with the load-balancing loss, two ranks bringing parts of one micro-batch get one rank's gradient", async () => {
    // Micro-batch 0 is sequences {0, 2} on rank 0 and {1} on rank 1: together the one rank's micro-batch. Its
    // load-balancing loss is over all three (the engine reduces the counts over the group), and each rank must
    // weight it by that whole micro-batch's share of the step: by its own share, the loss's gradient would be
    // split between the ranks instead of counted once.
    await Promise.all([...ranks.map((r) => r.trainer.loadModel({ modelDir: auxModelDir, dtype: '', seed: 0, keepReference: false })), one.trainer.loadModel({ modelDir: auxModelDir, dtype: '', seed: 0, keepReference: false })]);
    const [r0, r1] = await Promise.all([
      ranks[0].trainer.trainBatch(train(1, [fixtureMicroBatch(fx, [0, 2])])),
      ranks[1].trainer.trainBatch(train(1, [fixtureMicroBatch(fx, [1]), EMPTY])),
    ]);
    const base = await one.trainer.trainBatch(train(1, [fixtureMicroBatch(fx, [0, 1, 2])]));
    assert.ok(Math.abs(r0.metrics!.loss + r1.metrics!.loss - base.metrics!.loss) < 1e-6);
    const [o0] = await Promise.all(ranks.map((r) => r.trainer.optimizerStep({ step: 1, adamw: { ...ADAMW, maxGradNorm: 0 } })));
    const ob = await one.trainer.optimizerStep({ step: 1, adamw: { ...ADAMW, maxGradNorm: 0 } });
    // Without the load-balancing loss the norm would be another one: the check sees that term.
    const rel = Math.abs(o0.gradNorm - ob.gradNorm) / ob.gradNorm;
    assert.ok(rel < 1e-5, `grad norm ${o0.gradNorm} over two ranks vs ${ob.gradNorm} on one (relative ${rel})`);
  });

  test('SIGTERM stops both ranks cleanly, with a span per call in their span files', async () => {
    for (const r of ranks) r.child.kill('SIGTERM');
    const codes = await Promise.all(ranks.map(async (r) => (r.child.exitCode !== null ? r.child.exitCode : (await once(r.child, 'exit'))[0])));
    assert.deepEqual(codes, [0, 0]);
    const spans = readFileSync(spanFile(1), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { name: string; kind: string; attributes: Record<string, unknown> });
    const train = spans.find((s) => s.name === 'pilot.v1.TrainerService/TrainBatch');
    assert.ok(train, 'TrainBatch span');
    assert.equal(train.kind, 'SERVER');
    assert.equal(train.attributes['rank.micro_batches'], 2);
    assert.ok(spans.some((s) => s.name === 'pilot.v1.RolloutService/Generate'));
  });
});
