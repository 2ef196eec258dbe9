// Entry point of a rank: the only place that reads flags and the environment.
//   RANK=0 WORLD_SIZE=2 RENDEZVOUS_ADDR=127.0.0.1:50050 node --import tsx services/rank/main.ts --port 0
import { Command } from 'commander';
import { integer, stopOnSignals } from '../common/main-support.ts';
import { createHashPool } from '../common/hash-pool.ts';
import { createTracing } from '../common/tracing.ts';
import { createRankServer } from './server.ts';
import type { ExpertGradDtype } from '../../src/engine/engine.ts';

const env = process.env;
const program = new Command('rank')
  .description('moe-pilot rank: the engine of one device serving RolloutService and TrainerService')
  .option('--host <host>', 'bind address (RANK_HOST)', env.RANK_HOST ?? '0.0.0.0')
  .option('--port <port>', 'port, 0 = any free one (RANK_PORT)', integer(0), Number(env.RANK_PORT ?? 50060))
  .option('--rank <r>', 'this rank (RANK)', integer(0), Number(env.RANK ?? 0))
  .option('--world-size <n>', 'ranks in the expert-parallel group (WORLD_SIZE)', integer(1), Number(env.WORLD_SIZE ?? 1))
  .option('--rendezvous <host:port>', 'rendezvous service, hosted by the coordinator (RENDEZVOUS_ADDR)', env.RENDEZVOUS_ADDR)
  .option('--group <id>', 'process group id at the rendezvous (PILOT_GROUP)', env.PILOT_GROUP ?? 'pilot-ranks')
  .option('--rendezvous-timeout-ms <ms>', 'how long to wait for every rank to join', integer(1), 120000)
  .option('--comm-timeout-ms <ms>', 'bound on every collective between ranks', integer(1), 300000)
  .option('--comm-host <host>', 'address the other ranks reach this one at for collectives (RANK_COMM_HOST); default 127.0.0.1', env.RANK_COMM_HOST)
  .option('--comm-iface <name>', 'network interface for collectives, e.g. eth0 (RANK_COMM_IFACE); wins over --comm-host', env.RANK_COMM_IFACE)
  .option('--kv-blocks <n>', 'KV cache blocks of the generator (KV_BLOCKS)', integer(1), Number(env.KV_BLOCKS ?? 1024))
  .option('--block-size <n>', 'tokens per KV block', integer(1), 16)
  .option('--max-prompts <n>', 'most prompts per Generate call', integer(1), 4096)
  .option('--max-queued-samples <n>', 'one rank: samples queued or generating at most; past it Generate answers RESOURCE_EXHAUSTED', integer(1), 8192)
  .option('--max-message-mb <n>', 'largest gRPC message in MiB', integer(1), 512)
  .option('--shutdown-grace-ms <ms>', 'time calls in flight get on shutdown', integer(0), 5000)
  .option('--device <device>', "where the policy trains: cpu, cuda or cuda:N (RANK_DEVICE); a group's ranks each on their own GPU, over NCCL", env.RANK_DEVICE ?? 'cpu')
  .option('--expert-grads <dtype>', "with a GPU --device: the routed experts' gradients in float32 or bfloat16 (RANK_EXPERT_GRADS)", env.RANK_EXPERT_GRADS ?? 'float32')
  .option('--model-dir <dir>', 'model folder to load at start (MODEL_DIR)', env.MODEL_DIR)
  .option('--keep-reference', 'with --model-dir: keep a frozen reference model', false)
  .option('--hash-threads <n>', 'threads verifying the sha256 of the shard files LoadShard reads, one file each (RANK_HASH_THREADS)', integer(1), Number(env.RANK_HASH_THREADS ?? 4))
  .option('--span-file <path>', 'JSON-lines span file when OTEL_EXPORTER_OTLP_ENDPOINT is unset (PILOT_SPAN_FILE)', env.PILOT_SPAN_FILE)
  .parse();

const opts = program.opts<{
  host: string;
  port: number;
  rank: number;
  worldSize: number;
  rendezvous?: string;
  group: string;
  rendezvousTimeoutMs: number;
  commTimeoutMs: number;
  commHost?: string;
  commIface?: string;
  kvBlocks: number;
  blockSize: number;
  maxPrompts: number;
  maxQueuedSamples: number;
  maxMessageMb: number;
  shutdownGraceMs: number;
  device: string;
  expertGrads: string;
  modelDir?: string;
  keepReference: boolean;
  hashThreads: number;
  spanFile?: string;
}>();

if (opts.rank >= opts.worldSize) program.error(`--rank ${opts.rank} must be < --world-size ${opts.worldSize}`);
if (opts.worldSize > 1 && !opts.rendezvous) program.error(`--world-size ${opts.worldSize} needs --rendezvous (RENDEZVOUS_ADDR)`);

const tracing = createTracing({
  serviceName: env.OTEL_SERVICE_NAME ?? 'rank',
  otlpEndpoint: env.OTEL_EXPORTER_OTLP_ENDPOINT || null,
  spanFile: opts.spanFile || null,
});
const hashPool = createHashPool(opts.hashThreads);
const server = createRankServer(
  { tracer: tracing.tracer, hashFile: (path) => hashPool.hashFile(path) },
  {
    host: opts.host,
    port: opts.port,
    rank: opts.rank,
    worldSize: opts.worldSize,
    rendezvous: opts.worldSize > 1 ? { address: opts.rendezvous!, group: opts.group, timeoutMs: opts.rendezvousTimeoutMs } : null,
    commTimeoutMs: opts.commTimeoutMs,
    commHost: opts.commHost || null,
    commIface: opts.commIface || null,
    kvBlocks: opts.kvBlocks,
    blockSize: opts.blockSize,
    maxPrompts: opts.maxPrompts,
    maxQueuedSamples: opts.maxQueuedSamples,
    addonPath: null,
    device: opts.device,
    expertGradDtype: opts.expertGrads as ExpertGradDtype,
    shutdownGraceMs: opts.shutdownGraceMs,
    serverCredentials: null,
    maxMessageBytes: opts.maxMessageMb * 1024 * 1024,
  },
);

const port = await server.start();
// One machine-readable line so launchers (and tests) learn the port when --port 0.
console.log(JSON.stringify({ service: 'rank', event: 'listening', host: opts.host, port, rank: opts.rank, worldSize: opts.worldSize }));

const stop = stopOnSignals({ service: 'rank', rank: opts.rank }, async () => {
  await server.shutdown();
  await hashPool.close();
}, tracing);

if (opts.modelDir) {
  // Loaded after listening, so the health check answers while a large model loads (with several ranks,
  // every rank loads at start and they meet at the rendezvous).
  try {
    const { info } = await server.service.loadModel({ modelDir: opts.modelDir, dtype: '', seed: 0, keepReference: opts.keepReference });
    console.log(JSON.stringify({ service: 'rank', event: 'model-loaded', modelDir: opts.modelDir, rank: opts.rank, parameters: info?.numParameters }));
  } catch (e) {
    console.error(JSON.stringify({ service: 'rank', event: 'model-load-failed', modelDir: opts.modelDir, error: (e as Error).message }));
    await stop('model-load-failed', 1);
  }
}
