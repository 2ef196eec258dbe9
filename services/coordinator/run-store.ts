// Durable run records on NATS: one JetStream subject per run (pilot.runstate.<id>) in a stream that keeps only
// the last message per subject, so the coordinator is stateless on disk and a restarted coordinator finds the
// runs it was driving (and resumes those still running). The in-memory map is authoritative while the process
// lives; every change is published before it is reported.
import { DeliverPolicy, RetentionPolicy, StorageType, jetstream, jetstreamManager } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import { ensureStream } from '../common/nats/ensure.ts';
import { checkToken } from '../common/nats/names.ts';

export const RUN_STATE_STREAM = 'PILOT_RUN_STATE';
export const RUN_STATE_PREFIX = 'pilot.runstate';

export interface RunStore<T extends { id: string }> {
  put(run: T): Promise<void>;
  /**
   * Changes a run's record: `change` receives the newest one (a change still being written included) and returns
   * the next. One run's changes are written in call order, so a later write never carries an older copy (a step's
   * checkpoint noted just before the run's final state is not lost to it).
   */
  update(id: string, change: (cur: T) => T): Promise<T>;
  get(id: string): T | undefined;
  /** In no particular order after a restart (the stream keeps last-updated order). */
  list(): T[];
}

export async function createRunStore<T extends { id: string }>(deps: { nc: NatsConnection }, config: { stream?: string } = {}): Promise<RunStore<T>> {
  const stream = config.stream ?? RUN_STATE_STREAM;
  const jsm = await jetstreamManager(deps.nc);
  const js = jetstream(deps.nc);
  await ensureStream(jsm, {
    name: stream,
    subjects: [`${RUN_STATE_PREFIX}.*`],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    max_msgs_per_subject: 1,
  });
  const runs = new Map<string, T>();
  const info = await jsm.streams.info(stream);
  if (info.state.messages > 0) {
    const consumer = await js.consumers.get(stream, { deliver_policy: DeliverPolicy.LastPerSubject, filter_subjects: `${RUN_STATE_PREFIX}.*` });
    const messages = await consumer.consume();
    try {
      for await (const m of messages) {
        const run = m.json<T>();
        runs.set(run.id, run);
        if (m.info.pending === 0) break;
      }
    } finally {
      messages.stop();
    }
  }
  // Per run: the newest record not yet written, and the tail of its chain of writes.
  const newest = new Map<string, T>();
  const writes = new Map<string, Promise<void>>();
  const write = async (run: T): Promise<void> => {
    await js.publish(`${RUN_STATE_PREFIX}.${checkToken('run id', run.id)}`, JSON.stringify(run));
    runs.set(run.id, run);
  };
  return {
    put: write,
    async update(id, change) {
      const cur = newest.get(id) ?? runs.get(id);
      if (!cur) throw new Error(`run store: no run ${id}`);
      const next = change(cur);
      newest.set(id, next);
      const w = (writes.get(id) ?? Promise.resolve()).catch(() => undefined).then(() => write(next));
      writes.set(id, w);
      try {
        await w;
      } finally {
        if (newest.get(id) === next) newest.delete(id);
        if (writes.get(id) === w) writes.delete(id);
      }
      return next;
    },
    get: (id) => runs.get(id),
    list: () => [...runs.values()],
  };
}
