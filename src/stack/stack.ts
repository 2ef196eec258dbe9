// The local moe-pilot stack: nats-server, then the reward and checkpoint services, N rank services (on the CPU, or
// one GPU each) and the coordinator (which hosts the RunService and the ranks' rendezvous), each its own process.
// `startStack` brings it up and writes the state file; `stopStack` (another process, `pilot down`) takes it down in
// reverse order. Services run from source with tsx, or, where this module is itself bundled beside the services'
// bundles (scripts/device/bundle-cli.mjs: a machine without node_modules, like the GPU machine), from those.
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureNatsServer, stopNatsServerFromState } from '../../services/common/nats/server-process.ts';
import { createSupervisor, freePort, killServiceByPid, stopServiceByPid, type ChildExit, type ServiceSpec, type Supervisor } from './supervisor.ts';
import { isAlive, readStackState, removeStackState, writeStackState, type ServiceState, type StackState } from './state.ts';
import { isExpertGradDtype, type ExpertGradDtype } from '../engine/engine.ts';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');

export interface StackConfig {
  stateDir: string;
  /** Rank services (expert parallel, one process each). */
  ranks: number;
  /** Where the ranks' policies train: 'cpu', or 'cuda' (rank r on GPU r, the group over NCCL). */
  device: 'cpu' | 'cuda';
  /** With device 'cuda': the routed experts' gradients in 'bfloat16' or 'float32' (the ranks' --expert-grads). */
  expertGradDtype: ExpertGradDtype;
  /** KV cache blocks per rank (16 tokens each); null: the rank's default. */
  kvBlocks: number | null;
  /**
   * Committed checkpoints the checkpoint service keeps per run. Each holds fp32 parameters and AdamW moments: about
   * 172 GB for Qwen1.5-MoE-A2.7B, so one node's disk may hold only one.
   */
  checkpointKeep: number;
  host: string;
  /** Per service, from spawn to SERVING. */
  startTimeoutMs: number;
  stopGraceMs: number;
  /** Engine threads per rank process (OMP_NUM_THREADS). */
  threadsPerRank: number;
  /** Reward scoring worker threads. */
  rewardWorkers: number;
  /** Which services to start (all by default; tests start a part). */
  parts: readonly StackPart[];
}

export type StackPart = 'reward' | 'checkpoint' | 'ranks' | 'coordinator';
export const STACK_PARTS: readonly StackPart[] = ['reward', 'checkpoint', 'ranks', 'coordinator'];

export const STACK_DEFAULTS: Omit<StackConfig, 'stateDir'> = {
  ranks: 2,
  device: 'cpu',
  expertGradDtype: 'float32',
  kvBlocks: null,
  checkpointKeep: 3,
  host: '127.0.0.1',
  startTimeoutMs: 90_000,
  stopGraceMs: 10_000,
  threadsPerRank: 1,
  rewardWorkers: 1,
  parts: STACK_PARTS,
};

export interface StackDeps {
  log?: (line: string) => void;
  /** A service died after start-up (only while this process supervises it, i.e. not after detach). */
  onExit?: (exit: ChildExit) => void;
}

export interface Stack {
  readonly state: StackState;
  /** RunService address (the coordinator). */
  readonly runAddress: string;
  readonly checkpointAddress: string;
  readonly supervisor: Supervisor;
  /** Stops every service and the nats-server this stack started; removes the state file. */
  stop(): Promise<void>;
  /** Leaves the stack running after this process exits (`pilot up`). */
  detach(): void;
  /**
   * Kills one service with SIGKILL (a crash: no shutdown path runs) and starts it again with the same command and
   * port, waiting until it serves; the state file follows. Recovery drills: a coordinator killed mid-run resumes
   * the run from its last checkpoint.
   */
  crashAndRestart(name: string): Promise<ServiceState>;
}

/** Paths of a state dir's parts, in one place. */
export function stackPaths(stateDir: string) {
  return {
    logDir: join(stateDir, 'logs'),
    natsDir: join(stateDir, 'nats'),
    natsStore: join(stateDir, 'nats', 'store'),
    checkpointDir: join(stateDir, 'checkpoints'),
    runsDir: join(stateDir, 'runs'),
    spanFile: join(stateDir, 'traces', 'spans.jsonl'),
  };
}

export class StackAlreadyRunningError extends Error {
  constructor(stateDir: string, alive: string[]) {
    super(`a stack is already running from ${stateDir} (${alive.join(', ')}); run "pilot down" first`);
    this.name = 'StackAlreadyRunningError';
  }
}

const require = createRequire(import.meta.url);

type ServiceName = 'reward' | 'checkpoint' | 'rank' | 'coordinator';

// A bundled stack has <service>-main.mjs beside this module's bundle; from source, services/<service>/main.ts.
const bundleDir = dirname(fileURLToPath(import.meta.url));
const bundled = existsSync(join(bundleDir, 'rank-main.mjs'));

function serviceCommand(service: ServiceName, args: string[]): string[] {
  if (bundled) return [process.execPath, join(bundleDir, `${service}-main.mjs`), ...args];
  return [process.execPath, '--import', require.resolve('tsx'), join(REPO_ROOT, 'services', service, 'main.ts'), ...args];
}

export async function startStack(deps: StackDeps, config: Partial<StackConfig> & Pick<StackConfig, 'stateDir'>): Promise<Stack> {
  const cfg: StackConfig = { ...STACK_DEFAULTS, ...config };
  if (!Number.isInteger(cfg.ranks) || cfg.ranks < 1) throw new RangeError(`ranks must be an integer >= 1, got ${cfg.ranks}`);
  if (cfg.device !== 'cpu' && cfg.device !== 'cuda') throw new RangeError(`device must be 'cpu' or 'cuda', got '${String(cfg.device)}'`);
  if (!isExpertGradDtype(cfg.expertGradDtype))
    throw new RangeError(`expertGradDtype must be 'float32' or 'bfloat16', got '${String(cfg.expertGradDtype)}'`);
  if (cfg.expertGradDtype === 'bfloat16' && cfg.device !== 'cuda')
    throw new RangeError("expertGradDtype 'bfloat16' needs device 'cuda' (the CPU engine keeps fp32 gradients)");
  if (cfg.kvBlocks !== null && (!Number.isInteger(cfg.kvBlocks) || cfg.kvBlocks < 1)) throw new RangeError(`kvBlocks must be an integer >= 1, got ${cfg.kvBlocks}`);
  if (!Number.isInteger(cfg.checkpointKeep) || cfg.checkpointKeep < 1) throw new RangeError(`checkpointKeep must be an integer >= 1, got ${cfg.checkpointKeep}`);
  const log = deps.log ?? (() => {});
  const paths = stackPaths(cfg.stateDir);
  const previous = await readStackState(cfg.stateDir);
  if (previous) {
    const alive = previous.services.filter((s) => isAlive(s.pid)).map((s) => `${s.name} pid ${s.pid}`);
    if (alive.length) throw new StackAlreadyRunningError(cfg.stateDir, alive);
  }
  for (const d of [paths.logDir, paths.natsDir, paths.checkpointDir, paths.runsDir, dirname(paths.spanFile)]) await mkdir(d, { recursive: true });

  const nats = await ensureNatsServer({ storeDir: paths.natsStore, runDir: paths.natsDir, host: cfg.host });
  log(`nats-server (pid ${nats.pid}) ${nats.started ? 'started' : 'already running'} at ${nats.url}`);

  const supervisor = createSupervisor(
    { log, onExit: deps.onExit },
    { logDir: paths.logDir, cwd: REPO_ROOT, startTimeoutMs: cfg.startTimeoutMs, stopGraceMs: cfg.stopGraceMs },
  );
  const state: StackState = {
    version: 1,
    startedAt: new Date().toISOString(),
    stateDir: cfg.stateDir,
    natsUrl: nats.url,
    natsStarted: nats.started,
    spanFile: paths.spanFile,
    services: [],
  };
  // Once: a signal handler and a failing caller may both ask.
  let stopping: Promise<void> | null = null;
  const stop = () =>
    (stopping ??= (async () => {
      await supervisor.stopAll();
      if (state.natsStarted) await stopNatsServerFromState(paths.natsDir, cfg.stopGraceMs);
      await removeStackState(cfg.stateDir);
    })());

  let chosen: ServiceSpec[] = [];
  try {
    // Every port is chosen before anything starts: the ranks need the coordinator's rendezvous address and the
    // coordinator needs the ranks', so neither can wait to learn the other's.
    const taken = new Set<number>();
    const port = async () => {
      const p = await freePort(cfg.host, taken);
      taken.add(p);
      return p;
    };
    const ports = { reward: await port(), checkpoint: await port(), coordinator: await port(), ranks: [] as number[] };
    for (let r = 0; r < cfg.ranks; r++) ports.ranks.push(await port());
    const addr = (p: number) => `${cfg.host}:${p}`;
    const common = (service: string): Record<string, string> => ({
      OTEL_SERVICE_NAME: service,
      PILOT_SPAN_FILE: paths.spanFile,
      NATS_URL: nats.url,
    });
    const specs: ServiceSpec[] = [
      {
        name: 'reward',
        command: serviceCommand('reward', ['--host', cfg.host, '--port', String(ports.reward), '--workers', String(cfg.rewardWorkers)]),
        env: common('reward'),
        host: cfg.host,
        port: ports.reward,
        grpcServices: ['pilot.v1.RewardService'],
      },
      {
        name: 'checkpoint',
        command: serviceCommand('checkpoint', ['--host', cfg.host, '--port', String(ports.checkpoint), '--root', paths.checkpointDir,
          '--keep', String(cfg.checkpointKeep)]),
        env: common('checkpoint'),
        host: cfg.host,
        port: ports.checkpoint,
        grpcServices: ['pilot.v1.CheckpointService'],
      },
      ...ports.ranks.map(
        (p, r): ServiceSpec => ({
          name: `rank-${r}`,
          command: serviceCommand('rank', [
            '--host', cfg.host,
            '--port', String(p),
            '--rank', String(r),
            '--world-size', String(cfg.ranks),
            '--rendezvous', addr(ports.coordinator),
            '--device', cfg.device === 'cuda' ? `cuda:${r}` : 'cpu',
            ...(cfg.expertGradDtype !== 'float32' ? ['--expert-grads', cfg.expertGradDtype] : []),
            ...(cfg.kvBlocks !== null ? ['--kv-blocks', String(cfg.kvBlocks)] : []),
          ]),
          env: { ...common(`rank-${r}`), OMP_NUM_THREADS: String(cfg.threadsPerRank), UV_THREADPOOL_SIZE: '8' },
          host: cfg.host,
          port: p,
          grpcServices: ['pilot.v1.TrainerService', 'pilot.v1.RolloutService'],
        }),
      ),
      {
        name: 'coordinator',
        command: serviceCommand('coordinator', [
          '--host', cfg.host,
          '--port', String(ports.coordinator),
          '--nats', nats.url,
          '--reward', addr(ports.reward),
          '--checkpoint', addr(ports.checkpoint),
          '--ranks', ports.ranks.map(addr).join(','),
        ]),
        env: common('coordinator'),
        host: cfg.host,
        port: ports.coordinator,
        // The rendezvous service is served by the same server but has no health entry of its own.
        grpcServices: ['pilot.v1.RunService'],
      },
    ];
    const partOf = (name: string): StackPart => (name.startsWith('rank-') ? 'ranks' : (name as StackPart));
    chosen = specs.filter((sp) => cfg.parts.includes(partOf(sp.name)));
    // Everything the coordinator dials starts at once (they need nothing of each other); the coordinator last.
    // State is written after each start so a failed `up` still leaves what to stop.
    let writes = Promise.resolve();
    const record = (s: ServiceState) => {
      state.services.push(s);
      // One write at a time: concurrent starts finish together and share the temp file name.
      writes = writes.then(() => writeStackState(cfg.stateDir, state));
      return writes;
    };
    const results = await Promise.allSettled(chosen.filter((sp) => sp.name !== 'coordinator').map(async (sp) => record(await supervisor.start(sp))));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    const coordinatorSpec = chosen.find((sp) => sp.name === 'coordinator');
    if (coordinatorSpec) await record(await supervisor.start(coordinatorSpec));
    // Start order in the file = the order they were asked for, so `down` stops the coordinator first.
    state.services.sort((a, b) => chosen.findIndex((sp) => sp.name === a.name) - chosen.findIndex((sp) => sp.name === b.name));
    await writes;
    await writeStackState(cfg.stateDir, state);
  } catch (err) {
    await stop().catch(() => {});
    throw err;
  }
  const find = (name: string) => state.services.find((s) => s.name === name)?.address ?? '';
  return {
    state,
    runAddress: find('coordinator'),
    checkpointAddress: find('checkpoint'),
    supervisor,
    stop,
    detach: () => supervisor.detach(),
    async crashAndRestart(name: string): Promise<ServiceState> {
      const spec = chosen.find((sp) => sp.name === name);
      const i = state.services.findIndex((x) => x.name === name);
      if (!spec || i < 0) throw new Error(`crashAndRestart: this stack has no service ${name}`);
      await killServiceByPid(state.services[i].pid);
      // The supervisor forgets the child once its exit is seen; until then a start of the same name is refused.
      while (supervisor.running.some((x) => x.name === name)) await new Promise((r) => setTimeout(r, 20));
      state.services[i] = await supervisor.start(spec);
      await writeStackState(cfg.stateDir, state);
      return state.services[i];
    },
  };
}

export interface StopReport {
  stopped: string[];
  /** Services whose process was already gone (crashed or killed) when `pilot down` came. */
  alreadyGone: string[];
  natsStopped: boolean;
}

/** `pilot down`: stops what the state file lists, coordinator first, then the nats-server; null if no state file. */
export async function stopStack(stateDir: string, graceMs = STACK_DEFAULTS.stopGraceMs): Promise<StopReport | null> {
  const state = await readStackState(stateDir);
  if (state === null) return null;
  const report: StopReport = { stopped: [], alreadyGone: [], natsStopped: false };
  for (const s of [...state.services].reverse()) {
    if (await stopServiceByPid(s.pid, graceMs)) report.stopped.push(s.name);
    else report.alreadyGone.push(s.name);
  }
  if (state.natsStarted) report.natsStopped = await stopNatsServerFromState(stackPaths(stateDir).natsDir, graceMs);
  await removeStackState(stateDir);
  return report;
}

/** Each listed service with whether its process is alive (for `pilot up` on a running stack, and reports). */
export async function stackStatus(stateDir: string): Promise<{ state: StackState; alive: Record<string, boolean> } | null> {
  const state = await readStackState(stateDir);
  if (!state) return null;
  return { state, alive: Object.fromEntries(state.services.map((s) => [s.name, isAlive(s.pid)])) };
}
