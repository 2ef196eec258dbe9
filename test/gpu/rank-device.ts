// A rank service whose policy is on the GPU (`--device cuda:0`), over real gRPC on loopback, on the qwen2_moe-tiny
// fixture. Generate runs on the GPU (the generator's GPU backend: the device's weights, KV cache and sampler), as do
// TrainBatch, ComputeLogprobs and OptimizerStep, so the rollout's logprobs must equal the trainer's bit for bit before
// AND after an optimizer step (a rollout reading stale weights would not), and a shard saved from the GPU in the
// background (the next step training while it is written) and loaded back must give the GPU the bits of the save. Greedy rollout equals the fixture (the fp32 checkpoint) on the CPU; in bf16 on
// the GPU it may part from it at a near-tie, so there that comparison is printed as a note, not a check.
//
// Usage (bundled with the CLI by scripts/device/bundle-cli.mjs, which ships the protos the gRPC packages read):
//   MOEPILOT_ADDON=<moepilot.node> node test/gpu/bundle/rank-device.mjs [fixture dir] [device]
// The device defaults to cuda:0; `cpu` runs the same checks on the CPU engine (where every comparison is exact).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { createClient } from '../../services/common/grpc-client.ts';
import { createRankServer } from '../../services/rank/server.ts';
import { f32Values, fixtureMicroBatch, packSequences, readFixture } from '../../services/rank/test-fixture.ts';
import { RolloutServiceService, type GenerateRequest, type GenerateResponse } from '../../proto/gen/pilot/v1/rollout.ts';
import { KlEstimator, LogprobModel, LossAggregation, TrainerServiceService } from '../../proto/gen/pilot/v1/trainer.ts';

const fixtureDir = process.argv[2] ?? join(process.env.REPO_ROOT ?? process.cwd(), 'test/fixtures/recomputed/qwen2_moe-tiny');
const device = process.argv[3] ?? 'cuda:0';
const TOL = 2e-2;  // how far one optimizer step must move the policy's logprobs (x5, relative L2)
const ADAMW = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 0 };

let failures = 0;
function report(ok: boolean, what: string, detail: string): void {
  if (!ok) failures++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}: ${detail}`);
}
function sameBits(a: ArrayLike<number>, b: ArrayLike<number>): boolean {
  if (a.length !== b.length || a.length === 0) return false;
  for (let i = 0; i < a.length; i++) if (!Object.is(Math.fround(a[i]), Math.fround(b[i]))) return false;
  return true;
}
function relL2(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return a.length === b.length ? Math.sqrt(num) / Math.max(Math.sqrt(den), 1e-30) : Infinity;
}

const fx = await readFixture(fixtureDir);
const tmp = mkdtempSync(join(tmpdir(), 'rank-gpu-'));
const server = createRankServer(
  { tracer: null },
  {
    host: '127.0.0.1', port: 0, rank: 0, worldSize: 1, rendezvous: null, commTimeoutMs: 30000, kvBlocks: 256,
    blockSize: 16, maxPrompts: 16, addonPath: process.env.MOEPILOT_ADDON ?? null, device, shutdownGraceMs: 1000,
    serverCredentials: null, maxMessageBytes: 64 << 20,
  },
);
const address = `127.0.0.1:${await server.start()}`;
const rollout = createClient({ tracer: null }, RolloutServiceService, { address, defaultTimeoutMs: 60000, credentials: null });
const trainer = createClient({ tracer: null }, TrainerServiceService, { address, defaultTimeoutMs: 60000, credentials: null });

async function greedy(): Promise<GenerateResponse> {
  const req: GenerateRequest = {
    prompts: [{ promptId: 'p0', input: { $case: 'tokenIds', value: { ids: fx.greedyPrompt } }, applyChatTemplate: false }],
    n: 1,
    sampling: { temperature: 0, topK: 0, topP: 0, minP: 0, seed: 7, maxNewTokens: fx.greedyTokens.length, stop: [], stopTokenIds: [] },
    returnExperts: false,
    returnText: false,
  };
  const out: GenerateResponse[] = [];
  for await (const r of rollout.generate(req)) out.push(r);
  return out[0];
}
async function policyLogprobs(seq: number[]): Promise<Float32Array> {
  const r = await trainer.computeLogprobs({ batches: [packSequences([seq])], model: LogprobModel.LOGPROB_MODEL_POLICY, temperature: 0 });
  return f32Values(r.logprobs[0]);
}
function trainRequest(step: number) {
  return {
    step,
    microBatches: [fixtureMicroBatch(fx, [0, 1, 2])],
    loss: {
      epsLow: fx.grpo.epsLow, epsHigh: fx.grpo.epsHigh, beta: fx.grpo.beta, kl: KlEstimator.KL_ESTIMATOR_K3,
      aggregation: LossAggregation.LOSS_AGGREGATION_TOKEN_MEAN, temperature: 0, normLength: 0,
    },
    globalTokens: fx.maskedTokens,
    globalSequences: fx.sequences.length,
  };
}

try {
  const { info } = await trainer.loadModel({ modelDir: fixtureDir, dtype: '', seed: 1, keepReference: false });
  report((info?.numParameters ?? 0) > 0, `LoadModel on ${device}`, `${info?.numParameters} parameters`);

  const g0 = await greedy();
  const sameAsFixture = JSON.stringify(g0.tokenIds) === JSON.stringify(fx.greedyTokens);
  if (device === 'cpu') report(sameAsFixture, 'greedy rollout equals the fixture', `${g0.tokenIds.join(',')}`);
  else {
    let agree = 0;
    while (agree < fx.greedyTokens.length && g0.tokenIds[agree] === fx.greedyTokens[agree]) agree++;
    console.log(`note greedy rollout (bf16) vs the fp32 fixture: first ${agree} of ${fx.greedyTokens.length} tokens agree`);
  }
  const seq0 = [...fx.greedyPrompt, ...g0.tokenIds];
  const before = (await policyLogprobs(seq0)).subarray(fx.greedyPrompt.length);
  const e0 = relL2(before, f32Values(g0.logprobs));
  report(sameBits(before, f32Values(g0.logprobs)), 'trainer logprobs == rollout logprobs before a step', `rel_l2 ${e0.toExponential(3)}`);

  const t = await trainer.trainBatch(trainRequest(1));
  const o = await trainer.optimizerStep({ step: 1, adamw: ADAMW });
  report(Number.isFinite(t.metrics?.loss ?? NaN) && Number.isFinite(o.gradNorm), 'TrainBatch + OptimizerStep', `loss ${t.metrics?.loss}, grad norm ${o.gradNorm}`);
  const g1 = await greedy();
  const seq1 = [...fx.greedyPrompt, ...g1.tokenIds];
  const after = (await policyLogprobs(seq1)).subarray(fx.greedyPrompt.length);
  const e1 = relL2(after, f32Values(g1.logprobs));
  const moved = relL2((await policyLogprobs(seq0)).subarray(fx.greedyPrompt.length), before);
  report(sameBits(after, f32Values(g1.logprobs)), 'trainer logprobs == rollout logprobs after a step (the rollout read the new weights)', `rel_l2 ${e1.toExponential(3)}`);
  report(moved > 5 * TOL, 'the step moved the policy well past the tolerance', `rel_l2 ${moved.toExponential(3)}`);

  // A background save: it answers once the state is captured, the next step trains while the files are written,
  // and the files still hold the state of the save.
  const shardDir = join(tmp, 'shard');
  const started = await trainer.saveShard({ dir: shardDir, includeOptimizer: true, background: true });
  report(started.files.length === 0, 'a background SaveShard answers before its files exist', `${started.files.length} files`);
  const atSave = await policyLogprobs(seq1);
  await trainer.trainBatch(trainRequest(2));
  await trainer.optimizerStep({ step: 2, adamw: ADAMW });
  const changed = await policyLogprobs(seq1);
  const saved = await trainer.awaitShard({ dir: shardDir });
  report(saved.files.length === 3, 'AwaitShard answers with the files', saved.files.map((f) => f.path.split('/').pop()).join(', '));
  await trainer.loadShard({ files: saved.files, includeOptimizer: true });
  const restored = await policyLogprobs(seq1);
  report(relL2(changed, atSave) > 0, 'a second step changed the weights', `rel_l2 ${relL2(changed, atSave).toExponential(3)}`);
  report(
    restored.every((v, i) => Object.is(v, atSave[i])),
    'a shard saved from the device and loaded back gives the same bits',
    `${restored.length} logprobs`,
  );
} catch (e) {
  report(false, 'rank on the device', (e as Error).stack ?? String(e));
} finally {
  rollout.close();
  trainer.close();
  await server.shutdown();
  rmSync(tmp, { recursive: true, force: true });
}
console.log(`rank-gpu: ${failures} failure(s)`);
process.exit(failures === 0 ? 0 : 1);
