// The public RunService: queue prompts, start GRPO runs on the ranks, follow and cancel them. Runs are recorded
// on NATS (run-store.ts), so a coordinator restarted after a crash picks up the runs that were running and
// resumes each from its latest checkpoint (the loop does the restoring).
import { randomBytes } from 'node:crypto';
import { SpanStatusCode, type Tracer } from '@opentelemetry/api';
import {
  CancelledError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  ResourceExhaustedError,
  UnavailableError,
} from '../common/errors.ts';
import type { PromiseClient } from '../common/grpc-client.ts';
import type { ServiceImpl } from '../common/grpc-server.ts';
import { normalizePrompt, type PromptInput, type PromptQueue } from '../common/nats/prompt-queue.ts';
import type { RunEventRecord, RunEvents, StepMetricsRecord } from '../common/nats/run-events.ts';
import type { RewardServiceService } from '../../proto/gen/pilot/v1/reward.ts';
import {
  RunServiceService,
  RunState,
  type Prompt,
  type Run,
  type StepMetrics,
  type WatchRunResponse,
} from '../../proto/gen/pilot/v1/run.ts';
import type { Tokenizer } from '../../src/tokenizer/index.ts';
import type { StepSummary } from './algo/metrics.ts';
import { runGrpoLoop, type GrpoLoopDeps, type RankClients } from './grpo-loop.ts';
import { resolveRunConfig, settingsToConfig, type RunSettings } from './run-config.ts';
import type { RunStore } from './run-store.ts';
import type { CheckpointServiceService } from '../../proto/gen/pilot/v1/checkpoint.ts';

/** What the run store keeps per run. */
export interface RunRecord {
  id: string;
  settings: RunSettings;
  state: RunState;
  step: number;
  error: string;
  lastMetrics: StepMetrics | null;
  latestCheckpointId: string;
  createdUnixMs: number;
  updatedUnixMs: number;
}

export interface RunServiceDeps {
  ranks: readonly RankClients[];
  reward: PromiseClient<typeof RewardServiceService>;
  checkpoint: PromiseClient<typeof CheckpointServiceService>;
  events: RunEvents;
  runs: RunStore<RunRecord>;
  /** The prompt queue of a dataset (created on first use). */
  queueFor(dataset: string): Promise<PromptQueue>;
  loadTokenizer(modelDir: string): Promise<Tokenizer>;
  tracer: Tracer;
  log?: (record: Record<string, unknown>) => void;
}

export interface RunServiceConfig {
  /**
   * Prompts being persisted (published, ack not yet back) at most, over all SubmitPrompts calls; a call
   * that would go past it is refused at once with RESOURCE_EXHAUSTED and queues nothing, so overload
   * shows as fast refusals the client retries (ids de-duplicate) instead of an unbounded queue in
   * this process. A call is always let through when nothing is in flight, so any batch up to
   * maxPromptsPerSubmit can make progress. Size it as throughput x the queueing delay you accept
   * (about 20000 prompts/s x 0.05 s here). Default 1000.
   */
  maxPromptsInFlight?: number;
  /** SubmitPrompts answers queue_length from a count at most this old (ms); 0 asks NATS on every call. Default 250. */
  queueLengthMaxAgeMs?: number;
  takeTimeoutMs: number;
  callTimeoutMs: number;
  /** Deadline of LoadModel on the ranks. */
  loadTimeoutMs: number;
  maxPromptsPerSubmit: number;
}

export interface RunServiceHandle {
  impl: ServiceImpl<typeof RunServiceService>;
  /** Restarts the runs the store says were running (after a coordinator crash or restart). */
  resumeRuns(): Promise<string[]>;
  /** Stops driving runs (they stay RUNNING in the store, so the next coordinator resumes them). */
  close(): Promise<void>;
}

const TERMINAL = new Set([RunState.RUN_STATE_SUCCEEDED, RunState.RUN_STATE_FAILED, RunState.RUN_STATE_CANCELLED]);
const ROLES = new Set(['system', 'user', 'assistant', 'tool']);

/** A proto Prompt as the queue's input; throws InvalidArgumentError naming prompts[i].<field>. */
export function promptInput(p: Prompt, i: number): PromptInput {
  const field = `prompts[${i}]`;
  if (!p.input) throw new InvalidArgumentError(`${field}.input`, 'set text or messages');
  let text: string;
  const metadata: Record<string, unknown> = { ...p.metadata };
  if (p.input.$case === 'text') {
    text = p.input.value;
  } else {
    const msgs = p.input.value.messages;
    if (msgs.length === 0) throw new InvalidArgumentError(`${field}.messages`, 'is empty');
    msgs.forEach((m, k) => {
      if (!ROLES.has(m.role)) throw new InvalidArgumentError(`${field}.messages[${k}].role`, `must be one of ${[...ROLES].join(', ')}, got "${m.role}"`);
      if (m.content.trim() === '') throw new InvalidArgumentError(`${field}.messages[${k}].content`, 'is empty');
    });
    const lastUser = [...msgs].reverse().find((m) => m.role === 'user');
    if (!lastUser) throw new InvalidArgumentError(`${field}.messages`, 'has no user message');
    text = lastUser.content;
    metadata.messages = msgs.map((m) => ({ role: m.role, content: m.content }));
  }
  const input: PromptInput = { text, reference: p.referenceAnswer === '' ? null : p.referenceAnswer, metadata };
  if (p.id !== '') input.id = p.id;
  try {
    normalizePrompt(input);
  } catch (err) {
    throw new InvalidArgumentError(field, (err as Error).message);
  }
  return input;
}

function toRun(r: RunRecord): Run {
  return {
    id: r.id,
    config: settingsToConfig(r.settings),
    state: r.state,
    step: r.step,
    error: r.error,
    lastMetrics: r.lastMetrics ?? undefined,
    latestCheckpointId: r.latestCheckpointId,
    createdUnixMs: r.createdUnixMs,
    updatedUnixMs: r.updatedUnixMs,
  };
}

const SUMMARY_FIELDS: (keyof Omit<StepSummary, 'extra' | 'step'>)[] = [
  'rewardMean', 'rewardStd', 'accuracy', 'loss', 'pgLoss', 'kl', 'entropy', 'clipFraction', 'gradNorm', 'lr',
  'responseLengthMean', 'tokens', 'groupsKept', 'groupsFiltered', 'rolloutSeconds', 'trainSeconds', 'stepSeconds',
];
const snake = (k: string) => k.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase());

/** A NATS metrics record (flattenSummary's names) as a StepMetrics message. */
export function metricsToProto(rec: StepMetricsRecord): StepMetrics {
  const m = { ...rec.metrics };
  const out = { step: rec.step, extra: {} as Record<string, number> } as StepMetrics;
  for (const f of SUMMARY_FIELDS) {
    const v = m[snake(f)];
    delete m[snake(f)];
    (out as unknown as Record<string, number>)[f] = v ?? NaN;
  }
  for (const [k, v] of Object.entries(m)) out.extra[k] = v ?? NaN;
  return out;
}

function summaryToProto(s: StepSummary): StepMetrics {
  return { ...s, extra: { ...s.extra } };
}

export function eventToProto(e: RunEventRecord, unixMs: number): WatchRunResponse {
  return {
    update: {
      $case: 'event',
      value: {
        kind: e.type,
        message: typeof e.message === 'string' ? e.message : '',
        state: typeof e.state === 'number' ? e.state : RunState.RUN_STATE_UNSPECIFIED,
        step: typeof e.step === 'number' ? e.step : 0,
        unixMs,
      },
    },
  };
}

export function createRunService(deps: RunServiceDeps, config: RunServiceConfig): RunServiceHandle {
  const active = new Map<string, { controller: AbortController; done: Promise<void> }>();
  let closing = false;
  const log = deps.log ?? (() => undefined);

  async function update(id: string, patch: Partial<RunRecord>): Promise<RunRecord> {
    return deps.runs.update(id, (cur) => ({ ...cur, ...patch, updatedUnixMs: Date.now() }));
  }

  async function setState(id: string, state: RunState, message: string, extra: Partial<RunRecord> = {}) {
    const r = await update(id, { ...extra, state });
    await deps.events.publishEvent(id, { type: 'state', state, message, step: r.step });
    return r;
  }

  async function loadModel(s: RunSettings): Promise<void> {
    await Promise.all(
      deps.ranks.map((r, rank) =>
        r.trainer.loadModel({ modelDir: s.modelDir, dtype: s.dtype, seed: s.seed, keepReference: s.loss.beta > 0 }, { timeoutMs: config.loadTimeoutMs }).catch((err: Error) => {
          throw Object.assign(err, { message: `rank ${rank}: LoadModel: ${err.message}` });
        }),
      ),
    );
  }

  function drive(id: string): void {
    const controller = new AbortController();
    const done = (async () => {
      const record = deps.runs.get(id)!;
      const s = record.settings;
      await deps.tracer.startActiveSpan('run', { attributes: { 'run.id': id, 'run.steps': s.steps } }, async (span) => {
        try {
          const [tokenizer, queue] = await Promise.all([deps.loadTokenizer(s.modelDir), deps.queueFor(s.dataset)]);
          const loopDeps: GrpoLoopDeps = { ...deps, queue, tokenizer };
          const res = await runGrpoLoop(loopDeps, {
            runId: id,
            settings: s,
            signal: controller.signal,
            takeTimeoutMs: config.takeTimeoutMs,
            callTimeoutMs: config.callTimeoutMs,
            onStep: (m) => void update(id, { step: m.step, lastMetrics: summaryToProto(m) }).catch((err) => log({ event: 'run_store_error', error: String(err) })),
            onCheckpoint: (c) => void update(id, { latestCheckpointId: c.id }).catch((err) => log({ event: 'run_store_error', error: String(err) })),
          });
          await setState(id, RunState.RUN_STATE_SUCCEEDED, `finished ${res.step} step(s)`, { step: res.step });
        } catch (err) {
          if (closing) return; // the process is stopping: the run stays RUNNING for the next coordinator
          span.recordException(err as Error);
          span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message });
          if (err instanceof CancelledError || controller.signal.aborted) {
            await setState(id, RunState.RUN_STATE_CANCELLED, String(controller.signal.reason ?? 'cancelled'));
          } else {
            log({ event: 'run_failed', runId: id, error: (err as Error).stack ?? String(err) });
            await setState(id, RunState.RUN_STATE_FAILED, (err as Error).message, { error: (err as Error).message });
          }
        } finally {
          span.end();
        }
      });
    })().catch((err) => log({ event: 'run_driver_error', runId: id, error: String(err) })).finally(() => active.delete(id));
    active.set(id, { controller, done });
  }

  const maxPromptsInFlight = config.maxPromptsInFlight ?? 1000;
  const queueLengthMaxAgeMs = config.queueLengthMaxAgeMs ?? 250;
  let promptsInFlight = 0;
  // Per dataset: the last queue length read from JetStream (two API calls per read), when, and the prompts
  // this process queued since; the answer is the read count plus those, so a submitter sees its own
  // prompts counted even within the cache's age (prompts taken since are not subtracted until the next read).
  const queueLengths = new Map<string, { at: number; value: Promise<number>; addedSince: number }>();
  async function queueLength(dataset: string, queue: PromptQueue, added: number): Promise<number> {
    const cached = queueLengths.get(dataset);
    if (cached && Date.now() - cached.at <= queueLengthMaxAgeMs) {
      cached.addedSince += added;
      return (await cached.value) + cached.addedSince;
    }
    const value = queue.pending().then((c) => c.waiting + c.leased);
    value.catch(() => queueLengths.delete(dataset));
    queueLengths.set(dataset, { at: Date.now(), value, addedSince: 0 });
    return value;
  }

  const impl: ServiceImpl<typeof RunServiceService> = {
    async submitPrompts(req, ctx) {
      const dataset = req.dataset === '' ? 'default' : req.dataset;
      if (!/^[A-Za-z0-9_-]+$/.test(dataset)) throw new InvalidArgumentError('dataset', `"${dataset}" may only contain letters, digits, "_" and "-"`);
      if (req.prompts.length === 0) throw new InvalidArgumentError('prompts', 'is empty');
      if (req.prompts.length > config.maxPromptsPerSubmit) {
        throw new InvalidArgumentError('prompts', `at most ${config.maxPromptsPerSubmit} prompts per call, got ${req.prompts.length}`);
      }
      // Every prompt is checked before any is queued: a bad one rejects the call and queues nothing of it.
      const inputs = req.prompts.map(promptInput);
      const queue = await deps.queueFor(dataset);
      if (promptsInFlight > 0 && promptsInFlight + inputs.length > maxPromptsInFlight) {
        throw new ResourceExhaustedError(
          `${promptsInFlight} prompts are being queued (limit ${maxPromptsInFlight}); nothing of this call was queued, retry after a backoff`,
        );
      }
      // A call whose client already gave up (deadline, cancel) must not spend the queue's capacity.
      if (ctx.signal.aborted) throw new CancelledError('the call ended before its prompts were queued; nothing was queued');
      promptsInFlight += inputs.length;
      let res: Awaited<ReturnType<PromptQueue['submit']>>;
      try {
        res = await queue.submit(inputs);
      } finally {
        promptsInFlight -= inputs.length;
      }
      if (res.rejected.length > 0) {
        const r = res.rejected[0];
        const msg = `prompts[${r.index}]: ${r.error}` + (res.accepted.length > 0 ? ` (${res.accepted.length} other prompt(s) were queued; submitting again is safe)` : '');
        if (r.retryable) throw new UnavailableError(msg);
        throw new InvalidArgumentError(`prompts[${r.index}]`, r.error);
      }
      const added = res.accepted.filter((a) => !a.duplicate).length;
      return { acceptedIds: res.accepted.sort((a, b) => a.index - b.index).map((a) => a.id), queueLength: await queueLength(dataset, queue, added) };
    },

    async createRun(req) {
      const settings = await resolveRunConfig(req.config, deps.ranks.length);
      // The reward service validates the spec (scorer names, params) even for an empty batch.
      try {
        await deps.reward.score({ items: [], spec: settings.reward }, { timeoutMs: 10_000 });
      } catch (err) {
        if (err instanceof InvalidArgumentError) throw new InvalidArgumentError('config.reward', err.message.replace(/^Score: /, ''));
        throw err;
      }
      const busy = [...active.keys()];
      if (busy.length > 0) throw new FailedPreconditionError(`run ${busy[0]} is running; the ranks hold one model at a time (cancel it first)`);
      const id = `${settings.name}-${randomBytes(4).toString('hex')}`;
      const now = Date.now();
      await deps.runs.put({
        id, settings, state: RunState.RUN_STATE_PENDING, step: 0, error: '', lastMetrics: null, latestCheckpointId: '', createdUnixMs: now, updatedUnixMs: now,
      });
      await deps.events.publishEvent(id, { type: 'state', state: RunState.RUN_STATE_PENDING, message: 'created', step: 0 });
      try {
        await loadModel(settings);
      } catch (err) {
        await setState(id, RunState.RUN_STATE_FAILED, (err as Error).message, { error: (err as Error).message });
        throw err;
      }
      const run = await setState(id, RunState.RUN_STATE_RUNNING, 'model loaded on every rank');
      drive(id);
      return { run: toRun(run) };
    },

    async getRun(req) {
      const r = deps.runs.get(req.runId);
      if (!r) throw new NotFoundError(`no run "${req.runId}"`);
      return { run: toRun(r) };
    },

    async *watchRun(req, ctx) {
      const r = deps.runs.get(req.runId);
      if (!r) throw new NotFoundError(`no run "${req.runId}"`);
      const watch = await deps.events.watch(req.runId);
      const stop = () => watch.stop();
      ctx.signal.addEventListener('abort', stop, { once: true });
      try {
        for await (const rec of watch) {
          if (rec.kind === 'metrics') {
            const m = rec.data as StepMetricsRecord;
            if (m.step >= req.fromStep) yield { update: { $case: 'metrics', value: metricsToProto(m) } };
            continue;
          }
          const e = rec.data as RunEventRecord;
          yield eventToProto(e, rec.time.getTime());
          if (e.type === 'state' && TERMINAL.has(e.state as RunState)) return;
        }
      } finally {
        ctx.signal.removeEventListener('abort', stop);
        watch.stop();
      }
    },

    async cancelRun(req) {
      const r = deps.runs.get(req.runId);
      if (!r) throw new NotFoundError(`no run "${req.runId}"`);
      if (TERMINAL.has(r.state)) throw new FailedPreconditionError(`run ${req.runId} already ended (${RunState[r.state]})`);
      const a = active.get(req.runId);
      if (a) {
        a.controller.abort(req.reason || 'cancelled by the user');
        await a.done;
      } else {
        await setState(req.runId, RunState.RUN_STATE_CANCELLED, req.reason || 'cancelled by the user');
      }
      return { run: toRun(deps.runs.get(req.runId)!) };
    },

    async listRuns(req) {
      const all = deps.runs
        .list()
        .filter((r) => req.state === RunState.RUN_STATE_UNSPECIFIED || r.state === req.state)
        .sort((a, b) => a.createdUnixMs - b.createdUnixMs || (a.id < b.id ? -1 : 1));
      const start = req.pageToken === '' ? 0 : Number(req.pageToken);
      if (!Number.isInteger(start) || start < 0) throw new InvalidArgumentError('page_token', `"${req.pageToken}" is not a token this service gave out`);
      const size = req.pageSize === 0 ? 100 : Math.min(req.pageSize, 1000);
      const page = all.slice(start, start + size);
      return { runs: page.map(toRun), nextPageToken: start + size < all.length ? String(start + size) : '' };
    },
  };

  return {
    impl,
    async resumeRuns() {
      const resumed: string[] = [];
      for (const r of deps.runs.list()) {
        if (r.state !== RunState.RUN_STATE_RUNNING && r.state !== RunState.RUN_STATE_PENDING) continue;
        if (active.size > 0) {
          await setState(r.id, RunState.RUN_STATE_FAILED, 'another run was resumed first; the ranks hold one model at a time', { error: 'not resumed' });
          continue;
        }
        try {
          await loadModel(r.settings);
        } catch (err) {
          await setState(r.id, RunState.RUN_STATE_FAILED, `resume failed: ${(err as Error).message}`, { error: (err as Error).message });
          continue;
        }
        await setState(r.id, RunState.RUN_STATE_RUNNING, 'coordinator restarted; resuming from the latest checkpoint');
        drive(r.id);
        resumed.push(r.id);
      }
      return resumed;
    },
    async close() {
      closing = true;
      for (const a of active.values()) a.controller.abort('coordinator stopping');
      await Promise.all([...active.values()].map((a) => a.done));
    },
  };
}
