// One rank of the multi-process communicator tests (communicator.int.test.ts forks it). Reads its
// scenario from argv[2] (JSON), talks to the test over the IPC channel, and never lets an error
// escape: every failure is reported as a message so the test can check it.
import { type Communicator, createCommunicator } from './communicator.ts';
import * as data from './comm-test-data.ts';

export interface WorkerConfig {
  scenario: 'collectives' | 'retry' | 'idle' | 'fail-in-op' | 'abort-in-op';
  rank: number;
  worldSize: number;
  address: string;
  group: string;
  timeoutMs: number;
  joinTimeoutMs: number;
  op: 'allReduceSum' | 'allToAllV' | null; // for fail-in-op
}

export type WorkerMessage =
  | { type: 'results'; results: Record<string, number[]>; generation: number }
  | { type: 'error'; phase: string; name: string; code: string; message: string; elapsedMs: number }
  | { type: 'connected'; generation: number }
  | { type: 'entering' }
  | { type: 'after-abort'; code: string; message: string; elapsedMs: number };

const config = JSON.parse(process.argv[2] ?? '{}') as WorkerConfig;

function send(m: WorkerMessage): Promise<void> {
  return new Promise((resolve) => process.send!(m, () => resolve()));
}

function nextMessage(): Promise<string> {
  return new Promise((resolve) => process.once('message', (m) => resolve(String(m))));
}

function describe(e: unknown): { name: string; code: string; message: string } {
  const err = e as { name?: string; code?: unknown; message?: string };
  return { name: String(err?.name), code: String(err?.code), message: String(err?.message ?? e) };
}

async function connect(): Promise<Communicator> {
  return createCommunicator({
    rank: config.rank,
    worldSize: config.worldSize,
    rendezvous: { address: config.address, group: config.group, timeoutMs: config.joinTimeoutMs },
    timeoutMs: config.timeoutMs,
  });
}

async function runCollectives(comm: Communicator): Promise<Record<string, number[]>> {
  const { rank, worldSize } = comm;
  const results: Record<string, number[]> = {};

  const sendCounts = Array.from({ length: worldSize }, (_, d) => data.a2aCount(rank, d));
  const recvCounts = Array.from({ length: worldSize }, (_, s) => data.a2aCount(s, rank));
  const a2a: number[] = [];
  for (let d = 0; d < worldSize; d++) for (let i = 0; i < sendCounts[d]; i++) a2a.push(data.a2aValue(rank, d, i));
  results.allToAllVF32 = Array.from(await comm.allToAllV(Float32Array.from(a2a), sendCounts, recvCounts));
  // Counts exchanged by the communicator itself.
  results.allToAllVI32 = Array.from(await comm.allToAllV(Int32Array.from(a2a), sendCounts));

  const red = Array.from({ length: data.reduceLength }, (_, i) => data.reduceValue(rank, i));
  results.allReduceF32 = Array.from(await comm.allReduceSum(Float32Array.from(red)));
  results.allReduceF64 = Array.from(await comm.allReduceSum(Float64Array.from(red.slice(0, 1000))));
  results.allReduceI32 = Array.from(await comm.allReduceSum(Int32Array.from(red.slice(0, 777))));

  const scatterCounts = Array.from({ length: worldSize }, (_, r) => data.scatterCount(r));
  const total = scatterCounts.reduce((a, b) => a + b, 0);
  results.reduceScatter = Array.from(await comm.reduceScatterSum(Float32Array.from({ length: total }, (_, i) => data.reduceValue(rank, i)), scatterCounts));
  results.reduceScatterEqual = Array.from(await comm.reduceScatterSum(Float64Array.from({ length: 3 * worldSize }, (_, i) => data.reduceValue(rank, i))));

  const mine = Float32Array.from({ length: data.gatherCount(rank) }, (_, i) => data.gatherValue(rank, i));
  const gatherCounts = Array.from({ length: worldSize }, (_, r) => data.gatherCount(r));
  results.allGather = Array.from(await comm.allGather(mine, gatherCounts));
  results.allGatherExchanged = Array.from(await comm.allGather(mine));

  const root = worldSize - 1;
  const b = rank === root ? Float32Array.from({ length: data.broadcastLength }, (_, i) => data.broadcastValue(i)) : new Float32Array(data.broadcastLength);
  results.broadcast = Array.from(await comm.broadcast(b, root));
  await comm.barrier();
  return results;
}

async function main(): Promise<void> {
  const started = Date.now();
  if (config.scenario === 'collectives' || config.scenario === 'retry') {
    let comm: Communicator;
    try {
      comm = await connect();
    } catch (e) {
      await send({ type: 'error', phase: 'rendezvous', ...describe(e), elapsedMs: Date.now() - started });
      if (config.scenario !== 'retry') return;
      await nextMessage(); // the test starts the missing rank, then tells us to retry
      comm = await connect();
    }
    const results = await runCollectives(comm);
    await send({ type: 'results', results, generation: comm.generation });
    await comm.dispose();
    return;
  }
  const comm = await connect();
  await send({ type: 'connected', generation: comm.generation });
  if (config.scenario === 'idle') {
    // Connected but never calls a collective: the peers' calls must time out, or the test kills us.
    await nextMessage();
    await comm.dispose();
    return;
  }
  await nextMessage();
  await send({ type: 'entering' });
  const t0 = Date.now();
  // abort-in-op: this rank gives up on its own while blocked in the collective.
  const aborter = config.scenario === 'abort-in-op' ? setTimeout(() => comm.abort('test aborts'), 300) : null;
  try {
    if (config.op === 'allToAllV') {
      const counts = new Array<number>(config.worldSize).fill(1000);
      await comm.allToAllV(new Float32Array(1000 * config.worldSize), counts, counts);
    } else {
      await comm.allReduceSum(new Float32Array(100_000));
    }
    await send({ type: 'error', phase: 'none', name: '', code: '', message: 'collective succeeded unexpectedly', elapsedMs: Date.now() - t0 });
  } catch (e) {
    await send({ type: 'error', phase: 'collective', ...describe(e), elapsedMs: Date.now() - t0 });
  }
  if (aborter !== null) clearTimeout(aborter);
  const t1 = Date.now();
  try {
    await comm.barrier();
    await send({ type: 'after-abort', code: 'none', message: 'barrier succeeded after a failure', elapsedMs: Date.now() - t1 });
  } catch (e) {
    const d = describe(e);
    await send({ type: 'after-abort', code: d.code, message: d.message, elapsedMs: Date.now() - t1 });
  }
  await comm.dispose();
}

main().then(
  () => process.disconnect?.(),
  async (e) => {
    await send({ type: 'error', phase: 'unexpected', ...describe(e), elapsedMs: 0 });
    process.exitCode = 3;
    process.disconnect?.();
  },
);
