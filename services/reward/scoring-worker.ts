// Worker thread body: scores chunks of items with the local scorers named in each task.
// Parameters arrive already validated by the server (parseParams); the worker only binds and runs.
import { parentPort } from 'node:worker_threads';
import { createScorerRegistry, LOCAL_SCORERS } from './scorers/registry.ts';
import type { ScoringTask, ScoringReply } from './worker-pool.ts';

const registry = createScorerRegistry(LOCAL_SCORERS);

if (!parentPort) throw new Error('scoring-worker.ts must run as a worker thread');
const port = parentPort;

port.on('message', (task: ScoringTask) => {
  let reply: ScoringReply;
  try {
    reply = { id: task.id, values: runScoringTask(task) };
  } catch (error) {
    const e = error instanceof Error ? error : new Error(String(error));
    reply = { id: task.id, error: { name: e.name, message: e.message } };
  }
  port.postMessage(reply);
});

function runScoringTask(task: ScoringTask): number[][] {
  return task.scorers.map((spec) => {
    const score = registry.getLocal(spec.name).bind(spec.params);
    return task.items.map(score);
  });
}
