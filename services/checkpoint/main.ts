// Entry point of the checkpoint service: the only place that reads flags and the environment.
//   node --import tsx services/checkpoint/main.ts --root /data/checkpoints --port 50054 --keep 3
import { Command } from 'commander';
import { integer, stopOnSignals } from '../common/main-support.ts';
import { createTracing } from '../common/tracing.ts';
import { availableParallelism } from 'node:os';
import { createHashPool } from '../common/hash-pool.ts';
import { createCheckpointServer } from './server.ts';

const env = process.env;
const program = new Command('checkpoint')
  .description('moe-pilot CheckpointService: sharded, verified checkpoints of runs')
  .option('--root <dir>', 'where checkpoints live, one folder per run (CHECKPOINT_ROOT)', env.CHECKPOINT_ROOT)
  .option('--host <host>', 'bind address (CHECKPOINT_HOST)', env.CHECKPOINT_HOST ?? '0.0.0.0')
  .option('--port <port>', 'port, 0 = any free one (CHECKPOINT_PORT)', integer(0), Number(env.CHECKPOINT_PORT ?? 50054))
  .option('--keep <n>', 'committed checkpoints kept per run (CHECKPOINT_KEEP)', integer(1), Number(env.CHECKPOINT_KEEP ?? 3))
  .option('--hash-threads <n>', 'threads hashing shard files, one file each (CHECKPOINT_HASH_THREADS; default: the cores, at most 8)',
    integer(1), Number(env.CHECKPOINT_HASH_THREADS ?? Math.min(8, availableParallelism())))
  .option('--shutdown-grace-ms <ms>', 'time calls in flight get on shutdown', integer(0), 5000)
  .option('--span-file <path>', 'JSON-lines span file when OTEL_EXPORTER_OTLP_ENDPOINT is unset (PILOT_SPAN_FILE)',
    env.PILOT_SPAN_FILE)
  .parse();

const opts = program.opts<{
  root?: string;
  host: string;
  port: number;
  keep: number;
  hashThreads: number;
  shutdownGraceMs: number;
  spanFile?: string;
}>();
if (!opts.root) program.error('error: the checkpoint root is required (--root or CHECKPOINT_ROOT)');

const tracing = createTracing({
  serviceName: env.OTEL_SERVICE_NAME ?? 'checkpoint',
  otlpEndpoint: env.OTEL_EXPORTER_OTLP_ENDPOINT || null,
  spanFile: opts.spanFile || null,
});
const hashPool = createHashPool(opts.hashThreads);
const server = await createCheckpointServer(
  {
    tracer: tracing.tracer,
    hashFile: (path) => hashPool.hashFile(path),
    onWarning: (message, err) => console.error(JSON.stringify({ service: 'checkpoint', event: 'warning', message, error: String(err) })),
  },
  {
    root: opts.root!,
    keepLast: opts.keep,
    host: opts.host,
    port: opts.port,
    shutdownGraceMs: opts.shutdownGraceMs,
    serverCredentials: null,
  },
);
const port = await server.start();
console.log(JSON.stringify({ service: 'checkpoint', event: 'listening', host: opts.host, port, root: opts.root }));

stopOnSignals({ service: 'checkpoint' }, async () => {
  await server.shutdown();
  await hashPool.close();
}, tracing);
