// The reward service as a process: `node --import tsx services/reward/main.ts`, as launchers run it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { createClient } from '../common/grpc-client.ts';
import { waitForServing } from '../common/grpc-probes.ts';
import { RewardServiceService } from '../../proto/gen/pilot/v1/reward.ts';

const main = fileURLToPath(new URL('./main.ts', import.meta.url));

test('main starts the server with workers, serves Score, writes spans and stops on SIGTERM', async () => {
  const spanFile = join(mkdtempSync(join(tmpdir(), 'reward-main-')), 'spans.jsonl');
  const child = spawn(process.execPath, ['--import', 'tsx', main, '--host', '127.0.0.1', '--port', '0', '--workers', '2', '--span-file', spanFile], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: '' },
  });
  try {
    const lines = createInterface({ input: child.stdout! });
    let port = 0;
    for await (const line of lines) {
      const event = JSON.parse(line) as { event: string; port: number };
      if (event.event === 'listening') {
        port = event.port;
        break;
      }
    }
    assert.ok(port > 0);
    const address = `127.0.0.1:${port}`;
    await waitForServing(address, 'pilot.v1.RewardService', 5000);
    const client = createClient({ tracer: null }, RewardServiceService, { address, defaultTimeoutMs: 5000, credentials: null });
    const response = await client.score({
      items: Array.from({ length: 200 }, (_, i) => ({ completion: `#### ${i}`, referenceAnswer: String(i % 2 ? i : i + 1), metadata: {}, completionTokens: 1, prompt: '' })),
      spec: { scorers: [{ name: 'math', weight: 1, params: undefined, label: '' }] },
    });
    client.close();
    assert.equal(response.scores.length, 200);
    assert.deepEqual(response.scores.slice(0, 4).map((s) => s.score), [0, 1, 0, 1]);
    child.kill('SIGTERM');
    const [code] = await once(child, 'exit');
    assert.equal(code, 0);
    const spans = readFileSync(spanFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    assert.ok(spans.some((s) => s.kind === 'SERVER' && s.name === 'pilot.v1.RewardService/Score' && s.service === 'reward'));
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
});
