// A load run: W worker threads share a target rate (open loop) or a number of concurrent clients
// (closed loop) against one loopback gRPC address, for a bounded duration and/or call count; their
// records are merged into one result (throughput, latency percentiles, errors by status code, a
// timeline for the plot).
import { randomBytes } from 'node:crypto';
import { availableParallelism, cpus, loadavg } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { LoadMode, WorkerInit, WorkerMessage, WorkerRecord } from './protocol.ts';
import { roundSummary, statusName, summarize, type LatencySummary } from './stats.ts';
import { TARGET_KINDS, type TargetOptions } from './targets.ts';

export type { LoadMode } from './protocol.ts';

export interface LoadConfig {
  /** "host:port" on the loopback interface (127.0.0.1, ::1 or localhost). */
  address: string;
  target: TargetOptions;
  mode: LoadMode;
  /** Open loop: calls per second, all workers together. */
  rate: number | null;
  /** Closed loop: calls in flight, all workers together. */
  concurrency: number | null;
  /** Sending stops after this; calls in flight then finish (or time out). */
  durationMs: number;
  /** Calls at most, all workers together; null = as many as the duration allows. */
  maxCalls: number | null;
  workers: number;
  callTimeoutMs: number;
  connectTimeoutMs: number;
  /** Open loop: calls in flight at most, all workers together, before due calls are skipped. */
  maxInFlight: number;
}

export const LOAD_DEFAULTS = {
  mode: 'closed' as LoadMode,
  rate: null,
  concurrency: 8,
  durationMs: 10_000,
  maxCalls: null,
  workers: Math.max(1, Math.min(4, availableParallelism() - 1)),
  callTimeoutMs: 10_000,
  connectTimeoutMs: 10_000,
  maxInFlight: 10_000,
} satisfies Partial<LoadConfig>;

export interface TimelineBucket {
  /** Seconds since the start, at the bucket's start. */
  t: number;
  ok: number;
  errors: number;
  units: number;
  p50: number | null;
  p99: number | null;
}

export interface LoadResult {
  target: TargetOptions;
  address: string;
  mode: LoadMode;
  rate: number | null;
  concurrency: number | null;
  durationMs: number;
  maxCalls: number | null;
  workers: number;
  startedAt: string;
  /** From the shared start to the last call's end. */
  elapsedS: number;
  calls: { sent: number; ok: number; errors: number; skipped: number };
  unit: string;
  throughput: { callsPerS: number; unitsPerS: number; okCallsPerS: number };
  units: number;
  /** Latency of successful calls, ms. */
  latencyMs: LatencySummary;
  /** Latency of failed calls, ms (fast refusals show here). */
  errorLatencyMs: LatencySummary;
  /** Streams: time to the first streamed answer, ms. */
  firstResponseMs: LatencySummary | null;
  /** Open loop: how late calls went out versus their schedule, ms (a busy generator shows here). */
  sendLagMs: LatencySummary;
  /** Per worker: share of the run its event loop was busy (near 1: the generator limits the run). */
  workerUtilization: number[];
  errorsByCode: Record<string, number>;
  errorSamples: Record<string, string>;
  timeline: TimelineBucket[];
  /** Up to ~4000 [seconds since start, latency ms, status code] points for the plot. */
  points: [number, number, number][];
  /** loadAvg1: the 1-minute load average at the start and end of the run (other work on the machine shows here). */
  host: { cpus: number; cpuModel: string; node: string; loadAvg1: [number, number] };
}

function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/** Splits "host:port" (IPv6 in brackets); throws naming the problem. */
export function parseLoopbackAddress(address: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(address);
  if (!m) throw new TypeError(`address "${address}" must be host:port (IPv6 in brackets)`);
  const port = Number(m[2]);
  if (!(port > 0 && port < 65536)) throw new TypeError(`address "${address}": port must be 1..65535`);
  // The generator can saturate a server; keeping it on loopback means it can only hit this machine.
  if (!isLoopbackHost(m[1]!)) throw new TypeError(`address "${address}" is not loopback: the load generator only targets 127.0.0.1, ::1 or localhost`);
  return { host: m[1]!, port };
}

function positiveInt(name: string, v: number): void {
  if (!Number.isInteger(v) || v < 1) throw new TypeError(`${name} must be an integer >= 1, got ${v}`);
}

/** Fills defaults and checks every field; the returned config is complete. */
export function resolveLoadConfig(input: Partial<LoadConfig> & Pick<LoadConfig, 'address' | 'target'>): LoadConfig {
  const c: LoadConfig = { ...LOAD_DEFAULTS, ...input };
  parseLoopbackAddress(c.address);
  if (!TARGET_KINDS.includes(c.target.kind)) throw new TypeError(`unknown target "${c.target.kind}"; valid: ${TARGET_KINDS.join(', ')}`);
  if (c.mode !== 'open' && c.mode !== 'closed') throw new TypeError(`mode must be "open" or "closed", got "${c.mode}"`);
  if (c.mode === 'open') {
    if (c.rate === null || !(c.rate > 0) || !Number.isFinite(c.rate)) throw new TypeError(`open loop needs a rate > 0 (calls/s), got ${c.rate}`);
    c.concurrency = null;
  } else {
    if (c.concurrency === null) throw new TypeError('closed loop needs a concurrency');
    positiveInt('concurrency', c.concurrency);
    c.rate = null;
  }
  if (!(c.durationMs > 0) || !Number.isFinite(c.durationMs)) throw new TypeError(`durationMs must be > 0, got ${c.durationMs}`);
  if (c.maxCalls !== null) positiveInt('maxCalls', c.maxCalls);
  positiveInt('workers', c.workers);
  positiveInt('callTimeoutMs', c.callTimeoutMs);
  positiveInt('connectTimeoutMs', c.connectTimeoutMs);
  positiveInt('maxInFlight', c.maxInFlight);
  const b = (c.target as { batch: number }).batch;
  positiveInt('target batch', b);
  // More workers than clients would leave some idle; more than calls, likewise.
  if (c.mode === 'closed') c.workers = Math.min(c.workers, c.concurrency!);
  if (c.maxCalls !== null) c.workers = Math.min(c.workers, c.maxCalls);
  return c;
}

/** n split over k parts as evenly as possible (the first parts get the remainder). */
export function split(n: number, k: number): number[] {
  return Array.from({ length: k }, (_, i) => Math.floor(n / k) + (i < n % k ? 1 : 0));
}

// Workers are TypeScript: each starts from a tiny script that registers tsx's loader in its own
// thread, then imports the real entry (the parent's --import does not reach worker threads).
function startWorker(init: WorkerInit): Worker {
  const tsxApi = import.meta.resolve('tsx/esm/api');
  const entry = new URL('./worker.ts', import.meta.url).href;
  const bootstrap =
    `import(${JSON.stringify(tsxApi)})` +
    `.then((tsx) => { tsx.register(); return import(${JSON.stringify(entry)}); })` +
    `.catch((error) => { setImmediate(() => { throw error; }); });`;
  return new Worker(bootstrap, { eval: true, workerData: init });
}

export async function runLoad(input: Partial<LoadConfig> & Pick<LoadConfig, 'address' | 'target'>): Promise<LoadResult> {
  const config = resolveLoadConfig(input);
  const loadBefore = loadavg()[0]!;
  const W = config.workers;
  const tag = `lt${Date.now().toString(36)}${randomBytes(3).toString('hex')}`;
  const concurrency = config.mode === 'closed' ? split(config.concurrency!, W) : Array<number>(W).fill(0);
  const maxCalls = config.maxCalls === null ? Array<number | null>(W).fill(null) : split(config.maxCalls, W);
  const inFlight = split(Math.max(config.maxInFlight, W), W);
  const workers = Array.from({ length: W }, (_, w) =>
    startWorker({
      worker: w,
      address: config.address,
      target: config.target,
      mode: config.mode,
      durationMs: config.durationMs,
      callTimeoutMs: config.callTimeoutMs,
      connectTimeoutMs: config.connectTimeoutMs,
      tag,
      share: {
        rate: config.mode === 'open' ? config.rate! / W : 0,
        phase: w / W,
        maxInFlight: inFlight[w]!,
        concurrency: concurrency[w]!,
        maxCalls: maxCalls[w]!,
      },
    }),
  );

  try {
    let startEpochMs = 0;
    const records = await new Promise<WorkerRecord[]>((resolve, reject) => {
      const ready = new Set<number>();
      const results: WorkerRecord[] = [];
      const fail = (error: Error) => reject(error);
      for (const worker of workers) {
        worker.on('error', fail);
        worker.on('exit', (code) => {
          if (results.length < W) fail(new Error(`load worker exited with code ${code} before reporting`));
        });
        worker.on('message', (m: WorkerMessage) => {
          if (m.type === 'fatal') fail(new Error(`load worker ${m.worker}: ${m.error}`));
          else if (m.type === 'ready') {
            ready.add(m.worker);
            if (ready.size === W) {
              // One shared start instant, a little ahead so every worker is waiting for it.
              startEpochMs = performance.timeOrigin + performance.now() + 100;
              for (const w of workers) w.postMessage({ type: 'start', startEpochMs });
            }
          } else {
            results.push(m.record);
            if (results.length === W) resolve(results);
          }
        });
      }
    });
    const result = aggregate(config, records, startEpochMs);
    result.host.loadAvg1 = [Math.round(loadBefore * 100) / 100, Math.round(loadavg()[0]! * 100) / 100];
    return result;
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

function concat(arrays: Float64Array[]): Float64Array {
  const out = new Float64Array(arrays.reduce((n, a) => n + a.length, 0));
  let o = 0;
  for (const a of arrays) {
    out.set(a, o);
    o += a.length;
  }
  return out;
}

/** Merges worker records into the run's result. Exported for tests. */
export function aggregate(config: LoadConfig, records: WorkerRecord[], startEpochMs: number): LoadResult {
  const endAt = concat(records.map((r) => r.endAt));
  const latency = concat(records.map((r) => r.latency));
  const units = concat(records.map((r) => r.units));
  const codes = concat(records.map((r) => r.codes));
  const n = endAt.length;
  const ok: number[] = [];
  const bad: number[] = [];
  const errorsByCode: Record<string, number> = {};
  let totalUnits = 0;
  let lastEnd = 0;
  for (let i = 0; i < n; i++) {
    lastEnd = Math.max(lastEnd, endAt[i]!);
    if (codes[i] === 0) {
      ok.push(latency[i]!);
      totalUnits += units[i]!;
    } else {
      bad.push(latency[i]!);
      const name = statusName(codes[i]!);
      errorsByCode[name] = (errorsByCode[name] ?? 0) + 1;
    }
  }
  const errorSamples: Record<string, string> = {};
  for (const r of records) for (const [code, msg] of Object.entries(r.errorSamples)) errorSamples[statusName(Number(code))] ??= msg;
  const elapsedS = Math.max(lastEnd, 1) / 1000;

  // Timeline: ~60-200 buckets of at least 100 ms.
  const bucketS = Math.max(0.1, Math.ceil((elapsedS / 100) * 10) / 10);
  const nb = Math.max(1, Math.ceil(elapsedS / bucketS));
  const buckets = Array.from({ length: nb }, () => ({ ok: [] as number[], errors: 0, units: 0 }));
  for (let i = 0; i < n; i++) {
    const b = buckets[Math.min(nb - 1, Math.floor(endAt[i]! / 1000 / bucketS))]!;
    if (codes[i] === 0) {
      b.ok.push(latency[i]!);
      b.units += units[i]!;
    } else b.errors++;
  }
  const timeline: TimelineBucket[] = buckets.map((b, i) => {
    const s = b.ok.length ? summarize(b.ok) : null;
    return {
      t: Math.round(i * bucketS * 1000) / 1000,
      ok: b.ok.length,
      errors: b.errors,
      units: b.units,
      p50: s ? Math.round(s.p50 * 1000) / 1000 : null,
      p99: s ? Math.round(s.p99 * 1000) / 1000 : null,
    };
  });

  const stride = Math.max(1, Math.ceil(n / 4000));
  const points: [number, number, number][] = [];
  for (let i = 0; i < n; i++) {
    // Every error is kept (they are what a reader looks for), successes are sampled.
    if (codes[i] !== 0 || i % stride === 0) {
      points.push([Math.round(endAt[i]!) / 1000, Math.round(latency[i]! * 1000) / 1000, codes[i]!]);
    }
    if (points.length > 8000) break;
  }

  const firstResponse = concat(records.map((r) => r.firstResponse));
  const cpuList = cpus();
  return {
    target: config.target,
    address: config.address,
    mode: config.mode,
    rate: config.rate,
    concurrency: config.concurrency,
    durationMs: config.durationMs,
    maxCalls: config.maxCalls,
    workers: config.workers,
    startedAt: new Date(startEpochMs).toISOString(),
    elapsedS: Math.round(elapsedS * 1000) / 1000,
    calls: {
      sent: records.reduce((s, r) => s + r.sent, 0),
      ok: ok.length,
      errors: bad.length,
      skipped: records.reduce((s, r) => s + r.skipped, 0),
    },
    unit: records[0]?.unit ?? '',
    throughput: {
      callsPerS: Math.round((n / elapsedS) * 100) / 100,
      okCallsPerS: Math.round((ok.length / elapsedS) * 100) / 100,
      unitsPerS: Math.round((totalUnits / elapsedS) * 100) / 100,
    },
    units: totalUnits,
    latencyMs: roundSummary(summarize(ok)),
    errorLatencyMs: roundSummary(summarize(bad)),
    firstResponseMs: firstResponse.length ? roundSummary(summarize(firstResponse)) : null,
    sendLagMs: roundSummary(summarize(concat(records.map((r) => r.lag)))),
    workerUtilization: [...records].sort((a, b) => a.worker - b.worker).map((r) => Math.round(r.eventLoopUtilization * 1000) / 1000),
    errorsByCode,
    errorSamples,
    timeline,
    points,
    host: { cpus: cpuList.length, cpuModel: cpuList[0]?.model ?? 'unknown', node: process.version, loadAvg1: [Number.NaN, Number.NaN] },
  };
}
