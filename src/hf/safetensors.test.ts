import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  INDEX_FILE,
  SafetensorsCheckpoint,
  SafetensorsError,
  SafetensorsFile,
  f32ToBf16Bits,
  writeSafetensors,
  writeSafetensorsFolder,
  writeSafetensorsHashed,
} from './safetensors.ts';
import { createHash } from 'node:crypto';

const FIXTURES = fileURLToPath(new URL('../../test/fixtures/', import.meta.url));

async function withTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'st-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true });
  }
}

// A safetensors file from a header object and raw data bytes, for hand-made and corrupt files.
function rawFile(header: unknown, data: Uint8Array, headerLength?: number): Buffer {
  const h = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(headerLength ?? h.length));
  return Buffer.concat([len, h, data]);
}

async function expectError(p: Promise<unknown>, message: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof SafetensorsError, `expected SafetensorsError, got ${String(e)}`);
    assert.equal(e.message, message);
    return true;
  });
}

function sum(a: Float32Array): number {
  let s = 0;
  for (const v of a) s += v;
  return s;
}

// Reference values read with numpy from the fixture files (first, last element and float64 sum).
const REFERENCE = {
  'qwen2_moe-tiny': {
    'model.embed_tokens.weight': [-0.12204767018556595, 0.04594402760267258, 1.2600650106681428],
    'model.layers.1.mlp.experts.7.down_proj.weight': [-0.022406334057450294, 0.1534048616886139, 6.041714597580722],
    'lm_head.weight': [-0.056592125445604324, 0.01508953794836998, 12.786609884798509],
  },
  'qwen2_moe-tiny-bf16-sharded': {
    'model.embed_tokens.weight': [-0.08349609375, 0.0311279296875, 3.274844691157341],
    'model.layers.1.mlp.experts.7.down_proj.weight': [-0.083984375, -0.0257568359375, -2.450361490249634],
    'lm_head.weight': [-0.11181640625, 0.10986328125, 1.1165557876229286],
  },
} as const;

for (const [fixture, tensors] of Object.entries(REFERENCE)) {
  test(`reads the ${fixture} fixture`, async () => {
    const ckpt = await SafetensorsCheckpoint.open(join(FIXTURES, fixture));
    try {
      assert.equal(ckpt.tensors.size, 79);
      assert.equal(ckpt.files.length, fixture.includes('sharded') ? 10 : 1);
      for (const [name, [first, last, total]] of Object.entries(tensors)) {
        const t = ckpt.tensors.get(name)!;
        assert.equal(t.dtype, fixture.includes('bf16') ? 'BF16' : 'F32');
        const x = await ckpt.read(name);
        assert.equal(x.length, t.numel);
        assert.equal(x[0], first);
        assert.equal(x[x.length - 1], last);
        assert.ok(Math.abs(sum(x) - total) < 1e-4, `${name}: sum ${sum(x)} vs ${total}`);
      }
      assert.deepEqual(ckpt.tensors.get('model.layers.0.mlp.shared_expert_gate.weight')!.shape, [1, 64]);
    } finally {
      await ckpt.close();
    }
  });
}

test('F32 round trip is exact, special values included', () =>
  withTmp(async (dir) => {
    const a = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i) * 10 ** ((i % 13) - 6));
    a.set([0, -0, Infinity, -Infinity, NaN, 3.4028234663852886e38, 1.401298464324817e-45], 0);
    const b = Float32Array.from([1, 2, 3, 4, 5, 6]);
    const path = join(dir, 'x.safetensors');
    await writeSafetensors(path, [
      { name: 'a', shape: [10, 100], data: a },
      { name: 'b', shape: [2, 3], data: b },
      { name: 'empty', shape: [0, 4], data: new Float32Array(0) },
    ]);
    const f = await SafetensorsFile.open(path);
    try {
      assert.deepEqual(f.metadata, { format: 'pt' });
      assert.deepEqual(f.info('a').shape, [10, 100]);
      assert.deepEqual(f.info('a').dtype, 'F32');
      assert.deepEqual(new Uint32Array((await f.read('a')).buffer), new Uint32Array(a.buffer));
      assert.deepEqual(await f.read('b'), b);
      assert.equal((await f.read('empty')).length, 0);
      // Into a caller's buffer at an offset (how the engine loads its parameters).
      const dst = new Float32Array(10);
      await f.read('b', dst.subarray(2, 8));
      assert.deepEqual([...dst], [0, 0, 1, 2, 3, 4, 5, 6, 0, 0]);
      await expectError(f.read('b', new Float32Array(5)), 'x.safetensors: tensor b: has 6 elements, destination holds 5');
      assert.throws(() => f.info('nope'), /x\.safetensors: no tensor nope/);
    } finally {
      await f.close();
    }
    // Data starts 8-byte aligned.
    const bytes = await readFile(path);
    assert.equal(Number(bytes.readBigUInt64LE(0)) % 8, 0);
  }));

test('BF16 writing rounds to nearest even and keeps NaN, infinities and signed zero', () =>
  withTmp(async (dir) => {
    const vals = [
      1, // exact
      1 + 2 ** -8, // halfway between 1 and 1+2^-7: ties to even -> 1
      1 + 3 * 2 ** -8, // halfway between 1+2^-7 and 1+2^-6: ties to even -> 1+2^-6
      1 + 2 ** -8 + 2 ** -20, // just above halfway -> 1+2^-7
      -2.5,
      3.4028234663852886e38, // float max rounds up to infinity in bf16
      Infinity,
      -Infinity,
      NaN,
      -0,
    ];
    const want = [1, 1, 1 + 2 ** -6, 1 + 2 ** -7, -2.5, Infinity, Infinity, -Infinity, NaN, -0];
    const path = join(dir, 'b.safetensors');
    await writeSafetensors(path, [{ name: 'v', shape: [vals.length], data: Float32Array.from(vals) }], { dtype: 'BF16', metadata: { step: '7' } });
    const f = await SafetensorsFile.open(path);
    try {
      assert.deepEqual(f.metadata, { step: '7', format: 'pt' });
      assert.equal(f.info('v').dtype, 'BF16');
      assert.equal(f.info('v').end - f.info('v').begin, vals.length * 2);
      const got = await f.read('v');
      assert.deepEqual([...got], want);
      assert.ok(Object.is(got[9], -0));
    } finally {
      await f.close();
    }
    assert.equal(f32ToBf16Bits(0x7fc00001), 0x7fc0);
  }));

test('F16 tensors are read with subnormals, infinities and NaN', () =>
  withTmp(async (dir) => {
    const bits = Uint16Array.from([0x3c00, 0xc000, 0x0001, 0x7c00, 0xfc00, 0x7e00, 0x3555, 0x7bff, 0x8000, 0x0400]);
    const want = [1, -2, 2 ** -24, Infinity, -Infinity, NaN, 0.333251953125, 65504, -0, 2 ** -14];
    const header = { __metadata__: { format: 'pt' }, h: { dtype: 'F16', shape: [2, 5], data_offsets: [0, 20] } };
    const path = join(dir, 'h.safetensors');
    await writeFile(path, rawFile(header, new Uint8Array(bits.buffer)));
    const f = await SafetensorsFile.open(path);
    try {
      const got = await f.read('h');
      assert.deepEqual([...got], want);
      assert.ok(Object.is(got[8], -0));
    } finally {
      await f.close();
    }
  }));

test('sharded writing splits at the size limit, writes an index and replaces an earlier save', () =>
  withTmp(async (dir) => {
    const ts = Array.from({ length: 5 }, (_, i) => ({ name: `t${i}`, shape: [i + 1, 10], data: Float32Array.from({ length: (i + 1) * 10 }, (_, j) => i * 100 + j) }));
    // A stale single-file save must not shadow the sharded one.
    await writeSafetensorsFolder(dir, ts.slice(0, 1));
    assert.deepEqual(await readdir(dir), ['model.safetensors']);
    // 120 bytes a shard in F32: t0 (40) + t1 (80) | t2 (120) | t3 (160, over the limit: alone) | t4 (200).
    const files = await writeSafetensorsFolder(dir, ts, { maxShardBytes: 120 });
    assert.deepEqual(files, [
      'model-00001-of-00004.safetensors',
      'model-00002-of-00004.safetensors',
      'model-00003-of-00004.safetensors',
      'model-00004-of-00004.safetensors',
      INDEX_FILE,
    ]);
    assert.deepEqual((await readdir(dir)).sort(), [...files].sort());
    const index = JSON.parse(await readFile(join(dir, INDEX_FILE), 'utf8'));
    assert.equal(index.metadata.total_size, 600);
    assert.equal(index.weight_map.t1, 'model-00001-of-00004.safetensors');
    assert.equal(index.weight_map.t4, 'model-00004-of-00004.safetensors');
    const ckpt = await SafetensorsCheckpoint.open(dir);
    try {
      for (const t of ts) assert.deepEqual(await ckpt.read(t.name), t.data);
    } finally {
      await ckpt.close();
    }
    // BF16 halves the sizes: all fits in one file again, and the shards go.
    assert.deepEqual(await writeSafetensorsFolder(dir, ts, { dtype: 'BF16', maxShardBytes: 1000 }), ['model.safetensors']);
    assert.deepEqual(await readdir(dir), ['model.safetensors']);
  }));

test('writing rejects data that does not match its shape', () =>
  withTmp(async (dir) => {
    await expectError(
      writeSafetensors(join(dir, 'w.safetensors'), [{ name: 'w', shape: [2, 3], data: new Float32Array(5) }]),
      'w.safetensors: tensor w has 5 values, shape [2,3] needs 6',
    );
    assert.deepEqual(await readdir(dir), []);
  }));

test('corrupt, truncated and misshapen files are errors naming the file and the tensor', () =>
  withTmp(async (dir) => {
    const p = (n: string) => join(dir, n);
    const ok = { __metadata__: { format: 'pt' }, a: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] }, b: { dtype: 'BF16', shape: [4], data_offsets: [16, 24] } };

    await writeFile(p('short.safetensors'), Buffer.from([1, 2, 3, 4]));
    await expectError(SafetensorsFile.open(p('short.safetensors')), 'short.safetensors: file is 4 bytes, too short for a safetensors header');

    await writeFile(p('len.safetensors'), rawFile(ok, new Uint8Array(24), 1 << 20));
    const size = rawFile(ok, new Uint8Array(24)).length;
    await expectError(SafetensorsFile.open(p('len.safetensors')), `len.safetensors: header length 1048576 is invalid for a ${size}-byte file (corrupt or not safetensors)`);

    const notJson = Buffer.concat([Buffer.from([5, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{"a":')]);
    await writeFile(p('json.safetensors'), notJson);
    await assert.rejects(SafetensorsFile.open(p('json.safetensors')), (e: Error) => e instanceof SafetensorsError && e.message.startsWith('json.safetensors: header is not valid JSON'));

    await writeFile(p('arr.safetensors'), rawFile([1, 2], new Uint8Array(0)));
    await expectError(SafetensorsFile.open(p('arr.safetensors')), 'arr.safetensors: header must be a JSON object');

    await writeFile(p('dtype.safetensors'), rawFile({ ...ok, i: { dtype: 'I64', shape: [1], data_offsets: [24, 32] } }, new Uint8Array(32)));
    await expectError(SafetensorsFile.open(p('dtype.safetensors')), 'dtype.safetensors: tensor i: dtype I64 is not supported (supported: F32, BF16, F16, I32)');

    await writeFile(p('shape.safetensors'), rawFile({ ...ok, a: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 16] } }, new Uint8Array(24)));
    await expectError(SafetensorsFile.open(p('shape.safetensors')), 'shape.safetensors: tensor a: shape [2,3] of F32 needs 24 bytes but data_offsets span 16');

    await writeFile(p('neg.safetensors'), rawFile({ ...ok, a: { dtype: 'F32', shape: [-1, 4], data_offsets: [0, 16] } }, new Uint8Array(24)));
    await expectError(SafetensorsFile.open(p('neg.safetensors')), 'neg.safetensors: tensor a: shape must be an array of non-negative integers, got [-1,4]');

    await writeFile(p('offs.safetensors'), rawFile({ ...ok, a: { dtype: 'F32', shape: [2, 2], data_offsets: [16, 0] } }, new Uint8Array(24)));
    await expectError(SafetensorsFile.open(p('offs.safetensors')), 'offs.safetensors: tensor a: data_offsets must be [begin, end] with 0 <= begin <= end, got [16,0]');

    await writeFile(p('overlap.safetensors'), rawFile({ ...ok, b: { dtype: 'BF16', shape: [4], data_offsets: [8, 16] } }, new Uint8Array(24)));
    await expectError(SafetensorsFile.open(p('overlap.safetensors')), 'overlap.safetensors: tensors a and b overlap');

    // A valid file cut short: the header is intact, the last tensor runs past the end.
    await writeSafetensors(p('cut.safetensors'), [
      { name: 'x', shape: [4], data: new Float32Array(4) },
      { name: 'y', shape: [8], data: new Float32Array(8) },
    ]);
    const full = (await readFile(p('cut.safetensors'))).length;
    await truncate(p('cut.safetensors'), full - 3);
    await expectError(SafetensorsFile.open(p('cut.safetensors')), 'cut.safetensors: tensor y: data_offsets [16, 48] run past the end of the data (45 bytes; file truncated?)');

    await expectError(SafetensorsFile.open(p('absent.safetensors')), `absent.safetensors: cannot open ${p('absent.safetensors')}: ENOENT: no such file or directory, open '${p('absent.safetensors')}'`);
  }));

test('sharded folders: a missing shard, a bad index or no weights at all are errors naming the file', () =>
  withTmp(async (dir) => {
    await expectError(SafetensorsCheckpoint.open(dir), `${dir}: neither model.safetensors nor model.safetensors.index.json found`);
    await writeSafetensors(join(dir, 'model-00001-of-00002.safetensors'), [{ name: 'a', shape: [2], data: Float32Array.from([1, 2]) }]);
    const index = (wm: Record<string, string>) => writeFile(join(dir, INDEX_FILE), JSON.stringify({ metadata: {}, weight_map: wm }));
    await index({ a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors' });
    await expectError(SafetensorsCheckpoint.open(dir), `model.safetensors.index.json: shard model-00002-of-00002.safetensors is missing from ${dir}`);
    await index({ a: 'model-00001-of-00002.safetensors', c: 'model-00001-of-00002.safetensors' });
    await expectError(SafetensorsCheckpoint.open(dir), 'model.safetensors.index.json: tensor c is mapped to model-00001-of-00002.safetensors, which does not hold it');
    await index({ a: '../model-00001-of-00002.safetensors' });
    await expectError(SafetensorsCheckpoint.open(dir), 'model.safetensors.index.json: weight_map[a] must be a file name in the folder, got "../model-00001-of-00002.safetensors"');
    await writeFile(join(dir, INDEX_FILE), '{"weight_map": 3}');
    await expectError(SafetensorsCheckpoint.open(dir), 'model.safetensors.index.json: weight_map must be an object of tensor name -> shard file');
    await index({ a: 'model-00001-of-00002.safetensors' });
    const ckpt = await SafetensorsCheckpoint.open(dir);
    assert.deepEqual(await ckpt.read('a'), Float32Array.from([1, 2]));
    await ckpt.close();
  }));

test('tensors larger than one read chunk are read and written whole, in F32 and BF16', () =>
  withTmp(async (dir) => {
    // 5M values: 20 MB in F32, 10 MB in BF16, both over the 8 MB chunk.
    const n = 5_000_000;
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = (i % 65521) * 0.25 - 8000;
    for (const dtype of ['F32', 'BF16'] as const) {
      const path = join(dir, `big-${dtype}.safetensors`);
      await writeSafetensors(path, [{ name: 'big', shape: [1000, 5000], data: a }], { dtype });
      const f = await SafetensorsFile.open(path);
      try {
        const got = await f.read('big');
        const src = new Uint32Array(a.buffer);
        const bits = new Uint32Array(got.buffer);
        for (let i = 0; i < n; i++) {
          const want = dtype === 'F32' ? src[i] : (f32ToBf16Bits(src[i]) << 16) >>> 0;
          if (bits[i] !== want) assert.fail(`${dtype}: value ${i} is ${got[i]}, expected bits ${want.toString(16)}`);
        }
      } finally {
        await f.close();
      }
    }
  }));

test('a tensor written from pieces and read into pieces of other sizes is the same tensor, in F32 and BF16', () =>
  withTmp(async (dir) => {
    const values = Float32Array.from({ length: 10_000 }, (_, i) => Math.sin(i) * 100);
    const cut = (v: Float32Array, sizes: number[]) => {
      let at = 0;
      return sizes.map((n) => v.subarray(at, (at += n)));
    };
    for (const dtype of ['F32', 'BF16'] as const) {
      const path = join(dir, `pieces-${dtype}.safetensors`);
      await writeSafetensors(path, [
        { name: 'head', shape: [3], data: Float32Array.from([1, 2, 3]) },
        { name: 'm', shape: [values.length], data: cut(values, [4000, 1, 5999]) },
      ], { dtype });
      const f = await SafetensorsFile.open(path);
      try {
        const whole = await f.read('m');
        const pieces = [new Float32Array(2500), new Float32Array(7000), new Float32Array(500)];
        await f.read('m', pieces);
        const joined = new Float32Array(values.length);
        joined.set(pieces[0], 0), joined.set(pieces[1], 2500), joined.set(pieces[2], 9500);
        assert.deepEqual(joined, whole);
        if (dtype === 'F32') assert.deepEqual(whole, values);
        else assert.ok(whole.every((x, i) => new Uint32Array(Float32Array.of(x).buffer)[0] === (f32ToBf16Bits(new Uint32Array(Float32Array.of(values[i]).buffer)[0]) << 16) >>> 0));
        assert.deepEqual(await f.read('head'), Float32Array.from([1, 2, 3]));
        await assert.rejects(f.read('m', [new Float32Array(10)]), /has 10000 elements, destination holds 10/);
      } finally {
        await f.close();
      }
    }
    await assert.rejects(
      writeSafetensors(join(dir, 'bad.safetensors'), [{ name: 'm', shape: [5], data: [new Float32Array(2), new Float32Array(2)] }]),
      /tensor m has 4 values, shape \[5\] needs 5/,
    );
  }));

test('a file hashed by hashFile as it is flushed has the digest of hashing it while writing; a failed hash leaves no file', () =>
  withTmp(async (dir) => {
    const a = new Float32Array(3_000_000);  // 12 MB: two write chunks
    for (let i = 0; i < a.length; i++) a[i] = Math.sin(i);
    const tensors = [{ name: 'w', shape: [3000, 1000], data: a }];
    const inThread = await writeSafetensorsHashed(join(dir, 'a.safetensors'), tensors, { dtype: 'BF16' });
    const sha256Of = async (path: string) => createHash('sha256').update(await readFile(path)).digest('hex');
    const seen: string[] = [];
    const elsewhere = await writeSafetensorsHashed(join(dir, 'b.safetensors'), tensors, {
      dtype: 'BF16',
      hashFile: (path) => (seen.push(path), sha256Of(path)),
    });
    assert.deepEqual(elsewhere, inThread);
    assert.equal(elsewhere.sha256, await sha256Of(join(dir, 'b.safetensors')));
    assert.equal(seen.length, 1);
    assert.ok(!seen[0].endsWith('b.safetensors'), 'hashed before it is renamed into place');

    await assert.rejects(
      writeSafetensorsHashed(join(dir, 'c.safetensors'), tensors, { hashFile: () => Promise.reject(new Error('no hash thread')) }),
      /no hash thread/,
    );
    assert.deepEqual((await readdir(dir)).sort(), ['a.safetensors', 'b.safetensors']);
  }));
