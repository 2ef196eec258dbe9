// The `pilot` command line: one entry point, one module per command under src/cli/commands/.
import { Command, CommanderError } from 'commander';

import { registerOracle } from './commands/oracle.ts';

const program = new Command();
program
  .name('pilot')
  .description('moe-pilot: GRPO post-training for Mixture-of-Experts LLMs')
  .showHelpAfterError()
  .exitOverride();
registerOracle(program);

try {
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof CommanderError) process.exit(e.exitCode);
  const err = e as Error;
  console.error(`pilot: ${err.name && err.name !== 'Error' ? `${err.name}: ` : ''}${err.message}`);
  process.exit(1);
}
