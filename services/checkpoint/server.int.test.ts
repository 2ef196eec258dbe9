// The checkpoint service over real gRPC on loopback: two-phase save with shard files written into the
// staging dir, commit with sha256 checks, list, verified restore (a corrupted shard is refused and the latest
// good checkpoint is used), export of two ranks' shards into one Hugging Face folder.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from '../common/errors.ts';
import { createClient } from '../common/grpc-client.ts';
import { CheckpointServiceService, CheckpointState } from '../../proto/gen/pilot/v1/checkpoint.ts';
import { SafetensorsCheckpoint, writeSafetensors } from '../../src/hf/safetensors.ts';
import { createCheckpointServer, MODEL_DIR_KEY, type CheckpointServer } from './server.ts';

const MODEL = join(import.meta.dirname, '..', '..', 'test', 'fixtures', 'recomputed', 'qwen2_moe-tiny');
let dir: string;
let server: CheckpointServer;
let client: ReturnType<typeof createClient<typeof CheckpointServiceService>>;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ckpt-int-'));
  server = await createCheckpointServer(
    { tracer: null },
    { root: join(dir, 'root'), keepLast: 2, host: '127.0.0.1', port: 0, shutdownGraceMs: 500, serverCredentials: null },
  );
  const port = await server.start();
  client = createClient({ tracer: null }, CheckpointServiceService, { address: `127.0.0.1:${port}`, defaultTimeoutMs: 20_000, credentials: null });
});

after(async () => {
  client.close();
  await server.shutdown();
  await rm(dir, { recursive: true, force: true });
});

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Splits the fixture model as two expert-parallel ranks would save it: dense weights on both, experts halved. */
async function writeRankShards(stagingDir: string): Promise<{ rank: number; path: string; sha: string }[]> {
  const src = await SafetensorsCheckpoint.open(MODEL);
  const out: { rank: number; path: string; sha: string }[] = [];
  try {
    for (const rank of [0, 1]) {
      const tensors = [];
      for (const [name, info] of src.tensors) {
        const m = /\.experts\.(\d+)\./.exec(name);
        if (m && (Number(m[1]) < 4 ? 0 : 1) !== rank) continue;
        const data = await src.files.find((f) => f.path === info.path)!.read(name);
        tensors.push({ name, shape: info.shape, data });
      }
      // Optimizer state travels in the same shard but is not part of the exported model.
      tensors.push({ name: 'optimizer.exp_avg.flat', shape: [3], data: new Float32Array([1, 2, 3]) });
      const path = join(stagingDir, `rank-${rank}.safetensors`);
      await writeSafetensors(path, tensors);
      out.push({ rank, path, sha: sha(await readFile(path)) });
    }
  } finally {
    await Promise.all(src.files.map((f) => f.close()));
  }
  return out;
}

async function saveStep(runId: string, step: number, extra: Record<string, string> = {}) {
  const opened = await client.save({ checkpointId: '', runId, step, shards: [], metadata: { [MODEL_DIR_KEY]: MODEL } });
  assert.equal(opened.checkpointId, `${runId}:${step}`);
  const files = await writeRankShards(opened.stagingDir);
  const added = await client.save({
    checkpointId: opened.checkpointId,
    runId: '',
    step: 0,
    shards: files.map((f) => ({ name: `rank-${f.rank}/model.safetensors`, rank: f.rank, source: { $case: 'path' as const, value: f.path }, sha256: f.sha })),
    metadata: extra,
  });
  assert.deepEqual(added.shardNames.sort(), ['rank-0.model.safetensors', 'rank-1.model.safetensors']);
  return (await client.commit({ checkpointId: opened.checkpointId, expectedShards: 2 })).checkpoint!;
}

test('save, commit, list and restore a two-rank checkpoint', async () => {
  const c = await saveStep('run-a', 1, { prompt_ids: JSON.stringify(['p1', 'p2']) });
  assert.equal(c.state, CheckpointState.CHECKPOINT_STATE_COMMITTED);
  assert.equal(c.metadata.run_id, 'run-a');
  assert.deepEqual(JSON.parse(c.metadata.prompt_ids), ['p1', 'p2']);
  assert.deepEqual(c.shards.map((s) => s.rank).sort(), [0, 1]);
  await saveStep('run-a', 2);
  await saveStep('run-b', 5);
  const listed = await client.list({ runId: 'run-a' });
  assert.deepEqual(listed.checkpoints.map((x) => x.step), [1, 2]);
  assert.equal((await client.list({ runId: '' })).checkpoints.length, 3);

  const latest = (await client.restore({ target: { $case: 'latestOfRun', value: 'run-a' } })).checkpoint!;
  assert.equal(latest.step, 2);
  for (const s of latest.shards) assert.equal(sha(await readFile(s.path)), s.sha256);

  // A corrupted shard: restoring that checkpoint fails naming it; "latest" falls back to step 1.
  await writeFile(latest.shards[0].path, 'garbage');
  await assert.rejects(client.restore({ target: { $case: 'checkpointId', value: 'run-a:2' } }), (err: Error) => {
    assert.ok(err instanceof FailedPreconditionError, String(err));
    assert.match(err.message, /step 2 is corrupt: rank-0\.model\.safetensors/);
    return true;
  });
  assert.equal((await client.restore({ target: { $case: 'latestOfRun', value: 'run-a' } })).checkpoint!.step, 1);
  // keepLast 2: a third commit removes the oldest.
  await saveStep('run-a', 3);
  assert.deepEqual((await client.list({ runId: 'run-a' })).checkpoints.map((x) => x.step), [2, 3]);
});

test('commit refuses a wrong shard count and a sha256 mismatch; bad ids are named', async () => {
  const opened = await client.save({ checkpointId: '', runId: 'run-c', step: 1, shards: [], metadata: {} });
  await client.save({
    checkpointId: opened.checkpointId, runId: '', step: 0, metadata: {},
    shards: [{ name: 'rank-0.bin', rank: 0, source: { $case: 'data', value: Buffer.from('abc') }, sha256: sha(Buffer.from('abd')) }],
  });
  await assert.rejects(client.commit({ checkpointId: opened.checkpointId, expectedShards: 2 }), /has 1 shards, expected 2/);
  await assert.rejects(client.commit({ checkpointId: opened.checkpointId, expectedShards: 0 }), /do not match their sha256: rank-0\.bin/);
  await assert.rejects(client.save({ checkpointId: '', runId: 'bad run', step: 1, shards: [], metadata: {} }), (err: Error) => {
    assert.ok(err instanceof InvalidArgumentError);
    assert.match(err.message, /run_id: "bad run" is not a valid run id/);
    return true;
  });
  await assert.rejects(client.restore({ target: { $case: 'latestOfRun', value: 'nobody' } }), NotFoundError);
  await assert.rejects(client.restore({ target: { $case: 'checkpointId', value: 'x' } }), /is not a checkpoint id/);
});

test('a Save takes its shards in together: a missing file is named, and the others are kept', async () => {
  const opened = await client.save({ checkpointId: '', runId: 'run-d', step: 1, shards: [], metadata: {} });
  const [f0, f1] = await writeRankShards(opened.stagingDir);
  const byPath = (name: string, rank: number, path: string, sha256: string) => ({ name, rank, source: { $case: 'path' as const, value: path }, sha256 });
  await assert.rejects(
    client.save({
      checkpointId: opened.checkpointId, runId: '', step: 0, metadata: {},
      shards: [byPath('rank-0.st', 0, f0.path, f0.sha), byPath('rank-2.st', 2, join(opened.stagingDir, 'never-written'), ''), byPath('rank-1.st', 1, f1.path, f1.sha)],
    }),
    (err: Error) => {
      assert.ok(err instanceof InvalidArgumentError, String(err));
      assert.match(err.message, /shards\[1\]\.path: no such file: .*never-written/);
      return true;
    },
  );
  const c = (await client.commit({ checkpointId: opened.checkpointId, expectedShards: 2 })).checkpoint!;
  assert.deepEqual(c.shards.map((x) => [x.name, x.rank, x.sha256]).sort(), [['rank-0.st', 0, f0.sha], ['rank-1.st', 1, f1.sha]]);
});

test('export merges the ranks into one Hugging Face folder under hub names', async () => {
  await saveStep('run-e', 4);
  const out = join(dir, 'export');
  const res = await client.export({ checkpointId: 'run-e:4', outputDir: out, dtype: 'f32' });
  assert.ok(res.files.includes('model.safetensors') && res.files.includes('config.json') && res.files.includes('tokenizer.json'));
  const names = await readdir(out);
  assert.ok(names.includes('tokenizer_config.json'));
  const exported = await SafetensorsCheckpoint.open(out);
  const original = await SafetensorsCheckpoint.open(MODEL);
  try {
    assert.deepEqual([...exported.tensors.keys()].sort(), [...original.tensors.keys()].sort());
    for (const name of original.tensors.keys()) {
      const a = await original.files.find((f) => f.path === original.tensors.get(name)!.path)!.read(name);
      const b = await exported.files[0].read(name);
      assert.deepEqual(b, a, name);
    }
  } finally {
    await Promise.all([...exported.files, ...original.files].map((f) => f.close()));
  }
  assert.equal(JSON.parse(await readFile(join(out, 'config.json'), 'utf8')).torch_dtype, 'float32');
  await assert.rejects(client.export({ checkpointId: 'run-e:4', outputDir: out, dtype: 'f16' }), /dtype: must be "bf16" or "f32"/);
});

test('opening a step again drops the uncommitted checkpoint of a crashed writer', async () => {
  const first = await client.save({ checkpointId: '', runId: 'run-r', step: 3, shards: [], metadata: {} });
  await client.save({
    checkpointId: first.checkpointId, runId: '', step: 0, metadata: {},
    shards: [{ name: 'rank-0.stale', rank: 0, source: { $case: 'data', value: Buffer.from('old') }, sha256: '' }],
  });
  const again = await client.save({
    checkpointId: '', runId: 'run-r', step: 3, metadata: {},
    shards: [{ name: 'rank-0.fresh', rank: 0, source: { $case: 'data', value: Buffer.from('new') }, sha256: '' }],
  });
  assert.deepEqual(again.shardNames, ['rank-0.fresh']);
  const c = (await client.commit({ checkpointId: again.checkpointId, expectedShards: 1 })).checkpoint!;
  assert.deepEqual(c.shards.map((s) => s.name), ['rank-0.fresh']);
  assert.equal((await readFile(c.shards[0].path)).toString(), 'new');
});
