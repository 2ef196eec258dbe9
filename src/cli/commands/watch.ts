// `pilot watch RUN`: a progress bar and each step's metrics from WatchRun (already recorded steps are replayed,
// then live ones follow); exits when the run ends, with code 0 only if it succeeded.
import { appendFile } from 'node:fs/promises';
import type { Command } from 'commander';

import { RunState, type Run, type RunEvent, type StepMetrics } from '../../../proto/gen/pilot/v1/run.ts';
import { connectRunService, type RunClient } from '../../stack/connect.ts';
import { resolveStateDir } from '../../stack/state.ts';

const TERMINAL = new Set([RunState.RUN_STATE_SUCCEEDED, RunState.RUN_STATE_FAILED, RunState.RUN_STATE_CANCELLED]);

export function runStateName(s: RunState): string {
  return (RunState[s] ?? String(s)).replace('RUN_STATE_', '').toLowerCase();
}

export interface FollowHandlers {
  onMetrics?: (m: StepMetrics, totalSteps: number) => void | Promise<void>;
  onEvent?: (e: RunEvent) => void | Promise<void>;
}

/** Follows a run until it ends; resolves with its final state (GetRun after the stream closes). */
export async function followRun(client: RunClient, runId: string, h: FollowHandlers = {}, signal?: AbortSignal): Promise<Run> {
  const first = (await client.getRun({ runId })).run;
  if (!first) throw new Error(`GetRun ${runId} answered without a run`);
  const total = first.config?.steps ?? 0;
  // A stream of a long run lives far beyond the default deadline.
  for await (const u of client.watchRun({ runId, fromStep: 0 }, { timeoutMs: 7 * 24 * 3600_000, signal })) {
    if (u.update?.$case === 'metrics') await h.onMetrics?.(u.update.value, total);
    else if (u.update?.$case === 'event') {
      await h.onEvent?.(u.update.value);
      if (u.update.value.kind === 'state' && TERMINAL.has(u.update.value.state)) break;
    }
  }
  const last = (await client.getRun({ runId })).run;
  if (!last) throw new Error(`GetRun ${runId} answered without a run`);
  return last;
}

export function progressBar(done: number, total: number, width = 24): string {
  const frac = total > 0 ? Math.min(1, done / total) : 0;
  const full = Math.round(frac * width);
  return `[${'#'.repeat(full)}${'.'.repeat(width - full)}] ${String(done).padStart(String(total).length)}/${total}`;
}

export function formatMetrics(m: StepMetrics): string {
  const f = (x: number, d = 3) => (Number.isFinite(x) ? x.toFixed(d) : String(x));
  return (
    `reward ${f(m.rewardMean)}±${f(m.rewardStd)} acc ${f(m.accuracy)} loss ${f(m.loss, 4)} kl ${f(m.kl, 4)} ` +
    `ent ${f(m.entropy)} clip ${f(m.clipFraction)} gnorm ${f(m.gradNorm)} len ${f(m.responseLengthMean, 1)} ` +
    `groups ${m.groupsKept}${m.groupsFiltered ? `(-${m.groupsFiltered})` : ''} ${f(m.stepSeconds, 1)}s`
  );
}

/** One JSON object per step, snake_case like the proto (the metrics JSONL file). */
export function metricsRecord(runId: string, m: StepMetrics): Record<string, unknown> {
  return {
    run_id: runId,
    step: Number(m.step),
    reward_mean: m.rewardMean,
    reward_std: m.rewardStd,
    accuracy: m.accuracy,
    loss: m.loss,
    pg_loss: m.pgLoss,
    kl: m.kl,
    entropy: m.entropy,
    clip_fraction: m.clipFraction,
    grad_norm: m.gradNorm,
    lr: m.lr,
    response_length_mean: m.responseLengthMean,
    tokens: Number(m.tokens),
    groups_kept: m.groupsKept,
    groups_filtered: m.groupsFiltered,
    rollout_seconds: m.rolloutSeconds,
    train_seconds: m.trainSeconds,
    step_seconds: m.stepSeconds,
    ...m.extra,
  };
}

export interface WatchOptions {
  /** Append each step's metrics as a JSON line here. */
  metricsFile?: string;
  /** Rewrite one progress line in place (a terminal) instead of a line per step. */
  tty: boolean;
  write: (text: string) => void;
  /** Called for every event after it is printed (the demo refills the queue on "waiting"). */
  onEvent?: (e: RunEvent) => void | Promise<void>;
  onMetrics?: (m: StepMetrics) => void | Promise<void>;
}

/** The `watch` command's body (also used by `pilot demo`): prints progress, returns the final run. */
export async function watchRun(client: RunClient, runId: string, o: WatchOptions): Promise<Run> {
  let shownBar = false;
  return followRun(client, runId, {
    onMetrics: async (m, total) => {
      if (o.metricsFile) await appendFile(o.metricsFile, JSON.stringify(metricsRecord(runId, m)) + '\n');
      await o.onMetrics?.(m);
      const line = `${progressBar(Number(m.step), total)} ${formatMetrics(m)}`;
      if (o.tty) {
        o.write(`\r\x1b[2K${line}`);
        shownBar = true;
      } else o.write(line + '\n');
    },
    onEvent: async (e) => {
      // Every step announces itself; the progress line already says where the run is.
      if (e.kind === 'step_started') return o.onEvent?.(e);
      if (o.tty && shownBar) o.write('\n');
      shownBar = false;
      o.write(`${e.kind}${e.kind === 'state' ? ` ${runStateName(e.state)}` : ''}${e.message ? `: ${e.message}` : ''}\n`);
      await o.onEvent?.(e);
    },
  }).finally(() => {
    if (o.tty && shownBar) o.write('\n');
  });
}

export function registerWatch(program: Command): void {
  program
    .command('watch')
    .description("follow a run's progress and metrics until it ends")
    .argument('<run>', 'run id')
    .option('--metrics-file <file>', 'also append each step\'s metrics as a JSON line to this file')
    .option('--address <host:port>', 'RunService address (default: the stack "pilot up" started)')
    .action(async (runId: string, opts: { metricsFile?: string; address?: string }) => {
      const client = await connectRunService(resolveStateDir(process.cwd(), process.env), opts.address);
      try {
        const run = await watchRun(client, runId, { metricsFile: opts.metricsFile, tty: Boolean(process.stdout.isTTY), write: (t) => process.stdout.write(t) });
        console.log(`run ${run.id} ${runStateName(run.state)} at step ${run.step}${run.error ? `: ${run.error}` : ''}`);
        if (run.state !== RunState.RUN_STATE_SUCCEEDED) process.exitCode = 1;
      } finally {
        client.close();
      }
    });
}
