// One load-generating thread: its own gRPC channel (its own HTTP/2 connection), its share of the
// rate or concurrency, and a record of every call it made. The parent starts all workers at one
// shared instant and merges their records (load.ts).
import { performance } from 'node:perf_hooks';
import { parentPort, workerData } from 'node:worker_threads';
import { Client, credentials } from '@grpc/grpc-js';
import { createTarget, type CallOutcome } from './targets.ts';
import type { WorkerInit, WorkerMessage, WorkerRecord, ParentMessage } from './protocol.ts';

const init = workerData as WorkerInit;
const port = parentPort!;

function post(message: WorkerMessage, transfer: ArrayBuffer[] = []): void {
  port.postMessage(message, transfer);
}

/** Growable float column: a load run makes up to millions of calls, so records stay in typed arrays. */
class Column {
  data = new Float64Array(1024);
  length = 0;
  push(x: number): void {
    if (this.length === this.data.length) {
      const grown = new Float64Array(this.data.length * 2);
      grown.set(this.data);
      this.data = grown;
    }
    this.data[this.length++] = x;
  }
  take(): Float64Array {
    return this.data.slice(0, this.length);
  }
}

const client = new Client(init.address, credentials.createInsecure(), {
  // A channel of its own per worker; without it grpc-js would share one connection per process.
  'grpc.use_local_subchannel_pool': 1,
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
});

client.waitForReady(Date.now() + init.connectTimeoutMs, (error) => {
  if (error) post({ type: 'fatal', worker: init.worker, error: `cannot connect to ${init.address}: ${error.message}` });
  else post({ type: 'ready', worker: init.worker });
});

port.on('message', (message: ParentMessage) => {
  if (message.type === 'start') void run(message.startEpochMs).catch((error: Error) => post({ type: 'fatal', worker: init.worker, error: error.stack ?? error.message }));
});

async function run(startEpochMs: number): Promise<void> {
  const target = createTarget(init.target, `${init.tag}-w${init.worker}`);
  // performance.now() of this thread at the shared start instant (timeOrigin differs per thread).
  const t0 = startEpochMs - performance.timeOrigin;
  const end = t0 + init.durationMs;
  const maxCalls = init.share.maxCalls ?? Number.POSITIVE_INFINITY;

  const endAt = new Column(); // ms since the shared start when the call finished
  const latency = new Column(); // ms
  const units = new Column();
  const codes = new Column();
  const firstResponse = new Column(); // ms, streams only
  const lag = new Column(); // ms a call went out after its scheduled time (open loop: generator health)
  const errorSamples: Record<string, string> = {};
  let sent = 0;
  let skipped = 0;
  let inFlight = 0;
  let stopped = false;
  let resolveIdle: (() => void) | null = null;
  // Resolves once sending has stopped and every call in flight has finished.
  const idle = new Promise<void>((resolve) => (resolveIdle = resolve));
  const checkIdle = () => {
    if (stopped && inFlight === 0) resolveIdle!();
  };

  const record = (sentAt: number, o: CallOutcome) => {
    const now = performance.now();
    inFlight--;
    endAt.push(now - t0);
    latency.push(now - sentAt);
    units.push(o.units);
    codes.push(o.code);
    if (!Number.isNaN(o.firstResponseMs)) firstResponse.push(o.firstResponseMs);
    if (o.code !== 0 && !(o.code in errorSamples)) errorSamples[o.code] = o.message.slice(0, 300);
  };

  const send = (index: number, scheduledAt: number, next: (() => void) | null) => {
    const now = performance.now();
    lag.push(now - scheduledAt);
    sent++;
    inFlight++;
    target.call(client, index, Date.now() + init.callTimeoutMs, (outcome) => {
      // Open loop measures from the scheduled time, so a slow server (or a busy generator) cannot hide
      // its queueing by delaying the next request (coordinated omission).
      record(scheduledAt, outcome);
      if (next) next();
      checkIdle();
    });
  };

  const wait = (ms: number) => new Promise((r) => setTimeout(r, Math.max(0, ms)));
  await wait(t0 - performance.now());
  const elu0 = performance.eventLoopUtilization();

  if (init.mode === 'closed') {
    let index = 0;
    const loop = () => {
      if (stopped) return;
      if (performance.now() >= end || index >= maxCalls) {
        stopped = true;
        return;
      }
      const i = index++;
      send(i, performance.now(), loop);
    };
    for (let c = 0; c < init.share.concurrency; c++) loop();
    // Clients waiting on a slow call see the end of the window only at their next turn; this timer
    // stops them there too, so the run ends at its duration plus the calls still in flight.
    const timer = setTimeout(() => {
      stopped = true;
      checkIdle();
    }, Math.max(0, end - performance.now()));
    await idle;
    clearTimeout(timer);
  } else {
    const interval = 1000 / init.share.rate;
    let next = t0 + init.share.phase * interval;
    let index = 0;
    const tick = () => {
      const now = performance.now();
      while (next <= now && !stopped) {
        if (next >= end || index >= maxCalls) break;
        if (inFlight >= init.share.maxInFlight) skipped++;
        else send(index, next, null);
        index++;
        next += interval;
      }
      if (next >= end || index >= maxCalls) {
        stopped = true;
        checkIdle();
        return;
      }
      setTimeout(tick, Math.max(0, next - performance.now()));
    };
    tick();
    await idle;
  }

  const elu = performance.eventLoopUtilization(elu0).utilization;
  client.close();
  const result: WorkerRecord = {
    worker: init.worker,
    sent,
    skipped,
    endAt: endAt.take(),
    latency: latency.take(),
    units: units.take(),
    codes: codes.take(),
    firstResponse: firstResponse.take(),
    lag: lag.take(),
    errorSamples,
    unit: target.unit,
    eventLoopUtilization: elu,
  };
  post({ type: 'result', record: result }, [
    result.endAt.buffer as ArrayBuffer,
    result.latency.buffer as ArrayBuffer,
    result.units.buffer as ArrayBuffer,
    result.codes.buffer as ArrayBuffer,
    result.firstResponse.buffer as ArrayBuffer,
    result.lag.buffer as ArrayBuffer,
  ]);
}
