// `pilot down`: stops the stack `pilot up` started from this directory, coordinator first, nats-server last.
import type { Command } from 'commander';

import { resolveStateDir } from '../../stack/state.ts';
import { stopStack } from '../../stack/stack.ts';

export function registerDown(program: Command): void {
  program
    .command('down')
    .description('stop the local stack started by "pilot up"')
    .action(async () => {
      const stateDir = resolveStateDir(process.cwd(), process.env);
      const report = await stopStack(stateDir);
      if (report === null) {
        console.log(`no stack to stop in ${stateDir}`);
        return;
      }
      console.log(`stopped: ${[...report.stopped, ...(report.natsStopped ? ['nats-server'] : [])].join(', ') || 'nothing'}`);
      // A service that was already gone before "down" crashed or was killed: say so, its log tells why.
      if (report.alreadyGone.length) {
        console.log(`already gone before "pilot down" (see ${stateDir}/logs): ${report.alreadyGone.join(', ')}`);
        process.exitCode = 1;
      }
    });
}
