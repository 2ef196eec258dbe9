// CPU benchmark: rollout tokens/s of the tiny fixture model at 1, 16 and 64 samples (one prompt, n samples
// sharing its KV blocks), 64 new tokens each, top-p 0.9. Writes bench/results/generate-cpu.json.
//   npx tsx bench/generate-cpu.ts
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Engine } from '../src/engine/engine.ts';
import { createGenerator } from '../src/engine/generator.ts';
import { median, writeResult } from './common.ts';

const dir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../test/fixtures/recomputed/qwen2_moe-tiny');
const engine = await Engine.fromHfFolder(dir);
const prompt = Array.from({ length: 32 }, (_, i) => 3 + ((i * 17) % 500));
const rows: Record<string, unknown>[] = [];
for (const n of [1, 16, 64]) {
  const gen = createGenerator(engine, { numBlocks: 2048, blockSize: 16, stepsPerCall: 16 });
  const times: number[] = [];
  let tokens = 0;
  for (let rep = 0; rep < 3; rep++) {
    const t0 = performance.now();
    const samples = await gen.generateAll({ prompt, n, maxNewTokens: 64, temperature: 1, topP: 0.9, seed: rep, requestId: n });
    times.push((performance.now() - t0) / 1000);
    tokens = samples.reduce((a, s) => a + s.tokens.length, 0);
  }
  await gen.close();
  const s = median(times);
  rows.push({ samples: n, new_tokens: tokens, seconds: s, tokens_per_s: tokens / s });
  console.log(`n=${n}: ${tokens} tokens in ${s.toFixed(3)} s = ${(tokens / s).toFixed(0)} tok/s`);
}
const result = { benchmark: 'rollout generation, CPU backend', command: 'npx tsx bench/generate-cpu.ts', model: 'test/fixtures/recomputed/qwen2_moe-tiny', prompt_tokens: prompt.length, max_new_tokens: 64, top_p: 0.9, results: rows };
console.log('wrote', writeResult('generate-cpu', result));
