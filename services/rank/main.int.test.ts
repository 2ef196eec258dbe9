// The rank as a process with MODEL_DIR: it listens, loads the model, serves, and stops on SIGTERM; a
// model folder that cannot be loaded ends the process with exit code 1.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { createClient } from '../common/grpc-client.ts';
import { RolloutServiceService, type GenerateResponse } from '../../proto/gen/pilot/v1/rollout.ts';
import { TrainerServiceService } from '../../proto/gen/pilot/v1/trainer.ts';
import { FIXTURE_DIR, readFixture } from './test-fixture.ts';

const main = fileURLToPath(new URL('./main.ts', import.meta.url));

function startMain(modelDir: string) {
  const child = spawn(process.execPath, ['--import', 'tsx', main, '--host', '127.0.0.1', '--port', '0', '--kv-blocks', '16'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, MODEL_DIR: modelDir, RANK: '0', WORLD_SIZE: '1', OTEL_EXPORTER_OTLP_ENDPOINT: '', PILOT_SPAN_FILE: '' },
  });
  const events = createInterface({ input: child.stdout! });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  // Every event line, kept (breaking out of the readline iterator would close it).
  const seen: Record<string, unknown>[] = [];
  let closed = false;
  let wake: (() => void) | null = null;
  events.on('line', (line) => {
    seen.push(JSON.parse(line) as Record<string, unknown>);
    wake?.();
  });
  events.on('close', () => {
    closed = true;
    wake?.();
  });
  const next = async (name: string): Promise<Record<string, unknown>> => {
    for (;;) {
      const e = seen.find((x) => x.event === name);
      if (e) return e;
      if (closed) throw new Error(`process ended before "${name}"; stderr: ${stderr}`);
      await new Promise<void>((r) => (wake = r));
    }
  };
  return { child, next, stderr: () => stderr };
}

test('MODEL_DIR is loaded at start; Generate is served; SIGTERM exits 0', async () => {
  const fx = await readFixture();
  const p = startMain(FIXTURE_DIR);
  try {
    const listening = await p.next('listening');
    const address = `127.0.0.1:${listening.port as number}`;
    await p.next('model-loaded');
    const rollout = createClient({ tracer: null }, RolloutServiceService, { address, defaultTimeoutMs: 20000, credentials: null });
    const trainer = createClient({ tracer: null }, TrainerServiceService, { address, defaultTimeoutMs: 20000, credentials: null });
    const out: GenerateResponse[] = [];
    for await (const s of rollout.generate({
      prompts: [{ promptId: 'p', input: { $case: 'tokenIds', value: { ids: fx.greedyPrompt } }, applyChatTemplate: false }],
      n: 1,
      sampling: { temperature: 0, topK: 0, topP: 0, minP: 0, seed: 1, maxNewTokens: fx.greedyTokens.length, stop: [], stopTokenIds: [] },
      returnExperts: false,
      returnText: false,
    })) out.push(s);
    assert.deepEqual(out.map((s) => s.tokenIds), [fx.greedyTokens]);
    const m = await trainer.getMetrics({});
    assert.equal(m.counters.model_loaded, 1);
    assert.equal(m.counters.kv_blocks_total, 16);
    rollout.close();
    trainer.close();
    p.child.kill('SIGTERM');
    const [code] = await once(p.child, 'exit');
    assert.equal(code, 0);
  } finally {
    if (p.child.exitCode === null) p.child.kill('SIGKILL');
  }
});

test('a MODEL_DIR that cannot be loaded ends the process with exit code 1, naming the folder', async () => {
  const p = startMain('/nonexistent/model-folder');
  try {
    await p.next('listening');
    const [code] = await once(p.child, 'exit');
    assert.equal(code, 1);
    assert.match(p.stderr(), /model_dir: \/nonexistent\/model-folder does not exist/);
  } finally {
    if (p.child.exitCode === null) p.child.kill('SIGKILL');
  }
});
