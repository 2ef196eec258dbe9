// The bundled CLI (scripts/device/bundle-cli.mjs: what runs the oracle on GPU machines, which have no
// node_modules) gives the same report as the CLI run from source: `pilot oracle --ranks 2`, whose
// ranks are forked from the worker bundle. Fails when a dependency starts reading files beside its
// code at import time in a way the bundle script does not handle, or when the worker is not found.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { defaultAddonPath } from './native.ts';
import { runOracle } from '../cli/commands/oracle.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const dir = path.join(root, 'test/fixtures/qwen3_moe-tiny');

test('the bundled pilot oracle --ranks 2 reports what the source CLI reports', { timeout: 120_000 }, async () => {
  const out = mkdtempSync(path.join(tmpdir(), 'pilot-bundle-'));
  try {
    await run(process.execPath, [path.join(root, 'scripts/device/bundle-cli.mjs'), out]);
    const size = statSync(path.join(out, 'pilot.mjs')).size + statSync(path.join(out, 'oracle-rank-worker.mjs')).size;
    assert.ok(size < 8e6, `bundles are ${(size / 1e6).toFixed(1)} MB`);
    // No tsx, no node_modules lookups relative to the checkout: the addon comes from MOEPILOT_ADDON.
    const { stdout } = await run(process.execPath, [path.join(out, 'pilot.mjs'), 'oracle', '--ranks', '2', dir], {
      cwd: out,
      env: { ...process.env, MOEPILOT_ADDON: defaultAddonPath, NODE_OPTIONS: '' },
    });
    const bundled = JSON.parse(stdout.trim());
    const fromSource = await runOracle(dir, { ranks: 2 });
    assert.equal(bundled.ok, true);
    assert.deepEqual(bundled, JSON.parse(JSON.stringify(fromSource)));
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
