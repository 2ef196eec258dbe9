// CheckpointService over the sharded store (store.ts): one store per run under <root>/<runId>.
//
// A checkpoint is written in two phases. Save without an id opens the step and returns a staging directory
// where writers on shared storage (the ranks' SaveShard) put their files; Save with the id then hands the
// files over (by path: moved into the checkpoint and hashed; or by bytes) and may add metadata. Commit checks
// the shard count and the optional sha256 of every upload, writes the manifest and publishes the checkpoint
// atomically. Restore verifies every shard's hash before answering with their paths. Export merges every
// rank's safetensors into one Hugging Face folder under the hub's tensor names.
import { copyFile, mkdir, readdir, rename, rm, stat, writeFile, readFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import type { ChannelCredentials, ServerCredentials } from '@grpc/grpc-js';
import type { Tracer } from '@opentelemetry/api';
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PilotError,
} from '../common/errors.ts';
import { createGrpcServer, type ServiceImpl } from '../common/grpc-server.ts';
import {
  CheckpointServiceService,
  CheckpointState,
  type Checkpoint,
  type ShardUpload,
} from '../../proto/gen/pilot/v1/checkpoint.ts';
import { SafetensorsCheckpoint, SafetensorsFile, writeSafetensorsFolder, type TensorToWrite } from '../../src/hf/safetensors.ts';
import {
  CheckpointConflictError,
  CheckpointCorruptError,
  CheckpointNotFoundError,
  CheckpointStateError,
  CheckpointStoreLockedError,
} from './errors.ts';
import { createCheckpointStore, type CheckpointInfo, type CheckpointStore, type PendingCheckpoint } from './store.ts';

/** Metadata keys the service itself writes into manifests. */
export const SHARD_RANKS_KEY = 'pilot.shard_ranks';
/** The Hugging Face folder the run started from; Export copies config and tokenizer files from it. */
export const MODEL_DIR_KEY = 'model_dir';
const STAGING = '.staging';
const RUN_ID = /^[A-Za-z0-9_-]{1,128}$/;
const WEIGHT_FILE = /(\.safetensors|\.safetensors\.index\.json|\.bin|\.pt|\.pth)$/;

export interface CheckpointServiceConfig {
  root: string;
  /** Committed checkpoints kept per run. */
  keepLast: number;
}

export interface CheckpointServiceDeps {
  onWarning?: (message: string, err: unknown) => void;
  /** sha256 of a shard file (a HashPool's: several shards at once); absent: on the service's thread. */
  hashFile?: (path: string) => Promise<string>;
}

interface Pending {
  id: string;
  runId: string;
  step: number;
  checkpoint: PendingCheckpoint;
  stagingDir: string;
  createdUnixMs: number;
  metadata: Record<string, string>;
  ranks: Map<string, number>;
  /** Uploads whose sha256 did not match what was received: Commit refuses them. */
  mismatched: string[];
}

export interface CheckpointServiceImpl {
  impl: ServiceImpl<typeof CheckpointServiceService>;
  close(): Promise<void>;
}

export function checkpointId(runId: string, step: number): string {
  return `${runId}:${step}`;
}

export function parseCheckpointId(id: string, field = 'checkpoint_id'): { runId: string; step: number } {
  const m = /^([A-Za-z0-9_-]{1,128}):(\d{1,15})$/.exec(id);
  if (!m) throw new InvalidArgumentError(field, `"${id}" is not a checkpoint id (expected "<run id>:<step>")`);
  return { runId: m[1], step: Number(m[2]) };
}

function checkRunId(runId: string, field: string): string {
  if (!RUN_ID.test(runId)) {
    throw new InvalidArgumentError(field, `"${runId}" is not a valid run id (1..128 letters, digits, "_" or "-")`);
  }
  return runId;
}

/** Store errors to service errors (the common table maps those to gRPC statuses). */
function mapError(err: unknown): unknown {
  if (err instanceof PilotError) return err;
  if (err instanceof CheckpointNotFoundError) return new NotFoundError(err.message, { cause: err });
  if (err instanceof CheckpointConflictError) return new AlreadyExistsError(err.message, { cause: err });
  if (err instanceof CheckpointCorruptError) return new FailedPreconditionError(err.message, { cause: err });
  if (err instanceof CheckpointStateError) return new FailedPreconditionError(err.message, { cause: err });
  if (err instanceof CheckpointStoreLockedError) return new FailedPreconditionError(err.message, { cause: err });
  if (err instanceof TypeError || err instanceof RangeError) return new InvalidArgumentError(null, err.message, { cause: err });
  return err;
}

async function mapped<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw mapError(err);
  }
}

/** Shard names are flat in the store; "rank-0/model.safetensors" becomes "rank-0.model.safetensors". */
export function flatShardName(name: string): string {
  return name.replaceAll('/', '.');
}

export async function createCheckpointService(
  deps: CheckpointServiceDeps,
  config: CheckpointServiceConfig,
): Promise<CheckpointServiceImpl> {
  const root = resolve(config.root);
  await mkdir(root, { recursive: true });
  // Staging dirs of a previous process belong to checkpoints that can no longer be committed.
  await rm(join(root, STAGING), { recursive: true, force: true });
  const stores = new Map<string, Promise<CheckpointStore>>();
  const pending = new Map<string, Pending>();

  function storeOf(runId: string): Promise<CheckpointStore> {
    let s = stores.get(runId);
    if (!s) {
      s = createCheckpointStore({
        root: join(root, runId),
        keepLast: config.keepLast,
        runId,
        onWarning: deps.onWarning ?? null,
        hashFile: deps.hashFile ?? null,
      });
      s.catch(() => stores.delete(runId));
      stores.set(runId, s);
    }
    return s;
  }

  async function runExists(runId: string): Promise<boolean> {
    try {
      return (await stat(join(root, runId))).isDirectory();
    } catch {
      return false;
    }
  }

  function toProto(info: CheckpointInfo, runId: string): Checkpoint {
    const meta: Record<string, string> = {};
    for (const [k, v] of Object.entries(info.manifest.metadata)) meta[k] = typeof v === 'string' ? v : JSON.stringify(v);
    let ranks: Record<string, number> = {};
    try {
      ranks = JSON.parse(meta[SHARD_RANKS_KEY] ?? '{}') as Record<string, number>;
    } catch {
      // a manifest written by another tool: ranks unknown (0)
    }
    const committed = Date.parse(info.manifest.createdAt);
    return {
      id: checkpointId(runId, info.step),
      runId,
      step: info.step,
      state: CheckpointState.CHECKPOINT_STATE_COMMITTED,
      shards: info.manifest.shards.map((s) => ({
        name: s.name,
        rank: ranks[s.name] ?? 0,
        path: join(info.dir, s.name),
        sizeBytes: s.size,
        sha256: s.sha256,
      })),
      metadata: meta,
      createdUnixMs: Number(meta['pilot.created_unix_ms'] ?? committed),
      committedUnixMs: committed,
    };
  }

  async function addShard(p: Pending, up: ShardUpload, index: number): Promise<{ name: string; entry: { sha256: string } }> {
    const field = `shards[${index}]`;
    if (!up.name) throw new InvalidArgumentError(`${field}.name`, 'is empty');
    const name = flatShardName(up.name);
    if (!up.source) throw new InvalidArgumentError(`${field}.source`, 'set either path or data');
    let entry;
    if (up.source.$case === 'data') {
      entry = await p.checkpoint.writeShard(name, up.source.value);
    } else {
      const src = resolve(up.source.value);
      const target = join(p.checkpoint.dir, name);
      if (src !== target) {
        try {
          await rename(src, target);
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === 'ENOENT') throw new InvalidArgumentError(`${field}.path`, `no such file: ${src}`);
          if (code !== 'EXDEV') throw err;
          // Another filesystem: copy (the original stays with its writer).
          await copyFile(src, target);
        }
      }
      entry = await p.checkpoint.adoptFile(name);
    }
    return { name, entry };
  }

  // A Save's shards are taken in together (each is hashed as it comes in, on the hash pool's threads when there is
  // one: a checkpoint's files side by side rather than one after another), then recorded in the request's order.
  async function addShards(p: Pending, ups: readonly ShardUpload[]): Promise<void> {
    const added = await Promise.allSettled(ups.map((up, i) => addShard(p, up, i)));
    added.forEach((r, i) => {
      if (r.status !== 'fulfilled') return;
      const { name, entry } = r.value;
      const up = ups[i];
      p.ranks.set(name, up.rank);
      if (up.sha256 && up.sha256.toLowerCase() !== entry.sha256) {
        p.mismatched.push(`${name} (sent sha256 ${up.sha256}, received ${entry.sha256})`);
      }
    });
    const failed = added.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  const impl: ServiceImpl<typeof CheckpointServiceService> = {
    save: (req) =>
      mapped(async () => {
        let p: Pending | undefined;
        if (req.checkpointId === '') {
          const runId = checkRunId(req.runId, 'run_id');
          const id = checkpointId(runId, req.step);
          const stale = pending.get(id);
          if (stale) {
            // One coordinator drives a run; opening a step again means the one that opened it before crashed
            // (or gave up) and the run was resumed from an earlier checkpoint: its half-written files go.
            deps.onWarning?.(`checkpoint ${id} was reopened; dropping the uncommitted one`, null);
            pending.delete(id);
            await stale.checkpoint.abort();
            await rm(stale.stagingDir, { recursive: true, force: true });
          }
          const store = await storeOf(runId);
          const checkpoint = await store.begin(req.step);
          const stagingDir = join(root, STAGING, runId, `step-${req.step}`);
          await rm(stagingDir, { recursive: true, force: true });
          await mkdir(stagingDir, { recursive: true });
          p = {
            id,
            runId,
            step: req.step,
            checkpoint,
            stagingDir,
            createdUnixMs: Date.now(),
            metadata: {},
            ranks: new Map(),
            mismatched: [],
          };
          pending.set(id, p);
        } else {
          p = pending.get(req.checkpointId);
          if (!p) {
            parseCheckpointId(req.checkpointId);
            throw new NotFoundError(`checkpoint ${req.checkpointId} is not open (it was committed, or never opened by Save)`);
          }
          if (req.runId && req.runId !== p.runId) {
            throw new InvalidArgumentError('run_id', `"${req.runId}" does not match checkpoint ${p.id}`);
          }
        }
        for (const [k, v] of Object.entries(req.metadata)) {
          if (k.startsWith('pilot.')) throw new InvalidArgumentError(`metadata.${k}`, 'keys starting with "pilot." are reserved');
          p.metadata[k] = v;
        }
        await addShards(p, req.shards);
        return { checkpointId: p.id, stagingDir: p.stagingDir, shardNames: [...p.ranks.keys()] };
      }),

    commit: (req) =>
      mapped(async () => {
        const p = pending.get(req.checkpointId);
        if (!p) {
          parseCheckpointId(req.checkpointId);
          throw new NotFoundError(`checkpoint ${req.checkpointId} is not open (it was committed, or never opened by Save)`);
        }
        if (req.expectedShards !== 0 && p.ranks.size !== req.expectedShards) {
          throw new FailedPreconditionError(
            `checkpoint ${p.id} has ${p.ranks.size} shards, expected ${req.expectedShards} (received: ${[...p.ranks.keys()].join(', ') || 'none'})`,
          );
        }
        if (p.mismatched.length > 0) {
          throw new FailedPreconditionError(`checkpoint ${p.id}: shards do not match their sha256: ${p.mismatched.join('; ')}`);
        }
        const info = await p.checkpoint.commit({
          ...p.metadata,
          run_id: p.runId,
          [SHARD_RANKS_KEY]: JSON.stringify(Object.fromEntries(p.ranks)),
          'pilot.created_unix_ms': String(p.createdUnixMs),
        });
        pending.delete(p.id);
        await rm(p.stagingDir, { recursive: true, force: true });
        return { checkpoint: toProto(info, p.runId) };
      }),

    list: (req) =>
      mapped(async () => {
        let runs: string[];
        if (req.runId) {
          runs = [checkRunId(req.runId, 'run_id')];
        } else {
          runs = (await readdir(root, { withFileTypes: true }))
            .filter((d) => d.isDirectory() && RUN_ID.test(d.name))
            .map((d) => d.name)
            .sort();
        }
        const out: Checkpoint[] = [];
        for (const runId of runs) {
          if (!(await runExists(runId))) continue;
          const store = await storeOf(runId);
          for (const info of await store.list()) out.push(toProto(info, runId));
        }
        return { checkpoints: out };
      }),

    restore: (req) =>
      mapped(async () => {
        if (!req.target) throw new InvalidArgumentError('target', 'set checkpoint_id or latest_of_run');
        let runId: string;
        let step: number;
        if (req.target.$case === 'checkpointId') {
          ({ runId, step } = parseCheckpointId(req.target.value));
          if (!(await runExists(runId))) throw new NotFoundError(`no checkpoints of run "${runId}"`);
        } else {
          runId = checkRunId(req.target.value, 'latest_of_run');
          if (!(await runExists(runId))) throw new NotFoundError(`no checkpoints of run "${runId}"`);
          const latest = await (await storeOf(runId)).latest({
            verified: true,
            onCorrupt: (err) => deps.onWarning?.(`skipping corrupt checkpoint of run ${runId}`, err),
          });
          if (!latest) throw new NotFoundError(`run "${runId}" has no committed checkpoint that verifies`);
          step = latest.step;
        }
        const restored = await (await storeOf(runId)).restore(step);
        return { checkpoint: toProto(restored, runId) };
      }),

    export: (req) =>
      mapped(async () => {
        const { runId, step } = parseCheckpointId(req.checkpointId);
        if (!req.outputDir) throw new InvalidArgumentError('output_dir', 'is empty');
        const dtype = req.dtype === '' ? 'bf16' : req.dtype;
        if (dtype !== 'bf16' && dtype !== 'f32') throw new InvalidArgumentError('dtype', `must be "bf16" or "f32", got "${dtype}"`);
        if (!(await runExists(runId))) throw new NotFoundError(`no checkpoints of run "${runId}"`);
        const restored = await (await storeOf(runId)).restore(step);
        const modelDir = restored.manifest.metadata[MODEL_DIR_KEY];
        if (typeof modelDir !== 'string' || modelDir === '') {
          throw new FailedPreconditionError(`checkpoint ${req.checkpointId} records no ${MODEL_DIR_KEY} (pass it as Save metadata)`);
        }
        const outputDir = resolve(req.outputDir);
        const files = await exportHfFolder({
          modelDir,
          shardPaths: restored.manifest.shards.filter((s) => s.name.endsWith('.safetensors')).map((s) => restored.shardPath(s.name)),
          outputDir,
          dtype,
        });
        return { outputDir, files };
      }),
  };

  return {
    impl,
    async close() {
      for (const p of pending.values()) await p.checkpoint.abort().catch(() => undefined);
      pending.clear();
      for (const s of stores.values()) await (await s.catch(() => null))?.close();
      stores.clear();
    },
  };
}

/**
 * Writes a Hugging Face folder from rank shards: every tensor of the source model (its hub names, in its
 * order) is taken from the first shard holding it (dense weights are replicated on every rank, experts live
 * on one); tensors the hub model does not have (optimizer state) are left out. config.json (dtype updated)
 * and the tokenizer/generation files are copied from the source model folder.
 */
export async function exportHfFolder(o: {
  modelDir: string;
  shardPaths: readonly string[];
  outputDir: string;
  dtype: 'bf16' | 'f32';
}): Promise<string[]> {
  let source: SafetensorsCheckpoint;
  try {
    source = await SafetensorsCheckpoint.open(o.modelDir);
  } catch (err) {
    throw new FailedPreconditionError(`model folder ${o.modelDir} recorded at Save cannot be read: ${(err as Error).message}`);
  }
  const hubNames = [...source.tensors.keys()];
  await Promise.all(source.files.map((f) => f.close()));
  const shards: SafetensorsFile[] = [];
  try {
    for (const p of o.shardPaths) shards.push(await SafetensorsFile.open(p));
    const tensors: TensorToWrite[] = [];
    const missing: string[] = [];
    for (const name of hubNames) {
      const holder = shards.find((f) => f.tensors.has(name));
      if (!holder) {
        missing.push(name);
        continue;
      }
      const info = holder.info(name);
      tensors.push({ name, shape: info.shape, data: await holder.read(name) });
    }
    if (missing.length > 0) {
      throw new FailedPreconditionError(
        `the checkpoint's shards lack ${missing.length} tensor(s) of the model, e.g. ${missing.slice(0, 3).join(', ')}`,
      );
    }
    await mkdir(o.outputDir, { recursive: true });
    const written = await writeSafetensorsFolder(o.outputDir, tensors, { dtype: o.dtype === 'bf16' ? 'BF16' : 'F32' });
    for (const entry of await readdir(o.modelDir, { withFileTypes: true })) {
      if (!entry.isFile() || WEIGHT_FILE.test(entry.name)) continue;
      const from = join(o.modelDir, entry.name);
      const to = join(o.outputDir, entry.name);
      if (entry.name === 'config.json') {
        const config = JSON.parse(await readFile(from, 'utf8')) as Record<string, unknown>;
        const name = o.dtype === 'bf16' ? 'bfloat16' : 'float32';
        if ('dtype' in config) config.dtype = name;
        config.torch_dtype = name;
        await writeFile(to, JSON.stringify(config, null, 2) + '\n');
      } else {
        await mkdir(dirname(to), { recursive: true });
        await copyFile(from, to);
      }
      written.push(basename(to));
    }
    return written;
  } finally {
    await Promise.all(shards.map((f) => f.close()));
  }
}

export interface CheckpointServerConfig extends CheckpointServiceConfig {
  host: string;
  port: number;
  shutdownGraceMs: number;
  serverCredentials: ServerCredentials | null;
  clientCredentials?: ChannelCredentials | null;
}

export interface CheckpointServer {
  start(): Promise<number>;
  shutdown(): Promise<void>;
}

export async function createCheckpointServer(
  deps: CheckpointServiceDeps & { tracer: Tracer | null },
  config: CheckpointServerConfig,
): Promise<CheckpointServer> {
  const service = await createCheckpointService(deps, config);
  const server = createGrpcServer(
    { tracer: deps.tracer },
    {
      host: config.host,
      port: config.port,
      credentials: config.serverCredentials,
      shutdownGraceMs: config.shutdownGraceMs,
    },
  );
  server.addService(CheckpointServiceService, service.impl);
  return {
    start: () => server.start(),
    async shutdown() {
      await server.shutdown();
      await service.close();
    },
  };
}
