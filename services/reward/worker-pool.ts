// A fixed pool of worker threads for CPU-heavy scoring (regexes and answer normalisation over big
// batches would otherwise stall the event loop that serves gRPC). Batches are split into chunks
// spread over the workers; a worker that dies fails only its own task and is replaced.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { InternalError, InvalidArgumentError, UnavailableError } from '../common/errors.ts';
import type { ScorerRegistry } from './scorers/registry.ts';
import type { ScoreInput } from './scorers/types.ts';

export interface ScoringTask {
  id: number;
  /** Local scorers with params already parsed by their parseParams. */
  scorers: { name: string; params: unknown }[];
  items: ScoreInput[];
}

export type ScoringReply =
  | { id: number; values: number[][] }
  | { id: number; error: { name: string; message: string } };

export interface ScoringPoolConfig {
  /** Worker threads; 0 scores in the calling thread (small deployments, tests of the logic). */
  size: number;
  /** Items per chunk at least, so tiny batches do not pay a message round-trip per item. */
  minChunk: number;
}

export interface ScoringPool {
  /** values[s][i]: local scorer s on item i. */
  score(scorers: { name: string; params: unknown }[], items: ScoreInput[]): Promise<number[][]>;
  close(): Promise<void>;
  readonly size: number;
}

const WORKER_URL = new URL('./scoring-worker.ts', import.meta.url);
// Where this module is bundled (scripts/device/bundle-cli.mjs), the worker's own bundle sits beside it.
const BUNDLED_WORKER_URL = new URL('./scoring-worker.mjs', import.meta.url);

// The worker is TypeScript. On Node 20 a worker does not apply `--import tsx` from execArgv before
// loading its entry file, so the worker starts from a tiny script that registers tsx's loader in
// its own thread and then imports the real entry. This works under `node --import tsx`, the tsx CLI
// and node's test runner alike.
function startWorker(): Worker {
  if (existsSync(fileURLToPath(BUNDLED_WORKER_URL))) return new Worker(BUNDLED_WORKER_URL);
  const tsxApi = import.meta.resolve('tsx/esm/api');
  const bootstrap =
    `import(${JSON.stringify(tsxApi)})` +
    `.then((tsx) => { tsx.register(); return import(${JSON.stringify(WORKER_URL.href)}); })` +
    `.catch((error) => { setImmediate(() => { throw error; }); });`;
  return new Worker(bootstrap, { eval: true });
}

interface Slot {
  worker: Worker;
  busy: { task: ScoringTask; resolve: (v: number[][]) => void; reject: (e: Error) => void } | null;
}

export function createScoringPool(deps: { registry: ScorerRegistry }, config: ScoringPoolConfig): ScoringPool {
  if (!Number.isInteger(config.size) || config.size < 0) {
    throw new InvalidArgumentError('size', `must be an integer >= 0, got ${config.size}`);
  }
  if (config.size === 0) return createInlinePool(deps.registry);

  const slots: Slot[] = [];
  const queue: { task: ScoringTask; resolve: (v: number[][]) => void; reject: (e: Error) => void }[] = [];
  let nextId = 1;
  let closed = false;

  function spawn(): Slot {
    const slot: Slot = { worker: startWorker(), busy: null };
    slot.worker.on('message', (reply: ScoringReply) => {
      const job = slot.busy;
      slot.busy = null;
      if (job && job.task.id === reply.id) {
        if ('values' in reply) job.resolve(reply.values);
        else job.reject(new InternalError(`scoring failed: ${reply.error.name}: ${reply.error.message}`));
      }
      dispatch();
    });
    const fail = (error: Error) => {
      const job = slot.busy;
      slot.busy = null;
      job?.reject(new InternalError(`scoring worker died: ${error.message}`, { cause: error }));
      const index = slots.indexOf(slot);
      if (index >= 0) slots.splice(index, 1);
      if (!closed) {
        slots.push(spawn());
        dispatch();
      }
    };
    slot.worker.on('error', fail);
    slot.worker.on('exit', (code) => {
      if (!closed && slots.includes(slot)) fail(new Error(`exited with code ${code}`));
    });
    return slot;
  }

  function dispatch(): void {
    for (const slot of slots) {
      if (queue.length === 0) return;
      if (slot.busy) continue;
      const job = queue.shift()!;
      slot.busy = job;
      slot.worker.postMessage(job.task);
    }
  }

  for (let i = 0; i < config.size; i += 1) slots.push(spawn());

  function run(scorers: ScoringTask['scorers'], items: ScoreInput[]): Promise<number[][]> {
    if (closed) return Promise.reject(new UnavailableError('scoring pool is closed'));
    return new Promise((resolve, reject) => {
      queue.push({ task: { id: nextId++, scorers, items }, resolve, reject });
      dispatch();
    });
  }

  return {
    size: config.size,
    async score(scorers, items) {
      if (scorers.length === 0 || items.length === 0) return scorers.map(() => []);
      const chunk = Math.max(config.minChunk, Math.ceil(items.length / config.size));
      const parts: Promise<number[][]>[] = [];
      for (let start = 0; start < items.length; start += chunk) parts.push(run(scorers, items.slice(start, start + chunk)));
      const results = await Promise.all(parts);
      return scorers.map((_, s) => results.flatMap((r) => r[s]));
    },
    async close() {
      closed = true;
      for (const job of queue.splice(0)) job.reject(new UnavailableError('scoring pool closed'));
      await Promise.all(slots.map((slot) => slot.worker.terminate()));
      slots.length = 0;
    },
  };
}

function createInlinePool(registry: ScorerRegistry): ScoringPool {
  return {
    size: 0,
    async score(scorers, items) {
      return scorers.map((spec) => items.map(registry.getLocal(spec.name).bind(spec.params)));
    },
    async close() {},
  };
}
