// Starting and stopping a real nats-server, attached (tests) and detached (`pilot up` / `pilot down`).
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { connect } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { startTestNatsServer } from "../../../test/harness/nats-server.ts";
import {
  NATS_SERVER_STATE_FILE,
  NatsServerNotInstalledError,
  ensureNatsServer,
  readNatsServerState,
  startNatsServer,
  stopNatsServerFromState,
} from "./server-process.ts";

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe("nats-server process", () => {
  it("the test harness starts a JetStream server on a free loopback port and removes everything on stop", async () => {
    const a = await startTestNatsServer();
    const b = await startTestNatsServer();
    try {
      assert.match(a.url, /^nats:\/\/127\.0\.0\.1:\d+$/);
      assert.notEqual(a.port, b.port);
      const nc = await connect({ servers: a.url });
      const jsm = await jetstreamManager(nc);
      const info = await jsm.getAccountInfo();
      assert.equal(typeof info.limits, "object");
      await nc.close();
    } finally {
      await a.stop();
      await b.stop();
    }
    assert.equal(existsSync(a.storeDir), false);
    await a.stop(); // idempotent
  });

  it("explains how to install nats-server when the binary is missing", async () => {
    const dir = await mkdtemp(join(tmpdir(), "moe-pilot-nats-missing-"));
    try {
      await assert.rejects(
        startNatsServer({ storeDir: dir, binary: join(dir, "no-such-nats-server") }),
        (err: Error) => err instanceof NatsServerNotInstalledError && /apt-get install nats-server/.test(err.message),
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("a detached server keeps its store across restarts and is found and stopped through its state file", async () => {
    const dir = await mkdtemp(join(tmpdir(), "moe-pilot-nats-up-"));
    const storeDir = join(dir, "store");
    try {
      const s1 = await startNatsServer({ storeDir, runDir: dir, detached: true });
      const state = await readNatsServerState(dir);
      assert.deepEqual({ pid: state?.pid, url: state?.url }, { pid: s1.pid, url: s1.url });
      let nc = await connect({ servers: s1.url });
      await (await jetstreamManager(nc)).streams.add({ name: "KEEP", subjects: ["keep.>"] });
      await nc.close();

      assert.equal(await stopNatsServerFromState(dir), true);
      assert.equal(alive(s1.pid), false);
      assert.equal(existsSync(join(dir, NATS_SERVER_STATE_FILE)), false);
      assert.equal(await readNatsServerState(dir), null);
      assert.equal(await stopNatsServerFromState(dir), false);

      // Same store: the stream is still there. ensureNatsServer starts it once and then finds it running.
      const s2 = await ensureNatsServer({ storeDir, runDir: dir });
      assert.equal(s2.started, true);
      const again = await ensureNatsServer({ storeDir, runDir: dir });
      assert.deepEqual([again.started, again.pid, again.url], [false, s2.pid, s2.url]);
      try {
        nc = await connect({ servers: s2.url });
        const info = await (await jetstreamManager(nc)).streams.info("KEEP");
        assert.deepEqual(info.config.subjects, ["keep.>"]);
        await nc.close();
      } finally {
        assert.equal(await stopNatsServerFromState(dir), true);
      }
      assert.equal(alive(s2.pid), false);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("reports a server that fails to start with its own output", async () => {
    const dir = await mkdtemp(join(tmpdir(), "moe-pilot-nats-busy-"));
    const first = await startTestNatsServer();
    try {
      // The port is taken: the second server exits, and the error says why.
      await assert.rejects(startNatsServer({ storeDir: dir, port: first.port }), /exited during start-up[\s\S]*address already in use/);
    } finally {
      await first.stop();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
