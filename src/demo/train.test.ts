// The tiny model folder and the in-process training loops on the real engine and generator.
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Engine } from '../engine/engine.ts';
import { createGenerator } from '../engine/generator.ts';
import { makeTinyModel } from './make-model.ts';
import { createTask, evaluateGreedy, reward } from './task.ts';
import { loadDemoTokenizer } from './tokenizer.ts';
import { encodeExample, grpoTrain, sftWarmup } from './train.ts';

async function withModel(fn: (dir: string) => Promise<void>, options: Parameters<typeof makeTinyModel>[2] = {}): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'demo-model-'));
  try {
    const task = createTask({ kind: 'sort', digits: 3, heldOut: 40, seed: 1 });
    await makeTinyModel(dir, task.alphabet, options);
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

for (const modelType of ['qwen3_moe', 'qwen2_moe'] as const) {
  test(`${modelType}: the model folder loads in the engine with HF-style init and the tokenizer's vocabulary`, () =>
    withModel(
      async (dir) => {
        const files = (await readdir(dir)).sort();
        assert.deepEqual(files, ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
        const config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
        const tok = await loadDemoTokenizer(dir);
        assert.equal(config.model_type, modelType);
        assert.equal(config.vocab_size, tok.vocabSize);
        assert.equal(config.eos_token_id, tok.eosId);
        const engine = await Engine.fromHfFolder(dir);
        const params = engine.paramsByName();
        assert.ok([...params.get('model.norm.weight')!].every((v) => v === 1));
        const w = params.get('model.layers.1.mlp.experts.7.down_proj.weight')!;
        const std = Math.sqrt(w.reduce((a, v) => a + v * v, 0) / w.length);
        assert.ok(Math.abs(std - 0.02) < 0.002, `expert weight std ${std}`);
        if (modelType === 'qwen2_moe') assert.ok([...params.get('model.layers.0.self_attn.q_proj.bias')!].every((v) => v === 0));
        await engine.dispose();
      },
      { modelType },
    ));
}

test('the same seed writes the same weights; another seed different ones', async () => {
  const read = async (seed: number) => {
    let out: Float32Array | null = null;
    await withModel(async (dir) => {
      const e = await Engine.fromHfFolder(dir);
      out = e.params.slice();
      await e.dispose();
    }, { seed });
    return out!;
  };
  const a = await read(4);
  const b = await read(4);
  const c = await read(5);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
});

test('SFT lowers the loss; greedy evaluation agrees with decoding each prompt by hand', () =>
  withModel(async (dir) => {
    const task = createTask({ kind: 'sort', digits: 3, heldOut: 40, seed: 1 });
    const tokenizer = await loadDemoTokenizer(dir);
    const engine = await Engine.fromHfFolder(dir);
    const generator = createGenerator(engine, { numBlocks: 256, blockSize: 16, decoder: tokenizer });
    const hist = await sftWarmup(engine, tokenizer, task, { steps: 40, batch: 32, lr: 3e-3, seed: 1 });
    const first = hist.slice(0, 5).reduce((a, h) => a + h.loss, 0) / 5;
    const last = hist.slice(-5).reduce((a, h) => a + h.loss, 0) / 5;
    assert.ok(last < 0.6 * first, `SFT loss ${first} -> ${last}`);
    const ev = await evaluateGreedy({ generator, tokenizer }, task);
    let correct = 0;
    for (const [i, ex] of task.heldOut.entries()) {
      const [s] = await generator.generateAll({ prompt: tokenizer.encode(ex.prompt), maxNewTokens: 4, temperature: 0, seed: 0, requestId: 1000 + i, stopTokenIds: [tokenizer.eosId] });
      correct += reward(tokenizer.decode(s.tokens), ex.answer);
    }
    assert.equal(ev.correct, correct);
    assert.equal(ev.total, 40);
    assert.equal(ev.accuracy, correct / 40);
    await generator.close();
    await engine.dispose();
  }));

test('encodeExample ends the completion with eos', () =>
  withModel(async (dir) => {
    const tok = await loadDemoTokenizer(dir);
    const { prompt, completion } = encodeExample(tok, { prompt: 's321=', answer: '123' });
    assert.equal(prompt.length, 5);
    assert.deepEqual(completion.slice(0, 3), tok.encode('123'));
    assert.equal(completion[3], tok.eosId);
  }));

test('two GRPO steps sample, score and change the weights', () =>
  withModel(async (dir) => {
    const task = createTask({ kind: 'sort', digits: 3, heldOut: 40, seed: 1 });
    const tokenizer = await loadDemoTokenizer(dir);
    const engine = await Engine.fromHfFolder(dir);
    const generator = createGenerator(engine, { numBlocks: 256, blockSize: 16, decoder: tokenizer });
    // A short warm-up so that samples are sometimes right: groups with mixed rewards carry the gradient.
    await sftWarmup(engine, tokenizer, task, { steps: 30, batch: 32, lr: 3e-3, seed: 2 });
    const before = engine.params.slice();
    const steps = await grpoTrain(engine, generator, tokenizer, task, { steps: 2, promptsPerStep: 16, G: 8, temperature: 1, lr: 1e-3, seed: 3 });
    assert.equal(steps.length, 2);
    for (const s of steps) {
      assert.equal(s.groups, 16);
      assert.ok(s.meanReward > 0 && s.meanReward < 1, `mean reward ${s.meanReward}`);
      assert.ok(s.activeGroups > 0 && s.tokens > 0);
      assert.ok(Number.isFinite(s.loss) && s.gradNorm > 0);
      assert.equal(s.clipFraction, 0, 'one on-policy update: ratios are exactly 1');
    }
    let changed = 0;
    const after = engine.params;
    for (let i = 0; i < after.length; i++) if (after[i] !== before[i]) changed++;
    assert.ok(changed > after.length / 2, `${changed} of ${after.length} parameters changed`);
    await generator.close();
    await engine.dispose();
  }));

test('bad training options are refused', () =>
  withModel(async (dir) => {
    const task = createTask({ kind: 'sort', digits: 3, heldOut: 40, seed: 1 });
    const tokenizer = await loadDemoTokenizer(dir);
    const engine = await Engine.fromHfFolder(dir);
    const generator = createGenerator(engine, { numBlocks: 16, blockSize: 16, decoder: tokenizer });
    const base = { steps: 1, promptsPerStep: 1, G: 4, temperature: 1, lr: 1e-3 };
    await assert.rejects(grpoTrain(engine, generator, tokenizer, task, { ...base, G: 1 }), /G must be >= 2/);
    await assert.rejects(grpoTrain(engine, generator, tokenizer, task, { ...base, temperature: 0 }), /temperature must be > 0/);
    await assert.rejects(grpoTrain(engine, generator, tokenizer, task, { ...base, updatesPerStep: 0 }), /updatesPerStep must be an integer >= 1/);
    await assert.rejects(sftWarmup(engine, tokenizer, task, { steps: 1, batch: 0, lr: 1e-3 }), /batch must be an integer >= 1/);
    await generator.close();
    await engine.dispose();
  }));
