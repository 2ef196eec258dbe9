// `pilot demo`: the end-to-end demo on CPU (see src/stack/demo-run.ts). Progress goes to stdout; the LAST line is
// one JSON object {"summary": {...}} with the held-out accuracies before and after GRPO and where the metrics,
// traces and exported model are.
import { InvalidArgumentError, type Command } from 'commander';

import { TASK_KINDS, type TaskKind } from '../../demo/task.ts';
import { defaultDemoSettings, runDemoThroughStack, type DemoSettings } from '../../stack/demo-run.ts';
import { resolveStateDir } from '../../stack/state.ts';
import { positiveInt } from './up.ts';

export function registerDemo(program: Command): void {
  const d = defaultDemoSettings();
  program
    .command('demo')
    .description('make a tiny MoE, SFT it, GRPO it through the local service stack, compare held-out accuracy')
    .option('--ranks <n>', 'CPU rank services (expert parallel)', positiveInt('--ranks'), d.ranks)
    .option('--steps <n>', 'GRPO steps', positiveInt('--steps'), d.grpoSteps)
    .option('--sft-steps <n>', 'SFT warm-up steps', (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`--sft-steps must be an integer >= 0, got "${v}"`);
      return n;
    }, d.sftSteps)
    .option('--prompts-per-step <n>', 'prompts (groups) per GRPO step', positiveInt('--prompts-per-step'), d.promptsPerStep)
    .option('--group-size <n>', 'samples per prompt (G)', positiveInt('--group-size'), d.G)
    .option('--held-out <n>', 'held-out prompts evaluated', positiveInt('--held-out'), d.heldOut)
    .option('--kind <kind>', `task: ${TASK_KINDS.join(', ')}`, (v) => {
      if (!TASK_KINDS.includes(v as TaskKind)) throw new InvalidArgumentError(`--kind must be one of ${TASK_KINDS.join(', ')}, got "${v}"`);
      return v;
    }, d.kind)
    .option('--digits <n>', 'digits per prompt (per operand for add)', positiveInt('--digits'), d.digits)
    .option('--seed <n>', 'seed of the task split, model init and sampling', (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`--seed must be an integer >= 0, got "${v}"`);
      return n;
    }, d.seed)
    .option('--dynamic-sampling', 'DAPO dynamic sampling: replace all-equal groups with fresh prompts', d.dynamicSampling)
    .option('--format-penalty', 'add a -1 reward term for completions that are not a well-formed answer', d.formatPenalty)
    .option('--lr <lr>', 'GRPO learning rate', (v) => {
      const n = Number(v);
      if (!(n > 0 && n < 1)) throw new InvalidArgumentError(`--lr must be a number in (0, 1), got "${v}"`);
      return n;
    }, d.grpoLr)
    .action(async (opts: { dynamicSampling: boolean; formatPenalty: boolean; lr: number; ranks: number; steps: number; sftSteps: number; promptsPerStep: number; groupSize: number; heldOut: number; kind: TaskKind; digits: number; seed: number }) => {
      const settings: DemoSettings = {
        ...d,
        ranks: opts.ranks,
        grpoSteps: opts.steps,
        sftSteps: opts.sftSteps,
        promptsPerStep: opts.promptsPerStep,
        G: opts.groupSize,
        heldOut: opts.heldOut,
        kind: opts.kind,
        digits: opts.digits,
        seed: opts.seed,
        dynamicSampling: opts.dynamicSampling,
        formatPenalty: opts.formatPenalty,
        grpoLr: opts.lr,
      };
      const summary = await runDemoThroughStack(
        { log: (l) => console.log(l), tty: Boolean(process.stdout.isTTY), write: (t) => process.stdout.write(t) },
        { settings, stateDir: resolveStateDir(process.cwd(), process.env), stallSeconds: 180 },
      );
      console.log(
        `\nGRPO through the service stack: held-out accuracy ${(100 * summary.sft_accuracy).toFixed(1)}% (SFT) -> ` +
          `${(100 * summary.grpo_accuracy).toFixed(1)}% (GRPO), ${summary.gain_points >= 0 ? '+' : ''}${summary.gain_points} points, ` +
          `${summary.steps} steps on ${summary.ranks} CPU ranks, ${summary.seconds} s\n` +
          `metrics: ${summary.metrics_file}\ntraces:  ${summary.trace_file} (pilot trace ${summary.run_id})\nexport:  ${summary.export_dir}`,
      );
      console.log(JSON.stringify({ summary }));
    });
}
