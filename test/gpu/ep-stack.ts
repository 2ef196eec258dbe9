// A GRPO run through the whole service stack with expert-parallel ranks on GPUs (issue: EP on one node): the
// project's own stack (src/stack/stack.ts: nats-server, reward, checkpoint, N rank services with rank r on GPU r and
// their group over NCCL, the coordinator), synthetic arithmetic prompts with a verifiable reward, G samples per
// prompt, a checkpoint committed, then the coordinator killed with SIGKILL and started again so that the run resumes
// from that checkpoint (the ranks reload the model and restore their shards), to the last step. Writes what the
// issue asks to record that the run itself reports: per-step time and its phases, rollout and training tokens/s,
// MFU, tokens per expert per layer, the token exchange's bus bandwidth inside the training passes (from the ranks'
// spans), and the resume. Peak memory per GPU comes from nvidia-smi in the calling script
// (scripts/device/ep-stack.sh).
//
// Bundled beside the services by scripts/device/bundle-cli.mjs (test/gpu/bundle/ep-stack.mjs): the stack then runs
// the bundled services, as on the GPU machine. On a machine without GPUs, --device cpu runs the same drill on CPU
// ranks (the fixture model).
//
// Usage: MOEPILOT_ADDON=<moepilot.node> node ep-stack.mjs --model DIR --ranks 4 [--device cuda] [--steps 5]
//          [--group-size 16] [--prompts-per-step 32] [--max-new-tokens 64] [--micro-batch 32] [--kv-blocks N]
//          [--checkpoint-every 2] [--checkpoint-keep 1] [--state-dir DIR] [--gpu NAME]
//          [--compare-to EARLIER.json [--rel-tol 1e-2 on GPUs, 1e-5 on CPUs]] --out result.json
import { mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { stringify } from 'yaml';

import { RunState, type RunConfig } from '../../proto/gen/pilot/v1/run.ts';
import { createRunFromFile } from '../../src/cli/commands/run.ts';
import { submitPromptsFile } from '../../src/cli/commands/submit.ts';
import { runStateName, watchRun } from '../../src/cli/commands/watch.ts';
import { readHfConfig } from '../../src/hf/config.ts';
import { connectRunService } from '../../src/stack/connect.ts';
import { compareFirstStep, formatCheck, type DrillRecord } from '../../src/stack/ep-compare.ts';
import { runConfigToYamlObject } from '../../src/stack/run-config.ts';
import { startStack, stackPaths } from '../../src/stack/stack.ts';
import { describeExit } from '../../src/stack/supervisor.ts';
import { arg } from './args.ts';

const modelDir = arg('model', '');
const ranks = Number(arg('ranks', '4'));
const device = arg('device', 'cuda') as 'cpu' | 'cuda';
// The ranks' routed-expert gradients (pilot up's --expert-grads): float32 or bfloat16 (GPU ranks only).
const expertGradDtype = arg('expert-grads', 'float32') as 'float32' | 'bfloat16';
const steps = Number(arg('steps', '5'));
const G = Number(arg('group-size', '16'));
const promptsPerStep = Number(arg('prompts-per-step', '32'));
const maxNewTokens = Number(arg('max-new-tokens', '64'));
const microBatch = Number(arg('micro-batch', '32'));
const kvBlocks = arg('kv-blocks', '');
const checkpointEvery = Number(arg('checkpoint-every', '2'));
// One committed checkpoint at a time by default: at the full A2.7B shape one holds ~172 GB (fp32 weights + AdamW).
const checkpointKeep = Number(arg('checkpoint-keep', '1'));
const stateDir = arg('state-dir', '/tmp/ep-stack');
const gpuName = arg('gpu', device === 'cuda' ? 'unknown GPU' : 'cpu');
const out = arg('out', 'ep-stack.json');
// An earlier record of the same model, seed and prompts at another number of ranks: the first steps must agree
// (src/stack/ep-compare.ts), exactly where rollout and routing decide and within --rel-tol where sums reorder.
const compareTo = arg('compare-to', '');
const relTol = Number(arg('rel-tol', device === 'cuda' ? '1e-2' : '1e-5'));
if (!modelDir) throw new Error('--model DIR is required (a Hugging Face model folder with a tokenizer)');

const H100_BF16_FLOPS = 989e12;

/** Synthetic verifiable prompts: "a + b" with the sum as the reference answer. */
function promptLines(count: number, seed: number): string[] {
  let x = seed >>> 0;
  const next = () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
  const lines: string[] = [];
  for (let i = 0; i < count; i++) {
    const a = next() % 1000;
    const b = next() % 1000;
    lines.push(JSON.stringify({ prompt: `Compute ${a} + ${b}. Answer with the number only.`, answer: String(a + b) }));
  }
  return lines;
}

/** Parameters a token passes through (attention, router, shared expert, top-k experts, LM head), for MFU. */
function activeParams(cfg: Record<string, number>): number {
  const C = cfg.hidden_size;
  const L = cfg.num_hidden_layers;
  const attn = 4 * C * C;
  const router = cfg.num_experts * C;
  const shared = 3 * (cfg.shared_expert_intermediate_size ?? 0) * C;
  const experts = cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * C;
  return L * (attn + router + shared + experts) + cfg.vocab_size * C;
}

/** Bytes of a committed checkpoint ("run:step"), from its folder in the checkpoint store. */
async function checkpointSize(stateDir: string, id: string): Promise<number | null> {
  const [runId, step] = [id.slice(0, id.lastIndexOf(':')), id.slice(id.lastIndexOf(':') + 1)];
  const dir = join(stackPaths(stateDir).checkpointDir, runId, `step-${step}`);
  try {
    let total = 0;
    for (const f of await readdir(dir)) total += (await stat(join(dir, f))).size;
    return total;
  } catch {
    return null;
  }
}

interface SpanLine {
  spanId: string;
  parentSpanId: string | null;
  name: string;
  kind: string;
  service: string;
  startTimeUnixNano: string;
  endTimeUnixNano: string;
  durationMs: number;
  attributes: Record<string, unknown>;
}

/**
 * Where a checkpoint's and a resume's time goes, from the spans. A checkpoint is two coordinator phases:
 * - "checkpoint", the part its step waits for: the ranks' SaveShard (each captures its state; the slowest rank's
 *   server time);
 * - "checkpoint_commit", below it, which runs while the next steps train: the ranks' AwaitShard (the slowest rank's
 *   wait for its files: the write), the checkpoint service's Save calls (which move the shards into the store and
 *   hash them again), and Commit.
 * A resume is one phase: Restore, which verifies every shard's hash, and the slowest rank's LoadShard. With the
 * checkpoint's bytes, the rate each part ran at.
 */
function checkpointPhases(spans: SpanLine[], bytes: number | null) {
  const children = new Map<string, SpanLine[]>();
  for (const sp of spans) if (sp.parentSpanId) children.set(sp.parentSpanId, [...(children.get(sp.parentSpanId) ?? []), sp]);
  // A phase's client calls and, below each, the server span that answered it.
  const servedUnder = (phase: SpanLine | undefined, name: string) =>
    phase ? (children.get(phase.spanId) ?? []).filter((c) => c.name.endsWith(name)).flatMap((c) => (children.get(c.spanId) ?? []).filter((x) => x.kind === 'SERVER')) : [];
  const sec = (xs: SpanLine[], f: (a: number[]) => number) => (xs.length ? f(xs.map((x) => x.durationMs)) / 1000 : null);
  const sum = (a: number[]) => a.reduce((x, y) => x + y, 0);
  const max = (a: number[]) => Math.max(...a);
  const rate = (s: number | null) => (bytes && s ? bytes / s / 1e9 : null);
  const out = { saves: [] as Record<string, unknown>[], resumes: [] as Record<string, unknown>[] };
  for (const sp of spans.filter((x) => x.kind === 'INTERNAL' && x.service === 'coordinator')) {
    if (sp.name === 'checkpoint') {
      const commit = (children.get(sp.spanId) ?? []).find((c) => c.name === 'checkpoint_commit');
      const both = [...servedUnder(sp, 'CheckpointService/Save'), ...servedUnder(commit, 'CheckpointService/Save')];
      // From the snapshot's start to the commit's end: the commit span begins inside the checkpoint span.
      const end = commit ? Number(BigInt(commit.endTimeUnixNano) - BigInt(sp.startTimeUnixNano)) / 1e9 : null;
      const write = sec(servedUnder(commit, 'TrainerService/AwaitShard'), max);
      out.saves.push({
        step: sp.attributes.step,
        step_wait_seconds: sp.durationMs / 1000,
        rank_snapshot_seconds: sec(servedUnder(sp, 'TrainerService/SaveShard'), max),
        seconds_to_commit: end,
        gb_per_s: rate(end),
        rank_write_seconds: write,
        rank_write_gb_per_s: rate(write),
        store_save_seconds: sec(both, sum),
        store_commit_seconds: sec(servedUnder(commit, 'CheckpointService/Commit'), sum),
      });
    } else if (sp.name === 'resume' && servedUnder(sp, 'TrainerService/LoadShard').length > 0) {
      const total = sp.durationMs / 1000;
      out.resumes.push({
        seconds: total,
        gb_per_s: rate(total),
        store_restore_seconds: sec(servedUnder(sp, 'CheckpointService/Restore'), sum),
        rank_load_shard_seconds: sec(servedUnder(sp, 'TrainerService/LoadShard'), max),
      });
    }
  }
  return out;
}

/**
 * Each step's phases as the traces have them: the coordinator's "step" span and, below it, its rollout, reward,
 * training micro-batches (summed), optimizer and checkpoint spans; the ranks' Generate time (the slowest rank) and
 * the engine's own phases inside TrainBatch (attention, experts, token exchange, LM head; per rank, summed over
 * the step's calls, the mean over ranks); and where the ranks' Generate and TrainBatch calls spent their time by the
 * addon's clock (rank.native_*: queued for libuv's pool, running, results waiting for the event loop; "outside": the
 * rest of the call, JavaScript or a held event loop), per rank summed over the step's calls, the largest over ranks.
 * A step whose coordinator was killed before its spans were exported (the crash drill's) is absent here; its
 * metrics record still has its phases.
 */
function nativeTimes(calls: SpanLine[]) {
  const perRank = new Map<string, Record<string, number>>();
  for (const sp of calls) {
    const a = sp.attributes;
    const num = (k: string) => (typeof a[k] === 'number' ? (a[k] as number) : 0);
    const acc = perRank.get(sp.service) ?? { calls: 0, queued_ms: 0, run_ms: 0, resolve_ms: 0, outside_ms: 0 };
    acc.calls += num('rank.native_calls');
    acc.queued_ms += num('rank.native_queued_ms');
    acc.run_ms += num('rank.native_run_ms');
    acc.resolve_ms += num('rank.native_resolve_ms');
    acc.outside_ms += sp.durationMs - num('rank.native_queued_ms') - num('rank.native_run_ms') - num('rank.native_resolve_ms');
    perRank.set(sp.service, acc);
  }
  const max: Record<string, number> = {};
  for (const acc of perRank.values()) for (const [k, v] of Object.entries(acc)) max[k] = Math.max(max[k] ?? 0, v);
  return max;
}

function phasesFromSpans(spans: SpanLine[]) {
  const engineByStep = new Map<number, Map<string, Record<string, number>>>();
  for (const sp of spans.filter((x) => x.kind === 'SERVER' && x.name.endsWith('TrainerService/TrainBatch'))) {
    const step = sp.attributes['rank.step'] as number;
    const perRank = engineByStep.get(step) ?? new Map<string, Record<string, number>>();
    const acc = perRank.get(sp.service) ?? {};
    for (const [k, v] of Object.entries(sp.attributes)) if (k.startsWith('engine.') && k.endsWith('_ms')) acc[k.slice(7)] = (acc[k.slice(7)] ?? 0) + (v as number);
    perRank.set(sp.service, acc);
    engineByStep.set(step, perRank);
  }
  const out: Record<string, unknown>[] = [];
  for (const st of spans.filter((x) => x.name === 'step' && x.service === 'coordinator')) {
    const step = st.attributes.step as number;
    const sum = (name: string) => spans.filter((x) => x.parentSpanId === st.spanId && x.name === name).reduce((a, x) => a + x.durationMs / 1000, 0);
    // The ranks' Generate calls of this step: server spans under the coordinator's client calls under its rollouts.
    const rollouts = new Set(spans.filter((x) => x.parentSpanId === st.spanId && x.name === 'rollout').map((x) => x.spanId));
    const calls = new Set(spans.filter((x) => x.kind === 'CLIENT' && rollouts.has(x.parentSpanId ?? '')).map((x) => x.spanId));
    const generate = spans.filter((x) => x.kind === 'SERVER' && x.name.endsWith('Generate') && calls.has(x.parentSpanId ?? ''));
    const train = spans.filter((x) => x.kind === 'SERVER' && x.name.endsWith('TrainerService/TrainBatch') && x.attributes['rank.step'] === step);
    const engine: Record<string, number> = {};
    const perRank = [...(engineByStep.get(step)?.values() ?? [])];
    for (const acc of perRank) for (const [k, v] of Object.entries(acc)) engine[k] = (engine[k] ?? 0) + v / perRank.length;
    out.push({
      step,
      seconds: st.durationMs / 1000,
      rollout_seconds: sum('rollout'),
      rank_generate_seconds_max: generate.length ? Math.max(...generate.map((g) => g.durationMs / 1000)) : null,
      reward_seconds: sum('reward'),
      train_seconds: sum('train_micro_batch'),
      optimizer_seconds: sum('optimizer_step'),
      checkpoint_seconds: sum('checkpoint'),
      engine_ms_mean_over_ranks: engine,
      native_ms_max_over_ranks: { generate: nativeTimes(generate), train_batch: nativeTimes(train) },
    });
  }
  return out.sort((a, b) => (a.step as number) - (b.step as number));
}

async function main(): Promise<void> {
  const t0 = performance.now();
  await rm(stateDir, { recursive: true, force: true });
  await mkdir(stateDir, { recursive: true });
  const parsed = await readHfConfig(modelDir);
  const cfgJson = JSON.parse(await readFile(join(modelDir, 'config.json'), 'utf8')) as Record<string, number>;
  const eos = JSON.parse(await readFile(join(modelDir, 'tokenizer_config.json'), 'utf8').catch(() => '{}')) as { eos_token?: string };
  let killing = false;
  const stack = await startStack(
    {
      log: (l) => console.error(l),
      onExit: (e) => {
        if (!(killing && e.name === 'coordinator')) console.error(`${e.name} (pid ${e.pid}) ${describeExit(e)}:\n${e.logTail}`);
      },
    },
    { stateDir, ranks, device, expertGradDtype, kvBlocks: kvBlocks ? Number(kvBlocks) : null, checkpointKeep, startTimeoutMs: 600_000 },
  );
  const stackUpS = (performance.now() - t0) / 1000;
  const result: Record<string, unknown> = { gpu: gpuName, ranks, device, expert_grad_dtype: expertGradDtype, model_dir: modelDir, engine_config: parsed.engine };
  try {
    let client = await connectRunService(stateDir);
    const dataset = `ep-${Date.now().toString(36)}`;
    const promptsFile = join(stateDir, 'prompts.jsonl');
    await writeFile(promptsFile, promptLines(Math.ceil(steps * promptsPerStep * 1.5), 7).join('\n') + '\n');
    const submitted = await submitPromptsFile(client, promptsFile, dataset);
    if (submitted.issues.length) throw new Error(`bad prompt lines: ${JSON.stringify(submitted.issues)}`);
    const config: RunConfig = {
      name: 'ep-stack',
      modelDir,
      // GPU ranks compute in bf16 (fp32 master weights); the CPU engine in f32.
      dtype: device === 'cuda' ? 'bf16' : 'f32',
      dataset,
      groupSize: G,
      promptsPerStep,
      steps,
      sampling: { temperature: 1, topK: 0, topP: 0.9, minP: 0, seed: 1, maxNewTokens, stop: [], stopTokenIds: [] },
      loss: { epsLow: 0.2, epsHigh: 0.28, beta: 0, kl: 0, aggregation: 0, temperature: 0, normLength: 0 },
      advantage: { stdNormalize: true },
      dynamicSampling: undefined,
      mu: 1,
      microBatchSize: microBatch,
      optimizer: { lr: 1e-6, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 },
      checkpointEvery,
      // The exact answer (a random model rarely finds it) and a digit-bearing completion (which gives the groups
      // reward variance, so the advantages and the gradients are not zero).
      reward: {
        scorers: [
          { name: 'math', weight: 1, params: { tolerance: 0 }, label: 'exact' },
          { name: 'format', weight: 0.5, params: { pattern: '\\d' }, label: 'has_digit' },
        ],
      },
      seed: 1,
      worldSize: ranks,
    };
    const runFile = join(stateDir, 'run.yaml');
    await writeFile(runFile, stringify(runConfigToYamlObject(config)));
    const run = await createRunFromFile(client, runFile);
    console.error(`run ${run.id}: ${steps} steps of ${promptsPerStep} prompts x ${G} samples over ${ranks} ranks (${device}); eos ${eos.eos_token ?? '?'}`);
    const metricsFile = join(stateDir, 'metrics.jsonl');
    const events: { kind: string; message: string; at_s: number }[] = [];
    const write = (t: string) => process.stderr.write(t);
    // Phase 1: to the first committed checkpoint, then a crash of the coordinator, killed from inside the event
    // callback (the watch reads no further event until it returns) while the run goes on to the next step.
    let crashedAfter: number | null = null;
    let restartS: number | null = null;
    await watchRun(client, run.id, {
      metricsFile,
      tty: false,
      write,
      onEvent: async (e) => {
        events.push({ kind: e.kind, message: e.message, at_s: (performance.now() - t0) / 1000 });
        if (e.kind === 'checkpoint_committed' && crashedAfter === null && Number(e.step) < steps) {
          crashedAfter = Number(e.step);
          killing = true;
          const r0 = performance.now();
          await stack.crashAndRestart('coordinator');
          killing = false;
          restartS = (performance.now() - r0) / 1000;
          console.error(`coordinator killed (SIGKILL) after the step-${crashedAfter} checkpoint and started again in ${restartS.toFixed(1)} s`);
        }
      },
    }).then(
      () => undefined,
      (e: Error) => {
        if (crashedAfter === null) throw e;  // the stream of the killed coordinator ends in an error
      },
    );
    if (crashedAfter !== null) client = await connectRunService(stateDir);
    // Phase 2 (or the whole run, if it ended before a checkpoint): to the end.
    const final = await watchRun(client, run.id, {
      metricsFile,
      tty: false,
      write,
      onEvent: (e) => void events.push({ kind: e.kind, message: e.message, at_s: (performance.now() - t0) / 1000 }),
    });
    if (final.state !== RunState.RUN_STATE_SUCCEEDED) throw new Error(`run ${run.id} ${runStateName(final.state)} at step ${final.step}: ${final.error}`);

    // Per step, the last record (a step run again after the resume replaces the first).
    const records = (await readFile(metricsFile, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as Record<string, number>);
    const byStep = new Map<number, Record<string, number>>();
    for (const r of records) byStep.set(r.step, r);
    const active = activeParams(cfgJson);
    const perStep = [...byStep.values()].sort((a, b) => a.step - b.step).map((r) => {
      const completion = r.response_length_mean * r.samples;
      const phases: Record<string, number> = {};
      for (const [k, v] of Object.entries(r)) if (k.startsWith('time/')) phases[k.slice(5)] = v;
      const trainS = (phases.train ?? 0) + (phases.reference ?? 0);
      const trainTokS = trainS > 0 ? r.tokens / trainS : NaN;
      const experts: Record<string, number> = {};
      for (const [k, v] of Object.entries(r)) if (k.startsWith('experts/')) experts[k] = v;
      return {
        step: r.step,
        step_seconds: r.step_seconds,
        phases_seconds: phases,
        reward_mean: r.reward_mean,
        grad_norm: r.grad_norm,
        loss: r.loss,
        pg_loss: r.pg_loss,
        entropy: r.entropy,
        completion_tokens: completion,
        rollout_tokens_per_s: phases.rollout ? completion / phases.rollout : NaN,
        trained_tokens: r.tokens,
        train_tokens_per_s: trainTokS,
        // 6 x active parameters x tokens/s (forward + backward) over the cards' bf16 peak.
        mfu: device === 'cuda' ? (6 * active * trainTokS) / (H100_BF16_FLOPS * ranks) : null,
        expert_load: experts,
        alltoall_in_step: null as null | { bytes_all_ranks: number; seconds_all_ranks: number; busbw_gb_s: number },
      };
    });
    // The token exchange inside the training passes, per step: bytes each rank handed to its all-to-alls and the
    // time spent in them, from the ranks' TrainBatch spans (engine.{forward,backward}.alltoall_*), as NCCL's tests
    // state it: algbw = bytes / time, busbw = algbw x (ranks - 1) / ranks.
    const a2a = new Map<number, { bytes: number; ms: number }>();
    // Every service's spans, read once for this and for the checkpoint and per-step breakdowns below.
    const spans = (await readFile(stackPaths(stateDir).spanFile, 'utf8'))
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as SpanLine);
    for (const span of spans) {
      if (span.kind !== 'SERVER' || !span.name.endsWith('TrainerService/TrainBatch')) continue;
      const at = span.attributes as Record<string, number>;
      const step = at['rank.step'];
      if (step === undefined) continue;
      const cur = a2a.get(step) ?? { bytes: 0, ms: 0 };
      for (const pass of ['forward', 'backward']) {
        cur.bytes += at[`engine.${pass}.alltoall_bytes`] ?? 0;
        cur.ms += at[`engine.${pass}.alltoall_ms`] ?? 0;
      }
      a2a.set(step, cur);
    }
    for (const st of perStep) {
      const x = a2a.get(st.step);
      // Summed over the ranks: the mean rank's bytes over its time.
      st.alltoall_in_step =
        x && x.ms > 0 ? { bytes_all_ranks: x.bytes, seconds_all_ranks: x.ms / 1000, busbw_gb_s: ((x.bytes / (x.ms / 1000)) * (ranks - 1)) / ranks / 1e9 } : null;
    }
    const checkpointBytes = final.latestCheckpointId ? await checkpointSize(stateDir, final.latestCheckpointId) : null;
    const checkpointing = checkpointPhases(spans, checkpointBytes);
    const tracedSteps = phasesFromSpans(spans);
    const resumed = events.filter((e) => e.kind === 'resumed');
    Object.assign(result, {
      run_id: run.id,
      state: runStateName(final.state),
      steps,
      group_size: G,
      prompts_per_step: promptsPerStep,
      max_new_tokens: maxNewTokens,
      micro_batch_sequences: microBatch,
      active_params: active,
      stack_up_seconds: stackUpS,
      crash: crashedAfter === null ? null : { after_checkpoint_step: crashedAfter, restart_seconds: restartS, resumed_events: resumed },
      latest_checkpoint: final.latestCheckpointId,
      per_step: perStep,
      checkpoint_bytes: checkpointBytes,
      checkpointing,
      traced_steps: tracedSteps,
      events,
      span_file: stackPaths(stateDir).spanFile,
      wall_seconds: (performance.now() - t0) / 1000,
    });
    if (crashedAfter !== null && resumed.length === 0) throw new Error('the coordinator was killed but the run reported no "resumed" event');
    if (compareTo) {
      const other = JSON.parse(await readFile(compareTo, 'utf8')) as DrillRecord;
      const cmp = compareFirstStep(other, { ranks, per_step: perStep }, relTol);
      result.first_step_against = { file: compareTo, ranks: other.ranks, rel_tol: relTol, ...cmp };
      console.log(`step 1 at ${ranks} ranks against ${other.ranks} ranks (${compareTo}), relative tolerance ${relTol}:`);
      for (const c of cmp.checks) console.log(formatCheck(c));
      if (!cmp.ok) throw new Error(`step 1 at ${ranks} ranks differs from ${other.ranks} ranks' (${compareTo})`);
    }
    for (const s of perStep)
      console.log(
        `step ${s.step}: ${s.step_seconds.toFixed(2)} s (${Object.entries(s.phases_seconds).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')}); ` +
          `rollout ${s.rollout_tokens_per_s.toFixed(0)} tok/s, train ${s.train_tokens_per_s.toFixed(0)} tok/s` +
          (s.mfu !== null ? `, MFU ${(100 * s.mfu).toFixed(1)}%` : '') +
          `, reward ${s.reward_mean.toFixed(3)}` +
          (s.alltoall_in_step ? `, all-to-all busbw ${s.alltoall_in_step.busbw_gb_s.toFixed(2)} GB/s` : ''),
      );
    const f2 = (x: unknown) => (typeof x === 'number' ? x.toFixed(2) : '?');
    for (const c of checkpointing.saves)
      console.log(
        `checkpoint at step ${c.step}: the step waited ${f2(c.step_wait_seconds)} s (ranks' snapshot ${f2(c.rank_snapshot_seconds)} s); committed ${f2(c.seconds_to_commit)} s after it began ` +
          `(ranks' write ${f2(c.rank_write_seconds)} s, store Save ${f2(c.store_save_seconds)} s, Commit ${f2(c.store_commit_seconds)} s)` +
          (c.gb_per_s ? `, ${f2(c.gb_per_s)} GB/s of ${((checkpointBytes ?? 0) / 1e9).toFixed(1)} GB` : ''),
      );
    for (const r of checkpointing.resumes)
      console.log(`resume: ${(r.seconds as number).toFixed(2)} s (store Restore ${(r.store_restore_seconds as number | null)?.toFixed(2)} s, ranks' LoadShard ${(r.rank_load_shard_seconds as number | null)?.toFixed(2)} s)`);
    console.log(`run ${run.id} ${runStateName(final.state)}; ${crashedAfter !== null ? `resumed after the step-${crashedAfter} checkpoint` : 'no checkpoint before the end'}; latest ${final.latestCheckpointId}`);
  } catch (e) {
    result.error = (e as Error).stack ?? String(e);
    throw e;
  } finally {
    await writeFile(out, JSON.stringify(result, null, 2) + '\n');
    await stack.stop();
  }
}

try {
  await main();
  process.exit(0);
} catch (e) {
  console.error(`ep-stack failed: ${(e as Error).stack ?? e}`);
  process.exit(1);
}
