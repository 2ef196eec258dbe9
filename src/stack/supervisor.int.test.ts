// The supervisor and the stack with real processes: `pilot up` / `pilot down` leave nothing behind, a service that
// dies during start-up or afterwards is reported by name with its exit status and log.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

import { checkHealth } from '../../services/common/grpc-probes.ts';
import { readNatsServerState } from '../../services/common/nats/server-process.ts';
import { REPO_ROOT, startStack, stackPaths } from './stack.ts';
import { isAlive, readStackState, type StackState } from './state.ts';
import { createSupervisor, freePort, ServiceStartError, type ChildExit, type ServiceSpec } from './supervisor.ts';

const pilot = join(REPO_ROOT, 'bin/pilot.js');
const tsx = createRequire(import.meta.url).resolve('tsx');
let dir = '';
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'pilot-stack-'));
});
after(() => rm(dir, { recursive: true, force: true }));

function runPilot(args: string[], home: string) {
  return promisify(execFile)(process.execPath, [pilot, ...args], { cwd: dir, env: { ...process.env, PILOT_HOME: home } });
}

async function waitGone(pids: number[], ms = 5000): Promise<number[]> {
  const end = Date.now() + ms;
  while (Date.now() < end && pids.some(isAlive)) await new Promise((r) => setTimeout(r, 50));
  return pids.filter(isAlive);
}

test('pilot up starts every service (health SERVING), pilot down stops them all and the nats-server', async () => {
  const home = join(dir, 'up-down');
  const up = await runPilot(['up', '--ranks', '2', '--json'], home);
  const state = JSON.parse(up.stdout) as StackState;
  assert.deepEqual(state.services.map((s) => s.name), ['reward', 'checkpoint', 'rank-0', 'rank-1', 'coordinator']);
  const nats = await readNatsServerState(stackPaths(home).natsDir);
  assert.ok(nats && isAlive(nats.pid), 'nats-server runs');
  // `pilot up` has exited; the services outlive it.
  for (const s of state.services) {
    assert.ok(isAlive(s.pid), `${s.name} is alive after pilot up exited`);
    for (const svc of s.grpcServices) assert.equal(await checkHealth(s.address, svc, 5000), 'SERVING', `${s.name} ${svc}`);
  }
  assert.deepEqual(await readStackState(home), state);
  // A second `up` on a running stack is refused, naming what runs.
  await assert.rejects(runPilot(['up'], home), (err: { stderr: string }) => {
    assert.match(err.stderr, /StackAlreadyRunningError: a stack is already running from .*coordinator pid \d+.*run "pilot down" first/);
    return true;
  });

  const down = await runPilot(['down'], home);
  assert.match(down.stdout, /stopped: coordinator, rank-1, rank-0, checkpoint, reward, nats-server/);
  assert.deepEqual(await waitGone([...state.services.map((s) => s.pid), nats!.pid], 1000), [], 'no process left');
  assert.equal(await readStackState(home), null, 'state file removed');
  assert.match((await runPilot(['down'], home)).stdout, /no stack to stop/);
});

test('pilot down reports a service that died before it', async () => {
  const home = join(dir, 'died');
  const stack = await startStack({}, { stateDir: home, parts: ['reward', 'checkpoint'] });
  stack.detach();
  const reward = stack.state.services.find((s) => s.name === 'reward')!;
  process.kill(reward.pid, 'SIGKILL');
  assert.deepEqual(await waitGone([reward.pid]), []);
  await assert.rejects(runPilot(['down'], home), (err: { stdout: string; code: number }) => {
    assert.equal(err.code, 1);
    assert.match(err.stdout, /stopped: checkpoint, nats-server/);
    assert.match(err.stdout, /already gone before "pilot down" .*: reward/);
    return true;
  });
  assert.deepEqual(await waitGone(stack.state.services.map((s) => s.pid)), []);
});

function rewardSpec(port: number, extra: string[] = []): ServiceSpec {
  return {
    name: 'reward',
    command: [process.execPath, '--import', tsx, join(REPO_ROOT, 'services/reward/main.ts'), '--host', '127.0.0.1', '--port', String(port), '--workers', '0', ...extra],
    env: {},
    host: '127.0.0.1',
    port,
    grpcServices: ['pilot.v1.RewardService'],
  };
}

test('a service that exits during start-up fails the start with its exit code and log tail', async () => {
  const sup = createSupervisor({}, { logDir: join(dir, 'crash-start'), cwd: REPO_ROOT });
  const err = await sup.start(rewardSpec(await freePort(), ['--max-items', 'lots'])).then(
    () => assert.fail('the start should fail'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof ServiceStartError);
  assert.equal(err.service, 'reward');
  assert.match(err.message, /^reward: exited with code 1 during start-up \(log: .*reward\.log\)/);
  assert.match(err.logTail, /--max-items.*expected an integer >= 1, got "lots"/);
  assert.equal(sup.running.length, 0);
});

test('a service that dies after start-up is reported through onExit; stopAll leaves no process', async () => {
  const exits: ChildExit[] = [];
  const sup = createSupervisor({ onExit: (e) => exits.push(e) }, { logDir: join(dir, 'crash-later'), cwd: REPO_ROOT });
  const a = await sup.start(rewardSpec(await freePort()));
  const b = await sup.start({ ...rewardSpec(await freePort()), name: 'reward-2' });
  assert.deepEqual(sup.running.map((s) => s.name), ['reward', 'reward-2']);
  process.kill(a.pid, 'SIGKILL');
  const end = Date.now() + 5000;
  while (exits.length === 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  assert.equal(exits.length, 1);
  assert.equal(exits[0].name, 'reward');
  assert.equal(exits[0].signal, 'SIGKILL');
  assert.match(exits[0].logTail, /"event":"listening"/);
  assert.deepEqual(sup.running.map((s) => s.name), ['reward-2']);
  await sup.stopAll();
  assert.equal(exits.length, 1, 'a stop is not a crash');
  assert.deepEqual(await waitGone([a.pid, b.pid]), []);
  // The stopped service logged its clean shutdown.
  assert.match(await readFile(b.logFile, 'utf8'), /"event":"stopping","signal":"SIGTERM"/);
});

test('a stack whose start fails stops what it had started', async () => {
  const home = join(dir, 'partial');
  // A rank with world size 2 waits at a rendezvous nobody serves, but it still starts its server; so make the start
  // fail on time instead: a start timeout shorter than any service needs.
  await assert.rejects(startStack({}, { stateDir: home, parts: ['reward', 'checkpoint'], startTimeoutMs: 1 }), ServiceStartError);
  const state = await readStackState(home);
  assert.equal(state, null, 'no state file after a failed start');
  assert.equal(await readNatsServerState(stackPaths(home).natsDir), null, 'the nats-server it started is stopped');
  assert.ok(!existsSync(join(home, 'stack.json')));
});

test('a stack refuses bad settings before starting anything', async () => {
  const home = join(dir, 'refused');
  await assert.rejects(startStack({}, { stateDir: home, checkpointKeep: 0 }), /checkpointKeep must be an integer >= 1, got 0/);
  await assert.rejects(startStack({}, { stateDir: home, ranks: 0 }), /ranks must be an integer >= 1, got 0/);
  await assert.rejects(startStack({}, { stateDir: home, kvBlocks: 1.5 }), /kvBlocks must be an integer >= 1, got 1.5/);
  await assert.rejects(startStack({}, { stateDir: home, expertGradDtype: 'float16' as 'bfloat16' }), /expertGradDtype must be 'float32' or 'bfloat16', got 'float16'/);
  await assert.rejects(startStack({}, { stateDir: home, expertGradDtype: 'bfloat16' }), /expertGradDtype 'bfloat16' needs device 'cuda'/);
  assert.equal(await readStackState(home), null);
});
