// Safetensors files: reading (single file or sharded with an index) into Float32Arrays, and writing.
//
// Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
// [begin, end]}, "__metadata__": {str: str}}, then the data; offsets are relative to the end of the header.
// Tensors are read with positioned reads straight into the caller's array (e.g. a view of the engine's
// parameter buffer), chunk by chunk, so a multi-gigabyte shard is never held in memory at once.
import { createHash, type Hash } from 'node:crypto';
import { open, readFile, rename, rm, readdir, writeFile, type FileHandle } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { endianness } from 'node:os';

// I32 holds token ids in oracle files (expected.safetensors); weights are F32, BF16 or F16.
export type Dtype = 'F32' | 'BF16' | 'F16' | 'I32';
export const DTYPE_BYTES: Readonly<Record<Dtype, number>> = { F32: 4, BF16: 2, F16: 2, I32: 4 };

/** Headers larger than this are refused (the reference implementation's limit). */
export const MAX_HEADER_BYTES = 100_000_000;
/** Bytes per positioned read / write when converting. */
const CHUNK_BYTES = 8 << 20;
// Reads and writes of one tensor keep this many chunks in flight (positional I/O on libuv's threadpool, 4 threads by
// default): one at a time, each chunk's copy to or from the page cache runs alone. Writing the 4.8 GB of a 1-layer
// A2.7B-width engine's tensors in 8 MB positional writes took 10.6 s one at a time and 2.4 s four at a time; reading
// them back 3.2-4.9 s and 1.9 s (a 2-core CI-class machine, page cache warm).
const IN_FLIGHT = 4;

// At most `limit` promises pending: add() waits for the oldest once the limit is reached; drain() for all. A
// rejection is reported by the add() or drain() that awaits it (the others are marked handled meanwhile).
class Window {
  private readonly pending: Promise<unknown>[] = [];
  constructor(private readonly limit: number) {}
  async add(p: Promise<unknown>): Promise<void> {
    p.catch(() => {});
    this.pending.push(p);
    if (this.pending.length >= this.limit) await this.pending.shift();
  }
  async drain(): Promise<void> {
    while (this.pending.length > 0) await this.pending.shift();
  }
}

export const SINGLE_FILE = 'model.safetensors';
export const INDEX_FILE = 'model.safetensors.index.json';

export class SafetensorsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SafetensorsError';
  }
}

export interface TensorInfo {
  name: string;
  dtype: Dtype;
  shape: number[];
  numel: number;
  /** Absolute byte range in the file. */
  begin: number;
  end: number;
  /** The file holding it. */
  path: string;
}

if (endianness() !== 'LE') throw new Error('safetensors.ts: a little-endian host is required');

/** One open safetensors file. Call close() when done. */
export class SafetensorsFile {
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly metadata: Record<string, string> | null,
    readonly tensors: ReadonlyMap<string, TensorInfo>,
  ) {}

  static async open(path: string): Promise<SafetensorsFile> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (e) {
      throw new SafetensorsError(`${basename(path)}: cannot open ${path}: ${(e as Error).message}`);
    }
    try {
      const { metadata, tensors } = await readHeader(fh, path);
      return new SafetensorsFile(path, fh, metadata, tensors);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  get name(): string {
    return basename(this.path);
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new SafetensorsError(`${this.name}: no tensor ${name}`);
    return t;
  }

  /**
   * Reads a tensor as float32 into `out` (allocated when absent; its length must equal numel), or into consecutive
   * pieces whose lengths add up to numel (a destination larger than one typed array may hold).
   */
  async read(name: string, out?: Float32Array): Promise<Float32Array>;
  async read(name: string, out: readonly Float32Array[]): Promise<readonly Float32Array[]>;
  async read(name: string, out?: Float32Array | readonly Float32Array[]): Promise<Float32Array | readonly Float32Array[]> {
    const t = this.info(name);
    if (t.dtype === 'I32') throw new SafetensorsError(`${this.name}: tensor ${name} is I32 (integers); use readInt32`);
    if (Array.isArray(out)) {
      const pieces = out as readonly Float32Array[];
      const total = pieces.reduce((a, p) => a + p.length, 0);
      if (total !== t.numel) {
        throw new SafetensorsError(`${this.name}: tensor ${name}: has ${t.numel} elements, destination holds ${total}`);
      }
      let at = 0;
      for (const p of pieces) {
        await readTensor(this.fh, t, p, at);
        at += p.length;
      }
      return pieces;
    }
    return readTensor(this.fh, t, out as Float32Array | undefined);
  }

  /** Reads an I32 tensor. */
  async readInt32(name: string): Promise<Int32Array> {
    const t = this.info(name);
    if (t.dtype !== 'I32') throw new SafetensorsError(`${this.name}: tensor ${name} is ${t.dtype}, not I32`);
    const buf = new Uint8Array(t.end - t.begin);
    await readExact(this.fh, buf, t.begin, `${this.name}: tensor ${name}`);
    return new Int32Array(buf.buffer, buf.byteOffset, t.numel);
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** The tensors of a model folder: model.safetensors, or the shards listed in model.safetensors.index.json. */
export class SafetensorsCheckpoint {
  private constructor(
    readonly dir: string,
    readonly files: readonly SafetensorsFile[],
    readonly tensors: ReadonlyMap<string, TensorInfo>,
  ) {}

  static async open(dir: string): Promise<SafetensorsCheckpoint> {
    const names = await listFiles(dir);
    if (names.has(SINGLE_FILE)) {
      const f = await SafetensorsFile.open(join(dir, SINGLE_FILE));
      return new SafetensorsCheckpoint(dir, [f], f.tensors);
    }
    if (!names.has(INDEX_FILE)) throw new SafetensorsError(`${dir}: neither ${SINGLE_FILE} nor ${INDEX_FILE} found`);
    const weightMap = await readIndex(join(dir, INDEX_FILE));
    const shardNames = [...new Set(weightMap.values())].sort();
    for (const s of shardNames) {
      if (!names.has(s)) throw new SafetensorsError(`${INDEX_FILE}: shard ${s} is missing from ${dir}`);
    }
    const files: SafetensorsFile[] = [];
    try {
      for (const s of shardNames) files.push(await SafetensorsFile.open(join(dir, s)));
    } catch (e) {
      await Promise.all(files.map((f) => f.close()));
      throw e;
    }
    const byName = new Map(files.map((f) => [f.name, f]));
    const tensors = new Map<string, TensorInfo>();
    for (const [tensor, shard] of weightMap) {
      const t = byName.get(shard)!.tensors.get(tensor);
      if (!t) {
        await Promise.all(files.map((f) => f.close()));
        throw new SafetensorsError(`${INDEX_FILE}: tensor ${tensor} is mapped to ${shard}, which does not hold it`);
      }
      tensors.set(tensor, t);
    }
    // A shard tensor missing from the weight map would be silently ignored; the index must list all.
    for (const f of files) {
      for (const t of f.tensors.keys()) {
        if (weightMap.get(t) !== f.name) {
          await Promise.all(files.map((x) => x.close()));
          throw new SafetensorsError(`${INDEX_FILE}: tensor ${t} in ${f.name} is not mapped to that shard`);
        }
      }
    }
    return new SafetensorsCheckpoint(dir, files, tensors);
  }

  /** The file name (not path) holding a tensor, for messages. */
  fileOf(name: string): string {
    const t = this.tensors.get(name);
    return t ? basename(t.path) : SINGLE_FILE;
  }

  async read(name: string, out?: Float32Array): Promise<Float32Array> {
    const t = this.tensors.get(name);
    if (!t) throw new SafetensorsError(`${this.dir}: no tensor ${name}`);
    const f = this.files.find((x) => x.path === t.path)!;
    return f.read(name, out);
  }

  async close(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close()));
  }
}

async function listFiles(dir: string): Promise<Set<string>> {
  try {
    return new Set(await readdir(dir));
  } catch (e) {
    throw new SafetensorsError(`${dir}: cannot list the folder: ${(e as Error).message}`);
  }
}

async function readIndex(path: string): Promise<Map<string, string>> {
  let j: unknown;
  try {
    j = JSON.parse(await readFile(path, 'utf8'));
  } catch (e) {
    throw new SafetensorsError(`${INDEX_FILE}: cannot read ${path}: ${(e as Error).message}`);
  }
  const wm = (j as { weight_map?: unknown } | null)?.weight_map;
  if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) {
    throw new SafetensorsError(`${INDEX_FILE}: weight_map must be an object of tensor name -> shard file`);
  }
  const out = new Map<string, string>();
  for (const [k, v] of Object.entries(wm)) {
    // Shard names are plain file names in the same folder; anything else could escape it.
    if (typeof v !== 'string' || v === '' || v !== basename(v) || v === '.' || v === '..') {
      throw new SafetensorsError(`${INDEX_FILE}: weight_map[${k}] must be a file name in the folder, got ${JSON.stringify(v)}`);
    }
    out.set(k, v);
  }
  return out;
}

async function readExact(fh: FileHandle, buf: Uint8Array, position: number, what: string): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw new SafetensorsError(`${what}: file ends early (truncated)`);
    done += bytesRead;
  }
}

async function readHeader(
  fh: FileHandle,
  path: string,
): Promise<{ metadata: Record<string, string> | null; tensors: Map<string, TensorInfo> }> {
  const file = basename(path);
  const size = (await fh.stat()).size;
  if (size < 8) throw new SafetensorsError(`${file}: file is ${size} bytes, too short for a safetensors header`);
  const lenBuf = new Uint8Array(8);
  await readExact(fh, lenBuf, 0, file);
  const n = Number(new DataView(lenBuf.buffer).getBigUint64(0, true));
  if (n < 2 || n > MAX_HEADER_BYTES || n > size - 8) {
    throw new SafetensorsError(`${file}: header length ${n} is invalid for a ${size}-byte file (corrupt or not safetensors)`);
  }
  const hdr = new Uint8Array(n);
  await readExact(fh, hdr, 8, file);
  let j: unknown;
  try {
    j = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(hdr));
  } catch (e) {
    throw new SafetensorsError(`${file}: header is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof j !== 'object' || j === null || Array.isArray(j)) throw new SafetensorsError(`${file}: header must be a JSON object`);
  const dataStart = 8 + n;
  const dataSize = size - dataStart;
  let metadata: Record<string, string> | null = null;
  const tensors = new Map<string, TensorInfo>();
  for (const [name, v] of Object.entries(j as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof v !== 'object' || v === null || Array.isArray(v) || !Object.values(v).every((x) => typeof x === 'string')) {
        throw new SafetensorsError(`${file}: __metadata__ must be an object of strings`);
      }
      metadata = v as Record<string, string>;
      continue;
    }
    const where = `${file}: tensor ${name}`;
    if (typeof v !== 'object' || v === null) throw new SafetensorsError(`${where}: entry must be an object`);
    const { dtype, shape, data_offsets: offs } = v as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof dtype !== 'string') throw new SafetensorsError(`${where}: dtype missing`);
    if (!(dtype in DTYPE_BYTES)) {
      throw new SafetensorsError(`${where}: dtype ${dtype} is not supported (supported: ${Object.keys(DTYPE_BYTES).join(', ')})`);
    }
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SafetensorsError(`${where}: shape must be an array of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((d) => Number.isSafeInteger(d) && d >= 0) || offs[0] > offs[1]) {
      throw new SafetensorsError(`${where}: data_offsets must be [begin, end] with 0 <= begin <= end, got ${JSON.stringify(offs)}`);
    }
    if (offs[1] > dataSize) {
      throw new SafetensorsError(`${where}: data_offsets [${offs[0]}, ${offs[1]}] run past the end of the data (${dataSize} bytes; file truncated?)`);
    }
    const numel = (shape as number[]).reduce((a, b) => a * b, 1);
    const bytes = numel * DTYPE_BYTES[dtype as Dtype];
    if (bytes !== offs[1] - offs[0]) {
      throw new SafetensorsError(
        `${where}: shape ${fmtShape(shape as number[])} of ${dtype} needs ${bytes} bytes but data_offsets span ${offs[1] - offs[0]}`,
      );
    }
    tensors.set(name, { name, dtype: dtype as Dtype, shape: shape as number[], numel, begin: dataStart + offs[0], end: dataStart + offs[1], path });
  }
  const sorted = [...tensors.values()].filter((t) => t.end > t.begin).sort((a, b) => a.begin - b.begin);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i].begin < sorted[i - 1].end) {
      throw new SafetensorsError(`${file}: tensors ${sorted[i - 1].name} and ${sorted[i].name} overlap`);
    }
  }
  return { metadata, tensors };
}

export function fmtShape(shape: readonly number[]): string {
  return `[${shape.join(',')}]`;
}

// Reads elements [from, from + numel of the destination) of a tensor (all of it when from is absent) as float32.
async function readTensor(fh: FileHandle, t: TensorInfo, out?: Float32Array, from?: number): Promise<Float32Array> {
  const where = `${basename(t.path)}: tensor ${t.name}`;
  const count = from === undefined ? t.numel : out!.length;
  if (from === undefined && out && out.length !== t.numel) {
    throw new SafetensorsError(`${where}: has ${t.numel} elements, destination holds ${out.length}`);
  }
  const first = from ?? 0;
  const dst = out ?? new Float32Array(t.numel);
  const esize = DTYPE_BYTES[t.dtype];
  const start = t.begin + first * esize;
  const window = new Window(IN_FLIGHT);
  if (t.dtype === 'F32') {
    // Straight into the destination's bytes (host and file are both little-endian).
    const bytes = new Uint8Array(dst.buffer, dst.byteOffset, count * 4);
    for (let off = 0; off < bytes.length; off += CHUNK_BYTES) {
      await window.add(readExact(fh, bytes.subarray(off, Math.min(bytes.length, off + CHUNK_BYTES)), start + off, where));
    }
    await window.drain();
    return dst;
  }
  // 16-bit: each chunk read into one of IN_FLIGHT staging buffers, widened into dst once it has arrived.
  const u32 = new Uint32Array(dst.buffer, dst.byteOffset, count);
  const chunkElems = CHUNK_BYTES / 2;
  const staging = Array.from({ length: IN_FLIGHT }, () => new Uint8Array(Math.min(CHUNK_BYTES, count * 2)));
  const f16 = t.dtype === 'F16' ? f16Table() : null;
  for (let e0 = 0, k = 0; e0 < count; e0 += chunkElems, k++) {
    const n = Math.min(chunkElems, count - e0);
    const buf = staging[k % IN_FLIGHT];  // free again: the window holds at most IN_FLIGHT - 1 reads when add() returns
    const half = new Uint16Array(buf.buffer, 0, n);
    const widen = readExact(fh, buf.subarray(0, n * 2), start + e0 * 2, where).then(() => {
      if (f16) for (let i = 0; i < n; i++) dst[e0 + i] = f16[half[i]];
      else for (let i = 0; i < n; i++) u32[e0 + i] = half[i] << 16;
    });
    await window.add(widen);
  }
  await window.drain();
  return dst;
}

let f16Cache: Float32Array | null = null;
// IEEE half -> float for all 65536 bit patterns, built on first use (a constant, not state).
function f16Table(): Float32Array {
  if (f16Cache) return f16Cache;
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) t[h] = sign * frac * 2 ** -24;
    else if (exp === 31) t[h] = frac ? NaN : sign * Infinity;
    else t[h] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  f16Cache = t;
  return t;
}

/** float32 bits -> bfloat16 bits, round to nearest even; NaN stays NaN. */
export function f32ToBf16Bits(bits: number): number {
  if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x007fffff) return ((bits >>> 16) | 0x40) & 0xffff;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

// ---- writing ----

export interface TensorToWrite {
  name: string;
  shape: readonly number[];
  /** The values, or consecutive pieces of them (a tensor larger than one typed array may hold). */
  data: Float32Array | readonly Float32Array[];
}

function lengthOf(data: TensorToWrite['data']): number {
  return Array.isArray(data) ? (data as readonly Float32Array[]).reduce((a, p) => a + p.length, 0) : (data as Float32Array).length;
}

export interface WriteOptions {
  dtype?: 'F32' | 'BF16';
  /** Extra __metadata__ entries; format "pt" is always set. */
  metadata?: Record<string, string>;
}

export interface HashedWriteOptions extends WriteOptions {
  /**
   * Hashes the written file elsewhere (a HashPool's thread reading it back while it is flushed to disk) instead of
   * hashing each chunk on this thread before it is written. For a service whose event loop must stay free while a
   * checkpoint of several GB is written behind its other calls: hashing here holds the loop for about 1 s per 2 GB.
   */
  hashFile?: (path: string) => Promise<string>;
}

/** Writes one safetensors file (via a temporary file renamed into place); returns its size in bytes. */
export async function writeSafetensors(path: string, tensors: readonly TensorToWrite[], options: WriteOptions = {}): Promise<number> {
  return (await writeSafetensorsHashed(path, tensors, options)).bytes;
}

/**
 * writeSafetensors that also returns the file's sha256, hashed from the bytes as they are written (no second read
 * of a file that may be tens of GB: a checkpoint shard).
 */
export async function writeSafetensorsHashed(
  path: string,
  tensors: readonly TensorToWrite[],
  options: HashedWriteOptions = {},
): Promise<{ bytes: number; sha256: string }> {
  const dtype = options.dtype ?? 'F32';
  if (dtype !== 'F32' && dtype !== 'BF16') throw new SafetensorsError(`${basename(path)}: cannot write dtype ${String(dtype)} (F32 or BF16)`);
  const esize = DTYPE_BYTES[dtype];
  const header: Record<string, unknown> = { __metadata__: { ...(options.metadata ?? {}), format: 'pt' } };
  let off = 0;
  const seen = new Set<string>();
  for (const t of tensors) {
    const numel = t.shape.reduce((a, b) => a * b, 1);
    if (seen.has(t.name) || t.name === '__metadata__') throw new SafetensorsError(`${basename(path)}: tensor ${t.name} given twice`);
    seen.add(t.name);
    const n = lengthOf(t.data);
    if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0) || numel !== n) {
      throw new SafetensorsError(`${basename(path)}: tensor ${t.name} has ${n} values, shape ${fmtShape(t.shape)} needs ${numel}`);
    }
    header[t.name] = { dtype, shape: [...t.shape], data_offsets: [off, off + numel * esize] };
    off += numel * esize;
  }
  let json = JSON.stringify(header);
  // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
  json += ' '.repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
  const hdr = Buffer.from(json, 'utf8');
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(hdr.length));

  const tmp = `${path}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w');
  const hash = options.hashFile ? null : createHash('sha256');
  let sha256: string;
  try {
    let pos = 0;
    pos += await writeAll(fh, lenBuf, pos, hash);
    pos += await writeAll(fh, hdr, pos, hash);
    const window = new Window(IN_FLIGHT);
    const staging: Staging = { bufs: [], next: 0 };
    for (const t of tensors) {
      for (const piece of Array.isArray(t.data) ? (t.data as readonly Float32Array[]) : [t.data as Float32Array]) {
        pos += await writeTensorData(fh, piece, dtype, pos, hash, window, staging);
      }
    }
    await window.drain();
    if (hash) {
      await fh.sync();
      sha256 = hash.digest('hex');
    } else {
      // Read back from the page cache while the same bytes go to disk; both settle before the file is closed.
      const [digest, synced] = await Promise.allSettled([options.hashFile!(tmp), fh.sync()]);
      if (synced.status === 'rejected') throw synced.reason;
      if (digest.status === 'rejected') throw digest.reason;
      sha256 = digest.value;
    }
  } catch (e) {
    await fh.close();
    await rm(tmp, { force: true });
    throw e;
  }
  await fh.close();
  await rename(tmp, path);
  return { bytes: 8 + hdr.length + off, sha256 };
}

// Writes buf at pos. Hashed here, before the write is issued: callers issue the file's chunks front to back, so the
// hash sees the file's bytes in order whatever order the writes complete in.
async function writeAll(fh: FileHandle, buf: Uint8Array, pos: number, hash: Hash | null): Promise<number> {
  hash?.update(buf);
  let done = 0;
  while (done < buf.length) done += (await fh.write(buf, done, buf.length - done, pos + done)).bytesWritten;
  return buf.length;
}

// BF16 conversion buffers of one file's writer, used in turn: IN_FLIGHT of them, so the next one is free whenever
// the window has room (its last write was IN_FLIGHT chunks ago).
interface Staging {
  bufs: Uint16Array[];
  next: number;
}

// Issues the writes of one tensor's data at pos through `window` (IN_FLIGHT chunks at a time).
async function writeTensorData(
  fh: FileHandle,
  data: Float32Array,
  dtype: 'F32' | 'BF16',
  pos: number,
  hash: Hash | null,
  window: Window,
  staging: Staging,
): Promise<number> {
  if (dtype === 'F32') {
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.length * 4);
    for (let o = 0; o < bytes.length; o += CHUNK_BYTES) {
      await window.add(writeAll(fh, bytes.subarray(o, Math.min(bytes.length, o + CHUNK_BYTES)), pos + o, hash));
    }
    return bytes.length;
  }
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  const chunkElems = CHUNK_BYTES / 2;
  for (let e0 = 0; e0 < data.length; e0 += chunkElems) {
    const n = Math.min(chunkElems, data.length - e0);
    const k = staging.next++ % IN_FLIGHT;
    if (staging.bufs.length <= k) staging.bufs.push(new Uint16Array(chunkElems));
    const half = staging.bufs[k];
    for (let i = 0; i < n; i++) half[i] = f32ToBf16Bits(bits[e0 + i]);
    await window.add(writeAll(fh, new Uint8Array(half.buffer, 0, n * 2), pos + e0 * 2, hash));
  }
  return data.length * 2;
}

export interface ShardedWriteOptions extends WriteOptions {
  /** Most bytes of tensor data per shard; default 5 GB (the hub's usual size). */
  maxShardBytes?: number;
}

/**
 * Writes a model folder's weights: model.safetensors when everything fits in one shard, otherwise
 * model-0000i-of-0000n.safetensors plus model.safetensors.index.json. Weight files of an earlier save in
 * the folder are removed first, so a stale index or shard cannot shadow the new weights.
 * Returns the files written.
 */
export async function writeSafetensorsFolder(dir: string, tensors: readonly TensorToWrite[], options: ShardedWriteOptions = {}): Promise<string[]> {
  const dtype = options.dtype ?? 'F32';
  const limit = options.maxShardBytes ?? 5e9;
  if (!(limit > 0)) throw new SafetensorsError(`maxShardBytes must be > 0, got ${limit}`);
  const esize = DTYPE_BYTES[dtype];
  const shards: TensorToWrite[][] = [];
  let cur: TensorToWrite[] = [];
  let curBytes = 0;
  for (const t of tensors) {
    const b = lengthOf(t.data) * esize;
    // A tensor larger than the limit gets a shard of its own.
    if (cur.length > 0 && curBytes + b > limit) {
      shards.push(cur);
      cur = [];
      curBytes = 0;
    }
    cur.push(t);
    curBytes += b;
  }
  if (cur.length > 0 || shards.length === 0) shards.push(cur);

  for (const f of await readdir(dir)) {
    if (f === SINGLE_FILE || f === INDEX_FILE || /^model-\d+-of-\d+\.safetensors$/.test(f)) await rm(join(dir, f), { force: true });
  }
  if (shards.length === 1) {
    await writeSafetensors(join(dir, SINGLE_FILE), shards[0], options);
    return [SINGLE_FILE];
  }
  const width = Math.max(5, String(shards.length).length);
  const pad = (i: number) => String(i).padStart(width, '0');
  const names: string[] = [];
  const weightMap: Record<string, string> = {};
  let total = 0;
  for (let i = 0; i < shards.length; i++) {
    const name = `model-${pad(i + 1)}-of-${pad(shards.length)}.safetensors`;
    await writeSafetensors(join(dir, name), shards[i], options);
    for (const t of shards[i]) {
      weightMap[t.name] = name;
      total += lengthOf(t.data) * esize;
    }
    names.push(name);
  }
  const index = { metadata: { total_size: total }, weight_map: weightMap };
  await writeFile(join(dir, INDEX_FILE), JSON.stringify(index, null, 2) + '\n');
  return [...names, INDEX_FILE];
}
