// A real nats-server with JetStream for integration tests: loopback, a port the server picks, a temp store that is
// removed on stop. Tests call `const nats = await startTestNatsServer(); after(() => nats.stop());`.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startNatsServer } from "../../services/common/nats/server-process.ts";

export { NatsServerNotInstalledError } from "../../services/common/nats/server-process.ts";

export interface TestNatsServer {
  url: string;
  port: number;
  storeDir: string;
  /** Kills the server (SIGTERM, then SIGKILL) and removes its store. Safe to call twice. */
  stop(): Promise<void>;
}

export async function startTestNatsServer(opts: { binary?: string } = {}): Promise<TestNatsServer> {
  const dir = await mkdtemp(join(tmpdir(), "moe-pilot-nats-"));
  try {
    const server = await startNatsServer({
      storeDir: join(dir, "store"),
      runDir: dir,
      binary: opts.binary ?? null,
      startTimeoutMs: 15_000,
    });
    let stopped: Promise<void> | null = null;
    return {
      url: server.url,
      port: server.port,
      storeDir: server.storeDir,
      stop: () =>
        (stopped ??= (async () => {
          await server.stop(2000);
          await rm(dir, { recursive: true, force: true });
        })()),
    };
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}
