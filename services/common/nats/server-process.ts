// Starts and stops a local nats-server with JetStream: used by `pilot up` (persistent store, detached, a state file
// so a later `pilot down` can find it) and by the test harness (temp store, owned by the test process).
//
// The port is chosen by the server itself (`-p -1`) and read back from its ports file, so two starts never race for
// the same "free" port the way probing for one and then binding it would.
import { spawn, type ChildProcess } from "node:child_process";
import { constants as fsConstants, openSync, closeSync } from "node:fs";
import { access, mkdir, readFile, readdir, rm, writeFile, rename } from "node:fs/promises";
import { connect as tcpConnect } from "node:net";
import { delimiter, join } from "node:path";

export const NATS_SERVER_STATE_FILE = "nats-server.json";

export class NatsServerNotInstalledError extends Error {
  constructor(searched: string) {
    super(
      `nats-server was not found (looked for ${searched}). Install it with "apt-get install nats-server" ` +
        `or set the binary path explicitly.`,
    );
    this.name = "NatsServerNotInstalledError";
  }
}

export class NatsServerStartError extends Error {
  constructor(message: string, readonly logTail: string) {
    super(logTail ? `${message}\n--- nats-server output ---\n${logTail}` : message);
    this.name = "NatsServerStartError";
  }
}

export interface NatsServerConfig {
  /** JetStream store directory; created if missing. Persistent for `pilot up`, a temp dir for tests. */
  storeDir: string;
  /** Where the ports file, the state file and (when detached) the log go; defaults to storeDir. */
  runDir: string | null;
  /** Loopback by default: the pilot's NATS is not meant to be reachable from other hosts. */
  host: string;
  /** 0 lets the server pick a free port. */
  port: number;
  /** Path of the nats-server binary; null searches PATH, then /usr/sbin and /usr/bin. */
  binary: string | null;
  /** Detached servers outlive this process (`pilot up`); their output goes to runDir/nats-server.log. */
  detached: boolean;
  startTimeoutMs: number;
}

export interface NatsServerState {
  pid: number;
  host: string;
  port: number;
  url: string;
  storeDir: string;
  startedAt: string;
}

export interface NatsServerProcess extends NatsServerState {
  /** SIGTERM, then SIGKILL after graceMs; resolves once the process is gone. */
  stop(graceMs?: number): Promise<void>;
}

const DEFAULTS: Omit<NatsServerConfig, "storeDir"> = {
  runDir: null,
  host: "127.0.0.1",
  port: 0,
  binary: null,
  detached: false,
  startTimeoutMs: 10_000,
};

/** Resolves the nats-server binary or throws NatsServerNotInstalledError. */
export async function findNatsServer(binary: string | null = null): Promise<string> {
  const candidates =
    binary !== null
      ? [binary]
      : [
          ...(process.env.PATH ?? "").split(delimiter).filter(Boolean).map((d) => join(d, "nats-server")),
          "/usr/sbin/nats-server",
          "/usr/bin/nats-server",
        ];
  for (const c of candidates) {
    try {
      await access(c, fsConstants.X_OK);
      return c;
    } catch {
      // try the next one
    }
  }
  throw new NatsServerNotInstalledError(binary ?? "nats-server on PATH, /usr/sbin, /usr/bin");
}

export async function startNatsServer(config: Partial<NatsServerConfig> & { storeDir: string }): Promise<NatsServerProcess> {
  const cfg: NatsServerConfig = { ...DEFAULTS, ...config };
  if (!Number.isInteger(cfg.port) || cfg.port < 0 || cfg.port > 65535) {
    throw new RangeError(`nats-server port must be an integer in 0..65535, got ${cfg.port}`);
  }
  const bin = await findNatsServer(cfg.binary);
  const runDir = cfg.runDir ?? cfg.storeDir;
  await mkdir(cfg.storeDir, { recursive: true });
  await mkdir(runDir, { recursive: true });
  const portsDir = join(runDir, "ports");
  // Stale ports files from an earlier run would be mistaken for this one's.
  await rm(portsDir, { recursive: true, force: true });
  await mkdir(portsDir, { recursive: true });

  const args = [
    "-js",
    "-sd", cfg.storeDir,
    "-a", cfg.host,
    "-p", cfg.port === 0 ? "-1" : String(cfg.port),
    "--ports_file_dir", portsDir,
  ];

  let child: ChildProcess;
  let output = "";
  if (cfg.detached) {
    const logFd = openSync(join(runDir, "nats-server.log"), "a");
    try {
      child = spawn(bin, args, { detached: true, stdio: ["ignore", logFd, logFd] });
    } finally {
      closeSync(logFd);
    }
  } else {
    child = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"] });
    // Keep only a tail: enough to explain a failed start, bounded for a long-lived server.
    const keep = (chunk: Buffer) => {
      output = (output + chunk.toString("utf8")).slice(-8192);
    };
    child.stdout!.on("data", keep);
    child.stderr!.on("data", keep);
  }
  const exited = new Promise<number | null>((resolve) => {
    child.once("exit", (code, signal) => resolve(code ?? (signal ? -1 : null)));
  });
  const spawnError = new Promise<Error>((resolve) => child.once("error", resolve));

  const logTail = async () =>
    cfg.detached ? (await readFile(join(runDir, "nats-server.log"), "utf8").catch(() => "")).slice(-4096) : output;
  const fail = async (message: string): Promise<never> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGKILL");
      await exited;
    }
    throw new NatsServerStartError(message, await logTail());
  };

  const deadline = Date.now() + cfg.startTimeoutMs;
  let port: number | null = null;
  // Set from the process callbacks; an object so the loop below rereads it.
  const startup: { failure: string | null } = { failure: null };
  void exited.then((code) => {
    startup.failure ??= `nats-server exited during start-up with code ${code}`;
  });
  void spawnError.then((err) => {
    startup.failure = `nats-server could not be started: ${err.message}`;
  });
  while (Date.now() < deadline) {
    if (startup.failure) return fail(startup.failure);
    port = await readPortsFile(portsDir, child.pid!, cfg.host);
    if (port !== null && (await acceptsJetStreamClients(cfg.host, port))) break;
    port = null;
    await sleep(25);
  }
  if (startup.failure) return fail(startup.failure);
  if (port === null) return fail(`nats-server did not accept connections within ${cfg.startTimeoutMs} ms`);

  const state: NatsServerState = {
    pid: child.pid!,
    host: cfg.host,
    port,
    url: `nats://${cfg.host}:${port}`,
    storeDir: cfg.storeDir,
    startedAt: new Date().toISOString(),
  };
  await writeStateFile(runDir, state);
  // An attached server dies with its owner even when the owner never gets to call stop() (a failed test run).
  const killOnExit = () => child.kill("SIGKILL");
  if (cfg.detached) child.unref();
  else process.once("exit", killOnExit);

  let stopping: Promise<void> | null = null;
  const stop = (graceMs = 5000) => {
    stopping ??= (async () => {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        const killTimer = setTimeout(() => child.kill("SIGKILL"), graceMs);
        await exited;
        clearTimeout(killTimer);
      }
      process.removeListener("exit", killOnExit);
      await rm(join(runDir, NATS_SERVER_STATE_FILE), { force: true });
    })();
    return stopping;
  };
  return { ...state, stop };
}

/** The state `pilot up` left behind, or null when there is none or its process is gone. */
export async function readNatsServerState(runDir: string): Promise<NatsServerState | null> {
  let text: string;
  try {
    text = await readFile(join(runDir, NATS_SERVER_STATE_FILE), "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw err;
  }
  const state = JSON.parse(text) as NatsServerState;
  return isAlive(state.pid) ? state : null;
}

/**
 * For `pilot up`: the server a previous `pilot up` left running (found through runDir's state file), or a new
 * detached one on the persistent storeDir. `started` says which.
 */
export async function ensureNatsServer(
  config: Partial<NatsServerConfig> & { storeDir: string; runDir: string },
): Promise<NatsServerState & { started: boolean }> {
  const running = await readNatsServerState(config.runDir);
  if (running !== null && (await acceptsJetStreamClients(running.host, running.port))) {
    return { ...running, started: false };
  }
  const { stop: _stop, ...state } = await startNatsServer({ ...config, detached: true });
  return { ...state, started: true };
}

/** Stops a server started detached by another process (`pilot down`); false when none was running. */
export async function stopNatsServerFromState(runDir: string, graceMs = 5000): Promise<boolean> {
  const state = await readNatsServerState(runDir);
  if (state === null) {
    await rm(join(runDir, NATS_SERVER_STATE_FILE), { force: true });
    return false;
  }
  process.kill(state.pid, "SIGTERM");
  const deadline = Date.now() + graceMs;
  while (isAlive(state.pid) && Date.now() < deadline) await sleep(50);
  if (isAlive(state.pid)) process.kill(state.pid, "SIGKILL");
  while (isAlive(state.pid)) await sleep(20);
  await rm(join(runDir, NATS_SERVER_STATE_FILE), { force: true });
  return true;
}

async function writeStateFile(runDir: string, state: NatsServerState): Promise<void> {
  const tmp = join(runDir, `.${NATS_SERVER_STATE_FILE}.tmp`);
  await writeFile(tmp, JSON.stringify(state, null, 2) + "\n");
  await rename(tmp, join(runDir, NATS_SERVER_STATE_FILE));
}

// The ports file is "<executable>_<pid>.ports" holding {"nats": ["nats://host:port"], ...} (2.9; some versions
// name the key "client").
async function readPortsFile(dir: string, pid: number, host: string): Promise<number | null> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return null;
  }
  const name = names.find((n) => n.endsWith(`_${pid}.ports`));
  if (!name) return null;
  try {
    const ports = JSON.parse(await readFile(join(dir, name), "utf8")) as { nats?: string[]; client?: string[] };
    const urls = ports.nats ?? ports.client ?? [];
    for (const u of urls) {
      const url = new URL(u);
      if (url.hostname === host || urls.length === 1) return Number(url.port);
    }
  } catch {
    // written but not complete yet: read again on the next poll
  }
  return null;
}

// A client-ready server greets with an INFO line; JetStream is enabled before the client listener opens, and the
// INFO line says so.
function acceptsJetStreamClients(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = tcpConnect({ host, port });
    let buf = "";
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.on("error", () => done(false));
    sock.on("data", (d) => {
      buf += d.toString("utf8");
      const nl = buf.indexOf("\r\n");
      if (nl < 0) return;
      const line = buf.slice(0, nl);
      if (!line.startsWith("INFO ")) return done(false);
      try {
        done((JSON.parse(line.slice(5)) as { jetstream?: boolean }).jetstream === true);
      } catch {
        done(false);
      }
    });
  });
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
