// How CLI commands reach a running stack: an explicit address, else the state file `pilot up` wrote.
import { createClient, type PromiseClient } from '../../services/common/grpc-client.ts';
import { CheckpointServiceService } from '../../proto/gen/pilot/v1/checkpoint.ts';
import { RunServiceService } from '../../proto/gen/pilot/v1/run.ts';
import { isAlive, readStackState, type StackState } from './state.ts';

export class NoStackError extends Error {
  constructor(stateDir: string, detail: string) {
    super(`no running moe-pilot stack in ${stateDir} (${detail}); start one with "pilot up" or pass --address`);
    this.name = 'NoStackError';
  }
}

/** The state of the stack in stateDir; throws NoStackError when there is none or `service` is not alive. */
export async function requireStack(stateDir: string, service: string): Promise<StackState> {
  const state = await readStackState(stateDir);
  if (!state) throw new NoStackError(stateDir, 'no stack.json');
  const s = state.services.find((x) => x.name === service);
  if (!s) throw new NoStackError(stateDir, `it has no ${service} service`);
  if (!isAlive(s.pid)) throw new NoStackError(stateDir, `${service} (pid ${s.pid}) is not running; see ${s.logFile}`);
  return state;
}

async function addressOf(stateDir: string, service: string, address: string | undefined): Promise<string> {
  if (address) return address;
  const state = await requireStack(stateDir, service);
  return state.services.find((x) => x.name === service)!.address;
}

export type RunClient = PromiseClient<typeof RunServiceService>;
export type CheckpointClient = PromiseClient<typeof CheckpointServiceService>;

export async function connectRunService(stateDir: string, address?: string, defaultTimeoutMs = 30_000): Promise<RunClient> {
  return createClient({ tracer: null }, RunServiceService, { address: await addressOf(stateDir, 'coordinator', address), defaultTimeoutMs, credentials: null });
}

export async function connectCheckpointService(stateDir: string, address?: string, defaultTimeoutMs = 120_000): Promise<CheckpointClient> {
  return createClient({ tracer: null }, CheckpointServiceService, { address: await addressOf(stateDir, 'checkpoint', address), defaultTimeoutMs, credentials: null });
}
