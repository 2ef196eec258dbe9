// The GRPO loop: the coordinator's one job. Per step it takes prompts from the durable queue, has every rank
// generate at once (rollout is collective under expert parallelism), scores the samples, computes group
// advantages (optionally dropping zero-variance groups and drawing more prompts: DAPO dynamic sampling), gets
// reference logprobs when beta > 0, then runs mu policy updates (TrainBatch micro-batch by micro-batch on every
// rank, then OptimizerStep on every rank), checkpoints every N steps and only then acks the prompts the
// checkpoint covers, so a crash redelivers prompts instead of losing them. A checkpoint holds up its step only
// while the ranks capture their state: they write it while the next steps run, and it commits when written.
//
// Resume: the latest committed checkpoint of the run is loaded on every rank and the loop continues at the next
// step; a redelivered prompt whose id a committed manifest lists was trained already and is acked unseen.
import { basename, join } from 'node:path';
import { SpanStatusCode, context as otelContext, trace, type Attributes, type Tracer } from '@opentelemetry/api';
import { CancelledError, NotFoundError, UnavailableError } from '../common/errors.ts';
import type { PromiseClient } from '../common/grpc-client.ts';
import type { PromptLease, PromptQueue } from '../common/nats/prompt-queue.ts';
import type { RunEventRecord, RunEvents } from '../common/nats/run-events.ts';
import type { CheckpointServiceService, Checkpoint } from '../../proto/gen/pilot/v1/checkpoint.ts';
import type { RewardServiceService } from '../../proto/gen/pilot/v1/reward.ts';
import type { GenerateResponse, RolloutServiceService } from '../../proto/gen/pilot/v1/rollout.ts';
import { LogprobModel, type TrainerServiceService } from '../../proto/gen/pilot/v1/trainer.ts';
import type { Tokenizer } from '../../src/tokenizer/index.ts';
import {
  assignPrompts,
  flattenSummary,
  globalNormalisers,
  groupAdvantages,
  packMicroBatch,
  planMicroBatches,
  readF32,
  readI64,
  summarizeStep,
  zeroVarianceGroups,
  type LossPart,
  type PackedMicroBatch,
  type StepSummary,
  type TrainSample,
} from './algo/mod.ts';
import type { RunSettings } from './run-config.ts';

/** Manifest metadata keys the loop writes (and reads back on resume). */
export const META_PROMPT_IDS = 'prompt_ids';
export const META_RUN_ID = 'run_id';
export const META_STEP = 'step';
export const META_MODEL_DIR = 'model_dir';
/** The step's metrics (before the checkpoint's own time), so a resume can publish them if the process died
 * between the commit and their publication. */
export const META_STEP_METRICS = 'step_metrics';
/** Shards carry each rank's AdamW moments and step count, so a resumed run continues the optimizer exactly. */
export const SHARDS_INCLUDE_OPTIMIZER = true;

export interface RankClients {
  rollout: PromiseClient<typeof RolloutServiceService>;
  trainer: PromiseClient<typeof TrainerServiceService>;
}

export interface GrpoLoopDeps {
  ranks: readonly RankClients[];
  reward: PromiseClient<typeof RewardServiceService>;
  checkpoint: PromiseClient<typeof CheckpointServiceService>;
  /** The queue of the run's dataset. */
  queue: PromptQueue;
  events: RunEvents;
  tracer: Tracer;
  tokenizer: Tokenizer;
}

export interface GrpoLoopOptions {
  runId: string;
  settings: RunSettings;
  signal: AbortSignal;
  /** How long one pull of prompts waits. */
  takeTimeoutMs: number;
  /** Deadline of each rank call (a rollout or a micro-batch). */
  callTimeoutMs: number;
  onStep?: (summary: StepSummary) => void;
  onCheckpoint?: (checkpoint: Checkpoint) => void;
  onEvent?: (event: RunEventRecord) => void;
}

export interface GrpoLoopResult {
  /** Last completed step. */
  step: number;
  resumedFrom: number | null;
}

interface StepPrompt {
  lease: PromptLease;
  id: string;
  /** Chat-templated prompt token ids. */
  tokens: number[];
  text: string;
  reference: string;
}

interface Sample {
  tokens: number[];
  logprobs: Float32Array;
  text: string;
  reward: number;
  components: Record<string, number>;
}

/** A checkpoint whose ranks are writing their files; `done` settles when it committed (or failed: `error`). */
interface CheckpointWrite {
  done: Promise<void>;
  error: Error | null;
}

interface Group {
  prompt: StepPrompt;
  /** The rank that generated (and trains on) it. */
  rank: number;
  samples: Sample[];
}

export async function runGrpoLoop(deps: GrpoLoopDeps, o: GrpoLoopOptions): Promise<GrpoLoopResult> {
  const { tracer, ranks, queue } = deps;
  const s = o.settings;
  const W = ranks.length;
  const G = s.groupSize;
  const accuracyLabel = s.reward.scorers[0].label || s.reward.scorers[0].name;
  const call = { timeoutMs: o.callTimeoutMs };

  function checkCancelled() {
    if (o.signal.aborted) throw new CancelledError(`run ${o.runId} was cancelled`);
  }

  /** A span made active for fn, so rank and reward calls made in it carry its context in their metadata. */
  function phase<T>(name: string, attributes: Attributes, fn: () => Promise<T>): Promise<T> {
    return tracer.startActiveSpan(name, { attributes }, async (span) => {
      try {
        return await fn();
      } catch (err) {
        span.recordException(err as Error);
        span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message });
        throw err;
      } finally {
        span.end();
      }
    });
  }

  async function event(e: RunEventRecord) {
    o.onEvent?.(e);
    await deps.events.publishEvent(o.runId, e, otelContext.active());
  }

  // ---- resume ----
  const trained = new Set<string>();
  let start = 0;
  let resumedFrom: number | null = null;
  await phase('resume', { 'run.id': o.runId }, async () => {
    let latest: Checkpoint | undefined;
    try {
      latest = (await deps.checkpoint.restore({ target: { $case: 'latestOfRun', value: o.runId } })).checkpoint;
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err;
    }
    if (!latest) return;
    await Promise.all(
      // Every rank gets every shard file: dense weights live in rank 0's shard, each rank picks its experts.
      ranks.map((r) =>
        r.trainer.loadShard(
          { files: latest!.shards.map((sh) => ({ path: sh.path, sizeBytes: sh.sizeBytes, sha256: sh.sha256 })), includeOptimizer: SHARDS_INCLUDE_OPTIMIZER },
          call,
        ),
      ),
    );
    // Every committed manifest still kept lists the prompts it covers; older ones were acked before the next
    // checkpoint began, so they cannot come back.
    const all = await deps.checkpoint.list({ runId: o.runId });
    for (const c of all.checkpoints) {
      for (const id of JSON.parse(c.metadata[META_PROMPT_IDS] ?? '[]') as string[]) trained.add(id);
    }
    start = latest.step;
    resumedFrom = latest.step;
    // A process that died between committing this checkpoint and publishing its step's metrics left a gap in
    // the run's record: fill it from the manifest.
    const saved = latest.metadata[META_STEP_METRICS];
    if (saved !== undefined) {
      const published = await deps.events.replay(o.runId, { kinds: ['metrics'] });
      if (!published.some((r) => (r.data as { step?: number }).step === latest!.step)) {
        await deps.events.publishMetrics(o.runId, latest.step, JSON.parse(saved) as Record<string, number>, otelContext.active());
      }
    }
    await event({ type: 'resumed', message: `resumed from checkpoint ${latest.id}`, step: latest.step, checkpointId: latest.id });
  });

  // Leases of steps not yet covered by a checkpoint: heartbeated until then, acked right after it commits.
  const held: PromptLease[] = [];
  const heldIds: string[] = [];
  const heartbeat = queue.heartbeat([]);
  let waitingAnnounced = false;

  function toStepPrompt(lease: PromptLease): StepPrompt {
    const p = lease.prompt;
    const messages = Array.isArray(p.metadata.messages)
      ? (p.metadata.messages as { role: string; content: string }[])
      : [{ role: 'user', content: p.text }];
    const rendered = deps.tokenizer.chatTemplateNames.length > 0
      ? deps.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true })
      : p.text;
    const tokens = deps.tokenizer.encode(rendered, { addSpecialTokens: deps.tokenizer.chatTemplateNames.length === 0 });
    if (tokens.length === 0) throw new Error(`prompt ${p.id} has no tokens`);
    return { lease, id: p.id, tokens, text: p.text, reference: p.reference ?? '' };
  }

  /** Up to n fresh prompts; waits for the queue when it is empty unless `once`. */
  async function takePrompts(n: number, once: boolean): Promise<StepPrompt[]> {
    const out: StepPrompt[] = [];
    for (;;) {
      checkCancelled();
      const leases = await queue.take(n - out.length, { timeoutMs: o.takeTimeoutMs });
      for (const lease of leases) {
        if (trained.has(lease.prompt.id)) {
          // Redelivered after a crash between checkpoint commit and ack: trained already.
          await lease.ack();
          await event({ type: 'prompt_skipped', message: `prompt ${lease.prompt.id} is in a committed checkpoint; acked without training`, promptId: lease.prompt.id });
          continue;
        }
        heartbeat.add([lease]);
        held.push(lease);
        heldIds.push(lease.prompt.id);
        try {
          out.push(toStepPrompt(lease));
        } catch (err) {
          await event({ type: 'warning', message: `prompt ${lease.prompt.id} skipped: ${(err as Error).message}` });
        }
      }
      if (out.length >= n || (out.length > 0 && leases.length < n) || once) return out;
      if (leases.length === 0 && !waitingAnnounced) {
        waitingAnnounced = true;
        await event({ type: 'waiting', message: `queue "${queue.config.queue}" is empty; waiting for prompts` });
      }
    }
  }

  async function rolloutAndScore(step: number, draw: number, prompts: StepPrompt[], offset: number): Promise<{ groups: Group[]; rolloutS: number; rewardS: number }> {
    const owners = assignPrompts(prompts.length, W, offset);
    const t0 = performance.now();
    const byId = new Map<string, GenerateResponse[]>();
    await phase('rollout', { 'step': step, 'draw': draw, 'prompts': prompts.length, 'group_size': G }, () =>
      Promise.all(
        ranks.map(async (r, rank) => {
          const mine = prompts.filter((_, i) => owners[i] === rank);
          const stream = r.rollout.generate(
            {
              prompts: mine.map((p) => ({ promptId: p.id, input: { $case: 'tokenIds', value: { ids: p.tokens } }, applyChatTemplate: false })),
              n: G,
              sampling: { ...s.sampling, seed: s.seed + step * 7919 + draw * 104729 },
              returnExperts: false,
              returnText: true,
            },
            call,
          );
          for await (const sample of stream) {
            const list = byId.get(sample.promptId) ?? [];
            list.push(sample);
            byId.set(sample.promptId, list);
          }
        }),
      ),
    );
    const rolloutS = (performance.now() - t0) / 1000;
    const groups: Group[] = prompts.map((p, i) => {
      const got = (byId.get(p.id) ?? []).sort((a, b) => a.sampleIndex - b.sampleIndex);
      if (got.length !== G) throw new UnavailableError(`rank ${owners[i]} returned ${got.length} samples for prompt ${p.id}, expected ${G}`);
      return {
        prompt: p,
        rank: owners[i],
        samples: got.map((g) => ({
          tokens: g.tokenIds,
          logprobs: readF32(g.logprobs, `logprobs of ${p.id}#${g.sampleIndex}`),
          text: g.text,
          reward: 0,
          components: {},
        })),
      };
    });
    const t1 = performance.now();
    await phase('reward', { 'step': step, 'draw': draw, 'items': prompts.length * G }, async () => {
      const items = groups.flatMap((g) =>
        g.samples.map((x) => ({ completion: x.text, referenceAnswer: g.prompt.reference, metadata: {}, completionTokens: x.tokens.length, prompt: g.prompt.text })),
      );
      if (items.length === 0) return;
      const res = await deps.reward.score({ items, spec: s.reward }, call);
      let k = 0;
      for (const g of groups) {
        for (const x of g.samples) {
          x.reward = res.scores[k].score;
          x.components = res.scores[k].components;
          k++;
        }
      }
    });
    return { groups, rolloutS, rewardS: (performance.now() - t1) / 1000 };
  }

  // The checkpoint being written. A checkpoint step waits only until every rank has captured its state (SaveShard
  // in the background); the ranks write their files while the next steps run, and the checkpoint commits, then acks
  // the prompts it covers, once they are written. One at a time: the next checkpoint, the end of the run and a
  // failure wait for it; a failed one fails the run at its next step.
  let writing: CheckpointWrite | null = null;

  function throwIfCheckpointFailed(): void {
    if (writing?.error) throw writing.error;
  }

  async function settleCheckpoint(): Promise<void> {
    const w = writing;
    if (!w) return;
    await w.done;
    if (writing === w) writing = null;
  }

  async function startCheckpoint(step: number, stepMetrics: Record<string, number>): Promise<void> {
    await settleCheckpoint();
    await phase('checkpoint', { step }, async () => {
      const opened = await deps.checkpoint.save({ checkpointId: '', runId: o.runId, step, shards: [], metadata: {} });
      const dirs = ranks.map((_, rank) => join(opened.stagingDir, `rank-${rank}`));
      await Promise.all(
        ranks.map((r, rank) => r.trainer.saveShard({ dir: dirs[rank], includeOptimizer: SHARDS_INCLUDE_OPTIMIZER, background: true }, call)),
      );
      // Every rank holds this step's state: the prompts trained so far are this checkpoint's, later ones the next.
      const leases = held.splice(0);
      const ids = heldIds.splice(0);
      const w: CheckpointWrite = { done: Promise.resolve(), error: null };
      w.done = phase('checkpoint_commit', { step }, () => commitCheckpoint(opened, step, stepMetrics, dirs, leases, ids)).then(
        () => undefined,
        (err: Error) => {
          w.error = err;
          throw err;
        },
      );
      w.done.catch(() => undefined);  // rethrown where it is awaited
      writing = w;
    });
  }

  async function commitCheckpoint(
    opened: { checkpointId: string },
    step: number,
    stepMetrics: Record<string, number>,
    dirs: string[],
    leases: PromptLease[],
    ids: string[],
  ): Promise<Checkpoint> {
    try {
      const saved = await Promise.all(ranks.map((r, rank) => r.trainer.awaitShard({ dir: dirs[rank] }, call)));
      const shards = saved.flatMap((res, rank) =>
        res.files.map((f) => ({ name: `rank-${rank}.${basename(f.path)}`, rank, source: { $case: 'path' as const, value: f.path }, sha256: f.sha256 })),
      );
      await deps.checkpoint.save({
        checkpointId: opened.checkpointId,
        runId: o.runId,
        step,
        shards,
        metadata: {
          [META_RUN_ID]: o.runId,
          [META_STEP]: String(step),
          [META_PROMPT_IDS]: JSON.stringify(ids),
          [META_MODEL_DIR]: s.modelDir,
          [META_STEP_METRICS]: JSON.stringify(stepMetrics),
        },
      });
      const committed = (await deps.checkpoint.commit({ checkpointId: opened.checkpointId, expectedShards: shards.length })).checkpoint!;
      // Only now are these prompts safe to remove from the queue.
      for (const id of ids) trained.add(id);
      await Promise.all(leases.map((l) => l.ack()));
      o.onCheckpoint?.(committed);
      await event({ type: 'checkpoint_committed', message: `checkpoint ${committed.id}`, step, checkpointId: committed.id });
      return committed;
    } catch (err) {
      // Not covered after all: back to the queue now rather than after ack_wait.
      nakAll(leases);
      throw err;
    }
  }

  function nakAll(leases: readonly PromptLease[]): void {
    for (const l of leases) {
      try {
        if (l.state === 'leased') l.nak();
      } catch {
        // connection gone: the server redelivers after ack_wait
      }
    }
  }

  async function trainStep(step: number, groups: Group[]) {
    const phaseSeconds: Record<string, number> = {};
    const timed = async <T>(name: string, fn: () => Promise<T>) => {
      const t = performance.now();
      try {
        return await fn();
      } finally {
        phaseSeconds[name] = (phaseSeconds[name] ?? 0) + (performance.now() - t) / 1000;
      }
    };
    // Each rank trains on the groups it generated.
    const perRank: TrainSample[][] = ranks.map(() => []);
    for (const g of groups) {
      const adv = groupAdvantages(g.samples.map((x) => x.reward), G, { stdNormalize: s.advantage.stdNormalize });
      g.samples.forEach((x, i) =>
        perRank[g.rank].push({ promptTokens: g.prompt.tokens, completionTokens: x.tokens, logprobs: x.logprobs, advantage: adv[i] }),
      );
    }
    const plan = planMicroBatches(perRank.map((l) => l.length), s.microBatchSize);
    const norms = globalNormalisers(perRank.flat().map((x) => ({ completionTokens: x.completionTokens.length })));
    const slices = perRank.map((list, r) => plan.ranges[r].map(([b, e]) => list.slice(b, e)));

    let ref: (Float32Array | null)[][] = ranks.map(() => plan.ranges[0].map(() => null));
    if (s.loss.beta > 0) {
      ref = await timed('reference', () =>
        phase('reference_logprobs', { step, micro_batches: plan.microBatches }, () =>
          Promise.all(
            ranks.map(async (r, rank) => {
              const batches = slices[rank].map((mb) => packMicroBatch(mb).microBatch.sequences!);
              const res = await r.trainer.computeLogprobs({ batches, model: LogprobModel.LOGPROB_MODEL_REFERENCE, temperature: s.loss.temperature }, call);
              if (res.logprobs.length !== batches.length) {
                throw new UnavailableError(`rank ${rank} returned reference logprobs for ${res.logprobs.length} of ${batches.length} micro-batches`);
              }
              return res.logprobs.map((t, k) => readF32(t, `reference logprobs of rank ${rank} micro-batch ${k}`));
            }),
          ),
        ),
      );
    }
    const packed: PackedMicroBatch[][] = slices.map((mbs, rank) => mbs.map((mb, k) => packMicroBatch(mb, ref[rank][k])));
    const updates: { parts: LossPart[]; gradNorm: number; lr: number }[] = [];
    for (let u = 0; u < s.mu; u++) {
      const parts: LossPart[] = [];
      for (let k = 0; k < plan.microBatches; k++) {
        checkCancelled();
        const res = await timed('train', () =>
          phase('train_micro_batch', { step, update: u, micro_batch: k, sequences: packed.reduce((a, p) => a + p[k].sequences, 0) }, () =>
            Promise.all(
              ranks.map((r, rank) =>
                r.trainer.trainBatch(
                  { step, microBatches: [packed[rank][k].microBatch], loss: s.loss, globalTokens: norms.globalTokens, globalSequences: norms.globalSequences },
                  call,
                ),
              ),
            ),
          ),
        );
        for (const x of res) {
          const m = x.metrics!;
          parts.push({ loss: m.loss, pgLoss: m.pgLoss, kl: m.kl, entropy: m.entropy, clipFractionLow: m.clipFractionLow, clipFractionHigh: m.clipFractionHigh, tokens: m.tokens });
        }
      }
      const opt = await timed('optimizer', () =>
        phase('optimizer_step', { step, update: u }, () => Promise.all(ranks.map((r) => r.trainer.optimizerStep({ step, adamw: s.optimizer }, call)))),
      );
      updates.push({ parts, gradNorm: opt[0].gradNorm, lr: opt[0].lr });
    }
    return { updates, phaseSeconds };
  }

  async function expertLoads(): Promise<{ layers: number; experts: number; counts: number[] } | null> {
    const res = await Promise.all(ranks.map((r) => r.trainer.getMetrics({}, call)));
    let out: { layers: number; experts: number; counts: number[] } | null = null;
    for (const m of res) {
      if (!m.expertLoad || m.expertLoad.shape.length !== 2) return null;
      const [L, E] = m.expertLoad.shape.map(Number);
      const counts = readI64(m.expertLoad, 'expert_load');
      if (!out) out = { layers: L, experts: E, counts };
      else if (out.layers !== L || out.experts !== E) return null;
      else counts.forEach((c, i) => (out!.counts[i] += c));
    }
    return out;
  }

  let last = start;
  try {
    for (let step = start + 1; step <= s.steps; step++) {
      checkCancelled();
      throwIfCheckpointFailed();
      await phase('step', { 'run.id': o.runId, step }, async () => {
        const t0 = performance.now();
        const prompts = await takePrompts(s.promptsPerStep, false);
        waitingAnnounced = false;
        await event({ type: 'step_started', message: `step ${step}: ${prompts.length} prompt(s)`, step, promptIds: prompts.map((p) => p.id) });
        let offset = 0;
        const first = await rolloutAndScore(step, 0, prompts, offset);
        offset += prompts.length;
        let rolloutS = first.rolloutS;
        let rewardS = first.rewardS;
        let kept = first.groups;
        let filtered = 0;
        if (s.dynamicSampling.enabled) {
          const keep = (gs: Group[]) => {
            const zero = zeroVarianceGroups(gs.flatMap((g) => g.samples.map((x) => x.reward)), G);
            filtered += zero.filter(Boolean).length;
            return gs.filter((_, i) => !zero[i]);
          };
          kept = keep(kept);
          for (let draw = 1; kept.length < s.promptsPerStep && draw <= s.dynamicSampling.maxDraws; draw++) {
            const more = await takePrompts(s.promptsPerStep - kept.length, true);
            if (more.length === 0) break;
            const r = await rolloutAndScore(step, draw, more, offset);
            offset += more.length;
            rolloutS += r.rolloutS;
            rewardS += r.rewardS;
            kept = kept.concat(keep(r.groups));
          }
        }
        checkCancelled();
        const train = kept.length > 0 ? await trainStep(step, kept) : { updates: [], phaseSeconds: {} as Record<string, number> };
        const expertTokens = await expertLoads();
        const phaseSeconds: Record<string, number> = { rollout: rolloutS, reward: rewardS, ...train.phaseSeconds };
        const all = kept.flatMap((g) => g.samples);
        const summarize = () =>
          summarizeStep({
            step,
            rewards: all.map((x) => x.reward),
            components: all.map((x) => x.components),
            accuracyLabel,
            completionLengths: all.map((x) => x.tokens.length),
            updates: train.updates,
            groupsKept: kept.length,
            groupsFiltered: filtered,
            phaseSeconds,
            stepSeconds: (performance.now() - t0) / 1000,
            expertTokens,
          });
        if ((s.checkpointEvery > 0 && step % s.checkpointEvery === 0) || step === s.steps) {
          // The step's own share: waiting for the previous checkpoint's files, and every rank capturing its state.
          const tc = performance.now();
          await startCheckpoint(step, flattenSummary(summarize()));
          phaseSeconds.checkpoint = (performance.now() - tc) / 1000;
        }
        const summary = summarize();
        await deps.events.publishMetrics(o.runId, step, flattenSummary(summary), otelContext.active());
        o.onStep?.(summary);
        trace.getActiveSpan()?.setAttributes({ 'reward.mean': summary.rewardMean, 'groups.kept': kept.length });
      });
      last = step;
    }
    // The last checkpoint's files and commit.
    await settleCheckpoint();
  } catch (err) {
    // A checkpoint being written still commits (and acks what it covers) or hands its prompts back.
    await (writing as CheckpointWrite | null)?.done.catch(() => undefined);
    // Prompts not covered by a checkpoint go back to the queue now rather than after ack_wait.
    nakAll(held);
    throw err;
  } finally {
    heartbeat.stop();
  }
  return { step: last, resumedFrom };
}
