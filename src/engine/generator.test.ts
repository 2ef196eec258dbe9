// Rollout generation on the CPU engine: greedy equals HF's greedy decode, rollout logprobs equal the
// trainer's bit for bit, groups share their prompt's KV blocks, requests wait for cache space.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Engine } from './engine.ts';
import { createGenerator } from './generator.ts';
import { loadNative } from './native.ts';
import { SafetensorsFile } from '../hf/safetensors.ts';

const fixtures = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures');
const tiny = path.join(fixtures, 'qwen2_moe-tiny');

async function expectedGreedy(dir: string): Promise<{ prompt: number[]; greedy: number[] }> {
  const f = await SafetensorsFile.open(path.join(dir, 'expected.safetensors'));
  try {
    const { default: meta } = await import(path.join(dir, 'expected.json'), { with: { type: 'json' } });
    const ids = Array.from(await f.readInt32('input_ids'));
    const greedy = Array.from(await f.readInt32('greedy_tokens'));
    const plen = meta.prompt_lens[0] as number;
    return { prompt: ids.slice(0, plen), greedy: greedy.slice(plen) };
  } finally {
    await f.close();
  }
}

test('greedy generation equals the HF greedy decode of the fixture', async () => {
  const engine = await Engine.fromHfFolder(tiny);
  const gen = createGenerator(engine, { numBlocks: 64, blockSize: 4 });
  const { prompt, greedy } = await expectedGreedy(tiny);
  const [s] = await gen.generateAll({ prompt, maxNewTokens: greedy.length, temperature: 0, seed: 1, requestId: 1 });
  assert.deepEqual(s.tokens, greedy);
  assert.equal(s.finishReason, 'length');
  await gen.close();
});

test('rollout logprobs equal the trainer forward logprobs exactly, in a batch mixing lengths', async () => {
  const engine = await Engine.fromHfFolder(tiny);
  const gen = createGenerator(engine, { numBlocks: 256, blockSize: 4, stepsPerCall: 3 });
  const prompts = [[5, 9, 33, 2], [7, 8, 100, 200, 300, 4, 17], [11]];
  for (const temperature of [1, 0.7]) {
    const runs = await Promise.all(
      prompts.map((prompt, i) => gen.generateAll({ prompt, n: 3, maxNewTokens: 5 + 3 * i, temperature, topP: 0.9, seed: 7, requestId: 100 + i })),
    );
    const seqs: number[][] = [];
    const rollout: number[][] = [];
    runs.forEach((samples, i) => {
      for (const s of samples) {
        seqs.push([...prompts[i], ...s.tokens]);
        rollout.push(s.logprobs);
      }
    });
    const tokens = Int32Array.from(seqs.flat());
    const seqLens = Int32Array.from(seqs.map((s) => s.length));
    const r = await engine.forward({ tokens, seqLens }, { logprobs: true, temperature });
    let o = 0;
    let checked = 0;
    seqs.forEach((seq, k) => {
      const plen = seq.length - rollout[k].length;
      for (let j = 0; j < rollout[k].length; j++) {
        // row plen - 1 + j predicts completion token j
        assert.equal(r.logprobs[o + plen - 1 + j], rollout[k][j], `sequence ${k} token ${j} at temperature ${temperature}`);
        checked++;
      }
      o += seq.length;
    });
    assert.ok(checked > 40);
  }
  await gen.close();
});

test('a group shares its prompt blocks: KV memory is the prompt blocks once plus each sample own blocks', async () => {
  const engine = await Engine.fromHfFolder(tiny);
  const bs = 4;
  const native = new (loadNative().Generator)(engine.nativeEngine, { numBlocks: 128, blockSize: bs });
  const prompt = Int32Array.from({ length: 10 }, (_, i) => 3 + i); // 2 full blocks + a partial one (2 tokens)
  const n = 4;
  const samples = Array.from({ length: n }, (_, i) => ({
    sampleId: i + 1, temperature: 1, topK: 0, topP: 1, minP: 0, seed: 3n, requestId: 9n, sampleIndex: i, step: 0,
  }));
  native.addGroup({ groupId: 1, prompt, samples, maxNewTokens: 12, stopIds: new Int32Array(0), wantExperts: false });
  const full = Math.floor(prompt.length / bs);
  // Prefill only (the first token of each sample is sampled from the prompt's logits, nothing cached yet):
  // the full prompt blocks once, plus each sample's copy of the partial block.
  await native.step(1);
  // One decode step later: 11 tokens cached per sample, still inside the private partial-block copy.
  assert.equal(native.groupBlocks(1), full + n * 1);
  // Three more steps: 14 tokens cached, each sample now owns 2 blocks past the shared prompt blocks.
  await native.step(1);
  await native.step(1);
  await native.step(1);
  assert.equal(native.groupBlocks(1), full + n * 2);
  const unshared = n * Math.ceil(14 / bs);
  assert.ok(native.groupBlocks(1) < unshared, 'shared prompt blocks are not counted per sample');
  while (native.stats().activeSamples > 0) await native.step(8);
  assert.equal(native.stats().freeBlocks, 128);
  assert.equal(native.stats().reservedBlocks, 0);
});

test('identical seeds give identical samples whatever batch they share', async () => {
  const engine = await Engine.fromHfFolder(tiny);
  const gen = createGenerator(engine, { numBlocks: 256, blockSize: 8 });
  const req = { prompt: [4, 5, 6, 7, 8], n: 2, maxNewTokens: 8, temperature: 1, topK: 20, seed: 42, requestId: 5 };
  const alone = await gen.generateAll(req);
  const [together] = await Promise.all([
    gen.generateAll(req),
    gen.generateAll({ prompt: [9, 9, 9], n: 5, maxNewTokens: 12, temperature: 1, seed: 1, requestId: 6 }),
  ]);
  assert.deepEqual(together.map((s) => s.tokens), alone.map((s) => s.tokens));
  assert.deepEqual(together.map((s) => s.logprobs), alone.map((s) => s.logprobs));
  assert.notDeepEqual(alone[0].tokens, alone[1].tokens);
  await gen.close();
});

test('a request larger than the cache is refused; one that must wait runs once blocks free up', async () => {
  const engine = await Engine.fromHfFolder(tiny);
  const gen = createGenerator(engine, { numBlocks: 8, blockSize: 4 });
  await assert.rejects(async () => gen.generateAll({ prompt: [1, 2, 3], n: 4, maxNewTokens: 40, seed: 1, requestId: 1 }), /KV blocks/);
  const need = gen.blocksNeeded(3, 2, 10);
  assert.ok(need <= 8 && 2 * need > 8);
  const [a, b] = await Promise.all([
    gen.generateAll({ prompt: [1, 2, 3], n: 2, maxNewTokens: 10, seed: 1, requestId: 2 }),
    gen.generateAll({ prompt: [1, 2, 3], n: 2, maxNewTokens: 10, seed: 1, requestId: 3 }),
  ]);
  assert.equal(a.length, 2);
  assert.equal(b.length, 2);
  for (const s of [...a, ...b]) assert.equal(s.tokens.length, 10);
  await gen.close();
});

test('stop token ids end a sample and are kept; router replay experts cover every fed row', async () => {
  const engine = await Engine.fromHfFolder(tiny);
  const gen = createGenerator(engine, { numBlocks: 64, blockSize: 4 });
  const free = await gen.generateAll({ prompt: [4, 5, 6], maxNewTokens: 10, temperature: 0, seed: 1, requestId: 1 });
  const stopAt = free[0].tokens[3];
  const [s] = await gen.generateAll({ prompt: [4, 5, 6], maxNewTokens: 10, temperature: 0, seed: 1, requestId: 2, stopTokenIds: [stopAt], returnExperts: true });
  const firstHit = free[0].tokens.indexOf(stopAt);
  assert.deepEqual(s.tokens, free[0].tokens.slice(0, firstHit + 1));
  assert.equal(s.finishReason, 'stop');
  const K = engine.config.topK;
  const rows = 3 + s.tokens.length - 1;
  assert.equal(s.experts!.length, rows * engine.moeLayerCount * K);
  // The experts the rollout used are the router's choices in the trainer's forward too.
  const seq = Int32Array.from([4, 5, 6, ...s.tokens]);
  const r = await engine.forward({ tokens: seq, seqLens: Int32Array.from([seq.length]) }, { experts: true });
  for (let row = 0; row < rows; row++)
    for (let m = 0; m < engine.moeLayerCount; m++)
      for (let k = 0; k < K; k++) assert.equal(s.experts![(row * engine.moeLayerCount + m) * K + k], r.experts[(m * seq.length + row) * K + k]);
  await gen.close();
});

test('stop strings cut the text and tokens at the first match, and the sample stops early', async () => {
  const { loadTokenizer } = await import('../tokenizer/index.ts');
  const engine = await Engine.fromHfFolder(tiny);
  const tokenizer = await loadTokenizer(tiny);
  const gen = createGenerator(engine, { numBlocks: 64, blockSize: 4, decoder: tokenizer, stepsPerCall: 2 });
  const prompt = tokenizer.encode('What is 12 + 30?');
  const req = { prompt, maxNewTokens: 40, temperature: 1, seed: 11, requestId: 1 };
  const [free] = await gen.generateAll(req);
  assert.equal(free.text, tokenizer.decode(free.tokens));
  // The stop string: the printable text token j adds, where it appears for the first time (j >= 2).
  let j = -1;
  let stop = '';
  for (let k = 2; k < free.tokens.length - 2 && j < 0; k++) {
    const before = tokenizer.decode(free.tokens.slice(0, k));
    const added = tokenizer.decode(free.tokens.slice(0, k + 1)).slice(before.length);
    if (added.trim().length > 0 && !added.includes('\uFFFD') && !before.includes(added)) {
      j = k;
      stop = added;
    }
  }
  assert.ok(j > 0, `no printable token in ${JSON.stringify(free.text)}`);
  const [cut] = await gen.generateAll({ ...req, stopStrings: [stop] });
  assert.equal(cut.finishReason, 'stop_string');
  assert.deepEqual(cut.tokens, free.tokens.slice(0, j + 1));
  assert.deepEqual(cut.logprobs, free.logprobs.slice(0, j + 1));
  assert.ok(cut.text!.endsWith(stop));
  assert.equal(gen.stats().freeBlocks, 64, 'the cancelled sample gave its blocks back');
  await gen.close();
});

test('cudaGraphs is validated and changes nothing on the CPU engine', async () => {
  const engine = await Engine.fromHfFolder(tiny);
  assert.throws(() => createGenerator(engine, { numBlocks: 16, cudaGraphs: 'yes' as unknown as boolean }), /cudaGraphs must be a boolean/);
  const req = { prompt: [5, 9, 33, 2], n: 2, maxNewTokens: 6, temperature: 0.8, seed: 5, requestId: 1 };
  const a = createGenerator(engine, { numBlocks: 64, blockSize: 4, cudaGraphs: true });
  const b = createGenerator(engine, { numBlocks: 64, blockSize: 4, cudaGraphs: false });
  const ra = await a.generateAll(req);
  const rb = await b.generateAll(req);
  assert.deepEqual(ra.map((s) => [s.tokens, s.logprobs]), rb.map((s) => [s.tokens, s.logprobs]));
  await a.close();
  await b.close();
});
