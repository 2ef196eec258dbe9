// A model larger than one 4 GiB host view, on the CPU: the Qwen1.5-MoE-A2.7B widths with LAYERS layers (default 2:
// 1.76B parameters, 7 GB in fp32) made in memory, saved as a bf16 Hugging Face folder, loaded back, and compared at
// marked positions of three tensors. Node's external buffers hold at most 4 GiB, so the engine hands out its
// parameters tensor by tensor (paramsByName) and refuses one view of all of them; this is the path a rank of an
// 8-GPU A2.7B run (about 3.4B parameters a rank) loads and checkpoints through. Needs about 2x the fp32 size in RAM.
//
// Usage: node --import tsx scripts/large-model-check.ts [layers]
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { Engine } from '../src/engine/engine.ts';
import { parseHfConfig } from '../src/hf/config.ts';
import { a2p7bConfig } from '../test/gpu/a2p7b.ts';

const layers = Number(process.argv[2] ?? '2');
const t0 = performance.now();
const seconds = () => ((performance.now() - t0) / 1000).toFixed(1);
const engine = Engine.fromConfig(parseHfConfig(a2p7bConfig(layers), { source: 'large-model-check' }));
console.log(`${layers} layers: ${engine.paramCount} parameters, ${(engine.paramCount * 4 / 2 ** 30).toFixed(2)} GiB in fp32`);
let whole = 'given';
try {
  void engine.params;
} catch (e) {
  whole = `refused (${(e as Error).message})`;
}
console.log(`one view of all parameters: ${whole}`);
const byName = engine.paramsByName();
const names = [...byName.keys()];
const marked = [names[0], names[names.length >> 1], names[names.length - 1]];
const mark = (i: number) => (i % 13) - 6;  // small integers: exact in bf16
for (const n of marked) {
  const v = byName.get(n)!;
  for (let i = 0; i < v.length; i += 997) v[i] = mark(i);
}
const dir = await mkdtemp(join(tmpdir(), 'large-model-'));
try {
  await engine.saveHfFolder(dir, { dtype: 'bf16' });
  console.log(`saved at ${seconds()} s`);
  await engine.dispose();
  const loaded = await Engine.fromHfFolder(dir);
  const got = loaded.paramsByName();
  let checked = 0, wrong = 0;
  for (const n of marked) {
    const v = got.get(n)!;
    for (let i = 0; i < v.length; i += 997, checked++) if (v[i] !== mark(i)) wrong++;
  }
  console.log(`loaded ${loaded.paramCount} parameters at ${seconds()} s: ${checked} marked values, ${wrong} wrong`);
  await loaded.dispose();
  if (wrong > 0 || loaded.paramCount !== engine.paramCount) process.exitCode = 1;
} finally {
  await rm(dir, { recursive: true, force: true });
}
