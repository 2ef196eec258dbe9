// Starts service processes one after another and stops them in reverse order.
//
// Each child is its own process group (so a stop also reaches whatever it spawned), writes stdout and stderr to a
// log file (so it can outlive `pilot up`), and counts as started once it has printed its JSON "listening" line and
// its gRPC health says SERVING. A child that exits during start-up fails the start with its exit status and the tail
// of its log; one that exits later, while the supervising process still runs, is reported through `onExit`.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { mkdir, readFile, stat } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { checkHealth } from '../../services/common/grpc-probes.ts';
import { isAlive, type ServiceState } from './state.ts';

export interface ServiceSpec {
  /** Unique in a stack: "reward", "rank-0", ... (also the log file's name). */
  name: string;
  /** Executable and arguments, e.g. [process.execPath, '--import', 'tsx', 'services/reward/main.ts', '--port', '0']. */
  command: string[];
  /** Added to the supervisor's environment. */
  env: Record<string, string>;
  host: string;
  /** The port the service is told to listen on (see freePort); checked against its listening line. */
  port: number;
  /** gRPC services that must report SERVING ("" is the server as a whole). */
  grpcServices: string[];
}

export interface SupervisorConfig {
  logDir: string;
  cwd: string;
  /** Per service: from spawn to SERVING. */
  startTimeoutMs: number;
  /** SIGTERM, then SIGKILL after this long. */
  stopGraceMs: number;
  /** Lines of log quoted when a child fails. */
  logTailLines: number;
}

export const SUPERVISOR_DEFAULTS: Omit<SupervisorConfig, 'logDir' | 'cwd'> = {
  startTimeoutMs: 60_000,
  stopGraceMs: 10_000,
  logTailLines: 30,
};

export interface ChildExit {
  name: string;
  pid: number;
  code: number | null;
  signal: NodeJS.Signals | null;
  logFile: string;
  logTail: string;
}

export interface SupervisorDeps {
  /** A child exited while not being stopped by the supervisor. */
  onExit?: (exit: ChildExit) => void;
  /** Progress lines ("reward listening on 127.0.0.1:41234"). */
  log?: (line: string) => void;
}

/** A service exited (or never became ready) during start-up. */
export class ServiceStartError extends Error {
  constructor(
    readonly service: string,
    message: string,
    readonly logFile: string,
    readonly logTail: string,
  ) {
    super(`${service}: ${message} (log: ${logFile})${logTail ? `\n--- last lines of ${service}'s log ---\n${logTail}` : ''}`);
    this.name = 'ServiceStartError';
  }
}

export function describeExit(e: Pick<ChildExit, 'code' | 'signal'>): string {
  return e.signal ? `was killed by ${e.signal}` : `exited with code ${e.code}`;
}

export interface Supervisor {
  /** Starts one service and waits until it is ready; throws ServiceStartError (the child is then stopped). */
  start(spec: ServiceSpec): Promise<ServiceState>;
  /** Services started and not stopped, in start order. */
  readonly running: readonly ServiceState[];
  /** Stops every running service, last started first. */
  stopAll(): Promise<void>;
  /** Lets the children outlive this process (`pilot up`); `onExit` is no longer called. */
  detach(): void;
}

interface Child {
  state: ServiceState;
  proc: ChildProcess;
  exited: Promise<void>;
  stopping: boolean;
}

export function createSupervisor(deps: SupervisorDeps, config: Partial<SupervisorConfig> & Pick<SupervisorConfig, 'logDir' | 'cwd'>): Supervisor {
  const cfg: SupervisorConfig = { ...SUPERVISOR_DEFAULTS, ...config };
  const children: Child[] = [];
  const log = deps.log ?? (() => {});
  let detached = false;
  // Children of a supervisor that dies without stopping them (a failed test) must not be left behind.
  const killOnExit = () => {
    if (detached) return;
    for (const c of children) killGroup(c.state.pid, 'SIGKILL');
  };
  process.on('exit', killOnExit);

  async function start(spec: ServiceSpec): Promise<ServiceState> {
    if (children.some((c) => c.state.name === spec.name)) throw new Error(`supervisor: a service named ${spec.name} is already running`);
    await mkdir(cfg.logDir, { recursive: true });
    const logFile = join(cfg.logDir, `${spec.name}.log`);
    const fd = openSync(logFile, 'a');
    // Earlier runs' lines stay in the log; only what this start writes counts.
    const startOffset = (await stat(logFile)).size;
    let proc: ChildProcess;
    try {
      proc = spawn(spec.command[0], spec.command.slice(1), {
        cwd: cfg.cwd,
        env: { ...process.env, ...spec.env },
        detached: true,
        stdio: ['ignore', fd, fd],
      });
    } finally {
      closeSync(fd);
    }
    const tail = () => readTail(logFile, startOffset, cfg.logTailLines);
    const spawnError = await new Promise<Error | null>((resolve) => {
      proc.once('error', resolve);
      proc.once('spawn', () => resolve(null));
    });
    if (spawnError) throw new ServiceStartError(spec.name, `could not be started: ${spawnError.message}`, logFile, '');
    const pid = proc.pid!;
    const state: ServiceState = {
      name: spec.name,
      pid,
      host: spec.host,
      port: spec.port,
      address: `${spec.host}:${spec.port}`,
      logFile,
      grpcServices: spec.grpcServices,
    };
    const exit: { value: { code: number | null; signal: NodeJS.Signals | null } | null } = { value: null };
    const child: Child = {
      state,
      proc,
      stopping: false,
      exited: new Promise<void>((resolve) =>
        proc.once('exit', (code, signal) => {
          exit.value = { code, signal };
          resolve();
        }),
      ),
    };
    children.push(child);
    let ready = false;
    void child.exited.then(async () => {
      const i = children.indexOf(child);
      if (i >= 0) children.splice(i, 1);
      if (child.stopping || detached || !ready) return;
      deps.onExit?.({ name: spec.name, pid, ...exit.value!, logFile, logTail: await tail() });
    });

    const deadline = Date.now() + cfg.startTimeoutMs;
    const fail = async (message: string): Promise<never> => {
      await stopChild(child);
      throw new ServiceStartError(spec.name, message, logFile, await tail());
    };
    // 1. The listening line.
    let listening: Record<string, unknown> | null = null;
    while (listening === null) {
      if (exit.value) return fail(`${describeExit(exit.value)} during start-up`);
      if (Date.now() > deadline) return fail(`printed no "listening" line within ${cfg.startTimeoutMs} ms`);
      listening = findListeningLine(await readFromOffset(logFile, startOffset));
      if (listening === null) await sleep(50);
    }
    if (typeof listening.port === 'number' && listening.port !== spec.port) {
      return fail(`listens on port ${listening.port}, not on the port ${spec.port} it was given`);
    }
    // 2. Health: every named service SERVING.
    for (const svc of spec.grpcServices) {
      let last = 'no answer';
      for (;;) {
        if (exit.value) return fail(`${describeExit(exit.value)} during start-up`);
        if (Date.now() > deadline) return fail(`health of ${svc || '(server)'} not SERVING within ${cfg.startTimeoutMs} ms (last: ${last})`);
        try {
          last = await checkHealth(state.address, svc, Math.max(100, Math.min(2000, deadline - Date.now())));
          if (last === 'SERVING') break;
        } catch (err) {
          last = (err as Error).message;
        }
        await sleep(50);
      }
    }
    ready = true;
    log(`${spec.name} (pid ${pid}) serving on ${state.address}`);
    return state;
  }

  async function stopChild(c: Child): Promise<void> {
    c.stopping = true;
    if (c.proc.exitCode !== null || c.proc.signalCode !== null) return;
    killGroup(c.state.pid, 'SIGTERM');
    const timer = setTimeout(() => killGroup(c.state.pid, 'SIGKILL'), cfg.stopGraceMs);
    await c.exited;
    clearTimeout(timer);
    // The group may hold processes the service spawned itself; none may outlive it.
    killGroup(c.state.pid, 'SIGKILL');
  }

  return {
    start,
    get running() {
      return children.map((c) => c.state);
    },
    async stopAll() {
      for (const c of [...children].reverse()) {
        await stopChild(c);
        log(`${c.state.name} stopped`);
      }
    },
    detach() {
      detached = true;
      process.removeListener('exit', killOnExit);
      for (const c of children) c.proc.unref();
    },
  };
}

/**
 * Stops a service another process started (from the state file): SIGTERM to its process group, SIGKILL after
 * graceMs. Returns false when it was no longer running.
 */
export async function stopServiceByPid(pid: number, graceMs: number): Promise<boolean> {
  if (!isAlive(pid)) return false;
  killGroup(pid, 'SIGTERM');
  const deadline = Date.now() + graceMs;
  while (isAlive(pid) && Date.now() < deadline) await sleep(50);
  killGroup(pid, 'SIGKILL');
  while (isAlive(pid)) await sleep(20);
  return true;
}

/** Kills a service's process group at once with SIGKILL (a crash, for recovery drills); false when already gone. */
export async function killServiceByPid(pid: number): Promise<boolean> {
  if (!isAlive(pid)) return false;
  killGroup(pid, 'SIGKILL');
  while (isAlive(pid)) await sleep(20);
  return true;
}

function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // already gone
  }
}

/** The ports below the kernel's ephemeral range that freePort picks from. */
export const STACK_PORT_FLOOR = 10000;
const EPHEMERAL_RANGE_FILE = '/proc/sys/net/ipv4/ip_local_port_range';

/**
 * A TCP port nothing listens on now, handed to a service before it starts; `taken`: ports this caller has already
 * handed out, never returned again. Where the kernel says which ports it gives outgoing connections (Linux), the
 * port comes from below that range: a service binds its port only after the services started beside it have opened
 * connections of their own (NATS, the rendezvous, Gloo, gRPC), and each of those takes a port from that range,
 * which could be the one handed out (seen in CI: a rank could not bind its port). Elsewhere the OS picks it.
 */
export async function freePort(host = '127.0.0.1', taken: ReadonlySet<number> = new Set()): Promise<number> {
  const top = await ephemeralStart();
  for (let i = 0; top !== null && top - STACK_PORT_FLOOR >= 1000 && i < 100; i++) {
    const port = STACK_PORT_FLOOR + Math.floor(Math.random() * (top - STACK_PORT_FLOOR));
    if (!taken.has(port) && (await listenOnce(host, port)) !== null) return port;
  }
  for (let i = 0; i < 100; i++) {
    const port = await listenOnce(host, 0);  // the OS picks; it may pick a port handed out but not yet bound
    if (port !== null && !taken.has(port)) return port;
  }
  throw new Error(`no free TCP port on ${host}`);
}

/** The first port of the kernel's ephemeral range, or null where it is not known. */
export async function ephemeralStart(): Promise<number | null> {
  const text = await readFile(EPHEMERAL_RANGE_FILE, 'utf8').catch(() => '');
  const first = Number.parseInt(text.trim().split(/\s+/)[0] ?? '', 10);
  return Number.isInteger(first) && first > 0 ? first : null;
}

/** Listens on host:port (0: a port the OS picks) and closes again: the port, or null if it could not listen. */
function listenOnce(host: string, port: number): Promise<number | null> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once('error', () => resolve(null));
    srv.listen(port, host, () => {
      const addr = srv.address();
      const bound = typeof addr === 'object' && addr ? addr.port : null;
      srv.close(() => resolve(bound));
    });
  });
}

/** The first line of the text that is a JSON object with event "listening". */
export function findListeningLine(text: string): Record<string, unknown> | null {
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (!t.startsWith('{')) continue;
    try {
      const obj = JSON.parse(t) as Record<string, unknown>;
      if (obj && obj.event === 'listening') return obj;
    } catch {
      // not JSON: ordinary log output
    }
  }
  return null;
}

async function readFromOffset(file: string, offset: number): Promise<string> {
  const buf = await readFile(file).catch(() => Buffer.alloc(0));
  return buf.subarray(offset).toString('utf8');
}

async function readTail(file: string, offset: number, lines: number): Promise<string> {
  const text = await readFromOffset(file, offset);
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
