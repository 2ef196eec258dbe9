// The rank's gRPC server: RolloutService and TrainerService over one RankService (one engine), with the
// standard health service, reflection and SERVER spans from services/common.
import type { ServerCredentials } from '@grpc/grpc-js';
import type { Tracer } from '@opentelemetry/api';
import { createGrpcServer } from '../common/grpc-server.ts';
import { RolloutServiceService } from '../../proto/gen/pilot/v1/rollout.ts';
import { TrainerServiceService } from '../../proto/gen/pilot/v1/trainer.ts';
import { createRankService, type RankService, type RankServiceConfig, type RankServiceDeps } from './rank-service.ts';

export interface RankServerConfig extends RankServiceConfig {
  host: string;
  /** 0 picks a free port (see start()'s result). */
  port: number;
  shutdownGraceMs: number;
  serverCredentials: ServerCredentials | null;
  /** Largest gRPC message (TrainBatch requests carry whole micro-batches). */
  maxMessageBytes: number;
}

export interface RankServer {
  /** Binds and starts; resolves with the bound port. */
  start(): Promise<number>;
  /** Stops serving (calls in flight get shutdownGraceMs), then frees the model and leaves the group. */
  shutdown(): Promise<void>;
  readonly service: RankService;
}

export function createRankServer(deps: RankServiceDeps, config: RankServerConfig): RankServer {
  const service = createRankService(deps, config);
  const server = createGrpcServer(
    { tracer: deps.tracer },
    {
      host: config.host,
      port: config.port,
      credentials: config.serverCredentials,
      shutdownGraceMs: config.shutdownGraceMs,
      serverOptions: {
        'grpc.max_receive_message_length': config.maxMessageBytes,
        'grpc.max_send_message_length': config.maxMessageBytes,
      },
    },
  );
  server.addService(RolloutServiceService, service.rollout);
  server.addService(TrainerServiceService, service.trainer);
  return {
    service,
    start: () => server.start(),
    async shutdown() {
      await server.shutdown();
      await service.dispose();
    },
  };
}
