// Needs the native engine built (npm run build:native). Forward/backward numerics are tested with the
// kernels; here: loading, saving, the typed wrapper's validation and the calls that exist natively.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pbkdf2 } from 'node:crypto';
import { cp, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Engine, EngineError, WeightsError, buildLossSpec, packBatch, packRows, unpackRows, parseHfConfig, type ExpertGradDtype } from './index.ts';
import { SafetensorsCheckpoint, f32ToBf16Bits, writeSafetensors, type TensorToWrite } from '../hf/safetensors.ts';

const FIXTURES = fileURLToPath(new URL('../../test/fixtures/', import.meta.url));
const F32_DIR = join(FIXTURES, 'qwen2_moe-tiny');
const BF16_DIR = join(FIXTURES, 'qwen2_moe-tiny-bf16-sharded');

async function withTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'engine-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true });
  }
}

async function readAll(dir: string): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
  const ckpt = await SafetensorsCheckpoint.open(dir);
  try {
    const out = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const [name, t] of ckpt.tensors) out.set(name, { shape: t.shape, data: await ckpt.read(name) });
    return out;
  } finally {
    await ckpt.close();
  }
}

// A copy of the F32 fixture whose weights file is rewritten by `edit` (config.json edited by `config`).
async function editedFixture(
  dir: string,
  edit: (tensors: TensorToWrite[]) => TensorToWrite[],
  config?: (c: Record<string, unknown>) => void,
): Promise<string> {
  const out = join(dir, 'model');
  await cp(F32_DIR, out, { recursive: true });
  const tensors = [...(await readAll(F32_DIR))].map(([name, t]) => ({ name, shape: t.shape, data: t.data }));
  await writeSafetensors(join(out, 'model.safetensors'), edit(tensors));
  if (config) {
    const c = JSON.parse(await readFile(join(out, 'config.json'), 'utf8'));
    config(c);
    await writeFile(join(out, 'config.json'), JSON.stringify(c));
  }
  return out;
}

function bitsEqual(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

function assertParamsEqualFiles(engine: Engine, files: Map<string, { shape: number[]; data: Float32Array }>): void {
  for (const p of engine.paramTable) {
    const t = files.get(p.name);
    assert.ok(t, `${p.name} not in the files`);
    assert.deepEqual(p.shape, t.shape, p.name);
    assert.ok(bitsEqual(engine.params.subarray(p.offset, p.offset + p.numel), t.data), `${p.name} differs from the file`);
  }
}

function seeded(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32 - 0.5;
  };
}

for (const dir of [F32_DIR, BF16_DIR]) {
  test(`fromHfFolder loads every parameter of ${dir.split('/').at(-1)} with the file's values`, async () => {
    const engine = await Engine.fromHfFolder(dir);
    const files = await readAll(dir);
    assert.equal(engine.modelType, 'qwen2_moe');
    // Untied: every file tensor is a parameter and vice versa.
    assert.deepEqual(new Set(engine.paramTable.map((p) => p.name)), new Set(files.keys()));
    assert.equal(engine.params.length, engine.paramTable.reduce((a, p) => a + p.numel, 0));
    assertParamsEqualFiles(engine, files);
    const experts = engine.paramTable.filter((p) => p.kind === 'expert');
    assert.equal(experts.length, 2 * 8 * 3);
    assert.equal(engine.moeLayerCount, 2);
    await engine.dispose();
  });
}

test('saveHfFolder then fromHfFolder round-trips F32 exactly, with config and tokenizer files', () =>
  withTmp(async (tmp) => {
    const engine = await Engine.fromHfFolder(F32_DIR);
    const out = join(tmp, 'saved');
    const written = await engine.saveHfFolder(out);
    assert.deepEqual(written, ['model.safetensors', 'config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json']);
    const reloaded = await Engine.fromHfFolder(out);
    assert.ok(bitsEqual(reloaded.params, engine.params));
    const src = JSON.parse(await readFile(join(F32_DIR, 'config.json'), 'utf8'));
    const saved = JSON.parse(await readFile(join(out, 'config.json'), 'utf8'));
    assert.deepEqual(saved, { ...src, dtype: 'float32' });
    assert.equal(await readFile(join(out, 'tokenizer.json'), 'utf8'), await readFile(join(F32_DIR, 'tokenizer.json'), 'utf8'));
  }));

test('saveHfFolder in BF16, sharded, reloads to the BF16-rounded parameters', () =>
  withTmp(async (tmp) => {
    const engine = await Engine.fromHfFolder(F32_DIR);
    const out = join(tmp, 'bf16');
    await engine.saveHfFolder(out, { dtype: 'bf16', maxShardBytes: 100_000 });
    const names = await readdir(out);
    assert.ok(names.includes('model.safetensors.index.json'));
    assert.ok(names.filter((n) => /^model-\d+-of-\d+\.safetensors$/.test(n)).length > 1);
    assert.equal(JSON.parse(await readFile(join(out, 'config.json'), 'utf8')).dtype, 'bfloat16');
    const reloaded = await Engine.fromHfFolder(out);
    const src = new Uint32Array(engine.params.buffer, engine.params.byteOffset, engine.params.length);
    const got = new Uint32Array(reloaded.params.buffer, reloaded.params.byteOffset, reloaded.params.length);
    for (let i = 0; i < src.length; i++) {
      if (got[i] !== ((f32ToBf16Bits(src[i]) << 16) >>> 0)) assert.fail(`param ${i}: ${reloaded.params[i]} is not bf16(${engine.params[i]})`);
    }
    // Weights already in BF16 survive a BF16 save unchanged.
    const bf = await Engine.fromHfFolder(BF16_DIR);
    await bf.saveHfFolder(join(tmp, 'bf16b'), { dtype: 'bf16' });
    assert.ok(bitsEqual((await Engine.fromHfFolder(join(tmp, 'bf16b'))).params, bf.params));
  }));

test('a missing tensor is an error naming the tensor and the folder', () =>
  withTmp(async (tmp) => {
    const dir = await editedFixture(tmp, (ts) => ts.filter((t) => t.name !== 'model.layers.1.mlp.gate.weight'));
    await assert.rejects(Engine.fromHfFolder(dir), (e: Error) => {
      assert.ok(e instanceof WeightsError);
      assert.equal(e.message, `tensor model.layers.1.mlp.gate.weight is missing from ${dir} (no safetensors file holds it)`);
      return true;
    });
  }));

test('a tensor of the wrong shape is an error naming the file, the tensor and both shapes', () =>
  withTmp(async (tmp) => {
    const dir = await editedFixture(tmp, (ts) => ts.map((t) => (t.name === 'model.embed_tokens.weight' ? { ...t, shape: [64, 512] } : t)));
    await assert.rejects(Engine.fromHfFolder(dir), (e: Error) => {
      assert.ok(e instanceof WeightsError);
      assert.equal(e.message, 'model.safetensors: tensor model.embed_tokens.weight has shape [64,512], expected [512,64]');
      return true;
    });
  }));

test('unexpected tensors are errors; rotary inv_freq buffers are ignored', () =>
  withTmp(async (tmp) => {
    const extra = (name: string) => (ts: TensorToWrite[]) => [...ts, { name, shape: [8], data: new Float32Array(8) }];
    const bad = await editedFixture(join(tmp), extra('model.layers.0.mlp.experts.8.up_proj.weight'));
    await assert.rejects(Engine.fromHfFolder(bad), (e: Error) => {
      assert.ok(e instanceof WeightsError);
      assert.equal(e.message, 'model.safetensors: unexpected tensor model.layers.0.mlp.experts.8.up_proj.weight (not a parameter of this qwen2_moe model)');
      return true;
    });
    await rm(bad, { recursive: true });
    const ok = await editedFixture(tmp, extra('model.layers.0.self_attn.rotary_emb.inv_freq'));
    assertParamsEqualFiles(await Engine.fromHfFolder(ok), await readAll(F32_DIR));
  }));

test('tied embeddings: lm_head may be absent from (or present in) the files', () =>
  withTmp(async (tmp) => {
    const tie = (c: Record<string, unknown>) => {
      c.tie_word_embeddings = true;
    };
    const dir = await editedFixture(tmp, (ts) => ts.filter((t) => t.name !== 'lm_head.weight'), tie);
    const engine = await Engine.fromHfFolder(dir);
    assert.ok(!engine.paramTable.some((p) => p.name === 'lm_head.weight'));
    assertParamsEqualFiles(engine, await readAll(F32_DIR));
    await cp(join(F32_DIR, 'model.safetensors'), join(dir, 'model.safetensors'));
    assertParamsEqualFiles(await Engine.fromHfFolder(dir), await readAll(F32_DIR));
  }));

test('expertRange loads only the local experts and refuses to save a partial folder', async () => {
  const engine = await Engine.fromHfFolder(F32_DIR, { expertRange: [2, 5] });
  const experts = engine.paramTable.filter((p) => p.kind === 'expert');
  assert.deepEqual([...new Set(experts.map((p) => p.expert))], [2, 3, 4]);
  assert.equal(experts.length, 2 * 3 * 3);
  assertParamsEqualFiles(engine, await readAll(F32_DIR));
  await assert.rejects(engine.saveHfFolder(join(tmpdir(), 'never-written')), {
    name: 'WeightsError',
    message: 'saveHfFolder: this engine holds experts [2, 5) of 8; a Hugging Face folder needs all of them',
  });
});

const SMALL = {
  vocab_size: 64,
  hidden_size: 16,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_theta: 10000,
  num_experts_per_tok: 2,
  intermediate_size: 24,
};

for (const [type, extra, expectName] of [
  ['qwen3_moe', { num_experts: 4, moe_intermediate_size: 8, head_dim: 8, decoder_sparse_step: 2 }, 'model.layers.0.self_attn.q_norm.weight'],
  ['mixtral', { num_local_experts: 4 }, 'model.layers.1.block_sparse_moe.experts.3.w2.weight'],
] as const) {
  test(`${type}: a model saved from a config reloads with the same parameters`, () =>
    withTmp(async (tmp) => {
      const engine = Engine.fromConfig(parseHfConfig({ model_type: type, ...SMALL, ...extra }));
      const rnd = seeded(7);
      for (let i = 0; i < engine.params.length; i++) engine.params[i] = rnd();
      await engine.saveHfFolder(tmp);
      const files = await readAll(tmp);
      assert.ok(files.has(expectName), `${expectName} not written`);
      const reloaded = await Engine.fromHfFolder(tmp);
      assert.ok(bitsEqual(reloaded.params, engine.params));
      if (type === 'qwen3_moe') {
        // Layer 0 is dense (sparse step 2): a plain MLP.
        assert.ok(files.has('model.layers.0.mlp.gate_proj.weight'));
        assert.ok(files.has('model.layers.1.mlp.experts.0.gate_proj.weight'));
      }
    }));
}

test('native errors arrive as EngineError with a code', () => {
  const parsed = parseHfConfig(JSON.parse(JSON.stringify({ model_type: 'mixtral', ...SMALL, num_local_experts: 4 })));
  parsed.engine.layerIsMoe = [true];
  assert.throws(() => Engine.fromConfig(parsed), (e: unknown) => {
    assert.ok(e instanceof EngineError);
    assert.equal(e.code, 'INVALID_ARGUMENT');
    assert.equal(e.message, 'model config: layer_is_moe must have one entry per layer');
    return true;
  });
});

test('the addon path is checked with a clear message', () => {
  assert.throws(() => Engine.fromConfig(parseHfConfig({ model_type: 'mixtral', ...SMALL, num_local_experts: 4 }), { addonPath: '/nonexistent/moepilot.node' }), {
    message: 'native engine not built: /nonexistent/moepilot.node is missing; run npm run build:native',
  });
});

test('gradsByName views the gradient buffer; adamwStep returns the norm and moves each weight by about lr', async () => {
  const engine = await Engine.fromHfFolder(F32_DIR);
  const before = engine.params.slice();
  const grads = engine.gradsByName();
  assert.equal(grads.size, engine.paramTable.length);
  const g = grads.get('model.layers.0.self_attn.q_proj.weight')!;
  const rnd = seeded(3);
  let sq = 0;
  for (let i = 0; i < g.length; i++) {
    g[i] = rnd();
    sq += g[i] * g[i];
  }
  const p = engine.paramTable.find((t) => t.name === 'model.layers.0.self_attn.q_proj.weight')!;
  assert.equal(engine.grads[p.offset + 5], g[5]);
  const norm = await engine.adamwStep({ lr: 0.01 });
  assert.ok(Math.abs(norm - Math.sqrt(sq)) < 1e-4 * Math.sqrt(sq), `norm ${norm} vs ${Math.sqrt(sq)}`);
  // First Adam step: m/sqrt(v) = sign(g), so each weight moves by lr against its gradient.
  for (let i = 0; i < g.length; i++) {
    const d = engine.params[p.offset + i] - before[p.offset + i];
    assert.ok(Math.abs(d + 0.01 * Math.sign(g[i])) < 1e-5, `weight ${i} moved by ${d}`);
  }
  // Parameters without gradient stay (no weight decay by default).
  assert.equal(engine.params[0], before[0]);
  await engine.zeroGrad();
  assert.ok(engine.grads.every((v) => v === 0));
  await assert.rejects(engine.adamwStep({ lr: -1 }), { name: 'RangeError', message: 'adamw: lr must be >= 0, got -1' });
  await assert.rejects(engine.adamwStep({ lr: 1, momentum: 0.9 } as never), /adamw: unknown option 'momentum'/);
  await engine.dispose();
  assert.throws(() => engine.params, /engine is disposed/);
  await assert.rejects(engine.zeroGrad(), /engine is disposed/);
});

test('calls run one after another in the order made', async () => {
  const engine = await Engine.fromHfFolder(F32_DIR);
  engine.grads.fill(0.5);
  // Not awaited in between: zeroGrad must wait for the step, which must see the gradients.
  const step = engine.adamwStep({ lr: 0 });
  const zero = engine.zeroGrad();
  await zero;
  const norm = await step;
  const want = 0.5 * Math.sqrt(engine.grads.length);
  assert.ok(Math.abs(norm - want) < 1e-4 * want, `norm ${norm}, expected ${want}`);
  assert.ok(engine.grads.every((v) => v === 0));
});

test('the native clock splits each call into time queued behind a busy thread pool, running and resolving', async () => {
  const engine = await Engine.fromHfFolder(F32_DIR);
  const batch = { tokens: new Int32Array([1, 2, 3, 4, 5]), seqLens: new Int32Array([3, 2]) };
  await engine.forward(batch, { logprobs: true });
  const before = engine.nativeCallTimes()['moepilot.forward'];
  assert.ok(before && before.calls >= 1 && before.runMs > 0, JSON.stringify(before));
  // Every thread of libuv's pool busy (pbkdf2 runs there, as file writes do): the forward waits for one to free.
  const poolSize = Number(process.env.UV_THREADPOOL_SIZE ?? 4);
  const issued = performance.now();
  let firstDone = Infinity;
  const jobs = Array.from({ length: poolSize }, () =>
    new Promise<void>((resolve, reject) =>
      pbkdf2('moe-pilot', 'salt', 200_000, 32, 'sha256', (e) => {
        firstDone = Math.min(firstDone, performance.now());
        return e ? reject(e) : resolve();
      }),
    ),
  );
  await engine.forward(batch, { logprobs: true });
  await Promise.all(jobs);
  const after = engine.nativeCallTimes()['moepilot.forward'];
  assert.equal(after.calls - before.calls, 1);
  const queued = after.queuedMs - before.queuedMs;
  // The pool's first job ends before the forward can start: its queued time covers most of that wait.
  assert.ok(queued >= 0.5 * (firstDone - issued), `queued ${queued.toFixed(1)} ms, first pool job done after ${(firstDone - issued).toFixed(1)} ms`);
  assert.ok(after.runMs > before.runMs && after.resolveMs >= before.resolveMs);
});

test('a truncated shard is an error naming the shard and the tensor', () =>
  withTmp(async (tmp) => {
    const dir = join(tmp, 'model');
    await cp(BF16_DIR, dir, { recursive: true });
    const shard = join(dir, 'model-00001-of-00010.safetensors');
    await writeFile(shard, (await readFile(shard)).subarray(0, 1000));
    await assert.rejects(Engine.fromHfFolder(dir), {
      name: 'SafetensorsError',
      message: 'model-00001-of-00010.safetensors: tensor lm_head.weight: data_offsets [0, 65536] run past the end of the data (880 bytes; file truncated?)',
    });
  }));

test('batches are validated before they reach the native engine', async () => {
  const engine = await Engine.fromHfFolder(F32_DIR);
  const batch = { tokens: new Int32Array([1, 2, 3, 4, 5]), seqLens: new Int32Array([3, 2]) };
  await assert.rejects(engine.forward({ ...batch, seqLens: new Int32Array([3, 3]) }), { message: 'batch: seqLens sum to 6 but tokens has 5 entries' });
  await assert.rejects(engine.forward({ ...batch, seqLens: new Int32Array([5, 0]) }), { message: 'batch: seqLens[1] is 0; every sequence needs at least one token' });
  await assert.rejects(engine.forward({ ...batch, tokens: new Int32Array([1, 2, 512, 4, 5]) }), { message: 'batch: tokens[2] = 512 is outside the vocabulary [0, 512)' });
  await assert.rejects(engine.forward({ tokens: [1, 2] as never, seqLens: new Int32Array([2]) }), { message: 'batch.tokens must be an Int32Array' });
  await assert.rejects(engine.forward({ ...batch, replayExperts: new Int32Array(3) }), {
    message: 'batch: replayExperts has 3 entries, expected moeLayers*N*topK = 2*5*2 = 20',
  });
  await assert.rejects(engine.forward({ ...batch, replayExperts: new Int32Array(20).fill(8) }), { message: 'batch: replayExperts[0] = 8 is outside [0, 8)' });
  await assert.rejects(engine.forward(batch, { logit: true } as never), /forward request: unknown field 'logit'/);
  const mask = new Float32Array([0, 1, 0, 1, 0]);
  await assert.rejects(engine.forwardBackward(batch, { type: 'grpo', mask }), { message: 'loss: advantages must be a Float32Array' });
});

test('buildLossSpec fills defaults and rejects inconsistent losses', () => {
  const batch = { tokens: new Int32Array(5), seqLens: new Int32Array([3, 2]) };
  const mask = new Float32Array([0, 1, 0, 1, 0]);
  assert.deepEqual(buildLossSpec({ type: 'sft', mask }, batch), {
    type: 'sft',
    mask,
    advantages: null,
    oldLogprobs: null,
    refLogprobs: null,
    epsLow: 0.2,
    epsHigh: 0.28,
    beta: 0,
    kl: 'k3',
    aggregation: 'token-mean',
    totalTokens: 0,
    totalSeqs: 0,
    normLength: 0,
    temperature: 1,
    auxLossCoef: -1,
    auxScale: 1,
  });
  const rows = new Float32Array(5);
  const grpo = buildLossSpec({ type: 'grpo', mask, advantages: rows, oldLogprobs: rows, refLogprobs: rows, beta: 0.04, kl: 'k1', aggregation: 'seq-mean-token-sum-norm', normLength: 16, auxLossCoef: 0 }, batch);
  assert.equal(grpo.beta, 0.04);
  assert.equal(grpo.refLogprobs, rows);
  assert.equal(grpo.normLength, 16);
  assert.equal(grpo.auxLossCoef, 0);
  const bad = (loss: object, message: string) => assert.throws(() => buildLossSpec(loss as never, batch), { message });
  bad({ type: 'sft', mask: new Float32Array(4) }, 'loss: mask has 4 entries, expected N = 5');
  bad({ type: 'sft', mask: new Float32Array([0, 1, 1, 1, 0]) }, 'loss: mask must be 0 at the last row of each sequence (row 2, sequence 0)');
  bad({ type: 'sft', mask: new Float32Array([0, NaN, 0, 1, 0]) }, 'loss: mask[1] is not finite');
  bad({ type: 'dpo', mask }, "loss: type must be 'sft' or 'grpo', got 'dpo'");
  bad({ type: 'grpo', mask, advantages: rows, oldLogprobs: rows, beta: 0.1 }, 'loss: refLogprobs are required when beta > 0');
  bad({ type: 'grpo', mask, advantages: rows, oldLogprobs: new Float32Array(2) }, 'loss: oldLogprobs has 2 entries, expected N = 5');
  bad({ type: 'sft', mask, advantages: rows }, 'loss: advantages is only used by the grpo loss');
  bad({ type: 'sft', mask, aggregation: 'sum' }, "loss: aggregation must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm, got 'sum'");
  bad({ type: 'sft', mask, kl: 'k2' }, "loss: kl must be one of k1, k3, got 'k2'");
  bad({ type: 'sft', mask, epsLow: -0.1 }, 'loss: epsLow must be a number >= 0, got -0.1');
  bad({ type: 'sft', mask, clip: 1 }, "loss: unknown field 'clip'");
});

test('packBatch, packRows and unpackRows convert between padded rows and packed sequences', () => {
  const b = packBatch([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]], [3, 2, 4]);
  assert.deepEqual([...b.tokens], [5, 6, 7, 8, 9, 1, 2, 3, 4]);
  assert.deepEqual([...b.seqLens], [3, 2, 4]);
  assert.throws(() => packBatch([[1, 2]], [3]), { message: 'packBatch: lengths[0] = 3 must be an integer in [1, 2]' });
  assert.throws(() => packBatch([[1, 2]], [1, 1]), { message: 'packBatch: 1 rows but 2 lengths' });
  const adv = packRows([[0.5, 0.5, 0.5, 9], [-1, -1, 9, 9], [2, 2, 2, 2]], b.seqLens);
  assert.deepEqual([...adv], [0.5, 0.5, 0.5, -1, -1, 2, 2, 2, 2]);
  const rows = unpackRows(adv, b.seqLens);
  assert.deepEqual(rows.map((r) => [...r]), [[0.5, 0.5, 0.5], [-1, -1], [2, 2, 2, 2]]);
  // Views, not copies.
  rows[1][0] = 7;
  assert.equal(adv[3], 7);
  const wide = unpackRows(new Int32Array(18).map((_, i) => i), b.seqLens, 2);
  assert.deepEqual([...wide[1]], [6, 7, 8, 9]);
  assert.throws(() => unpackRows(new Float32Array(8), b.seqLens), { message: 'unpackRows: 8 values, expected N*width = 9*1' });
});

test('a large engine costs no host memory until its buffers are written; weightsOnly needs a GPU; deviceMemory is zero on the CPU', async () => {
  // ~1.6e9 parameters: 6.4 GB each for the fp32 parameters and gradients. Allocated as zero pages, they must not
  // show in the process's resident memory.
  const cfg = parseHfConfig(
    {
      model_type: 'qwen2_moe', vocab_size: 32768, hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 8,
      num_attention_heads: 16, num_key_value_heads: 16, max_position_embeddings: 4096, rope_theta: 1e6,
      rms_norm_eps: 1e-6, num_experts: 60, num_experts_per_tok: 4, moe_intermediate_size: 1408,
      shared_expert_intermediate_size: 5632, norm_topk_prob: false, decoder_sparse_step: 1, mlp_only_layers: [],
      tie_word_embeddings: false, qkv_bias: true, hidden_act: 'silu',
    },
    { source: 'lazy-host test' },
  );
  const before = process.memoryUsage().rss;
  const engine = Engine.fromConfig(cfg);
  try {
    const n = engine.paramTable.reduce((a, p) => a + p.numel, 0);
    assert.ok(n > 1.5e9, String(n));
    const grew = process.memoryUsage().rss - before;
    assert.ok(grew < 512 * 2 ** 20, `resident memory grew by ${(grew / 2 ** 20).toFixed(0)} MiB`);
    assert.deepEqual(engine.deviceMemory(), { current: 0, peak: 0 });
  } finally {
    await engine.dispose();
  }
  await assert.rejects(Engine.fromHfFolder(F32_DIR, { weightsOnly: true }), /weightsOnly needs a GPU device/);
  await assert.rejects(Engine.fromHfFolder(F32_DIR, { expertGradDtype: 'bfloat16' }), /expertGradDtype needs a GPU device/);
});

test('toDevice rejects an unknown expert gradient dtype, and bf16 expert gradients without gradients, before touching the device', async () => {
  const engine = await Engine.fromHfFolder(F32_DIR);
  try {
    await assert.rejects(
      engine.toDevice('cuda:0', { expertGradDtype: 'float16' as ExpertGradDtype }),
      { name: 'TypeError', message: "toDevice: expertGradDtype must be 'float32' or 'bfloat16', got 'float16'" },
    );
    await assert.rejects(
      engine.toDevice('cuda:0', { weightsOnly: true, expertGradDtype: 'bfloat16' }),
      { name: 'TypeError', message: 'toDevice: expertGradDtype bfloat16 needs gradients (not with weightsOnly)' },
    );
    assert.equal(engine.device, 'cpu');
  } finally {
    await engine.dispose();
  }
});
