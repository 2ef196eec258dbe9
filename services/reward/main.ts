// Entry point of the reward service: the only place that reads flags and the environment.
//   node --import tsx services/reward/main.ts --port 50053 --workers 4 --span-file /tmp/spans.jsonl
import { availableParallelism } from 'node:os';
import { Command } from 'commander';
import { integer, stopOnSignals } from '../common/main-support.ts';
import { createTracing } from '../common/tracing.ts';
import { createRewardServer } from './server.ts';

const env = process.env;
const program = new Command('reward')
  .description('moe-pilot RewardService: verifiable reward scorers over gRPC')
  .option('--host <host>', 'bind address (REWARD_HOST)', env.REWARD_HOST ?? '0.0.0.0')
  .option('--port <port>', 'port, 0 = any free one (REWARD_PORT)', integer(0), Number(env.REWARD_PORT ?? 50053))
  .option('--workers <n>', 'scoring worker threads, 0 = main thread (REWARD_WORKERS)', integer(0),
    Number(env.REWARD_WORKERS ?? Math.max(1, Math.min(4, availableParallelism() - 1))))
  .option('--max-items <n>', 'largest batch per Score call', integer(1), 65536)
  .option('--external-timeout-ms <ms>', 'default deadline of external scorer calls', integer(1), 30000)
  .option('--shutdown-grace-ms <ms>', 'time calls in flight get on shutdown', integer(0), 5000)
  .option('--span-file <path>', 'JSON-lines span file when OTEL_EXPORTER_OTLP_ENDPOINT is unset (PILOT_SPAN_FILE)',
    env.PILOT_SPAN_FILE)
  .parse();

const opts = program.opts<{
  host: string;
  port: number;
  workers: number;
  maxItems: number;
  externalTimeoutMs: number;
  shutdownGraceMs: number;
  spanFile?: string;
}>();

const tracing = createTracing({
  serviceName: env.OTEL_SERVICE_NAME ?? 'reward',
  otlpEndpoint: env.OTEL_EXPORTER_OTLP_ENDPOINT || null,
  spanFile: opts.spanFile || null,
});
const server = createRewardServer(
  { tracer: tracing.tracer },
  {
    host: opts.host,
    port: opts.port,
    workers: opts.workers,
    maxItems: opts.maxItems,
    externalTimeoutMs: opts.externalTimeoutMs,
    shutdownGraceMs: opts.shutdownGraceMs,
    serverCredentials: null,
    clientCredentials: null,
  },
);

const port = await server.start();
// One machine-readable line so launchers (and tests) learn the port when --port 0.
console.log(JSON.stringify({ service: 'reward', event: 'listening', host: opts.host, port, workers: opts.workers }));

stopOnSignals({ service: 'reward' }, () => server.shutdown(), tracing);
