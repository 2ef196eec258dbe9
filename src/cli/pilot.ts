// The `pilot` command line: one entry point, one module per command under src/cli/commands/.
import { Command, CommanderError } from 'commander';

import { registerOracle } from './commands/oracle.ts';
import { registerUp } from './commands/up.ts';
import { registerDown } from './commands/down.ts';
import { registerRun } from './commands/run.ts';
import { registerSubmit } from './commands/submit.ts';
import { registerWatch } from './commands/watch.ts';
import { registerExport } from './commands/export.ts';
import { registerTrace } from './commands/trace.ts';
import { registerGenerate } from './commands/generate.ts';
import { registerDemo } from './commands/demo.ts';

const program = new Command();
program
  .name('pilot')
  .description('moe-pilot: GRPO post-training for Mixture-of-Experts LLMs')
  .showHelpAfterError()
  .exitOverride();
registerOracle(program);
registerUp(program);
registerDown(program);
registerRun(program);
registerSubmit(program);
registerWatch(program);
registerExport(program);
registerTrace(program);
registerGenerate(program);
registerDemo(program);

try {
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof CommanderError) process.exit(e.exitCode);
  const err = e as Error;
  console.error(`pilot: ${err.name && err.name !== 'Error' ? `${err.name}: ` : ''}${err.message}`);
  process.exit(1);
}
