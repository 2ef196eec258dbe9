// Messages between the load run (load.ts) and its worker threads (worker.ts).
import type { TargetOptions } from './targets.ts';

export type LoadMode = 'open' | 'closed';

/** A worker's part of the run. */
export interface WorkerShare {
  /** Open loop: calls per second this worker sends. */
  rate: number;
  /** Open loop: this worker's offset within one send interval, in intervals (0..1), so workers interleave. */
  phase: number;
  /** Open loop: calls this worker keeps in flight at most; a call due beyond it is skipped and counted. */
  maxInFlight: number;
  /** Closed loop: clients of this worker, each with one call in flight. */
  concurrency: number;
  /** Calls this worker makes at most; null = until the duration ends. */
  maxCalls: number | null;
}

export interface WorkerInit {
  worker: number;
  address: string;
  target: TargetOptions;
  mode: LoadMode;
  durationMs: number;
  callTimeoutMs: number;
  connectTimeoutMs: number;
  /** Unique per run: prefixes request ids. */
  tag: string;
  share: WorkerShare;
}

/** Everything one worker measured; every array has one entry per finished call, except firstResponse and lag. */
export interface WorkerRecord {
  worker: number;
  sent: number;
  skipped: number;
  endAt: Float64Array;
  latency: Float64Array;
  units: Float64Array;
  codes: Float64Array;
  firstResponse: Float64Array;
  lag: Float64Array;
  errorSamples: Record<string, string>;
  unit: string;
  /** Share of the run this worker's event loop was busy (0..1): near 1, the generator is the bottleneck. */
  eventLoopUtilization: number;
}

export type ParentMessage = { type: 'start'; startEpochMs: number };

export type WorkerMessage =
  | { type: 'ready'; worker: number }
  | { type: 'fatal'; worker: number; error: string }
  | { type: 'result'; record: WorkerRecord };
