// RewardService: validates the spec, runs local scorers on the worker pool and batch scorers
// (external) concurrently, and returns the weighted score with every component per item.
import { trace, type Tracer } from '@opentelemetry/api';
import type { ChannelCredentials, ServerCredentials } from '@grpc/grpc-js';
import { CancelledError, ResourceExhaustedError } from '../common/errors.ts';
import { createClient, type PromiseClient } from '../common/grpc-client.ts';
import { createGrpcServer, type ServiceImpl } from '../common/grpc-server.ts';
import {
  RewardServiceService,
  type ScoreItem,
  type ScoreResponse,
} from '../../proto/gen/pilot/v1/reward.ts';
import { combineScores } from './scorers/combine.ts';
import { createExternalScorer } from './scorers/external.ts';
import { createScorerRegistry, LOCAL_SCORERS, type BatchScorer, type ScorerRegistry } from './scorers/registry.ts';
import type { LocalScorer, ScoreInput } from './scorers/types.ts';
import { resolveSpec } from './spec.ts';
import { createScoringPool, type ScoringPool } from './worker-pool.ts';

export interface RewardServiceConfig {
  /** Largest batch one Score call may carry. */
  maxItems: number;
}

export function toScoreInput(item: ScoreItem): ScoreInput {
  return {
    completion: item.completion,
    referenceAnswer: item.referenceAnswer,
    metadata: item.metadata,
    completionTokens: item.completionTokens,
    prompt: item.prompt,
  };
}

export function createRewardService(
  deps: { registry: ScorerRegistry; pool: ScoringPool },
  config: RewardServiceConfig,
): ServiceImpl<typeof RewardServiceService> {
  return {
    async score(request, ctx): Promise<ScoreResponse> {
      const scorers = resolveSpec(deps.registry, request.spec);
      if (request.items.length > config.maxItems) {
        throw new ResourceExhaustedError(`items: at most ${config.maxItems} items per Score call, got ${request.items.length}; split the batch`);
      }
      const span = trace.getActiveSpan();
      span?.setAttributes({ 'reward.items': request.items.length, 'reward.scorers': scorers.map((s) => s.label).join(',') });

      const items = request.items.map(toScoreInput);
      const local = scorers.filter((s) => s.scorer.kind === 'local');
      const batch = scorers.filter((s) => s.scorer.kind === 'batch');
      const [localValues, batchValues] = await Promise.all([
        deps.pool.score(local.map((s) => ({ name: s.name, params: s.params })), items),
        Promise.all(
          batch.map((s) =>
            (s.scorer as BatchScorer).scoreBatch(items, s.params, { parent: ctx.call, signal: ctx.signal }),
          ),
        ),
      ]);
      if (ctx.signal.aborted) throw new CancelledError('Score cancelled by the client');
      // Back to spec order.
      const values = scorers.map((s) =>
        s.scorer.kind === 'local' ? localValues[local.indexOf(s)] : batchValues[batch.indexOf(s)],
      );
      return { scores: combineScores(scorers, values, items.length) };
    },
  };
}

export interface RewardServerConfig {
  host: string;
  port: number;
  /** Scoring worker threads (0 = score on the main thread). */
  workers: number;
  maxItems: number;
  /** Default deadline of calls to external scorers. */
  externalTimeoutMs: number;
  shutdownGraceMs: number;
  serverCredentials: ServerCredentials | null;
  clientCredentials: ChannelCredentials | null;
}

export interface RewardServer {
  /** Resolves with the bound port. */
  start(): Promise<number>;
  shutdown(): Promise<void>;
  readonly registry: ScorerRegistry;
}

/** The whole reward server: gRPC with health and reflection, scorers, worker pool, external clients. */
export function createRewardServer(deps: { tracer: Tracer | null }, config: RewardServerConfig): RewardServer {
  const clients = new Map<string, PromiseClient<typeof RewardServiceService>>();
  const clientFor = (address: string) => {
    let client = clients.get(address);
    if (!client) {
      client = createClient({ tracer: deps.tracer }, RewardServiceService, {
        address,
        defaultTimeoutMs: config.externalTimeoutMs,
        credentials: config.clientCredentials,
      });
      clients.set(address, client);
    }
    return client;
  };
  const registry = createScorerRegistry([...(LOCAL_SCORERS as LocalScorer<unknown>[]), createExternalScorer({ clientFor })]);
  const pool = createScoringPool({ registry }, { size: config.workers, minChunk: 64 });
  const server = createGrpcServer(
    { tracer: deps.tracer },
    {
      host: config.host,
      port: config.port,
      credentials: config.serverCredentials,
      shutdownGraceMs: config.shutdownGraceMs,
    },
  );
  server.addService(RewardServiceService, createRewardService({ registry, pool }, { maxItems: config.maxItems }));
  return {
    registry,
    start: () => server.start(),
    async shutdown() {
      await server.shutdown();
      await pool.close();
      for (const client of clients.values()) client.close();
      clients.clear();
    },
  };
}
