// Collectives between the ranks of a process group (one process per rank), over the native engine's
// Gloo communicator (CPU, TCP) or, with backend 'nccl', its NCCL communicator (one GPU per rank; host
// arrays are staged through the device). Ranks meet through the rendezvous service (gRPC), so no
// shared files or fixed ports are needed: a Gloo rank listens on an ephemeral port and publishes it
// there; NCCL's rank 0 publishes its unique id there.
//
// Every method runs off the event loop on the communicator's own native thread, in call order, and
// is bounded by `timeoutMs`. A timeout or a lost peer rejects with CommError (code TIMEOUT or COMM)
// naming the operation and the ranks involved; the communicator is then aborted and every later call
// fails at once. Ranks must issue the same collectives in the same order.
import { CommError, toCommError } from './errors.ts';
import { type CommArray, type CommBackend, loadCommAddon, type NativeCommAddon, type NativeCommunicator, type SumArray } from './native.ts';
import { createRendezvousClient, type RendezvousClient } from './rendezvous-client.ts';

export type { CommArray, CommBackend, SumArray } from './native.ts';

export interface CommunicatorOptions {
  rank: number;
  worldSize: number;
  rendezvous: {
    address: string; // host:port of the rendezvous service
    group: string; // process group id (e.g. run id + role)
    timeoutMs?: number | null; // how long to wait for all ranks to join; default: timeoutMs
  };
  // Bound on connecting and on every collective (ms). Default 60 s.
  timeoutMs?: number | null;
  // Address peers reach this rank at: host name/IP (default 127.0.0.1) or a network interface name.
  host?: string | null;
  iface?: string | null;
  // 'gloo' (default) or 'nccl'. NCCL needs an engine built with it (nvcc, CUDA and NCCL_HOME at
  // build time) and one GPU per rank; `device` picks the GPU (default: rank modulo the GPU count).
  backend?: CommBackend | null;
  device?: number | null;
}

export interface CommunicatorDeps {
  addon: NativeCommAddon | null; // null: load kernels/build/moepilot.node
  rendezvous: RendezvousClient | null; // null: a client for options.rendezvous.address
}

export interface Communicator {
  readonly rank: number;
  readonly worldSize: number;
  readonly group: string;
  readonly generation: number; // of the rendezvous round this communicator came from
  // The native object: other native code (the engine) takes it to reach the C++ Collectives.
  readonly native: object;

  // send holds the block for rank r at offset sum(sendCounts[0..r)); resolves with the blocks from
  // every rank in rank order. recvCounts, when not given, are exchanged first (an extra round).
  allToAllV<T extends CommArray>(send: T, sendCounts: readonly number[], recvCounts?: readonly number[]): Promise<T>;
  // Elementwise sum over ranks; every rank gets the same values.
  allReduceSum<T extends SumArray>(data: T): Promise<T>;
  // data: sum(recvCounts) elements; resolves with this rank's block of the sum (recvCounts[rank]
  // elements). Without recvCounts, data is split into worldSize equal blocks.
  reduceScatterSum<T extends SumArray>(data: T, recvCounts?: readonly number[]): Promise<T>;
  // Concatenation of every rank's data in rank order. counts (elements per rank), when not given,
  // are gathered first.
  allGather<T extends CommArray>(data: T, counts?: readonly number[]): Promise<T>;
  // root's data on every rank (data must have the same length everywhere).
  broadcast<T extends CommArray>(data: T, root: number): Promise<T>;
  barrier(): Promise<void>;
  // Fails the communicator here (a collective in flight fails; peers waiting on us fail fast).
  abort(reason?: string): void;
  // Waits for queued calls, then closes the connections.
  dispose(): Promise<void>;
}

const defaultTimeoutMs = 60_000;

function checkCounts(op: string, what: string, counts: readonly number[], worldSize: number): number {
  if (counts.length !== worldSize) {
    throw new CommError(`${op}: ${what} has ${counts.length} entries, expected one per rank (${worldSize})`, 'INVALID_ARGUMENT');
  }
  let sum = 0;
  counts.forEach((c, r) => {
    if (!Number.isInteger(c) || c < 0) throw new CommError(`${op}: ${what}[${r}] must be a non-negative integer, got ${c}`, 'INVALID_ARGUMENT');
    sum += c;
  });
  return sum;
}

function checkOptions(o: CommunicatorOptions): void {
  const bad = (msg: string) => new CommError(`createCommunicator: ${msg}`, 'INVALID_ARGUMENT');
  if (!Number.isInteger(o.worldSize) || o.worldSize < 1) throw bad(`worldSize must be an integer >= 1, got ${o.worldSize}`);
  if (!Number.isInteger(o.rank) || o.rank < 0 || o.rank >= o.worldSize) throw bad(`rank must be an integer in [0, ${o.worldSize}), got ${o.rank}`);
  if (o.rendezvous === undefined || o.rendezvous === null) throw bad('rendezvous {address, group} is required');
  if (typeof o.rendezvous.address !== 'string' || o.rendezvous.address === '') throw bad('rendezvous.address must be host:port');
  if (typeof o.rendezvous.group !== 'string' || o.rendezvous.group === '') throw bad('rendezvous.group must not be empty');
  for (const [name, v] of [['timeoutMs', o.timeoutMs], ['rendezvous.timeoutMs', o.rendezvous.timeoutMs]] as const) {
    if (v !== undefined && v !== null && !(Number.isFinite(v) && v > 0)) throw bad(`${name} must be a positive number of ms, got ${v}`);
  }
  if (o.host === '') throw bad('host must not be empty (leave it out for 127.0.0.1)');
  if (o.backend !== undefined && o.backend !== null && o.backend !== 'gloo' && o.backend !== 'nccl') {
    throw bad(`backend must be 'gloo' or 'nccl', got '${String(o.backend)}'`);
  }
  if (o.device !== undefined && o.device !== null && !(Number.isInteger(o.device) && o.device >= 0)) {
    throw bad(`device must be a non-negative integer, got ${o.device}`);
  }
}

export async function createCommunicator(options: CommunicatorOptions, deps: Partial<CommunicatorDeps> = {}): Promise<Communicator> {
  checkOptions(options);
  const timeoutMs = options.timeoutMs ?? defaultTimeoutMs;
  const joinTimeoutMs = options.rendezvous.timeoutMs ?? timeoutMs;
  const iface = options.iface ?? null;
  const host = iface === null ? (options.host ?? '127.0.0.1') : null;
  const { rank, worldSize } = options;
  const { group } = options.rendezvous;

  const addon = deps.addon ?? loadCommAddon();
  const ownClient = deps.rendezvous == null;
  const client = deps.rendezvous ?? createRendezvousClient({ address: options.rendezvous.address });
  let native: NativeCommunicator | null = null;
  let generation: number;
  try {
    generation = await client.join({ group, rank, worldSize, timeoutMs: joinTimeoutMs });
    const gen = generation;
    native = new addon.Communicator(
      { rank, size: worldSize, host, iface, timeoutMs, backend: options.backend ?? 'gloo', device: options.device ?? null },
      {
        set: (key, value) => client.set(group, gen, key, value, timeoutMs),
        get: (keys, waitMs) => client.get(group, gen, keys, waitMs),
      },
    );
    await native.connect();
  } catch (e) {
    if (native !== null) await native.dispose().catch(() => undefined);
    throw toCommError(e);
  } finally {
    // The service is needed for meeting only; collectives go peer to peer.
    if (ownClient) client.close();
  }
  return new CommunicatorImpl(native, rank, worldSize, group, generation);
}

class CommunicatorImpl implements Communicator {
  private disposed = false;

  constructor(
    readonly native: NativeCommunicator,
    readonly rank: number,
    readonly worldSize: number,
    readonly group: string,
    readonly generation: number,
  ) {}

  private live(op: string): void {
    if (this.disposed) throw new CommError(`${op}: communicator of rank ${this.rank} is disposed`, 'COMM');
  }

  private async call<R>(run: () => Promise<R>): Promise<R> {
    try {
      return await run();
    } catch (e) {
      throw toCommError(e);
    }
  }

  async allToAllV<T extends CommArray>(send: T, sendCounts: readonly number[], recvCounts?: readonly number[]): Promise<T> {
    this.live('allToAllV');
    const total = checkCounts('allToAllV', 'sendCounts', sendCounts, this.worldSize);
    if (total !== send.length) {
      throw new CommError(`allToAllV: send has ${send.length} elements but sendCounts sum to ${total}`, 'INVALID_ARGUMENT');
    }
    if (recvCounts !== undefined) checkCounts('allToAllV', 'recvCounts', recvCounts, this.worldSize);
    const recv = recvCounts === undefined ? null : [...recvCounts];
    return this.call(() => this.native.allToAllV(send, [...sendCounts], recv));
  }

  async allReduceSum<T extends SumArray>(data: T): Promise<T> {
    this.live('allReduceSum');
    return this.call(() => this.native.allReduceSum(data));
  }

  async reduceScatterSum<T extends SumArray>(data: T, recvCounts?: readonly number[]): Promise<T> {
    this.live('reduceScatterSum');
    let counts: readonly number[];
    if (recvCounts === undefined) {
      if (data.length % this.worldSize !== 0) {
        throw new CommError(`reduceScatterSum: ${data.length} elements do not split into ${this.worldSize} equal blocks; pass recvCounts`, 'INVALID_ARGUMENT');
      }
      counts = new Array<number>(this.worldSize).fill(data.length / this.worldSize);
    } else {
      const total = checkCounts('reduceScatterSum', 'recvCounts', recvCounts, this.worldSize);
      if (total !== data.length) {
        throw new CommError(`reduceScatterSum: data has ${data.length} elements but recvCounts sum to ${total}`, 'INVALID_ARGUMENT');
      }
      counts = recvCounts;
    }
    return this.call(() => this.native.reduceScatterSum(data, [...counts]));
  }

  async allGather<T extends CommArray>(data: T, counts?: readonly number[]): Promise<T> {
    this.live('allGather');
    let c: number[];
    if (counts === undefined) {
      const ones = new Array<number>(this.worldSize).fill(1);
      c = Array.from(await this.call(() => this.native.allGather(Int32Array.of(data.length), ones)));
    } else {
      checkCounts('allGather', 'counts', counts, this.worldSize);
      if (counts[this.rank] !== data.length) {
        throw new CommError(`allGather: data has ${data.length} elements but counts[${this.rank}] is ${counts[this.rank]}`, 'INVALID_ARGUMENT');
      }
      c = [...counts];
    }
    return this.call(() => this.native.allGather(data, c));
  }

  async broadcast<T extends CommArray>(data: T, root: number): Promise<T> {
    this.live('broadcast');
    if (!Number.isInteger(root) || root < 0 || root >= this.worldSize) {
      throw new CommError(`broadcast: root must be in [0, ${this.worldSize}), got ${root}`, 'INVALID_ARGUMENT');
    }
    return this.call(() => this.native.broadcast(data, root));
  }

  async barrier(): Promise<void> {
    this.live('barrier');
    return this.call(() => this.native.barrier());
  }

  abort(reason = 'aborted by the application'): void {
    if (this.disposed) return;
    this.native.abort(`${reason} (rank ${this.rank})`);
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.native.dispose();
  }
}
