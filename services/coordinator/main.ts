// Entry point of the coordinator: the only place that reads flags and the environment.
//   NATS_URL=nats://127.0.0.1:4222 REWARD_ADDR=127.0.0.1:50053 CHECKPOINT_ADDR=127.0.0.1:50054 \
//   RANK_ADDRS=127.0.0.1:50060,127.0.0.1:50061 node --import tsx services/coordinator/main.ts --port 50051
import { Command } from 'commander';
import { integer, stopOnSignals } from '../common/main-support.ts';
import { createTracing } from '../common/tracing.ts';
import { createCoordinator } from './coordinator.ts';

const env = process.env;
const program = new Command('coordinator')
  .description('moe-pilot coordinator: RunService (the GRPO loop) and the ranks\' rendezvous')
  .option('--host <host>', 'bind address (COORDINATOR_HOST)', env.COORDINATOR_HOST ?? '0.0.0.0')
  .option('--port <port>', 'port, 0 = any free one (COORDINATOR_PORT)', integer(0), Number(env.COORDINATOR_PORT ?? 50051))
  .option('--nats <url>', 'NATS server with JetStream (NATS_URL)', env.NATS_URL ?? 'nats://127.0.0.1:4222')
  .option('--reward <host:port>', 'reward service (REWARD_ADDR)', env.REWARD_ADDR)
  .option('--checkpoint <host:port>', 'checkpoint service (CHECKPOINT_ADDR)', env.CHECKPOINT_ADDR)
  .option('--ranks <list>', 'rank addresses in rank order, comma-separated (RANK_ADDRS)', env.RANK_ADDRS)
  .option('--ack-wait-ms <ms>', 'prompt lease without heartbeat before redelivery (COORDINATOR_ACK_WAIT_MS)', integer(1000),
    Number(env.COORDINATOR_ACK_WAIT_MS ?? 600_000))
  .option('--take-timeout-ms <ms>', 'how long one pull of prompts waits (COORDINATOR_TAKE_TIMEOUT_MS)', integer(1000),
    Number(env.COORDINATOR_TAKE_TIMEOUT_MS ?? 5000))
  .option('--call-timeout-ms <ms>', 'deadline of each rank/reward call (COORDINATOR_CALL_TIMEOUT_MS)', integer(1),
    Number(env.COORDINATOR_CALL_TIMEOUT_MS ?? 1_800_000))
  .option('--load-timeout-ms <ms>', 'deadline of LoadModel on the ranks (COORDINATOR_LOAD_TIMEOUT_MS)', integer(1),
    Number(env.COORDINATOR_LOAD_TIMEOUT_MS ?? 1_800_000))
  .option('--max-prompts-per-submit <n>', 'largest SubmitPrompts batch', integer(1), 10_000)
  .option('--max-prompts-in-flight <n>', 'prompts being queued at once; past it SubmitPrompts answers RESOURCE_EXHAUSTED (COORDINATOR_MAX_PROMPTS_IN_FLIGHT)',
    integer(1), Number(env.COORDINATOR_MAX_PROMPTS_IN_FLIGHT ?? 1000))
  .option('--rendezvous-max-wait-ms <ms>', 'longest a rank waits at the rendezvous', integer(1), 300_000)
  .option('--max-message-mb <n>', 'largest gRPC message to and from the ranks, MiB', integer(1), 512)
  .option('--shutdown-grace-ms <ms>', 'time calls in flight get on shutdown', integer(0), 5000)
  .option('--span-file <path>', 'JSON-lines span file when OTEL_EXPORTER_OTLP_ENDPOINT is unset (PILOT_SPAN_FILE)', env.PILOT_SPAN_FILE)
  .parse();

const opts = program.opts<{
  host: string;
  port: number;
  nats: string;
  reward?: string;
  checkpoint?: string;
  ranks?: string;
  ackWaitMs: number;
  takeTimeoutMs: number;
  callTimeoutMs: number;
  loadTimeoutMs: number;
  maxPromptsPerSubmit: number;
  maxPromptsInFlight: number;
  rendezvousMaxWaitMs: number;
  maxMessageMb: number;
  shutdownGraceMs: number;
  spanFile?: string;
}>();
if (!opts.reward) program.error('error: the reward service address is required (--reward or REWARD_ADDR)');
if (!opts.checkpoint) program.error('error: the checkpoint service address is required (--checkpoint or CHECKPOINT_ADDR)');
const rankAddrs = (opts.ranks ?? '').split(',').map((s) => s.trim()).filter((s) => s.length > 0);
if (rankAddrs.length === 0) program.error('error: at least one rank address is required (--ranks or RANK_ADDRS)');

const tracing = createTracing({
  serviceName: env.OTEL_SERVICE_NAME ?? 'coordinator',
  otlpEndpoint: env.OTEL_EXPORTER_OTLP_ENDPOINT || null,
  spanFile: opts.spanFile || null,
});
const log = (record: Record<string, unknown>) => console.error(JSON.stringify({ service: 'coordinator', ...record }));
const coordinator = await createCoordinator(
  { tracer: tracing.tracer, log },
  {
    host: opts.host,
    port: opts.port,
    natsUrl: opts.nats,
    rewardAddr: opts.reward!,
    checkpointAddr: opts.checkpoint!,
    rankAddrs,
    ackWaitMs: opts.ackWaitMs,
    takeTimeoutMs: opts.takeTimeoutMs,
    callTimeoutMs: opts.callTimeoutMs,
    loadTimeoutMs: opts.loadTimeoutMs,
    maxPromptsPerSubmit: opts.maxPromptsPerSubmit,
    maxPromptsInFlight: opts.maxPromptsInFlight,
    rendezvousMaxWaitMs: opts.rendezvousMaxWaitMs,
    maxMessageBytes: opts.maxMessageMb * 1024 * 1024,
    shutdownGraceMs: opts.shutdownGraceMs,
  },
);
const port = await coordinator.start();
// One machine-readable line so launchers (and tests) learn the port when --port 0.
console.log(JSON.stringify({ service: 'coordinator', event: 'listening', host: opts.host, port, ranks: rankAddrs.length }));
// Resuming loads the model on the ranks, which meet at the rendezvous this process now serves.
coordinator.resumeRuns().then(
  (resumed) => console.log(JSON.stringify({ service: 'coordinator', event: 'resumed', runs: resumed })),
  (err) => log({ event: 'resume_failed', error: String(err) }),
);

stopOnSignals({ service: 'coordinator' }, () => coordinator.shutdown(), tracing);
