// One rank over real gRPC on loopback, on the qwen2_moe-tiny fixture: greedy rollout against the HF
// reference, rollout logprobs against ComputeLogprobs, the GRPO loss against the reference, an optimizer
// step that the next rollout sees, shard round trip, and the status codes of bad requests.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { createClient, type PromiseClient } from '../common/grpc-client.ts';
import { RolloutServiceService, FinishReason, type GenerateRequest, type GenerateResponse } from '../../proto/gen/pilot/v1/rollout.ts';
import {
  KlEstimator,
  LogprobModel,
  LossAggregation,
  TrainerServiceService,
  type LossParams,
  type TrainBatchRequest,
} from '../../proto/gen/pilot/v1/trainer.ts';
import { createRankServer, type RankServer } from './server.ts';
import { sha256File } from '../common/sha256-file.ts';
import { f32Tensor, i32Tensor, u8Tensor } from './tensors.ts';
import { FIXTURE_DIR, f32Values, fixtureMicroBatch, packSequences, readFixture, type Fixture } from './test-fixture.ts';

let server: RankServer;
let rollout: PromiseClient<typeof RolloutServiceService>;
let trainer: PromiseClient<typeof TrainerServiceService>;
let fx: Fixture;
let topK = 0;
const tmp = mkdtempSync(join(tmpdir(), 'rank-service-'));

async function expectStatus(p: Promise<unknown>, code: status, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (e: Error & { code?: number }) => {
    assert.equal(e.code, code, `expected ${status[code]}, got ${e.code} (${e.message})`);
    assert.match(e.message, pattern);
    return true;
  });
}

async function collect(req: GenerateRequest): Promise<GenerateResponse[]> {
  const out: GenerateResponse[] = [];
  for await (const r of rollout.generate(req)) out.push(r);
  return out;
}

function greedyRequest(prompt: number[], maxNewTokens: number, promptId = 'p0'): GenerateRequest {
  return {
    prompts: [{ promptId, input: { $case: 'tokenIds', value: { ids: prompt } }, applyChatTemplate: false }],
    n: 1,
    sampling: { temperature: 0, topK: 0, topP: 0, minP: 0, seed: 7, maxNewTokens, stop: [], stopTokenIds: [] },
    returnExperts: false,
    returnText: true,
  };
}

async function policyLogprobs(seq: number[], model = LogprobModel.LOGPROB_MODEL_POLICY): Promise<Float32Array> {
  const r = await trainer.computeLogprobs({ batches: [packSequences([seq])], model, temperature: 0 });
  assert.equal(r.logprobs.length, 1);
  return f32Values(r.logprobs[0]);
}

function lossParams(): LossParams {
  return {
    epsLow: fx.grpo.epsLow,
    epsHigh: fx.grpo.epsHigh,
    beta: fx.grpo.beta,
    kl: KlEstimator.KL_ESTIMATOR_K3,
    aggregation: LossAggregation.LOSS_AGGREGATION_TOKEN_MEAN, temperature: 0, normLength: 0 };
}

function fixtureTrainRequest(step: number, split: number[][]): TrainBatchRequest {
  return {
    step,
    microBatches: split.map((which) => fixtureMicroBatch(fx, which)),
    loss: lossParams(),
    globalTokens: fx.maskedTokens,
    globalSequences: fx.sequences.length,
  };
}

const KV_BLOCKS = 1024;
const ADAMW = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 0 };

before(async () => {
  fx = await readFixture();
  server = createRankServer(
    { tracer: null },
    {
      host: '127.0.0.1',
      port: 0,
      rank: 0,
      worldSize: 1,
      rendezvous: null,
      commTimeoutMs: 30000,
      kvBlocks: KV_BLOCKS,
      blockSize: 16,
      maxPrompts: 64,
      addonPath: null,
      shutdownGraceMs: 1000,
      serverCredentials: null,
      maxMessageBytes: 64 << 20,
    },
  );
  const port = await server.start();
  const address = `127.0.0.1:${port}`;
  rollout = createClient({ tracer: null }, RolloutServiceService, { address, defaultTimeoutMs: 30000, credentials: null });
  trainer = createClient({ tracer: null }, TrainerServiceService, { address, defaultTimeoutMs: 30000, credentials: null });
});

after(async () => {
  rollout.close();
  trainer.close();
  await server.shutdown();
  rmSync(tmp, { recursive: true, force: true });
});

describe('rank service, one rank', () => {
  test('before LoadModel every model call is FAILED_PRECONDITION; a bad folder is INVALID_ARGUMENT naming it', async () => {
    await expectStatus(collect(greedyRequest(fx.greedyPrompt, 4)), status.FAILED_PRECONDITION, /no model is loaded/);
    await expectStatus(trainer.trainBatch(fixtureTrainRequest(1, [[0]])), status.FAILED_PRECONDITION, /LoadModel/);
    await expectStatus(trainer.optimizerStep({ step: 1, adamw: ADAMW }), status.FAILED_PRECONDITION, /LoadModel/);
    const missing = join(tmp, 'no-such-model');
    await expectStatus(trainer.loadModel({ modelDir: missing, dtype: '', seed: 0, keepReference: false }), status.INVALID_ARGUMENT, new RegExp(`model_dir: .*no-such-model.*does not exist`));
    const broken = join(tmp, 'broken-model');
    mkdirSync(broken);
    writeFileSync(join(broken, 'config.json'), '{"model_type": "gpt2"}');
    await expectStatus(trainer.loadModel({ modelDir: broken, dtype: '', seed: 0, keepReference: false }), status.INVALID_ARGUMENT, /broken-model/);
    await expectStatus(trainer.loadModel({ modelDir: FIXTURE_DIR, dtype: 'bf16', seed: 0, keepReference: false }), status.INVALID_ARGUMENT, /dtype/);
  });

  test('LoadModel with a reference; greedy Generate equals the fixture, its logprobs equal ComputeLogprobs exactly', async () => {
    const { info } = await trainer.loadModel({ modelDir: FIXTURE_DIR, dtype: 'f32', seed: 1, keepReference: true });
    assert.ok(info);
    assert.equal(info.numExperts, 8);
    assert.equal(info.worldSize, 1);
    assert.ok(info.numParameters > 0);
    topK = info.expertsPerToken;
    assert.equal(topK, 2);
    const [s, ...rest] = await collect(greedyRequest(fx.greedyPrompt, fx.greedyTokens.length));
    assert.equal(rest.length, 0);
    assert.deepEqual(s.tokenIds, fx.greedyTokens);
    assert.equal(s.promptId, 'p0');
    assert.equal(s.promptTokens, fx.greedyPrompt.length);
    assert.equal(s.finishReason, FinishReason.FINISH_REASON_LENGTH);
    assert.ok(s.text.length > 0);
    const lp = f32Values(s.logprobs);
    const seq = [...fx.greedyPrompt, ...s.tokenIds];
    const policy = await policyLogprobs(seq);
    assert.equal(policy[0], 0);
    assert.deepEqual(Array.from(lp), Array.from(policy.subarray(fx.greedyPrompt.length)));
    assert.deepEqual(await policyLogprobs(seq, LogprobModel.LOGPROB_MODEL_REFERENCE), policy);
  });

  test('sampling streams n samples per prompt, reproducible for a seed, with experts when asked', async () => {
    const req: GenerateRequest = {
      prompts: [0, 1].map((b) => ({ promptId: `q${b}`, input: { $case: 'tokenIds' as const, value: { ids: fx.sequences[b].ids.slice(0, fx.sequences[b].promptLen) } }, applyChatTemplate: false })),
      n: 3,
      sampling: { temperature: 1, topK: 0, topP: 0.95, minP: 0, seed: 1234, maxNewTokens: 6, stop: [], stopTokenIds: [] },
      returnExperts: true,
      returnText: false,
    };
    const a = await collect(req);
    const b = await collect(req);
    assert.equal(a.length, 6);
    const key = (r: GenerateResponse) => `${r.promptId}/${r.sampleIndex}`;
    assert.deepEqual(new Set(a.map(key)).size, 6);
    const byKey = new Map(b.map((r) => [key(r), r.tokenIds]));
    for (const r of a) assert.deepEqual(r.tokenIds, byKey.get(key(r)));
    for (const r of a) {
      assert.ok(r.experts);
      // [rows fed, moe layers, top-k]
      assert.deepEqual(r.experts.shape.slice(1), [2, topK]);
      assert.equal(r.text, '');
    }
    const other = await collect({ ...req, sampling: { ...req.sampling!, seed: 99 } });
    assert.ok(other.some((r) => byKey.get(key(r))!.join() !== r.tokenIds.join()), 'another seed gives other samples');
  });

  test('text prompts with the chat template, stop strings cut from the text', async () => {
    const [s] = await collect({
      prompts: [{ promptId: 't', input: { $case: 'text', value: 'hello' }, applyChatTemplate: true }],
      n: 1,
      sampling: { temperature: 0, topK: 0, topP: 0, minP: 0, seed: 1, maxNewTokens: 5, stop: [], stopTokenIds: [] },
      returnExperts: false,
      returnText: true,
    });
    assert.ok(s.promptTokens > 3);
    assert.equal(s.tokenIds.length, 5);
    // A stop string taken from the greedy text ends the sample there and is cut from the text.
    const stop = s.text.slice(2, 4);
    assert.ok(stop.length > 0);
    const [cut] = await collect({
      prompts: [{ promptId: 't', input: { $case: 'text', value: 'hello' }, applyChatTemplate: true }],
      n: 1,
      sampling: { temperature: 0, topK: 0, topP: 0, minP: 0, seed: 1, maxNewTokens: 5, stop: [stop], stopTokenIds: [] },
      returnExperts: false,
      returnText: true,
    });
    assert.equal(cut.finishReason, FinishReason.FINISH_REASON_STOP);
    assert.equal(cut.text, s.text.slice(0, s.text.indexOf(stop)));
  });

  test('TrainBatch gives the fixture GRPO loss, in one micro-batch or split; extra holds the expert loads', async () => {
    const one = await trainer.trainBatch(fixtureTrainRequest(1, [[0, 1, 2]]));
    assert.ok(one.metrics);
    assert.ok(Math.abs(one.metrics.loss - fx.grpo.value) < 1e-5, `loss ${one.metrics.loss} vs ${fx.grpo.value}`);
    assert.equal(one.metrics.tokens, fx.maskedTokens);
    assert.ok(one.metrics.kl >= 0);
    assert.ok(one.metrics.entropy > 0);
    assert.ok(one.metrics.auxLoss > 0);
    const expertKeys = Object.keys(one.metrics.extra).filter((k) => k.startsWith('expert_tokens.'));
    assert.equal(expertKeys.length, 2 * 8);
    // Every token goes to top-k experts in each MoE layer.
    const routed = expertKeys.filter((k) => k.startsWith('expert_tokens.0.')).reduce((a, k) => a + one.metrics!.extra[k], 0);
    const N = fx.sequences.reduce((a, s) => a + s.ids.length, 0);
    assert.equal(routed, N * topK);
    // Same step again, split in two micro-batches: the loss shares add up to the same value.
    const split = await trainer.trainBatch(fixtureTrainRequest(1, [[0, 2], [1]]));
    assert.ok(Math.abs(split.metrics!.loss - fx.grpo.value) < 1e-5);
    assert.equal(split.metrics!.extra.micro_batches, 2);
    // pg_loss + the KL term (beta * mean k3 over tokens for token-mean) is the loss.
    assert.ok(Math.abs(split.metrics!.pgLoss + fx.grpo.beta * split.metrics!.kl - split.metrics!.loss) < 1e-6);
  });

  test('OptimizerStep changes the weights and the next Generate samples from them', async () => {
    const seq = [...fx.greedyPrompt, ...fx.greedyTokens];
    const before = await policyLogprobs(seq);
    const step = await trainer.optimizerStep({ step: 1, adamw: ADAMW });
    assert.equal(step.skipped, false);
    assert.ok(step.gradNorm > 0 && Number.isFinite(step.gradNorm));
    const afterStep = await policyLogprobs(seq);
    assert.notDeepEqual(afterStep, before);
    // The reference stays frozen.
    assert.deepEqual(await policyLogprobs(seq, LogprobModel.LOGPROB_MODEL_REFERENCE), before);
    const [s] = await collect(greedyRequest(fx.greedyPrompt, fx.greedyTokens.length));
    const now = await policyLogprobs([...fx.greedyPrompt, ...s.tokenIds]);
    assert.deepEqual(Array.from(f32Values(s.logprobs)), Array.from(now.subarray(fx.greedyPrompt.length)));
    assert.notDeepEqual(Array.from(f32Values(s.logprobs)), Array.from(before.subarray(fx.greedyPrompt.length)));
    const metrics = await trainer.getMetrics({});
    assert.equal(metrics.step, 1);
    assert.ok(metrics.tokensTrained >= 2 * fx.maskedTokens);
    assert.equal(metrics.counters.optimizer_steps, 1);
    assert.ok(metrics.counters.samples_generated >= 1);
    assert.equal(metrics.counters.kv_blocks_total, KV_BLOCKS);
    assert.equal(metrics.counters.kv_blocks_used + metrics.counters.kv_blocks_free, KV_BLOCKS);
    assert.deepEqual(metrics.expertLoad?.shape, [2, 8]);
    assert.equal(metrics.expertLoad?.dtype, 'i64');
  });

  test('SaveShard / LoadShard round trip restores the weights and the step', async () => {
    const seq = fx.sequences[1].ids;
    const saved = await policyLogprobs(seq);
    const dir = join(tmp, 'shard');
    const r = await trainer.saveShard({ dir, includeOptimizer: false, background: false });
    assert.equal(r.rank, 0);
    assert.equal(r.files.length, 2);
    for (const f of r.files) assert.equal(f.sha256, await sha256File(f.path));
    // Move the weights on, then restore.
    await trainer.trainBatch(fixtureTrainRequest(2, [[0, 1, 2]]));
    await trainer.optimizerStep({ step: 2, adamw: ADAMW });
    assert.notDeepEqual(await policyLogprobs(seq), saved);
    const loaded = await trainer.loadShard({ files: r.files, includeOptimizer: false });
    assert.equal(loaded.step, 1);
    assert.deepEqual(await policyLogprobs(seq), saved);
    // A tampered checksum, or a shard set without this rank's experts, is refused.
    const bad = r.files.map((f) => ({ ...f, sha256: f.path.endsWith('.json') ? '00'.repeat(32) : f.sha256 }));
    await expectStatus(trainer.loadShard({ files: bad, includeOptimizer: false }), status.INVALID_ARGUMENT, /sha256/);
    await expectStatus(trainer.loadShard({ files: r.files.filter((f) => f.path.endsWith('.safetensors')), includeOptimizer: false }), status.INVALID_ARGUMENT, /experts \[0, 8\)/);
    await expectStatus(trainer.loadShard({ files: r.files, includeOptimizer: true }), status.INVALID_ARGUMENT, /without optimizer state/);
    // With the optimizer state, a restored rank continues exactly as the one that never stopped.
    const withOpt = await trainer.saveShard({ dir: join(tmp, 'shard-opt'), includeOptimizer: true, background: false });
    assert.equal(withOpt.files.length, 3);
    // Its own optimizer file with a wrong checksum is refused before any weight changes; a file it does not read
    // (another rank's optimizer state, here one that does not even exist) is not hashed at all.
    const atSave = await policyLogprobs(seq);
    const badOpt = withOpt.files.map((f) => ({ ...f, sha256: f.path.endsWith('.optimizer.safetensors') ? '00'.repeat(32) : f.sha256 }));
    await trainer.trainBatch(fixtureTrainRequest(2, [[0, 1, 2]]));
    await trainer.optimizerStep({ step: 2, adamw: ADAMW });
    const moved = await policyLogprobs(seq);
    assert.notDeepEqual(moved, atSave);
    await expectStatus(trainer.loadShard({ files: badOpt, includeOptimizer: true }), status.INVALID_ARGUMENT, /optimizer\.safetensors has sha256 [0-9a-f]{64}, expected 0{64}/);
    assert.deepEqual(await policyLogprobs(seq), moved);
    const otherRank = { path: join(tmp, 'gone', 'rank-00001-of-00002.optimizer.safetensors'), sha256: '00'.repeat(32), sizeBytes: 0 };
    await trainer.loadShard({ files: [...withOpt.files, otherRank], includeOptimizer: true });
    assert.deepEqual(await policyLogprobs(seq), atSave);
    await trainer.trainBatch(fixtureTrainRequest(2, [[0, 1, 2]]));
    await trainer.optimizerStep({ step: 2, adamw: ADAMW });
    const continued = await policyLogprobs(seq);
    await trainer.loadShard({ files: withOpt.files, includeOptimizer: true });
    await trainer.trainBatch(fixtureTrainRequest(2, [[0, 1, 2]]));
    await trainer.optimizerStep({ step: 2, adamw: ADAMW });
    assert.deepEqual(await policyLogprobs(seq), continued);
    // Back to the weights the later tests expect.
    await trainer.loadShard({ files: r.files, includeOptimizer: false });
    assert.deepEqual(await policyLogprobs(seq), saved);
  });

  test('a background SaveShard answers once the state is captured; training goes on; AwaitShard has the files of the save', async () => {
    const seq = fx.sequences[1].ids;
    const dir = join(tmp, 'shard-bg');
    const atSave = await policyLogprobs(seq);
    const started = await trainer.saveShard({ dir, includeOptimizer: true, background: true });
    assert.deepEqual(started.files, []);
    // The next step trains at once (on the CPU the rank wrote from a copy of its buffers).
    await trainer.trainBatch(fixtureTrainRequest(2, [[0, 1, 2]]));
    await trainer.optimizerStep({ step: 2, adamw: ADAMW });
    assert.notDeepEqual(await policyLogprobs(seq), atSave);
    const done = await trainer.awaitShard({ dir });
    assert.equal(done.files.length, 3);
    for (const f of done.files) assert.equal(f.sha256, await sha256File(f.path));
    await expectStatus(trainer.awaitShard({ dir }), status.NOT_FOUND, /no background SaveShard into .*shard-bg/);
    await expectStatus(trainer.awaitShard({ dir: join(tmp, 'never') }), status.NOT_FOUND, /no background SaveShard/);
    await trainer.loadShard({ files: done.files, includeOptimizer: true });
    assert.deepEqual(await policyLogprobs(seq), atSave);
    // A write that fails (its dir lies under a regular file) is reported by AwaitShard, not lost.
    const blocker = join(tmp, 'a-file');
    writeFileSync(blocker, 'not a folder');
    const bad = await trainer.saveShard({ dir: join(blocker, 'shard'), includeOptimizer: false, background: true });
    assert.deepEqual(bad.files, []);
    await assert.rejects(trainer.awaitShard({ dir: join(blocker, 'shard') }), /ENOTDIR|not a directory/);
    // And the rank goes on: the next save works.
    const again = await trainer.saveShard({ dir: join(tmp, 'shard-bg-2'), includeOptimizer: false, background: true });
    assert.deepEqual(again.files, []);
    assert.equal((await trainer.awaitShard({ dir: join(tmp, 'shard-bg-2') })).files.length, 2);
  });

  test('bad requests are INVALID_ARGUMENT naming the field', async () => {
    const prompt = fx.greedyPrompt;
    await expectStatus(collect({ ...greedyRequest(prompt, 4), n: 0 }), status.INVALID_ARGUMENT, /^.*n: samples per prompt must be >= 1/);
    await expectStatus(collect(greedyRequest(prompt, 0)), status.INVALID_ARGUMENT, /max_new_tokens/);
    await expectStatus(collect(greedyRequest([1, 2, 100000], 4)), status.INVALID_ARGUMENT, /prompts\[0\]\.token_ids.*outside the vocabulary/);
    await expectStatus(collect(greedyRequest(prompt, 4, '')), status.INVALID_ARGUMENT, /prompt_id/);
    const mb = fixtureMicroBatch(fx, [0]);
    const req = (m: typeof mb, extra: Partial<TrainBatchRequest> = {}): TrainBatchRequest => ({ step: 9, microBatches: [m], loss: lossParams(), globalTokens: 0, globalSequences: 0, ...extra });
    await expectStatus(trainer.trainBatch(req({ ...mb, sequences: { ...mb.sequences!, inputIds: f32Tensor([1, 2]) } })), status.INVALID_ARGUMENT, /micro_batches\[0\]\.sequences\.input_ids: dtype must be "i32"/);
    await expectStatus(trainer.trainBatch(req({ ...mb, sequences: { ...mb.sequences!, cuSeqlens: i32Tensor([0, 5]) } })), status.INVALID_ARGUMENT, /cu_seqlens: ends at 5/);
    await expectStatus(trainer.trainBatch(req({ ...mb, advantages: f32Tensor([1, 2, 3]) })), status.INVALID_ARGUMENT, /advantages: has 3 entries/);
    const n = fx.sequences[0].ids.length;
    await expectStatus(trainer.trainBatch(req({ ...mb, lossMask: u8Tensor(Array(n).fill(1)) })), status.INVALID_ARGUMENT, /loss_mask: entry 0 .* never predicted/);
    await expectStatus(trainer.trainBatch(req({ ...mb, refLogprobs: undefined })), status.INVALID_ARGUMENT, /ref_logprobs: are required when loss.beta > 0/);
    await expectStatus(trainer.trainBatch(req(mb, { loss: { ...lossParams(), kl: KlEstimator.KL_ESTIMATOR_K2 } })), status.INVALID_ARGUMENT, /loss\.kl/);
    await expectStatus(trainer.optimizerStep({ step: 9, adamw: { ...ADAMW, eps: 0 } }), status.INVALID_ARGUMENT, /adamw\.eps/);
    await expectStatus(trainer.computeLogprobs({ batches: [packSequences([[1, 2, 3]])], model: LogprobModel.LOGPROB_MODEL_UNSPECIFIED, temperature: 0 }), status.INVALID_ARGUMENT, /model/);
  });

  test('an empty micro-batch list trains nothing; a non-finite gradient skips the step without touching the weights', async () => {
    const empty = await trainer.trainBatch({ step: 10, microBatches: [{ sequences: undefined, lossMask: undefined, advantages: undefined, oldLogprobs: undefined, refLogprobs: undefined }], loss: lossParams(), globalTokens: 0, globalSequences: 0 });
    assert.equal(empty.metrics!.tokens, 0);
    assert.equal(empty.metrics!.loss, 0);
    const none = await trainer.trainBatch({ step: 10, microBatches: [], loss: lossParams(), globalTokens: 0, globalSequences: 0 });
    assert.equal(none.metrics!.tokens, 0);
    const seq = fx.sequences[0].ids;
    const before = await policyLogprobs(seq);
    // Advantages near the float32 limit, accumulated over many TrainBatch calls of one step, overflow the
    // float32 gradients.
    const mb = fixtureMicroBatch(fx, [0, 1, 2]);
    const huge = { ...mb, advantages: f32Tensor(f32Values(mb.advantages).map((a) => (a >= 0 ? 3e38 : -3e38))) };
    for (let i = 0; i < 40; i++) {
      await trainer.trainBatch({ step: 11, microBatches: [huge], loss: { ...lossParams(), beta: 0 }, globalTokens: fx.maskedTokens, globalSequences: 0 });
    }
    const r = await trainer.optimizerStep({ step: 11, adamw: ADAMW });
    assert.equal(r.skipped, true, `norm ${r.gradNorm}`);
    assert.ok(Number.isNaN(r.gradNorm));
    assert.deepEqual(await policyLogprobs(seq), before);
    assert.equal((await trainer.getMetrics({})).counters.skipped_steps, 1);
  });

  test('a Generate past its deadline is cancelled on the rank, which then serves the next call', async () => {
    // Greedy decoding of this prompt never meets an end-of-sequence token: 8 x 1500 tokens take far longer than 50 ms.
    const long: GenerateRequest = { ...greedyRequest(fx.greedyPrompt, 1500, 'long'), n: 8 };
    const started = Date.now();
    await expectStatus(
      (async () => {
        for await (const _ of rollout.generate(long, { timeoutMs: 50 })) void _;
      })(),
      status.DEADLINE_EXCEEDED,
      /./,
    );
    assert.ok(Date.now() - started < 5000);
    const [s] = await collect(greedyRequest(fx.greedyPrompt, 3));
    assert.equal(s.tokenIds.length, 3);
    // The cancelled samples leave the generator (at its next step) and give their KV blocks back.
    let m = await trainer.getMetrics({});
    for (let i = 0; i < 40 && m.counters.active_samples > 0; i++) {
      await new Promise((r) => setTimeout(r, 50));
      m = await trainer.getMetrics({});
    }
    assert.equal(m.counters.active_samples, 0);
    assert.equal(m.counters.kv_blocks_free, m.counters.kv_blocks_total);
    // A request the KV cache can never hold is refused up front.
    await expectStatus(collect({ ...greedyRequest(fx.greedyPrompt, 4000), n: 8 }), status.RESOURCE_EXHAUSTED, /KV blocks/);
  });

  test('LoadModel again replaces the model: fresh weights, step 0, no reference unless asked', async () => {
    await trainer.loadModel({ modelDir: FIXTURE_DIR, dtype: '', seed: 0, keepReference: false });
    const [s] = await collect(greedyRequest(fx.greedyPrompt, fx.greedyTokens.length));
    assert.deepEqual(s.tokenIds, fx.greedyTokens);
    assert.equal((await trainer.getMetrics({})).step, 0);
    await expectStatus(trainer.computeLogprobs({ batches: [packSequences([fx.greedyPrompt])], model: LogprobModel.LOGPROB_MODEL_REFERENCE, temperature: 0 }), status.FAILED_PRECONDITION, /keep_reference/);
  });

  test('past its queue bound a rank answers Generate with RESOURCE_EXHAUSTED at once', async () => {
    const small = createRankServer(
      { tracer: null },
      {
        host: '127.0.0.1', port: 0, rank: 0, worldSize: 1, rendezvous: null, commTimeoutMs: 30000, kvBlocks: KV_BLOCKS, blockSize: 16,
        maxPrompts: 64, maxQueuedSamples: 8, addonPath: null, shutdownGraceMs: 1000, serverCredentials: null, maxMessageBytes: 64 << 20,
      },
    );
    const address = `127.0.0.1:${await small.start()}`;
    const ro = createClient({ tracer: null }, RolloutServiceService, { address, defaultTimeoutMs: 30000, credentials: null });
    const tr = createClient({ tracer: null }, TrainerServiceService, { address, defaultTimeoutMs: 30000, credentials: null });
    try {
      await tr.loadModel({ modelDir: FIXTURE_DIR, dtype: '', seed: 0, keepReference: false });
      const abort = new AbortController();
      // 8 samples of 1500 tokens: the bound is reached while they run.
      const long = (async () => {
        for await (const _ of ro.generate({ ...greedyRequest(fx.greedyPrompt, 1500, 'long'), n: 8 }, { signal: abort.signal })) void _;
      })().catch(() => undefined);
      let m = await tr.getMetrics({});
      for (let i = 0; i < 100 && m.counters.active_samples === 0; i++) {
        await new Promise((r) => setTimeout(r, 20));
        m = await tr.getMetrics({});
      }
      const t0 = Date.now();
      await expectStatus(
        (async () => {
          for await (const _ of ro.generate(greedyRequest(fx.greedyPrompt, 3, 'extra'))) void _;
        })(),
        status.RESOURCE_EXHAUSTED,
        /samples are queued or generating \(limit 8\)/,
      );
      assert.ok(Date.now() - t0 < 1000, 'refused at once');
      abort.abort();
      await long;
    } finally {
      ro.close();
      tr.close();
      await small.shutdown();
    }
  });
});
