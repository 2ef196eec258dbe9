// A sharded checkpoint store on the local filesystem, committed atomically.
//
// Layout under root:
//   step-<n>/manifest.json + shards   committed checkpoints (only ever created by a rename)
//   .pending-step-<n>/                a checkpoint being written; removed at open (a crash left it)
//   .trash-step-<n>-<rand>/           a checkpoint being garbage collected; removed at open
//   .writer.lock                      pid of the one process allowed to write
//
// Commit protocol: every shard is written and fsynced inside the pending dir, then manifest.json (sizes and sha256
// of every shard) is written and fsynced, the pending dir itself is fsynced, renamed to step-<n>, and root is fsynced.
// rename(2) of a directory is atomic, so after a crash a step-<n> either exists complete with its manifest or not at
// all. Corruption after the fact (a bad disk, a truncated copy) is caught by verify/restore, which recompute the
// hashes; latest({verified: true}) then falls back to the newest checkpoint that still verifies.
import { createHash, randomBytes } from "node:crypto";
import { mkdir, open, readFile, readdir, rename, rm, stat, unlink } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import {
  CheckpointConflictError,
  CheckpointCorruptError,
  CheckpointNotFoundError,
  CheckpointStateError,
  CheckpointStoreLockedError,
} from "./errors.ts";
import { sha256File } from "../common/sha256-file.ts";

export const MANIFEST_FILE = "manifest.json";
export const MANIFEST_FORMAT = "moe-pilot-checkpoint";
export const MANIFEST_VERSION = 1;
const LOCK_FILE = ".writer.lock";
const PENDING_PREFIX = ".pending-step-";
const TRASH_PREFIX = ".trash-step-";
const STEP_DIR = /^step-(\d+)$/;
const SHARD_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/;

export interface ShardEntry {
  name: string;
  size: number;
  sha256: string;
}

export interface CheckpointManifest {
  format: typeof MANIFEST_FORMAT;
  version: typeof MANIFEST_VERSION;
  step: number;
  runId: string | null;
  createdAt: string;
  shards: ShardEntry[];
  /** Whatever the caller attached: the prompt ids trained in this step, optimizer settings, ... */
  metadata: Record<string, unknown>;
}

export interface CheckpointInfo {
  step: number;
  /** The committed directory, step-<n>. */
  dir: string;
  manifest: CheckpointManifest;
}

export interface RestoredCheckpoint extends CheckpointInfo {
  /** Path of a shard listed in the manifest; throws for names it does not list. */
  shardPath(name: string): string;
  readShard(name: string): Promise<Buffer>;
}

export type ShardData = Uint8Array | AsyncIterable<Uint8Array | string>;

export interface PendingCheckpoint {
  readonly step: number;
  /** The temp directory; nothing else should write into it. */
  readonly dir: string;
  /** Writes one shard and fsyncs it. Names are unique within a checkpoint. */
  writeShard(name: string, data: ShardData): Promise<ShardEntry>;
  /**
   * Records a file that something else (the native engine's save, writing safetensors straight into `dir`) already
   * wrote into the pending directory: fsyncs it, hashes it and lists it like a written shard.
   */
  adoptFile(name: string): Promise<ShardEntry>;
  /** Writes the manifest and makes the checkpoint visible atomically; then garbage-collects old ones. */
  commit(metadata?: Record<string, unknown>): Promise<CheckpointInfo>;
  /** Drops the pending checkpoint. */
  abort(): Promise<void>;
}

export interface CheckpointStore {
  readonly root: string;
  readonly readOnly: boolean;
  begin(step: number): Promise<PendingCheckpoint>;
  /** Committed checkpoints with a readable manifest, oldest step first. Does not hash shards. */
  list(): Promise<CheckpointInfo[]>;
  /**
   * The newest committed checkpoint, null when there is none. With verified: every shard is hashed, and a corrupt
   * checkpoint is skipped (and reported to onCorrupt) in favour of the one before it.
   */
  latest(opts?: { verified?: boolean; onCorrupt?: (err: CheckpointCorruptError) => void }): Promise<CheckpointInfo | null>;
  /** Checks every shard's size and sha256 against the manifest; throws CheckpointCorruptError naming the first bad one. */
  verify(step: number): Promise<CheckpointInfo>;
  /** Verifies, then gives access to the shards. */
  restore(step: number): Promise<RestoredCheckpoint>;
  /**
   * The folder of a committed checkpoint, where the engine's save/export writes or reads the Hugging Face layout
   * (the integrator plugs the engine's export in here).
   */
  exportDir(step: number): Promise<string>;
  /** Removes committed checkpoints beyond the newest keepLast; returns the removed steps. */
  gc(): Promise<number[]>;
  /** Releases the writer lock. Pending checkpoints are left for the next open to clean. */
  close(): Promise<void>;
}

export interface CheckpointStoreConfig {
  root: string;
  /** How many committed checkpoints to keep (newest by step). */
  keepLast: number;
  /** Written into every manifest. */
  runId: string | null;
  /** Readers (status, export tools) open read-only: no lock, no clean-up, no begin. */
  readOnly: boolean;
  /** Problems that must not fail the call they happen in (a failed GC after a successful commit). */
  onWarning: ((message: string, err: unknown) => void) | null;
  /** sha256 of a file (a HashPool's, to hash several shards at once); null: on the calling thread. */
  hashFile: ((path: string) => Promise<string>) | null;
}

const DEFAULTS: Omit<CheckpointStoreConfig, "root"> = {
  keepLast: 3,
  runId: null,
  readOnly: false,
  onWarning: null,
  hashFile: null,
};

export async function createCheckpointStore(
  config: Partial<CheckpointStoreConfig> & { root: string },
): Promise<CheckpointStore> {
  const cfg: CheckpointStoreConfig = { ...DEFAULTS, ...config };
  if (typeof cfg.root !== "string" || cfg.root.length === 0) throw new TypeError("checkpoint store root must be a path");
  if (!Number.isInteger(cfg.keepLast) || cfg.keepLast < 1) {
    throw new RangeError(`keepLast must be a positive integer, got ${cfg.keepLast}`);
  }
  const root = cfg.root;
  const hashFile = cfg.hashFile ?? sha256File;
  let closed = false;
  if (!cfg.readOnly) {
    await mkdir(root, { recursive: true });
    await acquireLock(root);
    await cleanLeftovers(root);
  }
  const writing = new Set<number>();

  const stepDir = (step: number) => join(root, `step-${step}`);

  async function committedSteps(): Promise<number[]> {
    let names: string[];
    try {
      names = await readdir(root);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT" && cfg.readOnly) return [];
      throw err;
    }
    return names
      .map((n) => STEP_DIR.exec(n))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => Number(m[1]))
      .sort((a, b) => a - b);
  }

  async function readManifest(step: number): Promise<CheckpointInfo> {
    const dir = stepDir(step);
    let text: string;
    try {
      text = await readFile(join(dir, MANIFEST_FILE), "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        if (!(await exists(dir))) throw new CheckpointNotFoundError(step, root);
        throw new CheckpointCorruptError(step, MANIFEST_FILE, "missing");
      }
      throw err;
    }
    return { step, dir, manifest: parseManifest(step, text) };
  }

  // Sizes first, shard by shard; then every shard's sha256 at once (as many in parallel as the hasher runs), the
  // first mismatch in manifest order reported.
  async function verify(step: number): Promise<CheckpointInfo> {
    checkStep(step);
    const info = await readManifest(step);
    for (const shard of info.manifest.shards) {
      const path = join(info.dir, shard.name);
      let size: number;
      try {
        const st = await stat(path);
        if (!st.isFile()) throw new CheckpointCorruptError(step, shard.name, "not a regular file");
        size = st.size;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") throw new CheckpointCorruptError(step, shard.name, "missing");
        throw err;
      }
      if (size !== shard.size) {
        throw new CheckpointCorruptError(step, shard.name, `${size} bytes on disk, manifest says ${shard.size}`);
      }
    }
    const shas = await Promise.allSettled(info.manifest.shards.map((shard) => hashFile(join(info.dir, shard.name))));
    info.manifest.shards.forEach((shard, i) => {
      const r = shas[i];
      if (r.status === "rejected") throw r.reason;
      if (r.value !== shard.sha256) {
        throw new CheckpointCorruptError(step, shard.name, `sha256 ${r.value} does not match the manifest's ${shard.sha256}`);
      }
    });
    return info;
  }

  async function begin(step: number): Promise<PendingCheckpoint> {
    assertWritable("begin a checkpoint");
    checkStep(step);
    // The claim is taken before the first await: of two concurrent begins of one step the first wins, and the
    // loser never holds (or releases) the winner's claim.
    if (writing.has(step)) throw new CheckpointConflictError(step, "it is already being written");
    writing.add(step);
    const dir = join(root, `${PENDING_PREFIX}${step}`);
    try {
      if (await exists(stepDir(step))) throw new CheckpointConflictError(step, "it is already committed");
      // Not recursive: mkdir fails if the dir exists (another process's writer), which makes it the claim on disk.
      await mkdir(dir);
    } catch (err) {
      writing.delete(step);
      if ((err as NodeJS.ErrnoException).code === "EEXIST") {
        throw new CheckpointConflictError(step, "it is already being written");
      }
      throw err;
    }
    return createPending(step, dir);
  }

  function createPending(step: number, dir: string): PendingCheckpoint {
    let state: "open" | "committing" | "committed" | "aborted" = "open";
    const shards = new Map<string, ShardEntry>();
    const inFlight = new Set<string>();
    const assertOpen = (action: string) => {
      if (state !== "open") throw new CheckpointStateError(`cannot ${action}: checkpoint step ${step} is ${state}`);
      assertWritable(action);
    };

    function claimName(name: string, action: string) {
      assertOpen(`${action} shard "${name}"`);
      if (typeof name !== "string" || !SHARD_NAME.test(name) || name === MANIFEST_FILE) {
        throw new TypeError(
          `invalid shard name ${JSON.stringify(name)}: use 1..200 letters, digits, ".", "_" or "-", not starting ` +
            `with "." and not "${MANIFEST_FILE}"`,
        );
      }
      if (shards.has(name) || inFlight.has(name)) {
        throw new CheckpointStateError(`shard "${name}" was already written to checkpoint step ${step}`);
      }
      inFlight.add(name);
    }

    async function adoptFile(name: string): Promise<ShardEntry> {
      claimName(name, "adopt");
      const path = join(dir, name);
      try {
        let st;
        try {
          st = await stat(path);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === "ENOENT") {
            throw new CheckpointStateError(`cannot adopt shard "${name}": no such file in ${dir}`);
          }
          throw err;
        }
        if (!st.isFile()) throw new CheckpointStateError(`cannot adopt shard "${name}": not a regular file`);
        const fh = await open(path, "r");
        try {
          await fh.sync();
        } finally {
          await fh.close();
        }
        const entry: ShardEntry = { name, size: st.size, sha256: await hashFile(path) };
        if (state !== "open") throw new CheckpointStateError(`checkpoint step ${step} was ${state} while "${name}" was adopted`);
        shards.set(name, entry);
        return entry;
      } finally {
        inFlight.delete(name);
      }
    }

    async function writeShard(name: string, data: ShardData): Promise<ShardEntry> {
      claimName(name, "write");
      const path = join(dir, name);
      try {
        const entry = await writeFileSynced(path, name, data);
        if (state !== "open") throw new CheckpointStateError(`checkpoint step ${step} was ${state} while "${name}" was written`);
        shards.set(name, entry);
        return entry;
      } catch (err) {
        await rm(path, { force: true }).catch(() => undefined);
        throw err;
      } finally {
        inFlight.delete(name);
      }
    }

    async function commit(metadata: Record<string, unknown> = {}): Promise<CheckpointInfo> {
      assertOpen("commit");
      if (inFlight.size > 0) {
        throw new CheckpointStateError(`cannot commit step ${step}: shards still being written: ${[...inFlight].join(", ")}`);
      }
      if (shards.size === 0) throw new CheckpointStateError(`cannot commit step ${step}: no shards were written`);
      if (typeof metadata !== "object" || metadata === null || Array.isArray(metadata)) {
        throw new TypeError("checkpoint metadata must be an object");
      }
      // Files nobody recorded would be committed without a hash, and restore could not tell if they are intact.
      const strays = (await readdir(dir)).filter((n) => !shards.has(n) && n !== MANIFEST_FILE);
      if (strays.length > 0) {
        throw new CheckpointStateError(
          `cannot commit step ${step}: files not recorded as shards (write them with writeShard or adoptFile): ` +
            strays.join(", "),
        );
      }
      const manifest: CheckpointManifest = {
        format: MANIFEST_FORMAT,
        version: MANIFEST_VERSION,
        step,
        runId: cfg.runId,
        createdAt: new Date().toISOString(),
        shards: [...shards.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)),
        metadata,
      };
      let text: string;
      try {
        text = JSON.stringify(manifest, null, 2) + "\n";
      } catch (err) {
        throw new TypeError(`checkpoint metadata is not JSON-serialisable: ${(err as Error).message}`);
      }
      state = "committing";
      const target = stepDir(step);
      try {
        // A commit that failed after this point and is retried finds the earlier manifest here.
        await rm(join(dir, MANIFEST_FILE), { force: true });
        await writeFileSynced(join(dir, MANIFEST_FILE), MANIFEST_FILE, Buffer.from(text, "utf8"));
        await fsyncDir(dir);
        try {
          await rename(dir, target);
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === "ENOTEMPTY" || code === "EEXIST") {
            throw new CheckpointConflictError(step, "another writer committed it first");
          }
          throw err;
        }
        await fsyncDir(root);
      } catch (err) {
        state = "open";
        throw err;
      }
      state = "committed";
      writing.delete(step);
      try {
        await gc();
      } catch (err) {
        // The checkpoint is durable; failing the commit now would make the caller redo a step that is saved.
        cfg.onWarning?.(`garbage collection after committing step ${step} failed`, err);
      }
      return { step, dir: target, manifest };
    }

    async function abort(): Promise<void> {
      if (state === "committed" || state === "aborted") return;
      if (state === "committing") throw new CheckpointStateError(`cannot abort step ${step}: it is being committed`);
      state = "aborted";
      writing.delete(step);
      await rm(dir, { recursive: true, force: true });
    }

    return { step, dir, writeShard, adoptFile, commit, abort };
  }

  async function list(): Promise<CheckpointInfo[]> {
    const out: CheckpointInfo[] = [];
    for (const step of await committedSteps()) {
      try {
        out.push(await readManifest(step));
      } catch (err) {
        // Unreadable manifests are corrupt checkpoints (verify/restore name the problem); a checkpoint removed by
        // GC between readdir and read is simply gone.
        if (err instanceof CheckpointCorruptError || err instanceof CheckpointNotFoundError) continue;
        throw err;
      }
    }
    return out;
  }

  async function latest(
    opts: { verified?: boolean; onCorrupt?: (err: CheckpointCorruptError) => void } = {},
  ): Promise<CheckpointInfo | null> {
    const steps = (await committedSteps()).reverse();
    for (const step of steps) {
      try {
        return opts.verified ? await verify(step) : await readManifest(step);
      } catch (err) {
        if (err instanceof CheckpointCorruptError) {
          opts.onCorrupt?.(err);
          continue;
        }
        if (err instanceof CheckpointNotFoundError) continue;
        throw err;
      }
    }
    return null;
  }

  async function restore(step: number): Promise<RestoredCheckpoint> {
    const info = await verify(step);
    const names = new Set(info.manifest.shards.map((s) => s.name));
    const shardPath = (name: string) => {
      if (!names.has(name)) {
        throw new TypeError(`checkpoint step ${step} has no shard "${name}" (shards: ${[...names].join(", ")})`);
      }
      return join(info.dir, name);
    };
    return { ...info, shardPath, readShard: (name) => readFile(shardPath(name)) };
  }

  async function exportDir(step: number): Promise<string> {
    checkStep(step);
    const dir = stepDir(step);
    if (!(await exists(join(dir, MANIFEST_FILE)))) throw new CheckpointNotFoundError(step, root);
    return dir;
  }

  async function gc(): Promise<number[]> {
    assertWritable("garbage-collect");
    const steps = await committedSteps();
    const doomed = steps.slice(0, Math.max(0, steps.length - cfg.keepLast));
    for (const step of doomed) {
      // Renamed away first, so a crash mid-delete never leaves a half-deleted step-<n> that looks committed.
      const trash = join(root, `${TRASH_PREFIX}${step}-${randomBytes(4).toString("hex")}`);
      await rename(stepDir(step), trash);
      await fsyncDir(root);
      await rm(trash, { recursive: true, force: true });
    }
    return doomed;
  }

  async function close(): Promise<void> {
    if (closed) return;
    closed = true;
    if (!cfg.readOnly) await releaseLock(root);
  }

  function assertWritable(action: string) {
    if (cfg.readOnly) throw new CheckpointStateError(`cannot ${action}: the checkpoint store at ${root} is read-only`);
    if (closed) throw new CheckpointStateError(`cannot ${action}: the checkpoint store at ${root} is closed`);
  }

  return { root, readOnly: cfg.readOnly, begin, list, latest, verify, restore, exportDir, gc, close };
}

function checkStep(step: number) {
  if (!Number.isSafeInteger(step) || step < 0) throw new TypeError(`checkpoint step must be a non-negative integer, got ${step}`);
}

function parseManifest(step: number, text: string): CheckpointManifest {
  let m: CheckpointManifest;
  try {
    m = JSON.parse(text) as CheckpointManifest;
  } catch (err) {
    throw new CheckpointCorruptError(step, MANIFEST_FILE, `not JSON (${(err as Error).message})`);
  }
  const bad = (why: string) => new CheckpointCorruptError(step, MANIFEST_FILE, why);
  if (typeof m !== "object" || m === null) throw bad("not an object");
  if (m.format !== MANIFEST_FORMAT) throw bad(`format is ${JSON.stringify(m.format)}, expected "${MANIFEST_FORMAT}"`);
  if (m.version !== MANIFEST_VERSION) throw bad(`version ${m.version} is not supported (this build reads ${MANIFEST_VERSION})`);
  if (m.step !== step) throw bad(`says step ${m.step} but lives in step-${step}`);
  if (!Array.isArray(m.shards) || m.shards.length === 0) throw bad("lists no shards");
  for (const s of m.shards) {
    if (
      typeof s !== "object" || s === null ||
      typeof s.name !== "string" || !SHARD_NAME.test(s.name) ||
      !Number.isSafeInteger(s.size) || s.size < 0 ||
      typeof s.sha256 !== "string" || !/^[0-9a-f]{64}$/.test(s.sha256)
    ) {
      throw bad(`invalid shard entry ${JSON.stringify(s)}`);
    }
  }
  return m;
}

async function writeFileSynced(path: string, name: string, data: ShardData): Promise<ShardEntry> {
  const hash = createHash("sha256");
  let size = 0;
  // "wx": never overwrite; a second write of the same name is a bug, not an update.
  const fh = await open(path, "wx");
  try {
    const put = async (chunk: Uint8Array | string) => {
      const buf = typeof chunk === "string" ? Buffer.from(chunk, "utf8") : chunk;
      hash.update(buf);
      size += buf.byteLength;
      let off = 0;
      while (off < buf.byteLength) {
        const { bytesWritten } = await fh.write(buf, off, buf.byteLength - off);
        off += bytesWritten;
      }
    };
    if (data instanceof Uint8Array) {
      await put(data);
    } else if (data !== null && typeof data === "object" && Symbol.asyncIterator in data) {
      for await (const chunk of data) await put(chunk);
    } else {
      throw new TypeError(`shard "${name}" data must be a Uint8Array/Buffer or an async iterable of chunks (e.g. a stream)`);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return { name, size, sha256: hash.digest("hex") };
}


async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw err;
  }
}

/** Leftovers of a crash: pending checkpoints that never committed and GC that never finished. */
async function cleanLeftovers(root: string): Promise<void> {
  for (const name of await readdir(root)) {
    if (name.startsWith(PENDING_PREFIX) || name.startsWith(TRASH_PREFIX)) {
      await rm(join(root, name), { recursive: true, force: true });
    }
  }
}

interface LockHolder {
  pid: number;
  host: string;
  since: string;
}

// One writer per store: a second one would clean the first one's pending checkpoints at open. The lock names its
// holder; a holder on this host whose pid is gone crashed, and its lock is taken over.
async function acquireLock(root: string): Promise<void> {
  const path = join(root, LOCK_FILE);
  const me: LockHolder = { pid: process.pid, host: hostname(), since: new Date().toISOString() };
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await open(path, "wx");
      try {
        await fh.writeFile(JSON.stringify(me) + "\n");
        await fh.sync();
      } finally {
        await fh.close();
      }
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    let holder: LockHolder | null = null;
    try {
      holder = JSON.parse(await readFile(path, "utf8")) as LockHolder;
    } catch {
      // unreadable: a crash while it was being written; treat as stale
    }
    if (holder && (holder.host !== me.host || pidAlive(holder.pid))) {
      throw new CheckpointStoreLockedError(root, `pid ${holder.pid} on ${holder.host} since ${holder.since}`);
    }
    await unlink(path).catch(() => undefined);
  }
  throw new CheckpointStoreLockedError(root, "another process that took it over at the same time");
}

async function releaseLock(root: string): Promise<void> {
  const path = join(root, LOCK_FILE);
  try {
    const holder = JSON.parse(await readFile(path, "utf8")) as LockHolder;
    if (holder.pid === process.pid && holder.host === hostname()) await unlink(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}
