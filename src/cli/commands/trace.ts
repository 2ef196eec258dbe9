// `pilot trace RUN [--step N]`: the span tree of one training step of a run, with durations, from the JSON-lines
// span files the services write (the stack's traces/spans.jsonl unless --file is given).
import { existsSync } from 'node:fs';
import type { Command } from 'commander';

import { stackPaths } from '../../stack/stack.ts';
import { readStackState, resolveStateDir } from '../../stack/state.ts';
import { formatTrees, readSpanFiles, runsInSpans, stepsOfRun, stepTrees } from '../../stack/trace-tree.ts';

export interface TraceResult {
  step: number;
  steps: number[];
  text: string;
  /** Lines of the span files that could not be read. */
  skipped: number;
}

export async function traceRun(files: readonly string[], runId: string, step?: number): Promise<TraceResult> {
  const missing = files.filter((f) => !existsSync(f));
  if (missing.length) throw new Error(`span file not found: ${missing.join(', ')}`);
  const { spans, issues } = await readSpanFiles(files);
  const steps = stepsOfRun(spans, runId);
  if (steps.length === 0) {
    const runs = runsInSpans(spans);
    throw new Error(`no spans of run "${runId}" in ${files.join(', ')}${runs.length ? `; runs with spans: ${runs.join(', ')}` : ` (${spans.length} spans, none tagged with a run id)`}`);
  }
  const chosen = step ?? steps[steps.length - 1];
  if (!steps.includes(chosen)) throw new Error(`run "${runId}" has no spans for step ${chosen}; steps with spans: ${compactRanges(steps)}`);
  return { step: chosen, steps, text: formatTrees(stepTrees(spans, runId, chosen)), skipped: issues.length };
}

/** "1-5, 8, 10-12" */
export function compactRanges(ns: readonly number[]): string {
  const out: string[] = [];
  for (let i = 0; i < ns.length; ) {
    let j = i;
    while (j + 1 < ns.length && ns[j + 1] === ns[j] + 1) j++;
    out.push(i === j ? `${ns[i]}` : `${ns[i]}-${ns[j]}`);
    i = j + 1;
  }
  return out.join(', ');
}

export function registerTrace(program: Command): void {
  program
    .command('trace')
    .description('print the span tree of a training step of a run, with durations')
    .argument('<run>', 'run id')
    .option('--step <n>', 'step (default: the last one with spans)', (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new Error(`--step must be an integer >= 0, got "${v}"`);
      return n;
    })
    .option('--file <path...>', 'span files (JSON lines); default: the stack\'s traces/spans.jsonl')
    .action(async (runId: string, opts: { step?: number; file?: string[] }) => {
      let files = opts.file;
      if (!files?.length) {
        const stateDir = resolveStateDir(process.cwd(), process.env);
        files = [(await readStackState(stateDir))?.spanFile ?? stackPaths(stateDir).spanFile];
      }
      const r = await traceRun(files, runId, opts.step);
      console.log(`run ${runId} step ${r.step} (steps with spans: ${compactRanges(r.steps)})`);
      console.log(r.text);
      if (r.skipped) console.error(`(${r.skipped} unreadable line${r.skipped > 1 ? 's' : ''} in the span files skipped)`);
    });
}
