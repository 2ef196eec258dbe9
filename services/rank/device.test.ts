// The rank's --device: validated at start (a bad name), and at LoadModel either the policy lands on the GPU or the
// failure names the device (the machines CI runs on have no GPU: there LoadModel must fail on `device`, never as a
// bad model folder). A GPU rank of an expert-parallel group is accepted (its group is NCCL on that GPU:
// test/gpu/rank-ep.ts runs it on the GPU machine).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InvalidArgumentError } from '../common/errors.ts';
import { createRankService, type RankServiceConfig } from './rank-service.ts';
import { FIXTURE_DIR } from './test-fixture.ts';

const base: RankServiceConfig = {
  rank: 0,
  worldSize: 1,
  rendezvous: null,
  commTimeoutMs: 10_000,
  kvBlocks: 64,
  blockSize: 16,
  maxPrompts: 16,
  addonPath: null,
};

test('a bad device name is refused at start, naming the device; a GPU rank of a group is accepted', async () => {
  assert.throws(
    () => createRankService({ tracer: null }, { ...base, device: 'tpu:0' }),
    (e: Error) => e instanceof InvalidArgumentError && e.field === 'device' && /cpu', 'cuda' or 'cuda:N'/.test(e.message),
  );
  const svc = createRankService({ tracer: null }, { ...base, rank: 1, worldSize: 2, rendezvous: { address: '127.0.0.1:1', group: 'g', timeoutMs: 1000 }, device: 'cuda:1' });
  await svc.dispose();
});

test('bf16 expert gradients: an unknown dtype, or bf16 on a CPU rank, is refused at start; on a GPU rank accepted', async () => {
  assert.throws(
    () => createRankService({ tracer: null }, { ...base, device: 'cuda:0', expertGradDtype: 'float16' as 'bfloat16' }),
    (e: Error) => e instanceof InvalidArgumentError && e.field === 'expertGradDtype' && /'float32' or 'bfloat16', got 'float16'/.test(e.message),
  );
  assert.throws(
    () => createRankService({ tracer: null }, { ...base, device: 'cpu', expertGradDtype: 'bfloat16' }),
    (e: Error) => e instanceof InvalidArgumentError && e.field === 'expertGradDtype' && /need a GPU device/.test(e.message),
  );
  const svc = createRankService({ tracer: null }, { ...base, device: 'cuda:0', expertGradDtype: 'bfloat16' });
  await svc.dispose();
});

test('a CPU rank refuses a bf16 LoadModel, naming the dtype it computes in', async () => {
  const svc = createRankService({ tracer: null }, { ...base, device: 'cpu' });
  try {
    await assert.rejects(
      svc.loadModel({ modelDir: FIXTURE_DIR, dtype: 'bf16', seed: 0, keepReference: false }),
      (e: Error) => e instanceof InvalidArgumentError && e.field === 'dtype' && /computes in f32/.test(e.message),
    );
  } finally {
    await svc.dispose();
  }
});

test('a cuda rank loads its policy on the GPU, or fails on `device` where there is none', async () => {
  const svc = createRankService({ tracer: null }, { ...base, device: 'cuda:0' });
  try {
    const outcome = await svc.loadModel({ modelDir: FIXTURE_DIR, dtype: '', seed: 0, keepReference: false }).then(
      (r) => ({ ok: true as const, r }),
      (e: Error) => ({ ok: false as const, e }),
    );
    if (outcome.ok) {
      assert.ok((outcome.r.info?.numParameters ?? 0) > 0, JSON.stringify(outcome.r.info));
    } else {
      assert.ok(outcome.e instanceof InvalidArgumentError, `${outcome.e.name}: ${outcome.e.message}`);
      assert.equal((outcome.e as InvalidArgumentError).field, 'device', outcome.e.message);
      assert.match(outcome.e.message, /cuda:0: /);
    }
  } finally {
    await svc.dispose();
  }
});
