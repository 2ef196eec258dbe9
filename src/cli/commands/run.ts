// `pilot run --config run.yaml`: checks the run file (every problem with its field and line), creates the run on
// the stack's RunService and prints the run id.
import { readFile } from 'node:fs/promises';
import type { Command } from 'commander';

import type { Run } from '../../../proto/gen/pilot/v1/run.ts';
import { connectRunService, type RunClient } from '../../stack/connect.ts';
import { parseRunConfig } from '../../stack/run-config.ts';
import { resolveStateDir } from '../../stack/state.ts';

export async function createRunFromFile(client: RunClient, file: string): Promise<Run> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new Error(`cannot read run config ${file}: ${(err as Error).message}`);
  }
  const config = parseRunConfig(text, file);
  const { run } = await client.createRun({ config });
  if (!run) throw new Error('CreateRun answered without a run');
  return run;
}

export function registerRun(program: Command): void {
  program
    .command('run')
    .description('start a GRPO run from a run.yaml file; prints the run id')
    .requiredOption('--config <file>', 'run.yaml (fields mirror pilot.v1.RunConfig, snake_case)')
    .option('--address <host:port>', 'RunService address (default: the stack "pilot up" started)')
    .option('--json', 'print the created run as JSON')
    .action(async (opts: { config: string; address?: string; json?: boolean }) => {
      const client = await connectRunService(resolveStateDir(process.cwd(), process.env), opts.address);
      try {
        const run = await createRunFromFile(client, opts.config);
        console.log(opts.json ? JSON.stringify(run) : run.id);
      } finally {
        client.close();
      }
    });
}
