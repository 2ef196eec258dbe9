// The prompt queue without gRPC: how fast createPromptQueue().submit persists prompts in JetStream
// from one Node process, with and without the two JetStream API calls (`pending()`) that
// RunService.SubmitPrompts makes after every submit. Separates the queue's cost from the
// coordinator's, for the SubmitPrompts measurements in bench/results/.
//   node --import tsx loadtest/queue-bench.ts nats://127.0.0.1:4222 [--batch 100] [--concurrency 16] [--seconds 5] [--out f.json]
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { loadavg } from 'node:os';
import { connect } from '@nats-io/transport-node';
import { createPromptQueue } from '../services/common/nats/prompt-queue.ts';
import { summarize, roundSummary } from './stats.ts';

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: { batch: { type: 'string', default: '100' }, concurrency: { type: 'string', default: '16' }, seconds: { type: 'string', default: '5' }, out: { type: 'string' } },
});
const url = positionals[0];
if (!url) throw new Error('usage: queue-bench.ts <nats-url> [--batch N] [--concurrency N] [--seconds S]');
const batch = Number(values.batch);
const concurrency = Number(values.concurrency);
const seconds = Number(values.seconds);

const nc = await connect({ servers: url });
const tag = `qb${Date.now().toString(36)}`;
const results = [];
for (const withPending of [false, true]) {
  const queue = await createPromptQueue({ nc }, { queue: `${tag}-${withPending ? 'p' : 'n'}`, consumer: `${tag}-${withPending ? 'p' : 'n'}` });
  const latencies: number[] = [];
  let prompts = 0;
  let n = 0;
  const end = performance.now() + seconds * 1000;
  const t0 = performance.now();
  const loadBefore = loadavg()[0]!;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < end) {
        const call = n++;
        const start = performance.now();
        const res = await queue.submit(Array.from({ length: batch }, (_, k) => ({ id: `${tag}-${call}-${k}`, text: `What is ${call} + ${k}?`, reference: String(call + k) })));
        if (withPending) await queue.pending();
        latencies.push(performance.now() - start);
        prompts += res.accepted.length;
      }
    }),
  );
  const s = (performance.now() - t0) / 1000;
  const r = { withPending, batch, concurrency, promptsPerS: Math.round(prompts / s), callsPerS: Math.round((latencies.length / s) * 10) / 10, latencyMs: roundSummary(summarize(latencies)), loadAvg1: [loadBefore, loadavg()[0]] };
  results.push(r);
  console.log(JSON.stringify(r));
}
await nc.close();
if (values.out) {
  const command = ['node', '--import', 'tsx', 'loadtest/queue-bench.ts', ...process.argv.slice(2)].join(' ');
  writeFileSync(values.out, JSON.stringify({ command, results }, null, 1) + '\n');
}
