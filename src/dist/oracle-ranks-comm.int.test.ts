// The oracle's --comm option reaches every rank's communicator: on an engine without NCCL, asking for
// it makes the run fail at once with the engine's "not in this build" error instead of running over
// Gloo or hanging. (Over NCCL on GPUs the same run is the equivalence check of the issue.)
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { loadCommAddon } from './native.ts';
import { runRanks } from './oracle-ranks.ts';

const dir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures/qwen3_moe-tiny');

test('runRanks with comm nccl on an engine built without NCCL fails fast naming the build', { timeout: 60_000 }, async (t) => {
  if (loadCommAddon().ncclAvailable === true) {
    t.skip('this engine has NCCL');
    return;
  }
  const started = Date.now();
  await assert.rejects(runRanks(dir, { ranks: 2, timeoutMs: 20_000, comm: 'nccl' }), /rank \d: CommError: .*NCCL backend is not in this build/);
  assert.ok(Date.now() - started < 15_000, `failed after ${Date.now() - started} ms, expected at once`);
});
