// gRPC load generator CLI: the only place of loadtest/ that reads flags.
//   node --import tsx loadtest/main.ts --address 127.0.0.1:50051 --target submit --mode open --rate 200 --batch 50 \
//     --duration 10 --out bench/results/loadtest-submit.json --html bench/results/loadtest-submit.html
// A comma-separated --rate or --concurrency runs one load step per value, one after the other, into one report.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { Command, InvalidArgumentError as CliError, Option } from 'commander';
import { LOAD_DEFAULTS, runLoad, type LoadResult } from './load.ts';
import { renderHtml, summaryLine } from './report.ts';
import { checkQueue, type QueueCheck } from './verify-queue.ts';
import { TARGET_DEFAULTS, TARGET_KINDS, type TargetKind, type TargetOptions } from './targets.ts';

function number(min: number, integer: boolean) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
      throw new CliError(`expected ${integer ? 'an integer' : 'a number'} >= ${min}, got "${value}"`);
    }
    return n;
  };
}

function list(min: number, integer: boolean) {
  const one = number(min, integer);
  return (value: string): number[] => value.split(',').map((v) => one(v.trim()));
}

const program = new Command('loadtest')
  .description('moe-pilot gRPC load generator (loopback only)')
  .requiredOption('--address <host:port>', 'server address on loopback')
  .addOption(new Option('--target <kind>', 'RPC under load').choices(TARGET_KINDS as string[]).makeOptionMandatory())
  .addOption(new Option('--mode <mode>', 'open = fixed call rate, closed = fixed concurrency').choices(['open', 'closed']).default('closed'))
  .option('--rate <calls/s,...>', 'open loop: calls per second (a list runs several steps)', list(0.001, false))
  .option('--concurrency <n,...>', 'closed loop: calls in flight (a list runs several steps)', list(1, true))
  .option('--duration <s>', 'seconds of sending per step', number(0.1, false), LOAD_DEFAULTS.durationMs / 1000)
  .option('--count <n>', 'calls at most per step', number(1, true))
  .option('--workers <n>', 'worker threads', number(1, true), LOAD_DEFAULTS.workers)
  .option('--timeout-ms <ms>', 'deadline of each call', number(1, true), LOAD_DEFAULTS.callTimeoutMs)
  .option('--max-in-flight <n>', 'open loop: calls in flight at most before due calls are skipped', number(1, true), LOAD_DEFAULTS.maxInFlight)
  .option('--batch <n>', 'prompts (submit, generate) or items (score) per call', number(1, true), 1)
  .option('--dataset <name>', 'submit: prompt queue', TARGET_DEFAULTS.submit.dataset)
  .option('--prompt-chars <n>', 'submit: characters per prompt', number(16, true), TARGET_DEFAULTS.submit.promptChars)
  .option('--prompt-tokens <ids>', 'generate: prompt token ids, comma-separated', list(0, true), TARGET_DEFAULTS.generate.promptTokenIds)
  .option('--prompt-text <text>', 'generate: prompt text (the rank tokenises it) instead of token ids')
  .option('--chat-template', 'generate: apply the model chat template to --prompt-text', false)
  .option('--n <n>', 'generate: samples per prompt', number(1, true), TARGET_DEFAULTS.generate.n)
  .option('--max-new-tokens <n>', 'generate: tokens per sample at most', number(1, true), TARGET_DEFAULTS.generate.maxNewTokens)
  .option('--temperature <t>', 'generate: sampling temperature', number(0, false), TARGET_DEFAULTS.generate.temperature)
  .option('--seed <n>', 'generate: seed of call 0 (call i uses seed + i)', number(0, true), TARGET_DEFAULTS.generate.seed)
  .option('--scorer <name>', 'score: scorer name', TARGET_DEFAULTS.score.scorer)
  .option('--verify-nats <url>', 'submit: afterwards, check every accepted prompt is in the JetStream stream (use a fresh --dataset)')
  .option('--out <file.json>', 'write the JSON report here')
  .option('--html <file.html>', 'write the HTML report (inline SVG plots) here')
  .option('--title <text>', 'report title')
  .parse();

const o = program.opts<{
  address: string;
  target: TargetKind;
  mode: 'open' | 'closed';
  rate?: number[];
  concurrency?: number[];
  duration: number;
  count?: number;
  workers: number;
  timeoutMs: number;
  maxInFlight: number;
  batch: number;
  dataset: string;
  promptChars: number;
  promptTokens: number[];
  promptText?: string;
  chatTemplate: boolean;
  n: number;
  maxNewTokens: number;
  temperature: number;
  seed: number;
  scorer: string;
  verifyNats?: string;
  out?: string;
  html?: string;
  title?: string;
}>();

const target: TargetOptions =
  o.target === 'submit'
    ? { kind: 'submit', dataset: o.dataset, batch: o.batch, promptChars: o.promptChars }
    : o.target === 'generate'
      ? {
          kind: 'generate',
          promptTokenIds: o.promptTokens,
          promptText: o.promptText ?? null,
          applyChatTemplate: o.chatTemplate,
          batch: o.batch,
          n: o.n,
          maxNewTokens: o.maxNewTokens,
          temperature: o.temperature,
          seed: o.seed,
        }
      : { kind: 'score', batch: o.batch, scorer: o.scorer };

const steps = o.mode === 'open' ? o.rate : o.concurrency;
if (!steps) program.error(o.mode === 'open' ? 'error: open loop needs --rate' : 'error: closed loop needs --concurrency');

const runs: LoadResult[] = [];
for (const value of steps!) {
  const result = await runLoad({
    address: o.address,
    target,
    mode: o.mode,
    rate: o.mode === 'open' ? value : null,
    concurrency: o.mode === 'closed' ? value : null,
    durationMs: Math.round(o.duration * 1000),
    maxCalls: o.count ?? null,
    workers: o.workers,
    callTimeoutMs: o.timeoutMs,
    connectTimeoutMs: LOAD_DEFAULTS.connectTimeoutMs,
    maxInFlight: o.maxInFlight,
  });
  runs.push(result);
  console.log(summaryLine(result));
}

// Every step submits to the same dataset, so the check compares the total accepted with what is stored.
let queueCheck: QueueCheck | null = null;
if (o.verifyNats) {
  if (o.target !== 'submit') program.error('error: --verify-nats applies to --target submit');
  queueCheck = await checkQueue(o.verifyNats, o.dataset, runs.reduce((s, r) => s + r.units, 0));
  console.log(`queue check: ${queueCheck.accepted} accepted, ${queueCheck.stored} stored on ${queueCheck.subject}: ${queueCheck.ok ? 'none lost' : 'LOST PROMPTS'}`);
}

const command = ['node', '--import', 'tsx', 'loadtest/main.ts', ...process.argv.slice(2)].join(' ');
const title = o.title ?? `${o.target} load on ${o.address}`;
if (o.out) {
  mkdirSync(dirname(o.out), { recursive: true });
  writeFileSync(o.out, JSON.stringify({ title, command, queueCheck, runs }, null, 1) + '\n');
}
if (o.html) {
  mkdirSync(dirname(o.html), { recursive: true });
  const pages = runs.map((r) => renderHtml(r, `${title}: ${r.mode === 'open' ? `rate ${r.rate}/s` : `concurrency ${r.concurrency}`}`));
  // One page: the bodies of each step's page one after the other.
  const body = pages.map((p) => p.slice(p.indexOf('<body>') + 6, p.lastIndexOf('</body>'))).join('<hr>');
  writeFileSync(o.html, pages[0]!.slice(0, pages[0]!.indexOf('<body>') + 6) + `<p><code>${command.replace(/&/g, '&amp;').replace(/</g, '&lt;')}</code></p>` + body + '</body></html>\n');
}
if (queueCheck && !queueCheck.ok) process.exitCode = 1;
