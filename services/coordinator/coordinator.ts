// The coordinator process minus the environment: gRPC server (RunService + the ranks' RendezvousService),
// clients of the ranks, the reward and the checkpoint services, NATS queues, events and run records.
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import type { Tracer } from '@opentelemetry/api';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createClient } from '../common/grpc-client.ts';
import { createGrpcServer } from '../common/grpc-server.ts';
import { createPromptQueue, type PromptQueue } from '../common/nats/prompt-queue.ts';
import { createRunEvents } from '../common/nats/run-events.ts';
import { DEFAULT_PROMPT_QUEUE, PROMPT_CONSUMER } from '../common/nats/names.ts';
import { createRendezvousService } from '../../src/dist/rendezvous-server.ts';
import { loadTokenizer } from '../../src/tokenizer/index.ts';
import { CheckpointServiceService } from '../../proto/gen/pilot/v1/checkpoint.ts';
import { RewardServiceService } from '../../proto/gen/pilot/v1/reward.ts';
import { RolloutServiceService } from '../../proto/gen/pilot/v1/rollout.ts';
import { RunServiceService } from '../../proto/gen/pilot/v1/run.ts';
import { TrainerServiceService } from '../../proto/gen/pilot/v1/trainer.ts';
import { createRunService, type RunRecord, type RunServiceConfig } from './run-service.ts';
import { createRunStore } from './run-store.ts';

export interface CoordinatorConfig extends RunServiceConfig {
  host: string;
  port: number;
  natsUrl: string;
  rewardAddr: string;
  checkpointAddr: string;
  rankAddrs: string[];
  /** How long a leased prompt may go without heartbeat before NATS redelivers it. */
  ackWaitMs: number;
  rendezvousMaxWaitMs: number;
  maxMessageBytes: number;
  shutdownGraceMs: number;
}

export interface Coordinator {
  /** Starts serving; resolves with the bound port. */
  start(): Promise<number>;
  /** Resumes the runs the run records say were running (call after start: the ranks meet through this server). */
  resumeRuns(): Promise<string[]>;
  shutdown(): Promise<void>;
}

export async function createCoordinator(
  deps: { tracer: Tracer; log?: (record: Record<string, unknown>) => void },
  config: CoordinatorConfig,
): Promise<Coordinator> {
  if (config.rankAddrs.length === 0) throw new Error('the coordinator needs at least one rank address');
  // noAsyncTraces: nats.js otherwise builds two Error objects (stack captures) per request, i.e. per
  // published prompt: a quarter of the CPU of SubmitPrompts under load.
  const nc: NatsConnection = await connect({ servers: config.natsUrl, name: 'pilot-coordinator', noAsyncTraces: true });
  const events = await createRunEvents({ nc, propagator: new W3CTraceContextPropagator() });
  const runs = await createRunStore<RunRecord>({ nc });
  const queues = new Map<string, Promise<PromptQueue>>();
  const queueFor = (dataset: string) => {
    let q = queues.get(dataset);
    if (!q) {
      q = createPromptQueue(
        { nc, onInvalidMessage: (seq, error) => deps.log?.({ event: 'invalid_prompt_message', seq, error }) },
        {
          queue: dataset,
          // The default dataset keeps the consumer name the rest of the pilot knows.
          consumer: dataset === DEFAULT_PROMPT_QUEUE ? PROMPT_CONSUMER : `${PROMPT_CONSUMER}-${dataset}`,
          ackWaitMs: config.ackWaitMs,
        },
      );
      q.catch(() => queues.delete(dataset));
      queues.set(dataset, q);
    }
    return q;
  };
  const channelOptions = {
    'grpc.max_receive_message_length': config.maxMessageBytes,
    'grpc.max_send_message_length': config.maxMessageBytes,
  };
  const clientDeps = { tracer: deps.tracer };
  const ranks = config.rankAddrs.map((address) => ({
    rollout: createClient(clientDeps, RolloutServiceService, { address, defaultTimeoutMs: config.callTimeoutMs, credentials: null, channelOptions }),
    trainer: createClient(clientDeps, TrainerServiceService, { address, defaultTimeoutMs: config.callTimeoutMs, credentials: null, channelOptions }),
  }));
  const reward = createClient(clientDeps, RewardServiceService, { address: config.rewardAddr, defaultTimeoutMs: config.callTimeoutMs, credentials: null, channelOptions });
  const checkpoint = createClient(clientDeps, CheckpointServiceService, { address: config.checkpointAddr, defaultTimeoutMs: config.callTimeoutMs, credentials: null });
  const runService = createRunService(
    { ranks, reward, checkpoint, events, runs, queueFor, loadTokenizer, tracer: deps.tracer, log: deps.log },
    config,
  );
  const server = createGrpcServer(
    { tracer: deps.tracer },
    { host: config.host, port: config.port, credentials: null, shutdownGraceMs: config.shutdownGraceMs },
  );
  server.addService(RunServiceService, runService.impl);
  const rendezvous = createRendezvousService({ maxWaitMs: config.rendezvousMaxWaitMs });
  rendezvous.addTo(server.grpc);

  return {
    start: () => server.start(),
    resumeRuns: () => runService.resumeRuns(),
    async shutdown() {
      await runService.close();
      rendezvous.close();
      await server.shutdown();
      for (const r of ranks) {
        r.rollout.close();
        r.trainer.close();
      }
      reward.close();
      checkpoint.close();
      await nc.drain();
    },
  };
}
