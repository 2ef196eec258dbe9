// `pilot submit prompts.jsonl`: queues prompts on a dataset. Bad lines are reported with their line numbers and
// skipped; every good line is submitted, and the exit code is 1 when some line was bad.
import { readFile } from 'node:fs/promises';
import type { Command } from 'commander';

import { connectRunService, type RunClient } from '../../stack/connect.ts';
import { parsePromptsJsonl, type PromptLineIssue } from '../../stack/prompts-file.ts';
import { resolveStateDir } from '../../stack/state.ts';

export interface SubmitResult {
  accepted: number;
  acceptedIds: string[];
  queueLength: number;
  issues: PromptLineIssue[];
}

/** Prompts per SubmitPrompts call: bounded messages, and a failure loses at most one batch's progress report. */
const BATCH = 512;

export async function submitPromptsFile(client: RunClient, file: string, dataset: string): Promise<SubmitResult> {
  const parsed = parsePromptsJsonl(await readFile(file, 'utf8'));
  const result: SubmitResult = { accepted: 0, acceptedIds: [], queueLength: 0, issues: parsed.issues };
  for (let i = 0; i < parsed.prompts.length; i += BATCH) {
    const batch = parsed.prompts.slice(i, i + BATCH);
    let res;
    try {
      res = await client.submitPrompts({ dataset, prompts: batch });
    } catch (err) {
      throw new Error(
        `submitting lines ${parsed.lines[i]}..${parsed.lines[i + batch.length - 1]} of ${file} failed after ${result.accepted} prompts were accepted: ${(err as Error).message}`,
      );
    }
    result.accepted += res.acceptedIds.length;
    result.acceptedIds.push(...res.acceptedIds);
    result.queueLength = res.queueLength;
  }
  return result;
}

export function registerSubmit(program: Command): void {
  program
    .command('submit')
    .description('queue prompts from a JSON-lines file ({prompt|text|messages, answer, metadata} per line)')
    .argument('<file>', 'prompts.jsonl')
    .option('--dataset <name>', 'queue to add them to (a run reads the dataset its config names)', 'default')
    .option('--address <host:port>', 'RunService address (default: the stack "pilot up" started)')
    .action(async (file: string, opts: { dataset: string; address?: string }) => {
      const client = await connectRunService(resolveStateDir(process.cwd(), process.env), opts.address);
      try {
        const r = await submitPromptsFile(client, file, opts.dataset);
        for (const issue of r.issues) console.error(`${file}:${issue.line}: ${issue.message}`);
        console.log(`submitted ${r.accepted} prompts to dataset "${opts.dataset}" (queue length ${r.queueLength})` + (r.issues.length ? `; ${r.issues.length} bad line${r.issues.length > 1 ? 's' : ''} skipped` : ''));
        if (r.issues.length) process.exitCode = 1;
      } finally {
        client.close();
      }
    });
}
