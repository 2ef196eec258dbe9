// One rank's checkpoint shard: a safetensors file with hub tensor names (rank 0 writes the dense tensors
// and its experts, every other rank only its experts) and a small JSON describing it. Restoring takes
// any set of such files (typically rank 0's and this rank's): dense tensors from whichever file holds
// them, experts from the file whose expert range is this rank's.
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { InvalidArgumentError } from '../common/errors.ts';
import { sha256File } from '../common/sha256-file.ts';
import type { Engine } from '../../src/engine/engine.ts';
import { SafetensorsFile, writeSafetensorsHashed } from '../../src/hf/safetensors.ts';

export interface ShardMeta {
  format: 'moe-pilot-rank-shard/1';
  rank: number;
  worldSize: number;
  modelType: string;
  numExperts: number;
  /** Experts [begin, end) in the safetensors file. */
  expertRange: [number, number];
  /** Whether the file also holds the dense (replicated) tensors. */
  dense: boolean;
  /** Optimizer steps taken when saved. */
  step: number;
  /**
   * AdamW state of this rank, when saved: its ZeRO-1 shard [denseBegin, denseEnd) of the dense range and its
   * experts' moments, in `file` (tensors dense_m, dense_v, expert_m, expert_v). The dense shard depends on
   * the world size, so it restores only into the same number of ranks.
   */
  optimizer: { file: string; adamSteps: number; denseBegin: number; denseEnd: number } | null;
}

export interface ShardFileInfo {
  path: string;
  sizeBytes: number;
  sha256: string;
}

// sha256: known when the writer hashed the bytes as it wrote them; read back from the file otherwise.
async function describe(path: string, sha256?: string): Promise<ShardFileInfo> {
  return { path, sizeBytes: (await stat(path)).size, sha256: sha256 ?? (await sha256File(path)) };
}

export function shardBaseName(rank: number, worldSize: number): string {
  const w = String(worldSize).padStart(5, '0');
  return `rank-${String(rank).padStart(5, '0')}-of-${w}`;
}

/**
 * What one rank's shard holds, captured: the tensors it writes (views of the engine's host buffers, or copies)
 * and the description beside them. Writing it (writeShard) reads nothing else of the engine.
 */
export interface ShardSnapshot {
  base: string;
  tensors: { name: string; shape: number[]; data: Float32Array }[];
  optimizer: { denseM: Float32Array[]; denseV: Float32Array[]; expertM: Float32Array[]; expertV: Float32Array[] } | null;
  meta: ShardMeta;
}

/**
 * This rank's shard as the engine's host buffers hold it now. With `copy`, every value is copied (the buffers of a
 * CPU engine are the live weights, which the next optimizer step changes); without it, the snapshot views them
 * (a GPU engine's host buffers change only when synced again, so a write may go on while the GPU trains).
 */
export function snapshotShard(
  engine: Engine,
  info: { rank: number; worldSize: number; step: number; includeOptimizer?: boolean; copy?: boolean },
): ShardSnapshot {
  const c = engine.config;
  const dense = info.rank === 0;
  const own = (a: Float32Array) => (info.copy ? a.slice() : a);
  const params = engine.paramsByName();
  const tensors = engine.paramTable
    .filter((p) => p.kind === 'expert' || dense)
    .map((p) => ({ name: p.name, shape: [...p.shape], data: own(params.get(p.name)!) }));
  const base = shardBaseName(info.rank, info.worldSize);
  let optimizer: ShardSnapshot['optimizer'] = null;
  let optimizerMeta: ShardMeta['optimizer'] = null;
  if (info.includeOptimizer) {
    const st = engine.optimizerState();
    optimizer = { denseM: st.denseM.map(own), denseV: st.denseV.map(own), expertM: st.expertM.map(own), expertV: st.expertV.map(own) };
    optimizerMeta = { file: `${base}.optimizer.safetensors`, adamSteps: st.step, denseBegin: st.denseBegin, denseEnd: st.denseEnd };
  }
  const meta: ShardMeta = {
    format: 'moe-pilot-rank-shard/1',
    rank: info.rank,
    worldSize: info.worldSize,
    modelType: engine.modelType,
    numExperts: c.numExperts,
    expertRange: [c.expertBegin, c.expertEnd],
    dense,
    step: info.step,
    optimizer: optimizerMeta,
  };
  return { base, tensors, optimizer, meta };
}

/**
 * Writes a snapshot's files into `dir`; returns them with their sizes and sha256. With `hashFile` (a HashPool's),
 * the files are hashed on its threads as they are flushed, not on this one (writeSafetensorsHashed).
 */
export async function writeShard(snap: ShardSnapshot, dir: string, options: { hashFile?: (path: string) => Promise<string> } = {}): Promise<ShardFileInfo[]> {
  const abs = resolve(dir);
  await mkdir(abs, { recursive: true });
  const { meta } = snap;
  const weights = join(abs, `${snap.base}.safetensors`);
  const written = await writeSafetensorsHashed(weights, snap.tensors, { metadata: { rank: String(meta.rank), world_size: String(meta.worldSize) }, hashFile: options.hashFile });
  const extra: ShardFileInfo[] = [];
  if (snap.optimizer && meta.optimizer) {
    const o = snap.optimizer;
    // Each moment buffer is one tensor, written from its pieces (a rank's state may exceed one view's 4 GiB).
    const numel = (pieces: Float32Array[]) => pieces.reduce((a, p) => a + p.length, 0);
    const path = join(abs, meta.optimizer.file);
    const opt = await writeSafetensorsHashed(path, [
      { name: 'dense_m', shape: [numel(o.denseM)], data: o.denseM },
      { name: 'dense_v', shape: [numel(o.denseV)], data: o.denseV },
      { name: 'expert_m', shape: [numel(o.expertM)], data: o.expertM },
      { name: 'expert_v', shape: [numel(o.expertV)], data: o.expertV },
    ], { hashFile: options.hashFile });
    extra.push(await describe(path, opt.sha256));
  }
  const metaPath = join(abs, `${snap.base}.json`);
  await writeFile(metaPath, JSON.stringify(meta, null, 2) + '\n');
  return [await describe(weights, written.sha256), await describe(metaPath), ...extra];
}

function parseMeta(path: string, text: string): ShardMeta {
  let m: ShardMeta;
  try {
    m = JSON.parse(text) as ShardMeta;
  } catch (e) {
    throw new InvalidArgumentError('files', `${path} is not valid JSON: ${(e as Error).message}`);
  }
  if (m?.format !== 'moe-pilot-rank-shard/1' || !Array.isArray(m.expertRange) || !Number.isInteger(m.rank)) {
    throw new InvalidArgumentError('files', `${path} is not a moe-pilot rank shard description`);
  }
  return m;
}

/**
 * Restores the engine's parameters from shard files (a JSON + safetensors pair per rank). Checks the given
 * sha256 of every file it reads before it changes anything (the files at once, through `hashFile` when given:
 * a pool's threads), that one shard's expert range is exactly this engine's, and that every parameter of the
 * engine was restored. Another rank's optimizer file, which a restore hands every rank, is neither read nor
 * hashed. Returns the step of the shard holding this rank's experts.
 */
export async function loadShard(
  engine: Engine,
  files: readonly { path: string; sha256: string }[],
  options: { rank?: number; worldSize?: number; includeOptimizer?: boolean; hashFile?: (path: string) => Promise<string> } = {},
): Promise<{ step: number }> {
  if (files.length === 0) throw new InvalidArgumentError('files', 'no shard files given');
  for (const [i, f] of files.entries()) if (!f.path) throw new InvalidArgumentError(`files[${i}].path`, 'is empty');
  // The descriptions first (small): they say which optimizer file is this rank's.
  const jsonFiles = files.filter((f) => f.path.endsWith('.json'));
  await verifyFiles(files, jsonFiles, sha256File);
  const c = engine.config;
  const metas = new Map<string, ShardMeta>();
  for (const f of jsonFiles) metas.set(f.path.slice(0, -'.json'.length), parseMeta(f.path, await readFile(f.path, 'utf8')));
  const weightFiles = files.filter((f) => f.path.endsWith('.safetensors') && !f.path.endsWith('.optimizer.safetensors'));
  if (weightFiles.length === 0) throw new InvalidArgumentError('files', 'no .safetensors file among the shard files');
  // Every file read below, verified before the first parameter changes.
  const ownOptimizer = options.includeOptimizer ? ownOptimizerPath([...metas.entries()], options.rank) : null;
  await verifyFiles(files, [...weightFiles, ...files.filter((f) => ownOptimizer !== null && resolve(f.path) === resolve(ownOptimizer))], options.hashFile ?? sha256File);
  const own = [...metas.values()].filter((m) => m.expertRange[0] === c.expertBegin && m.expertRange[1] === c.expertEnd);
  if (own.length === 0) {
    const ranges = [...metas.values()].map((m) => `[${m.expertRange[0]}, ${m.expertRange[1]})`).join(', ') || 'none (no shard JSON given)';
    throw new InvalidArgumentError('files', `no shard holds this rank's experts [${c.expertBegin}, ${c.expertEnd}); the shards hold ${ranges}`);
  }
  for (const m of metas.values()) {
    if (m.numExperts !== c.numExperts || m.modelType !== engine.modelType) {
      throw new InvalidArgumentError('files', `shard of rank ${m.rank} is for a ${m.modelType} model with ${m.numExperts} experts; this model is ${engine.modelType} with ${c.numExperts}`);
    }
  }
  const params = engine.paramsByName();
  const restored = new Set<string>();
  for (const f of weightFiles) {
    const meta = metas.get(f.path.slice(0, -'.safetensors'.length));
    let st: SafetensorsFile;
    try {
      st = await SafetensorsFile.open(f.path);
    } catch (e) {
      throw new InvalidArgumentError('files', `${f.path}: ${(e as Error).message}`);
    }
    try {
      for (const [name, t] of st.tensors) {
        const dst = params.get(name);
        if (!dst) continue; // another rank's expert
        // Experts come only from the shard whose range is ours; with no JSON for a file, by name alone.
        if (meta && !meta.dense && !(meta.expertRange[0] === c.expertBegin && meta.expertRange[1] === c.expertEnd)) continue;
        const numel = t.shape.reduce((a, b) => a * b, 1);
        if (numel !== dst.length) throw new InvalidArgumentError('files', `${basename(f.path)}: tensor ${name} has ${numel} values, the model's has ${dst.length}`);
        await st.read(name, dst);
        restored.add(name);
      }
    } finally {
      await st.close();
    }
  }
  const missing = engine.paramTable.filter((p) => !restored.has(p.name)).map((p) => p.name);
  if (missing.length > 0) {
    throw new InvalidArgumentError('files', `${missing.length} parameters were in none of the files (first: ${missing.slice(0, 3).join(', ')}); give rank 0's shard for the dense tensors`);
  }
  if (options.includeOptimizer) await loadOptimizer(engine, files, [...metas.entries()], options);
  return { step: own[0].step };
}

// Checks the sha256 given for each of `which` (files of `all`, whose index names the field), all at once.
async function verifyFiles(
  all: readonly { path: string; sha256: string }[],
  which: readonly { path: string; sha256: string }[],
  hashFile: (path: string) => Promise<string>,
): Promise<void> {
  const results = await Promise.allSettled(which.map((f) => hashFile(f.path)));
  which.forEach((f, j) => {
    const i = all.indexOf(f);
    const r = results[j];
    if (r.status === 'rejected') throw new InvalidArgumentError(`files[${i}].path`, `cannot read ${f.path}: ${(r.reason as Error).message}`);
    if (f.sha256 && f.sha256.toLowerCase() !== r.value) {
      throw new InvalidArgumentError(`files[${i}].sha256`, `${f.path} has sha256 ${r.value}, expected ${f.sha256}`);
    }
  });
}

// The optimizer file of `rank`'s shard, named after its description (loadOptimizer says what is wrong if none).
function ownOptimizerPath(metas: [string, ShardMeta][], rank: number | undefined): string | null {
  const mine = metas.find(([, m]) => m.rank === rank && m.optimizer);
  return mine ? `${mine[0]}.optimizer.safetensors` : null;
}

// Restores this rank's AdamW moments and step count from the optimizer file its own shard names.
async function loadOptimizer(
  engine: Engine,
  files: readonly { path: string }[],
  metas: [string, ShardMeta][],
  options: { rank?: number; worldSize?: number },
): Promise<void> {
  const mine = metas.find(([, m]) => m.rank === options.rank && m.expertRange[0] === engine.config.expertBegin);
  if (!mine) throw new InvalidArgumentError('files', `no shard of rank ${options.rank} among the files, so no optimizer state for it`);
  const [base, meta] = mine;
  if (!meta.optimizer) throw new InvalidArgumentError('include_optimizer', `the shard of rank ${meta.rank} was saved without optimizer state`);
  if (meta.worldSize !== options.worldSize) {
    throw new InvalidArgumentError('include_optimizer', `optimizer state was saved by ${meta.worldSize} ranks and is sharded that way; this group has ${options.worldSize}`);
  }
  // Next to its JSON under the same base name (a checkpoint store may rename the files, consistently).
  const path = `${base}.optimizer.safetensors`;
  if (!files.some((f) => resolve(f.path) === resolve(path))) throw new InvalidArgumentError('files', `${basename(path)} (rank ${meta.rank}'s optimizer state) is not among the files`);
  const state = engine.optimizerState();
  if (state.denseBegin !== meta.optimizer.denseBegin || state.denseEnd !== meta.optimizer.denseEnd) {
    throw new InvalidArgumentError('include_optimizer', `optimizer shard [${meta.optimizer.denseBegin}, ${meta.optimizer.denseEnd}) does not match this rank's [${state.denseBegin}, ${state.denseEnd})`);
  }
  const st = await SafetensorsFile.open(path);
  try {
    await st.read('dense_m', state.denseM);
    await st.read('dense_v', state.denseV);
    await st.read('expert_m', state.expertM);
    await st.read('expert_v', state.expertV);
  } catch (e) {
    throw new InvalidArgumentError('files', `${path}: ${(e as Error).message}`);
  } finally {
    await st.close();
  }
  engine.setOptimizerSteps(meta.optimizer.adamSteps);
}
