// The checkpoint store on real files: atomic commit, verification, fallback, retention and crash leftovers.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, truncate, unlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, it } from "node:test";
import {
  CheckpointConflictError,
  CheckpointCorruptError,
  CheckpointNotFoundError,
  CheckpointStateError,
  CheckpointStoreLockedError,
} from "./errors.ts";
import { createCheckpointStore, MANIFEST_FILE, type CheckpointStore } from "./store.ts";

let root: string;
const open: CheckpointStore[] = [];

async function store(opts: { keepLast?: number; runId?: string; readOnly?: boolean } = {}) {
  const s = await createCheckpointStore({ root, keepLast: opts.keepLast ?? 3, runId: opts.runId ?? null, readOnly: opts.readOnly ?? false });
  open.push(s);
  return s;
}

/** Deterministic, step-dependent shard bytes. */
function bytes(step: number, n: number, salt = 0): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + step * 7 + salt) & 0xff;
  return b;
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

async function commitStep(s: CheckpointStore, step: number) {
  const p = await s.begin(step);
  await p.writeShard("model-00001-of-00002.bin", bytes(step, 1000));
  await p.writeShard("model-00002-of-00002.bin", bytes(step, 500, 1));
  return p.commit({ promptIds: [`p${step}`] });
}

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), "moe-pilot-ckpt-"));
});

afterEach(async () => {
  for (const s of open.splice(0)) await s.close();
  await rm(root, { recursive: true, force: true });
});

describe("checkpoint store", () => {
  it("commits shards atomically and restores them byte for byte", async () => {
    const s = await store({ runId: "run-7" });
    assert.equal(await s.latest(), null);
    const p = await s.begin(12);
    const a = bytes(12, 3 * 1024 * 1024 + 17);
    const b = bytes(12, 70_000, 3);
    const ea = await p.writeShard("experts.bin", a);
    // A stream in uneven chunks, as the engine's save would produce.
    const eb = await p.writeShard("router.bin", Readable.from([b.subarray(0, 1), b.subarray(1, 40_000), b.subarray(40_000)]));
    assert.deepEqual(ea, { name: "experts.bin", size: a.length, sha256: sha(a) });
    assert.deepEqual(eb, { name: "router.bin", size: b.length, sha256: sha(b) });
    // Nothing is visible before commit.
    assert.deepEqual(await s.list(), []);

    const before = Date.now();
    const info = await p.commit({ promptIds: ["p-1", "p-2"], lr: 1e-6 });
    assert.equal(info.dir, join(root, "step-12"));
    const onDisk = JSON.parse(await readFile(join(root, "step-12", MANIFEST_FILE), "utf8"));
    assert.deepEqual(onDisk, info.manifest);
    assert.equal(onDisk.step, 12);
    assert.equal(onDisk.runId, "run-7");
    assert.deepEqual(onDisk.shards, [ea, eb]);
    assert.deepEqual(onDisk.metadata, { promptIds: ["p-1", "p-2"], lr: 1e-6 });
    assert.ok(Date.parse(onDisk.createdAt) >= before - 1000);
    assert.deepEqual((await readdir(root)).filter((n) => !n.startsWith(".writer")).sort(), ["step-12"]);

    assert.deepEqual((await s.list()).map((c) => c.step), [12]);
    assert.equal((await s.latest({ verified: true }))?.step, 12);
    const r = await s.restore(12);
    assert.ok((await r.readShard("experts.bin")).equals(a));
    assert.ok((await readFile(r.shardPath("router.bin"))).equals(b));
    assert.throws(() => r.shardPath("optimizer.bin"), /has no shard "optimizer.bin"/);
    assert.equal(await s.exportDir(12), join(root, "step-12"));
    await assert.rejects(s.exportDir(13), CheckpointNotFoundError);
    await assert.rejects(s.restore(13), CheckpointNotFoundError);

    // A reader in another process sees the same thing.
    const reader = await store({ readOnly: true });
    assert.deepEqual((await reader.list()).map((c) => c.manifest), [info.manifest]);
    await assert.rejects(reader.begin(13), /read-only/);
  });

  it("detects a corrupt, truncated or missing shard by name, and latest({verified}) falls back", async () => {
    const s = await store();
    await commitStep(s, 1);
    await commitStep(s, 2);
    const shard = join(root, "step-2", "model-00002-of-00002.bin");
    const good = await readFile(shard);

    // Same size, one bit flipped: only the hash can tell.
    const flipped = Buffer.from(good);
    flipped[123] ^= 0x10;
    await writeFile(shard, flipped);
    await assert.rejects(s.restore(2), (err: unknown) => {
      assert.ok(err instanceof CheckpointCorruptError);
      assert.equal(err.step, 2);
      assert.equal(err.file, "model-00002-of-00002.bin");
      assert.match(err.message, /step 2 is corrupt: model-00002-of-00002.bin: sha256 [0-9a-f]{64} does not match/);
      return true;
    });
    assert.equal((await s.latest())?.step, 2); // unverified: the manifest is fine
    const skipped: CheckpointCorruptError[] = [];
    const fallback = await s.latest({ verified: true, onCorrupt: (e) => skipped.push(e) });
    assert.equal(fallback?.step, 1);
    assert.deepEqual(skipped.map((e) => [e.step, e.file]), [[2, "model-00002-of-00002.bin"]]);

    await truncate(shard, 10);
    await assert.rejects(s.verify(2), /model-00002-of-00002.bin: 10 bytes on disk, manifest says 500/);
    await unlink(shard);
    await assert.rejects(s.verify(2), /model-00002-of-00002.bin: missing/);

    await writeFile(join(root, "step-1", MANIFEST_FILE), "{ not json");
    await assert.rejects(s.restore(1), /step 1 is corrupt: manifest.json: not JSON/);
    // list() reads manifests only: step 1 (unreadable manifest) is left out, step 2 (bad shard) is listed.
    assert.deepEqual((await s.list()).map((c) => c.step), [2]);
    assert.equal(await s.latest({ verified: true }), null);
  });

  it("keeps only the newest keepLast committed checkpoints", async () => {
    const s = await store({ keepLast: 2 });
    for (const step of [1, 2, 3, 4]) await commitStep(s, step);
    assert.deepEqual((await s.list()).map((c) => c.step), [3, 4]);
    assert.deepEqual((await readdir(root)).filter((n) => n.startsWith("step-")).sort(), ["step-3", "step-4"]);
    assert.deepEqual((await s.list()).map((c) => c.manifest.metadata.promptIds), [["p3"], ["p4"]]);
    await assert.rejects(createCheckpointStore({ root: join(root, "x"), keepLast: 0 }), /keepLast must be a positive integer/);
  });

  it("ignores and then cleans what a crashed writer left behind", async () => {
    const first = await store();
    await commitStep(first, 1);
    await first.close();

    // A real crash: another process is killed with SIGKILL mid-checkpoint, holding the writer lock.
    const fixture = fileURLToPath(new URL("../../test/harness/checkpoint-crash-writer.ts", import.meta.url));
    const child = spawn(process.execPath, ["--import", "tsx", fixture, root, "2"], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout.on("data", (d) => (out += d));
    const [, signal] = await new Promise<[number | null, string | null]>((r) => child.once("exit", (c, s) => r([c, s])));
    assert.equal(out, "ready\n");
    assert.equal(signal, "SIGKILL");
    assert.ok(existsSync(join(root, ".pending-step-2", "half-written.bin")));
    // And an interrupted garbage collection.
    await mkdir(join(root, ".trash-step-0-deadbeef"));
    await writeFile(join(root, ".trash-step-0-deadbeef", MANIFEST_FILE), "{}");

    // Readers never see the leftovers.
    const reader = await store({ readOnly: true });
    assert.deepEqual((await reader.list()).map((c) => c.step), [1]);
    assert.equal((await reader.latest({ verified: true }))?.step, 1);

    // The next writer takes over the dead process's lock and removes them.
    const next = await store();
    assert.deepEqual((await readdir(root)).filter((n) => n.startsWith(".p") || n.startsWith(".t")), []);
    await commitStep(next, 2);
    assert.deepEqual((await next.list()).map((c) => c.step), [1, 2]);
  });

  it("rejects a second begin of a step being written or already committed", async () => {
    const s = await store();
    const [a, b] = await Promise.allSettled([s.begin(3), s.begin(3)]);
    assert.equal(a.status, "fulfilled");
    assert.equal(b.status, "rejected");
    assert.ok((b as PromiseRejectedResult).reason instanceof CheckpointConflictError);
    assert.match((b as PromiseRejectedResult).reason.message, /step 3: it is already being written/);
    const p = (a as PromiseFulfilledResult<Awaited<ReturnType<CheckpointStore["begin"]>>>).value;

    await p.abort();
    assert.equal(existsSync(p.dir), false);
    const again = await s.begin(3);
    await again.writeShard("w.bin", bytes(3, 10));
    await again.commit();
    await assert.rejects(s.begin(3), /step 3: it is already committed/);
    await assert.rejects(s.begin(-1), /non-negative integer/);
  });

  it("allows one writer per store directory", async () => {
    const s = await store();
    await assert.rejects(createCheckpointStore({ root, keepLast: 3 }), (err: unknown) => {
      assert.ok(err instanceof CheckpointStoreLockedError);
      assert.match(err.message, new RegExp(`pid ${process.pid}`));
      return true;
    });
    await s.close();
    await assert.rejects(s.begin(1), /closed/);
    await store(); // free again
  });

  it("adopts files another writer (the engine's save) put into the pending directory", async () => {
    const s = await store();
    const p = await s.begin(8);
    const engineOut = bytes(8, 12_345);
    await writeFile(join(p.dir, "model.safetensors"), engineOut);
    await writeFile(join(p.dir, "config.json"), '{"model_type":"qwen2_moe"}');
    assert.deepEqual(await p.adoptFile("model.safetensors"), { name: "model.safetensors", size: engineOut.length, sha256: sha(engineOut) });
    await p.adoptFile("config.json");
    await assert.rejects(p.adoptFile("tokenizer.json"), /no such file/);
    await assert.rejects(p.adoptFile("config.json"), /already written/);
    await writeFile(join(p.dir, "stray.tmp"), "x");
    await assert.rejects(p.commit(), /files not recorded as shards .*: stray.tmp/);
    await unlink(join(p.dir, "stray.tmp"));
    const info = await p.commit();
    assert.deepEqual(info.manifest.shards.map((x) => x.name), ["config.json", "model.safetensors"]);
    assert.ok((await (await s.restore(8)).readShard("model.safetensors")).equals(engineOut));
  });

  it("refuses misuse of a pending checkpoint with a clear error", async () => {
    const s = await store();
    const p = await s.begin(5);
    await assert.rejects(p.commit(), /no shards were written/);
    await assert.rejects(p.writeShard("../escape.bin", bytes(5, 1)), /invalid shard name/);
    await assert.rejects(p.writeShard(MANIFEST_FILE, bytes(5, 1)), /invalid shard name/);
    await assert.rejects(p.writeShard("x.bin", 42 as never), /must be a Uint8Array/);
    assert.equal(existsSync(join(p.dir, "x.bin")), false, "a failed write leaves no partial file");
    await p.writeShard("x.bin", bytes(5, 1));
    await assert.rejects(p.writeShard("x.bin", bytes(5, 1)), /already written/);
    const circular: Record<string, unknown> = {};
    circular.self = circular;
    await assert.rejects(p.commit(circular), /not JSON-serialisable/);
    await p.commit({ ok: true });
    await assert.rejects(p.writeShard("y.bin", bytes(5, 1)), CheckpointStateError);
    await assert.rejects(p.commit(), /is committed/);
  });
});
