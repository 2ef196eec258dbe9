// `pilot up [--ranks N] [--device cuda]`: starts the local stack (nats-server, reward, checkpoint, N ranks, coordinator) as
// background processes and returns; `pilot down` stops it. Logs and state go to the state dir (PILOT_HOME or .pilot/).
import { InvalidArgumentError, type Command } from 'commander';

import { resolveStateDir } from '../../stack/state.ts';
import { isExpertGradDtype, type ExpertGradDtype } from '../../engine/engine.ts';
import { startStack, type Stack } from '../../stack/stack.ts';

export function positiveInt(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError(`${name} must be an integer >= 1, got "${v}"`);
    return n;
  };
}

export interface UpOptions {
  ranks: number;
  /** 'cuda': rank r on GPU r (default 'cpu'). */
  device?: 'cpu' | 'cuda';
  /** With device 'cuda': the routed experts' gradients (default 'float32'). */
  expertGradDtype?: ExpertGradDtype;
  kvBlocks?: number | null;
  /** Committed checkpoints kept per run (default 3). */
  checkpointKeep?: number;
  stateDir: string;
  log: (line: string) => void;
}

/** Brings the stack up and leaves it running after this process exits. */
export async function up(o: UpOptions): Promise<Stack> {
  const stack = await startStack({ log: o.log }, {
    stateDir: o.stateDir,
    ranks: o.ranks,
    device: o.device ?? 'cpu',
    expertGradDtype: o.expertGradDtype ?? 'float32',
    kvBlocks: o.kvBlocks ?? null,
    checkpointKeep: o.checkpointKeep ?? 3,
  });
  stack.detach();
  return stack;
}

export function registerUp(program: Command): void {
  program
    .command('up')
    .description('start the local stack: nats-server, reward, checkpoint, rank services, coordinator')
    .option('--ranks <n>', 'rank services (expert parallel, one process each)', positiveInt('--ranks'), 2)
    .option('--device <device>', "where the ranks train: cpu, or cuda (rank r on GPU r, the group over NCCL)", (v) => {
      if (v !== 'cpu' && v !== 'cuda') throw new InvalidArgumentError(`--device must be cpu or cuda, got "${v}"`);
      return v;
    }, 'cpu')
    .option('--expert-grads <dtype>', "with --device cuda: the routed experts' gradients in float32 or bfloat16 (half their memory, a faster backward)", (v) => {
      if (!isExpertGradDtype(v)) throw new InvalidArgumentError(`--expert-grads must be float32 or bfloat16, got "${v}"`);
      return v;
    }, 'float32')
    .option('--kv-blocks <n>', "KV cache blocks per rank (16 tokens each; default: the rank's)", positiveInt('--kv-blocks'))
    .option('--checkpoint-keep <n>', 'committed checkpoints kept per run (each holds fp32 weights and AdamW moments)', positiveInt('--checkpoint-keep'), 3)
    .option('--json', 'print the stack state as JSON')
    .action(async (opts: { ranks: number; device: 'cpu' | 'cuda'; expertGrads: ExpertGradDtype; kvBlocks?: number; checkpointKeep: number; json?: boolean }) => {
      const stateDir = resolveStateDir(process.cwd(), process.env);
      const stack = await up({
        ranks: opts.ranks,
        device: opts.device,
        expertGradDtype: opts.expertGrads,
        kvBlocks: opts.kvBlocks ?? null,
        checkpointKeep: opts.checkpointKeep,
        stateDir,
        log: opts.json ? () => {} : (l) => console.error(l),
      });
      if (opts.json) console.log(JSON.stringify(stack.state));
      else {
        console.log(`stack up (${stateDir}): RunService at ${stack.runAddress}, logs in ${stateDir}/logs`);
        for (const s of stack.state.services) console.log(`  ${s.name.padEnd(12)} pid ${String(s.pid).padEnd(8)} ${s.address}`);
      }
    });
}
