// Where a local stack keeps its files, and the state file `pilot up` writes so that a later `pilot down` (another
// process) can find and stop what it started.
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';

export const STACK_STATE_FILE = 'stack.json';

/** PILOT_HOME when set, else `.pilot/` in the working directory. */
export function resolveStateDir(cwd: string, env: Readonly<Record<string, string | undefined>>): string {
  const home = env.PILOT_HOME;
  return home ? resolve(cwd, home) : resolve(cwd, '.pilot');
}

export interface ServiceState {
  name: string;
  pid: number;
  host: string;
  port: number;
  /** "host:port" clients dial. */
  address: string;
  logFile: string;
  /** gRPC service names whose health was SERVING at start. */
  grpcServices: string[];
}

export interface StackState {
  version: 1;
  startedAt: string;
  stateDir: string;
  natsUrl: string;
  /** Whether `pilot up` started the nats-server (then `pilot down` stops it). */
  natsStarted: boolean;
  spanFile: string;
  /** In start order; stopped in reverse. */
  services: ServiceState[];
}

export async function writeStackState(stateDir: string, state: StackState): Promise<void> {
  await mkdir(stateDir, { recursive: true });
  const tmp = join(stateDir, `.${STACK_STATE_FILE}.tmp`);
  await writeFile(tmp, JSON.stringify(state, null, 2) + '\n');
  await rename(tmp, join(stateDir, STACK_STATE_FILE));
}

/** The state file, or null when no stack was brought up from this directory. */
export async function readStackState(stateDir: string): Promise<StackState | null> {
  let text: string;
  try {
    text = await readFile(join(stateDir, STACK_STATE_FILE), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  const state = JSON.parse(text) as StackState;
  if (state.version !== 1 || !Array.isArray(state.services)) {
    throw new Error(`${join(stateDir, STACK_STATE_FILE)} is not a moe-pilot stack state file (version ${String(state.version)})`);
  }
  return state;
}

export async function removeStackState(stateDir: string): Promise<void> {
  await rm(join(stateDir, STACK_STATE_FILE), { force: true });
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
