// The rendezvous service: ranks of a process group meet here before connecting to each other.
//
// Rounds: Join waits until all `worldSize` ranks of the group have joined; the completed round gets
// the next generation, and key-values live under (group, generation). When the first waiting rank's
// deadline passes, the round fails for every rank in it with one message naming the missing ranks;
// starting the missing rank and retrying then completes a fresh round; values of an older generation are dropped when a new
// one starts, and calls naming a stale generation fail at once instead of waiting.
//
// In-memory only: the coordinator hosts it; when it restarts, ranks rendezvous again anyway.
import * as grpc from '@grpc/grpc-js';

import {
  type GetRequest,
  type GetResponse,
  type JoinRequest,
  type JoinResponse,
  RendezvousServiceService,
  type RendezvousServiceServer,
  type SetRequest,
  type SetResponse,
} from '../../proto/gen/pilot/v1/rendezvous.ts';

export interface RendezvousServiceConfig {
  // Upper bound on how long any Join or Get waits, whatever the client asks (ms).
  maxWaitMs: number;
}

export const defaultRendezvousServiceConfig: RendezvousServiceConfig = { maxWaitMs: 60_000 };

export interface RendezvousService {
  readonly implementation: RendezvousServiceServer;
  addTo(server: grpc.Server): void;
  // Fails every waiting call (UNAVAILABLE) and clears all groups; for shutdown.
  close(): void;
}

interface Failure {
  code: grpc.status;
  details: string;
}

interface JoinWaiter {
  rank: number;
  settle(result: { generation: number } | Failure): void;
}

interface GetWaiter {
  keys: string[];
  settle(result: { values: Buffer[] } | Failure): void;
}

interface GroupState {
  worldSize: number;
  generation: number; // of the last completed round; 0 before the first
  joining: Map<number, JoinWaiter>;
  values: Map<string, Buffer>;
  getters: Set<GetWaiter>;
}

function ranksText(ranks: number[]): string {
  return ranks.length === 0 ? 'none' : ranks.join(', ');
}

function invalid(details: string): Failure {
  return { code: grpc.status.INVALID_ARGUMENT, details };
}

class Rendezvous {
  private readonly groups = new Map<string, GroupState>();

  constructor(private readonly config: RendezvousServiceConfig) {}

  private waitMs(requested: number): number {
    return Math.min(requested > 0 ? requested : this.config.maxWaitMs, this.config.maxWaitMs);
  }

  join(req: JoinRequest, call: grpc.ServerUnaryCall<JoinRequest, JoinResponse>, reply: (r: { generation: number } | Failure) => void): void {
    if (req.group === '') return reply(invalid('Join: group must not be empty'));
    if (!Number.isInteger(req.worldSize) || req.worldSize < 1) return reply(invalid(`Join: worldSize must be >= 1, got ${req.worldSize}`));
    if (!Number.isInteger(req.rank) || req.rank < 0 || req.rank >= req.worldSize) {
      return reply(invalid(`Join: rank must be in [0, ${req.worldSize}), got ${req.rank}`));
    }
    let g = this.groups.get(req.group);
    if (g === undefined) {
      g = { worldSize: req.worldSize, generation: 0, joining: new Map(), values: new Map(), getters: new Set() };
      this.groups.set(req.group, g);
    }
    if (g.worldSize !== req.worldSize) {
      if (g.joining.size > 0) {
        return reply(invalid(`Join: group '${req.group}' is meeting with world size ${g.worldSize}; rank ${req.rank} asked for ${req.worldSize}`));
      }
      g.worldSize = req.worldSize; // a new run of the group with another size
    }
    const group = g;
    const previous = group.joining.get(req.rank);
    if (previous !== undefined) {
      // The same rank joins again (its process restarted): the newer call wins.
      group.joining.delete(req.rank);
      previous.settle({ code: grpc.status.ABORTED, details: `Join: rank ${req.rank} of group '${req.group}' joined again; this call is superseded` });
    }
    const waitMs = this.waitMs(req.timeoutMs);
    let done = false;
    const waiter: JoinWaiter = {
      rank: req.rank,
      settle: (r) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        reply(r);
      },
    };
    // The first deadline to pass fails the whole round, so every waiting rank reports the same
    // missing ranks; they all retry into a fresh round.
    const timer = setTimeout(() => {
      if (group.joining.get(req.rank) !== waiter) return;
      const joined = [...group.joining.keys()].sort((a, b) => a - b);
      const missing: number[] = [];
      for (let r = 0; r < group.worldSize; r++) if (!group.joining.has(r)) missing.push(r);
      const failure: Failure = {
        code: grpc.status.DEADLINE_EXCEEDED,
        details:
          `rendezvous of group '${req.group}' (world size ${group.worldSize}) timed out after ${waitMs} ms (deadline of rank ${req.rank}): ` +
          `rank${missing.length === 1 ? '' : 's'} ${ranksText(missing)} did not join (joined: ${ranksText(joined)})`,
      };
      const waiters = [...group.joining.values()];
      group.joining.clear();
      for (const w of waiters) w.settle(failure);
    }, waitMs);
    call.on('cancelled', () => {
      if (group.joining.get(req.rank) === waiter) group.joining.delete(req.rank);
      waiter.settle({ code: grpc.status.CANCELLED, details: 'Join cancelled by the client' });
    });
    group.joining.set(req.rank, waiter);
    if (group.joining.size === group.worldSize) this.complete(req.group, group);
  }

  private complete(name: string, g: GroupState): void {
    g.generation += 1;
    // A new generation: whatever an older round left behind is void.
    for (const w of g.getters) {
      w.settle({ code: grpc.status.ABORTED, details: `group '${name}' moved on to generation ${g.generation}` });
    }
    g.getters.clear();
    g.values.clear();
    const waiters = [...g.joining.values()];
    g.joining.clear();
    for (const w of waiters) w.settle({ generation: g.generation });
  }

  private current(op: string, group: string, generation: number): GroupState | Failure {
    const g = this.groups.get(group);
    if (g === undefined || g.generation === 0) {
      return { code: grpc.status.FAILED_PRECONDITION, details: `${op}: group '${group}' has not completed a Join` };
    }
    if (generation !== g.generation) {
      return {
        code: grpc.status.FAILED_PRECONDITION,
        details: `${op}: generation ${generation} of group '${group}' is stale (current ${g.generation}); join again`,
      };
    }
    return g;
  }

  set(req: SetRequest, reply: (r: SetResponse | Failure) => void): void {
    if (req.key === '') return reply(invalid('Set: key must not be empty'));
    const g = this.current('Set', req.group, req.generation);
    if ('code' in g) return reply(g);
    g.values.set(req.key, Buffer.from(req.value));
    for (const w of [...g.getters]) {
      if (w.keys.every((k) => g.values.has(k))) {
        g.getters.delete(w);
        w.settle({ values: w.keys.map((k) => g.values.get(k)!) });
      }
    }
    reply({});
  }

  get(req: GetRequest, call: grpc.ServerUnaryCall<GetRequest, GetResponse>, reply: (r: { values: Buffer[] } | Failure) => void): void {
    if (req.keys.length === 0) return reply(invalid('Get: keys must not be empty'));
    const found = this.current('Get', req.group, req.generation);
    if ('code' in found) return reply(found);
    const g = found;
    if (req.keys.every((k) => g.values.has(k))) return reply({ values: req.keys.map((k) => g.values.get(k)!) });
    const waitMs = this.waitMs(req.timeoutMs);
    let done = false;
    const waiter: GetWaiter = {
      keys: req.keys,
      settle: (r) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        reply(r);
      },
    };
    const timer = setTimeout(() => {
      g.getters.delete(waiter);
      const missing = req.keys.filter((k) => !g.values.has(k));
      waiter.settle({
        code: grpc.status.DEADLINE_EXCEEDED,
        details: `keys ${missing.join(', ')} of group '${req.group}' generation ${req.generation} were not set within ${waitMs} ms`,
      });
    }, waitMs);
    call.on('cancelled', () => {
      g.getters.delete(waiter);
      waiter.settle({ code: grpc.status.CANCELLED, details: 'Get cancelled by the client' });
    });
    g.getters.add(waiter);
  }

  close(): void {
    const gone: Failure = { code: grpc.status.UNAVAILABLE, details: 'rendezvous service is shutting down' };
    for (const g of this.groups.values()) {
      for (const w of g.joining.values()) w.settle(gone);
      for (const w of g.getters) w.settle(gone);
    }
    this.groups.clear();
  }
}

function answer<T>(callback: grpc.sendUnaryData<T>): (r: T | Failure) => void {
  return (r) => {
    if (r !== null && typeof r === 'object' && 'code' in r && 'details' in r) {
      const f = r as Failure;
      callback({ code: f.code, details: f.details, metadata: new grpc.Metadata() });
      return;
    }
    callback(null, r as T);
  };
}

export function createRendezvousService(config: Partial<RendezvousServiceConfig> = {}): RendezvousService {
  const merged: RendezvousServiceConfig = { ...defaultRendezvousServiceConfig, ...config };
  if (!(merged.maxWaitMs > 0)) throw new Error(`createRendezvousService: maxWaitMs must be > 0, got ${merged.maxWaitMs}`);
  const state = new Rendezvous(merged);
  const implementation: RendezvousServiceServer = {
    join: (call, callback) => state.join(call.request, call, answer(callback)),
    set: (call, callback) => state.set(call.request, answer(callback)),
    get: (call, callback) => state.get(call.request, call, answer(callback)),
  };
  return {
    implementation,
    addTo: (server) => server.addService(RendezvousServiceService, implementation),
    close: () => state.close(),
  };
}
