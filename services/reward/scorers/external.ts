// `external`: delegates scoring to another RewardService (a sandboxed code runner, a model judge...)
// at a configured address. Its component is the remote weighted score. The call carries the
// incoming call's deadline, and the trace context through the client's interceptor.
import {
  FailedPreconditionError,
  InvalidArgumentError,
  PilotError,
  UnavailableError,
  DeadlineExceededError,
} from '../../common/errors.ts';
import type { PromiseClient } from '../../common/grpc-client.ts';
import { RewardSpec, type RewardServiceService } from '../../../proto/gen/pilot/v1/reward.ts';
import type { BatchScorer } from './registry.ts';
import { isInteger, isPositive, readParams } from './types.ts';

export interface ExternalParams {
  address: string;
  spec: RewardSpec;
  /** Per-call timeout; the incoming call's deadline caps it. */
  timeoutMs: number | null;
}

export interface ExternalScorerDeps {
  /** A (cached) RewardService client for an address. */
  clientFor(address: string): PromiseClient<typeof RewardServiceService>;
}

const ADDRESS = /^[\w.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$|^(unix|dns|ipv4|ipv6):.+$/;

export function createExternalScorer(deps: ExternalScorerDeps): BatchScorer<ExternalParams> {
  return {
    kind: 'batch',
    name: 'external',
    description: 'score with a remote RewardService: params address ("host:port"), spec (a RewardSpec), timeout_ms',
    parseParams(raw, field) {
      const p = readParams(raw, field, ['address', 'spec', 'timeout_ms']);
      const address = p.string('address', null);
      if (address === null || address === '') throw new InvalidArgumentError(`${field}.address`, 'is required');
      if (!ADDRESS.test(address)) {
        throw new InvalidArgumentError(`${field}.address`, `not a gRPC address ("host:port"): ${JSON.stringify(address)}`);
      }
      const rawSpec = p.raw('spec');
      if (rawSpec === undefined || rawSpec === null || typeof rawSpec !== 'object' || Array.isArray(rawSpec)) {
        throw new InvalidArgumentError(`${field}.spec`, 'is required: the RewardSpec to send, e.g. {"scorers": [...]}');
      }
      const spec = RewardSpec.fromJSON(rawSpec);
      if (spec.scorers.length === 0) throw new InvalidArgumentError(`${field}.spec.scorers`, 'must list at least one scorer');
      const timeout = p.number('timeout_ms', 0, (v) => isInteger(v) ?? isPositive(v));
      return { address, spec, timeoutMs: timeout === 0 ? null : timeout };
    },
    async scoreBatch(items, params, ctx) {
      const client = deps.clientFor(params.address);
      try {
        const response = await client.score(
          {
            spec: params.spec,
            items: items.map((item) => ({
              completion: item.completion,
              referenceAnswer: item.referenceAnswer,
              metadata: item.metadata,
              completionTokens: item.completionTokens,
              prompt: item.prompt,
            })),
          },
          { parent: ctx.parent, signal: ctx.signal ?? undefined, ...(params.timeoutMs ? { timeoutMs: params.timeoutMs } : {}) },
        );
        if (response.scores.length !== items.length) {
          throw new FailedPreconditionError(
            `external scorer at ${params.address} returned ${response.scores.length} scores for ${items.length} items`,
          );
        }
        return response.scores.map((s) => s.score);
      } catch (error) {
        throw describeRemoteError(error, params.address);
      }
    },
  };
}

// Keep the remote status but say which remote failed; a remote INVALID_ARGUMENT is about the spec
// we forwarded, so it stays INVALID_ARGUMENT for our caller.
function describeRemoteError(error: unknown, address: string): unknown {
  if (!(error instanceof PilotError)) return error;
  const message = `external scorer at ${address}: ${error.message}`;
  if (error instanceof InvalidArgumentError) return new InvalidArgumentError('params.spec', message, { cause: error });
  if (error instanceof DeadlineExceededError) return new DeadlineExceededError(message, { cause: error });
  if (error instanceof UnavailableError) return new UnavailableError(message, { cause: error });
  const Cls = error.constructor as new (m: string, o?: { cause?: unknown }) => PilotError;
  return new Cls(message, { cause: error });
}
