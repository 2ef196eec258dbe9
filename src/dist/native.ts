// The typed binding of the native Communicator (kernels/addon/comm_binding.cpp). Internal: callers use
// createCommunicator (communicator.ts). Names, order and nesting match the C++ side.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

export type CommArray = Float32Array | Float64Array | Int32Array | Uint8Array;
export type SumArray = Float32Array | Float64Array | Int32Array;

export interface NativeCommOptions {
  rank: number;
  size: number;
  host: string | null;
  iface: string | null;
  timeoutMs: number;
  // 'gloo' (CPU, TCP) or 'nccl' (GPUs; only in engines built with NCCL, see kernels/comm/nccl.h).
  backend: CommBackend;
  device: number | null; // nccl: CUDA device; null: rank modulo the visible devices
}

export type CommBackend = 'gloo' | 'nccl';

// Answered by JS for Gloo's connectFullMesh (routed to the rendezvous service).
export interface NativeStore {
  set(key: string, value: Uint8Array): Promise<void>;
  get(keys: string[], timeoutMs: number): Promise<Uint8Array[]>;
}

export interface NativeCommunicator {
  connect(): Promise<void>;
  // recvCounts null: exchanged first on the native side.
  allToAllV<T extends CommArray>(send: T, sendCounts: number[], recvCounts: number[] | null): Promise<T>;
  allReduceSum<T extends SumArray>(data: T): Promise<T>;
  reduceScatterSum<T extends SumArray>(data: T, recvCounts: number[]): Promise<T>;
  allGather<T extends CommArray>(data: T, counts: number[]): Promise<T>;
  broadcast<T extends CommArray>(data: T, root: number): Promise<T>;
  barrier(): Promise<void>;
  abort(reason: string): void;
  dispose(): Promise<void>;
}

export interface NativeCommInfo {
  rank: number;
  size: number;
  timeoutMs: number;
  aborted: boolean;
}

export interface NativeCommAddon {
  Communicator: new (options: NativeCommOptions, store: NativeStore) => NativeCommunicator;
  // What native code reaches through comm_from_js (kernels/addon/comm_handle.h): accepts the native
  // object or the TS Communicator holding it under `native`.
  communicatorInfo(communicator: object): NativeCommInfo;
  // Whether backend 'nccl' is in this build (absent in engines built before the NCCL backend).
  ncclAvailable?: boolean;
}

// MOEPILOT_ADDON names another build (as in src/engine/native.ts): a bundled CLI has no checkout around it.
export const defaultAddonPath = process.env.MOEPILOT_ADDON || fileURLToPath(new URL('../../kernels/build/moepilot.node', import.meta.url));

// Loads the addon built by scripts/build-native.sh (or the one at `path`).
export function loadCommAddon(path: string = defaultAddonPath): NativeCommAddon {
  const require = createRequire(import.meta.url);
  try {
    return require(path) as NativeCommAddon;
  } catch (e) {
    throw new Error(`cannot load the native engine at ${path} (build it: bash scripts/build-native.sh)`, { cause: e });
  }
}
