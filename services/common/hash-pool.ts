// sha256 of checkpoint files on worker threads. A shard of an A2.7B rank is tens of GB and one thread hashes about
// 2 GB/s, so verifying a checkpoint file after file on a service's own thread takes minutes; the pool hashes up to
// `size` files at once, each on its own thread, with the same result as hashing in-thread. The checkpoint service
// verifies what it stores and restores with one; a rank, the files LoadShard reads.
//
// The worker is a few lines of plain JavaScript evaluated from a string: nothing to compile or bundle beside the
// service.
import { Worker } from 'node:worker_threads';

export interface HashPool {
  /** The file's sha256 (lowercase hex); rejects when it cannot be read. */
  hashFile(path: string): Promise<string>;
  /** Stops the threads; calls in flight reject. */
  close(): Promise<void>;
  readonly size: number;
}

// sha256File (services/common/sha256-file.ts) in a thread of its own: the same digests.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { createReadStream } = require('node:fs');
parentPort.on('message', async ({ id, path }) => {
  try {
    const hash = createHash('sha256');
    for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk);
    parentPort.postMessage({ id, sha256: hash.digest('hex') });
  } catch (err) {
    parentPort.postMessage({ id, error: err && err.message ? err.message : String(err) });
  }
});
`;

interface Job {
  id: number;
  path: string;
  resolve: (sha: string) => void;
  reject: (err: Error) => void;
}

interface Slot {
  worker: Worker;
  job: Job | null;
}

/** A pool of `size` hashing threads, started on first use; idle threads do not keep the process alive. */
export function createHashPool(size: number): HashPool {
  if (!Number.isInteger(size) || size < 1) throw new RangeError(`hash pool size must be a positive integer, got ${size}`);
  const slots: Slot[] = [];
  const queue: Job[] = [];
  let nextId = 0;
  let closed = false;

  function startSlot(): Slot {
    const worker = new Worker(WORKER_SOURCE, { eval: true });
    const slot: Slot = { worker, job: null };
    worker.unref();
    worker.on('message', (m: { id: number; sha256?: string; error?: string }) => {
      const job = slot.job;
      if (!job || job.id !== m.id) return;
      slot.job = null;
      worker.unref();
      if (m.error !== undefined) job.reject(new Error(`sha256 of ${job.path}: ${m.error}`));
      else job.resolve(m.sha256!);
      pump();
    });
    // A thread that dies fails its job and leaves the pool; the next job starts a fresh one.
    const fail = (err: Error) => {
      const i = slots.indexOf(slot);
      if (i >= 0) slots.splice(i, 1);
      if (slot.job) slot.job.reject(err);
      slot.job = null;
      pump();
    };
    worker.on('error', (err) => fail(err));
    worker.on('exit', (code) => fail(new Error(`hash worker exited with code ${code}`)));
    slots.push(slot);
    return slot;
  }

  function pump(): void {
    while (!closed && queue.length > 0) {
      let slot = slots.find((s) => s.job === null);
      if (!slot && slots.length < size) slot = startSlot();
      if (!slot) return;
      const job = queue.shift()!;
      slot.job = job;
      slot.worker.ref();  // a job in flight keeps the process alive until its answer
      slot.worker.postMessage({ id: job.id, path: job.path });
    }
  }

  return {
    size,
    hashFile(path: string): Promise<string> {
      if (closed) return Promise.reject(new Error('hash pool is closed'));
      return new Promise<string>((resolve, reject) => {
        queue.push({ id: nextId++, path, resolve, reject });
        pump();
      });
    },
    async close(): Promise<void> {
      closed = true;
      for (const job of queue.splice(0)) job.reject(new Error('hash pool is closed'));
      await Promise.all(slots.splice(0).map((s) => s.worker.terminate()));
    },
  };
}
