// `pilot oracle --ranks N [--comm nccl]`: the oracle check with N CPU-engine ranks, one process each
// (expert parallel over Gloo, or over NCCL with one GPU per rank and host buffers staged through it;
// data parallel over the reference's sequences). This process hosts the rendezvous service, forks the
// ranks, and assembles their pieces into the one-rank layout that compareOutputs checks.
import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';

import type { ExpertGradDtype } from '../engine/engine.ts';
import { readHfConfig, type RopeFreqDtype } from '../hf/config.ts';
import { type Outputs, type Reference, compareOutputs, readReference, type ModelOracleReport } from '../oracle/model-oracle.ts';
import type { OracleWorkerConfig, OracleWorkerMessage, OracleWorkerResult } from './oracle-rank-worker.ts';
import type { CommBackend } from './communicator.ts';
import { createRendezvousService } from './rendezvous-server.ts';

// From source (tsx) the worker is the .ts module beside this one. In the bundle that
// scripts/device/bundle-cli.mjs builds for machines without node_modules, this module is part of
// pilot.mjs and the worker is its own bundle beside it, plain JavaScript.
const fromSource = import.meta.url.endsWith('.ts');
const workerPath = fileURLToPath(new URL(fromSource ? './oracle-rank-worker.ts' : './oracle-rank-worker.mjs', import.meta.url));
const workerExecArgv = fromSource ? ['--import', 'tsx'] : [];

export interface RanksRunOptions {
  ranks: number;
  /** Bound on the rendezvous and on every collective. */
  timeoutMs?: number;
  /** Optimizer steps to run after the checks (their results come back in `trained`). */
  trainSteps?: number;
  lr?: number;
  ropeFreqDtype?: RopeFreqDtype;
  /** Collectives backend between the ranks (default gloo). */
  comm?: CommBackend;
  /** Each rank's engine on its GPU (cuda:<rank>; needs comm 'nccl' and a GPU per rank). */
  device?: boolean;
  /** With device: the routed experts' gradient precision on each rank's GPU (default float32). */
  expertGradDtype?: ExpertGradDtype;
  /** Expert bounds [ranks + 1] (default: the even split of expertBounds). */
  bounds?: number[];
  /** The rank of each reference sequence (default round-robin). */
  assign?: number[];
  /** The worker's entry point and Node flags (default: oracle-rank-worker next to this module). */
  worker?: { path: string; execArgv: string[] };
}

export interface RanksRun {
  outputs: Outputs;
  reference: Reference;
  /** After trainSteps: logprobs of every row and every parameter, assembled from the ranks. */
  trained: { logprobs: Float32Array; params: Map<string, Float32Array> } | null;
}

function merge(parts: (Record<string, Float32Array> | null)[]): Map<string, Float32Array> | null {
  if (parts.some((p) => p === null)) return null;
  const out = new Map<string, Float32Array>();
  for (const p of parts) for (const [k, v] of Object.entries(p!)) out.set(k, v);
  return out;
}

/** Runs the ranks and assembles their results. */
export async function runRanks(dir: string, options: RanksRunOptions): Promise<RanksRun> {
  const { ranks } = options;
  if (!Number.isInteger(ranks) || ranks < 1) throw new RangeError(`ranks must be an integer >= 1, got ${ranks}`);
  const cfg = await readHfConfig(dir);
  if (cfg.engine.numExperts < ranks) throw new RangeError(`${ranks} ranks need at least ${ranks} experts; the model has ${cfg.engine.numExperts}`);
  const reference = await readReference(dir);
  const service = createRendezvousService({ maxWaitMs: options.timeoutMs ?? 60_000 });
  const server = new grpc.Server();
  service.addTo(server);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  const group = `oracle-${process.pid}-${Date.now()}`;
  const children = Array.from({ length: ranks }, (_, rank) => {
    const config: OracleWorkerConfig = {
      dir,
      rank,
      worldSize: ranks,
      address: `127.0.0.1:${port}`,
      group,
      timeoutMs: options.timeoutMs ?? 60_000,
      trainSteps: options.trainSteps ?? 0,
      lr: options.lr ?? 1e-3,
      ropeFreqDtype: options.ropeFreqDtype ?? 'float32',
      comm: options.comm ?? 'gloo',
      device: options.device ?? false,
      expertGradDtype: options.expertGradDtype ?? 'float32',
      bounds: options.bounds ?? null,
      assign: options.assign ?? null,
    };
    return fork(options.worker?.path ?? workerPath, [JSON.stringify(config)], {
      execArgv: options.worker?.execArgv ?? workerExecArgv,
      serialization: 'advanced',
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      env: { ...process.env, OMP_NUM_THREADS: process.env.OMP_NUM_THREADS ?? '1' },
    });
  });
  try {
    const results = await Promise.all(
      children.map(
        (child, rank) =>
          new Promise<OracleWorkerResult>((resolve, reject) => {
            let settled = false;
            child.on('message', (m: OracleWorkerMessage) => {
              settled = true;
              if (m.type === 'result') resolve(m);
              else reject(Object.assign(new Error(`rank ${rank}: ${m.name}: ${m.message}`), { code: m.code }));
            });
            child.on('exit', (code, signal) => {
              if (!settled) reject(new Error(`rank ${rank} exited (${signal ?? `code ${code}`}) without a result`));
            });
          }),
      ),
    );
    const N = reference.batch.tokens.length;
    const V = cfg.engine.vocab;
    const E = cfg.engine.numExperts;
    const M = cfg.engine.layerIsMoe.filter(Boolean).length;
    const logprobs = new Float32Array(N);
    const logits = reference.logits ? new Float32Array(N * V) : null;
    const routerLogits = reference.routerLogits ? new Float32Array(M * N * E) : null;
    const trainedLogprobs = new Float32Array(N);
    for (const r of results) {
      const n = r.rows.length;
      r.rows.forEach((g, i) => {
        logprobs[g] = r.logprobs[i];
        if (logits && r.logits) logits.set(r.logits.subarray(i * V, (i + 1) * V), g * V);
        if (routerLogits && r.routerLogits)
          for (let m = 0; m < M; m++) routerLogits.set(r.routerLogits.subarray((m * n + i) * E, (m * n + i + 1) * E), (m * N + g) * E);
        if (r.trainedLogprobs) trainedLogprobs[g] = r.trainedLogprobs[i];
      });
    }
    const sum = (xs: (number | null)[]) => (xs.some((x) => x === null) ? null : xs.reduce<number>((a, b) => a + b!, 0));
    const outputs: Outputs = {
      logits,
      logprobs,
      routerLogits,
      grpoLoss: sum(results.map((r) => r.grpoLoss)),
      sftLoss: sum(results.map((r) => r.sftLoss)),
      gradsGrpo: merge(results.map((r) => r.gradsGrpo)),
      gradsSft: merge(results.map((r) => r.gradsSft)),
      greedyTokens: results[0].greedyTokens,
    };
    const trainedParams = merge(results.map((r) => r.trainedParams));
    return { outputs, reference, trained: trainedParams ? { logprobs: trainedLogprobs, params: trainedParams } : null };
  } finally {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    service.close();
    server.forceShutdown();
  }
}

export async function runRanksOracle(
  dir: string,
  ranks: number,
  options: { ropeFreqDtype?: RopeFreqDtype; comm?: CommBackend } = {},
): Promise<ModelOracleReport> {
  const run = await runRanks(dir, { ranks, ropeFreqDtype: options.ropeFreqDtype, comm: options.comm });
  return compareOutputs(run.reference, run.outputs, (await readHfConfig(dir)).modelType);
}
