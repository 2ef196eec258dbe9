import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isRuntimeVariable, readServiceEnv } from './service-env.ts';

test('reads env.X, process.env.X and process.env["X"], with defaults and required ones', () => {
  const source = `
    const env = process.env;
    program.option('--port <p>', 'port (A_PORT)', Number(env.A_PORT ?? 50053))
      .option('--root <dir>', 'root (A_ROOT)', env.A_ROOT)
      .option('--span <f>', 'span file', env.SPAN_FILE)
      .option('--host <h>', 'host', process.env.A_HOST || '0.0.0.0');
    const x = process.env['BRACKETED'];
    // const old = env.COMMENTED_OUT;
    /* env.BLOCK_COMMENT */
    const s = "not a comment // env.IN_STRING";
    if (!opts.root) program.error('error: the root is required (--root or A_ROOT)');
  `;
  const reads = readServiceEnv(source);
  assert.deepEqual(
    reads.map((r) => [r.name, r.defaulted, r.required]),
    [
      ['A_PORT', true, false],
      ['A_ROOT', false, true],
      ['SPAN_FILE', false, false],
      ['A_HOST', true, false],
      ['BRACKETED', false, false],
      ['IN_STRING', false, false],
    ],
  );
});

test('a variable named in an error but read with a default is not required', () => {
  const reads = readServiceEnv(`const p = env.P ?? 1; if (p < 0) throw new RangeError('P must be >= 0');`);
  assert.deepEqual(reads, [{ name: 'P', defaulted: true, required: false }]);
});

test('runtime variables are those of NCCL, OpenMP, libuv and Node, not service settings', () => {
  for (const n of ['NCCL_NVLS_ENABLE', 'NCCL_SOCKET_IFNAME', 'OMP_NUM_THREADS', 'UV_THREADPOOL_SIZE']) assert.ok(isRuntimeVariable(n), n);
  for (const n of ['RANK', 'REWARD_PORT', 'MODEL_DIR']) assert.ok(!isRuntimeVariable(n), n);
});
