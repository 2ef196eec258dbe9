// Client of the rendezvous service, as the communicator uses it: join a group, then set/get keys of
// the generation the join returned. Every call carries a deadline a little beyond the wait it asks
// the server for, so the server's error (which names the missing ranks or keys) is the one seen.
import * as grpc from '@grpc/grpc-js';

import { RendezvousServiceClient } from '../../proto/gen/pilot/v1/rendezvous.ts';
import { type CommErrorCode, RendezvousError } from './errors.ts';

export interface RendezvousClientConfig {
  address: string; // host:port of the rendezvous service
  credentials: grpc.ChannelCredentials | null; // null: insecure (loopback, tests)
  // Extra time a call's deadline allows beyond the server-side wait (ms).
  deadlineSlackMs: number;
}

export interface JoinOptions {
  group: string;
  rank: number;
  worldSize: number;
  timeoutMs: number;
}

export interface RendezvousClient {
  join(options: JoinOptions): Promise<number>;
  set(group: string, generation: number, key: string, value: Uint8Array, timeoutMs: number): Promise<void>;
  get(group: string, generation: number, keys: readonly string[], timeoutMs: number): Promise<Uint8Array[]>;
  close(): void;
}

function errorCode(status: grpc.status): CommErrorCode {
  switch (status) {
    case grpc.status.DEADLINE_EXCEEDED:
      return 'TIMEOUT';
    case grpc.status.INVALID_ARGUMENT:
      return 'INVALID_ARGUMENT';
    default:
      return 'COMM';
  }
}

function wrap(op: string, address: string, e: grpc.ServiceError): RendezvousError {
  const detail = e.details || e.message;
  const where = e.code === grpc.status.UNAVAILABLE ? ` (rendezvous service at ${address} unreachable)` : '';
  return new RendezvousError(`rendezvous ${op} failed${where}: ${detail}`, errorCode(e.code), e.code, { cause: e });
}

export function createRendezvousClient(config: Pick<RendezvousClientConfig, 'address'> & Partial<RendezvousClientConfig>): RendezvousClient {
  const c: RendezvousClientConfig = { credentials: null, deadlineSlackMs: 5_000, ...config };
  if (c.address === '') throw new Error('createRendezvousClient: address must not be empty');
  const client = new RendezvousServiceClient(c.address, c.credentials ?? grpc.credentials.createInsecure());
  const deadline = (waitMs: number) => ({ deadline: new Date(Date.now() + waitMs + c.deadlineSlackMs) });

  return {
    join: (o) =>
      new Promise((resolve, reject) => {
        client.join({ group: o.group, rank: o.rank, worldSize: o.worldSize, timeoutMs: o.timeoutMs }, new grpc.Metadata(),
          deadline(o.timeoutMs), (err, res) => (err ? reject(wrap(`join of rank ${o.rank} to group '${o.group}'`, c.address, err)) : resolve(res.generation)));
      }),
    set: (group, generation, key, value, timeoutMs) =>
      new Promise((resolve, reject) => {
        client.set({ group, generation, key, value: Buffer.from(value.buffer, value.byteOffset, value.byteLength) }, new grpc.Metadata(),
          deadline(timeoutMs), (err) => (err ? reject(wrap(`set(${key})`, c.address, err)) : resolve()));
      }),
    get: (group, generation, keys, timeoutMs) =>
      new Promise((resolve, reject) => {
        client.get({ group, generation, keys: [...keys], timeoutMs }, new grpc.Metadata(), deadline(timeoutMs),
          (err, res) => (err ? reject(wrap(`get(${keys.join(', ')})`, c.address, err)) : resolve(res.values)));
      }),
    close: () => client.close(),
  };
}
