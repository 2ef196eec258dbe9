// Hashing shard files on worker threads: the same digests as hashing in-thread, several files at once, errors that
// name the file, a closed pool that refuses work; and the store verifying a checkpoint through a pool.
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { CheckpointCorruptError } from "./errors.ts";
import { sha256File } from "../common/sha256-file.ts";
import { createHashPool } from "../common/hash-pool.ts";
import { createCheckpointStore } from "./store.ts";

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "hash-pool-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

function pattern(n: number, salt: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 131 + salt * 17 + (i >> 11)) & 0xff;
  return b;
}

describe("hash pool", () => {
  it("gives the in-thread digests for many files at once, more files than threads", async () => {
    const sizes = [0, 1, 4096, (1 << 20) + 7, 3 * (1 << 20) + 123, 65536, 9];
    const paths = await Promise.all(sizes.map(async (n, i) => {
      const p = join(dir, `f${i}.bin`);
      await writeFile(p, pattern(n, i));
      return p;
    }));
    const pool = createHashPool(3);
    try {
      const got = await Promise.all(paths.map((p) => pool.hashFile(p)));
      const want = await Promise.all(paths.map((p) => sha256File(p)));
      assert.deepEqual(got, want);
      assert.equal(want[0], "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"); // sha256 of nothing
      assert.equal(new Set(got).size, got.length);
    } finally {
      await pool.close();
    }
  });

  it("rejects a missing file by name and keeps working; a closed pool refuses work", async () => {
    const pool = createHashPool(2);
    const ok = join(dir, "ok.bin");
    await writeFile(ok, pattern(1000, 3));
    await assert.rejects(pool.hashFile(join(dir, "nope.bin")), /sha256 of .*nope\.bin: .*ENOENT/);
    assert.equal(await pool.hashFile(ok), await sha256File(ok));
    await pool.close();
    await assert.rejects(pool.hashFile(ok), /hash pool is closed/);
    assert.throws(() => createHashPool(0), /positive integer/);
  });

  it("lets the store verify a checkpoint: every shard hashed, the first bad one in manifest order reported", async () => {
    const pool = createHashPool(4);
    const root = join(dir, "store");
    const s = await createCheckpointStore({ root, keepLast: 3, runId: null, hashFile: (p) => pool.hashFile(p) });
    try {
      const p = await s.begin(1);
      const shards = Array.from({ length: 6 }, (_, i) => ({ name: `shard-${i}.bin`, data: pattern(50_000 + i, i) }));
      for (const sh of shards) await p.writeShard(sh.name, sh.data);
      await p.commit();
      assert.equal((await s.verify(1)).manifest.shards.length, 6);
      // Corrupt shards 4 and 2 (same sizes): the error names shard 2, the first in the manifest.
      for (const i of [4, 2]) {
        const bad = Buffer.from(shards[i].data);
        bad[10] ^= 1;
        await writeFile(join(root, "step-1", shards[i].name), bad);
      }
      await assert.rejects(s.verify(1), (err: unknown) => {
        assert.ok(err instanceof CheckpointCorruptError);
        assert.equal(err.file, "shard-2.bin");
        return true;
      });
    } finally {
      await s.close();
      await pool.close();
    }
  });
});
