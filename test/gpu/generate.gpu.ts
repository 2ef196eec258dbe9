// The rollout on the GPU (createGenerator on an engine on a device: paged KV cache on the device, GPU sampling,
// decode under CUDA graphs) against the GPU trainer's forward and the CPU generator, on the fixtures. Run on the
// GPU machine with Node (bundled by scripts/device/bundle.sh). Checks, per fixture:
//   - rollout logprobs == GPU Engine.forward logprobs of the same sequences, bit for bit, at T = 1 and 0.7 with
//     top-p, greedy, mixed prompt lengths (shared full prompt blocks and a copied partial one), requests joining
//     while others decode (mixed prefill/decode iterations);
//   - greedy tokens == the CPU generator's and == HF generate's (the fixture's), except after a step whose top-2
//     logits lie within bf16 noise;
//   - CUDA graphs == eager, bit for bit (tokens and logprobs), over several batch-size buckets;
//   - router replay experts: the rollout's experts == GPU Engine.forward's for every fed row;
//   - every KV block back after completion; cancel ends running samples and frees their blocks.
// Prints one line per check; exit status 1 on any failure.
//
// Usage: MOEPILOT_ADDON=<moepilot.node> node generate-gpu.mjs [fixtures folder [fixture name...]]
import path from 'node:path';

import { Engine } from '../../src/engine/engine.ts';
import { createGenerator, type GenerateRequest, type Generator, type Sample } from '../../src/engine/generator.ts';
import { readReference } from '../../src/oracle/model-oracle.ts';

const fixturesDir = process.argv[2] ?? path.join(process.env.REPO_ROOT ?? process.cwd(), 'test/fixtures');
// The project's four fixtures by default, or the names given after the folder (e.g. scripts/make-fixtures.py's).
const FIXTURES = process.argv.length > 3 ? process.argv.slice(3) : ['qwen2_moe-tiny', 'qwen3_moe-tiny', 'mixtral-tiny', 'qwen2_moe-sparse-step'];
// A greedy divergence from the CPU generator is accepted where the CPU's top-2 logits at that step are closer
// than this (relative to the row's largest |logit|): bf16 GEMM operands against fp32.
const GREEDY_TIE = 2e-2;

let failures = 0;
function report(ok: boolean, what: string, detail: string): void {
  if (!ok) failures++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}: ${detail}`);
}

const bits = new Float32Array(1);
const bitsU = new Uint32Array(bits.buffer);
function f32bits(x: number): number {
  bits[0] = x;
  return bitsU[0];
}

/**
 * Prompts of mixed lengths (with block size 4: none, one, four and 17 full shared blocks, partial blocks copied;
 * the 70-token prompt's first 64 positions make a whole attention tile its samples share).
 */
function prompts(vocab: number): number[][] {
  const p = [
    [5, 9, 33, 2],
    [7, 8, 100, 200, 300, 4, 17],
    [11],
    Array.from({ length: 19 }, (_, i) => 3 + 7 * i),
    Array.from({ length: 70 }, (_, i) => 1 + ((i * 37) % 251)),
  ];
  return p.map((q) => q.map((t) => t % vocab));
}

async function collect(gen: Generator, reqs: GenerateRequest[], staggerMs = 0): Promise<Sample[][]> {
  // Later requests join while earlier ones decode: iterations mix prefill and decode rows.
  return Promise.all(
    reqs.map(async (r, i) => {
      if (staggerMs > 0 && i > 0) await new Promise((res) => setTimeout(res, staggerMs * i));
      return gen.generateAll(r);
    }),
  );
}

/** Rollout logprobs vs the trainer's forward over prompt + completion, bit for bit. */
async function checkExact(what: string, engine: Engine, ps: number[][], runs: Sample[][], temperature: number, minChecked = 40): Promise<void> {
  const seqs: number[][] = [];
  const rollout: number[][] = [];
  runs.forEach((samples, i) => {
    for (const s of samples) {
      seqs.push([...ps[i], ...s.tokens]);
      rollout.push(s.logprobs);
    }
  });
  const tokens = Int32Array.from(seqs.flat());
  const seqLens = Int32Array.from(seqs.map((s) => s.length));
  const r = await engine.forward({ tokens, seqLens }, { logprobs: true, temperature });
  let o = 0;
  let checked = 0;
  let bad = 0;
  let first = '';
  seqs.forEach((seq, k) => {
    const plen = seq.length - rollout[k].length;
    for (let j = 0; j < rollout[k].length; j++) {
      const want = r.logprobs[o + plen - 1 + j]; // row plen - 1 + j predicts completion token j
      if (f32bits(want) !== f32bits(rollout[k][j])) {
        bad++;
        if (!first) first = `; first at sequence ${k} token ${j}: rollout ${rollout[k][j]} forward ${want}`;
      }
      checked++;
    }
    o += seq.length;
  });
  report(bad === 0 && checked >= minChecked, what, `${checked} logprobs, ${bad} differ${first}`);
}

/** (top - second) / max |logit| of row `r` of a forward's logits. */
function top2Gap(f: { logits: Float32Array }, r: number, V: number): number {
  const row = f.logits.subarray(r * V, (r + 1) * V);
  let top = -Infinity;
  let second = -Infinity;
  let scale = 0;
  for (const x of row) {
    scale = Math.max(scale, Math.abs(x));
    if (x > top) [second, top] = [top, x];
    else if (x > second) second = x;
  }
  return (top - second) / Math.max(scale, 1e-30);
}

function requests(ps: number[][], opts: Partial<GenerateRequest>, base: number): GenerateRequest[] {
  return ps.map((prompt, i) => ({ prompt, n: 3, maxNewTokens: 5 + 3 * i, seed: 7, requestId: base + i, ...opts }));
}

async function runFixture(name: string): Promise<void> {
  const dir = path.join(fixturesDir, name);
  const cpu = await Engine.fromHfFolder(dir);
  const gpu = await Engine.fromHfFolder(dir, { device: 'cuda:0' });
  const V = gpu.config.vocab;
  const ps = prompts(V);
  const numBlocks = 512;
  const gen = createGenerator(gpu, { numBlocks, blockSize: 4, stepsPerCall: 3 });
  const eager = createGenerator(gpu, { numBlocks, blockSize: 4, stepsPerCall: 3, cudaGraphs: false });

  // 1. Exactness against the trainer's forward on the same GPU engine.
  for (const temperature of [1, 0.7]) {
    const runs = await collect(gen, requests(ps, { temperature, topP: 0.9 }, temperature === 1 ? 100 : 200), 2);
    await checkExact(`${name} rollout == forward logprobs T=${temperature} top-p 0.9`, gpu, ps, runs, temperature);
  }
  const greedyRuns = await collect(gen, requests(ps, { temperature: 0, n: 1 }, 300));
  await checkExact(`${name} rollout == forward logprobs greedy`, gpu, ps, greedyRuns, 1, 30);

  // 2. Greedy tokens against the CPU generator, up to bf16 near-ties.
  const cgen = createGenerator(cpu, { numBlocks, blockSize: 4 });
  const cpuRuns = await collect(cgen, requests(ps, { temperature: 0, n: 1 }, 300));
  await cgen.close();
  let same = 0;
  let ties = 0;
  let real = 0;
  const notes: string[] = [];
  for (let i = 0; i < ps.length; i++) {
    const g = greedyRuns[i][0].tokens;
    const c = cpuRuns[i][0].tokens;
    let j = 0;
    while (j < g.length && j < c.length && g[j] === c[j]) j++;
    if (j === g.length && j === c.length) {
      same++;
      continue;
    }
    // The CPU's logits where the two first part: a near-tie is bf16 noise, not a bug.
    const seq = Int32Array.from([...ps[i], ...c.slice(0, j)]);
    const gap = top2Gap(await cpu.forward({ tokens: seq, seqLens: Int32Array.from([seq.length]) }, { logits: true }), seq.length - 1, V);
    if (gap <= GREEDY_TIE) ties++;
    else real++;
    notes.push(`prompt ${i} parts at token ${j} (top-2 gap ${gap.toExponential(2)})`);
  }
  report(real === 0, `${name} greedy tokens vs cpu generator`, `${same}/${ps.length} identical, ${ties} near-tie divergences, ${real} real${notes.length ? ': ' + notes.join('; ') : ''}`);

  // 2b. Greedy tokens against Hugging Face's generate (the fixture's greedy continuation), with the same near-tie
  // rule at the first divergence (the top-2 gap of the fp32 CPU engine's logits on HF's prefix).
  const ref = await readReference(dir);
  if (ref.greedyPrompt && ref.greedyTokens) {
    const [g] = await gen.generateAll({ prompt: ref.greedyPrompt, n: 1, maxNewTokens: ref.greedyTokens.length, temperature: 0, seed: 0, requestId: 350 });
    const want = ref.greedyTokens;
    let j = 0;
    while (j < g.tokens.length && j < want.length && g.tokens[j] === want[j]) j++;
    if (j === want.length && g.tokens.length === want.length) {
      report(true, `${name} greedy tokens vs HF generate`, `${want.length} tokens identical`);
    } else {
      const seq = Int32Array.from([...ref.greedyPrompt, ...want.slice(0, j)]);
      const gap = top2Gap(await cpu.forward({ tokens: seq, seqLens: Int32Array.from([seq.length]) }, { logits: true }), seq.length - 1, V);
      report(gap <= GREEDY_TIE, `${name} greedy tokens vs HF generate`, `parts at token ${j} of ${want.length} (top-2 gap ${gap.toExponential(2)}, tie below ${GREEDY_TIE})`);
    }
  }

  // 3. CUDA graphs vs eager: same requests and seeds, bit for bit; 5 samples per group and 4 groups give decode
  // batches from 20 rows down to 1 (buckets 32, 16, 8, 4, 2, 1).
  const big = requests(ps, { temperature: 0.8, topK: 20, n: 5 }, 400);
  const withGraphs = await collect(gen, big);
  const withoutGraphs = await collect(eager, big);
  let diff = 0;
  let total = 0;
  withGraphs.forEach((samples, i) =>
    samples.forEach((s, k) => {
      const e = withoutGraphs[i][k];
      total += s.tokens.length;
      if (s.tokens.length !== e.tokens.length) diff++;
      else s.tokens.forEach((t, j) => (diff += t !== e.tokens[j] || f32bits(s.logprobs[j]) !== f32bits(e.logprobs[j]) ? 1 : 0));
    }),
  );
  report(diff === 0, `${name} cuda graph == eager`, `${total} tokens, ${diff} differ`);
  await checkExact(`${name} rollout (graphs, 5 samples, top-k 20) == forward logprobs T=0.8`, gpu, ps, withGraphs, 0.8);

  // 4. Router replay: the rollout's experts for every fed row == the trainer forward's.
  if (gpu.moeLayerCount > 0) {
    const [s] = await gen.generateAll({ prompt: ps[3], n: 1, maxNewTokens: 6, temperature: 1, seed: 3, requestId: 500, returnExperts: true });
    const seq = Int32Array.from([...ps[3], ...s.tokens]);
    const f = await gpu.forward({ tokens: seq, seqLens: Int32Array.from([seq.length]) }, { experts: true });
    // forward: [ML, N, K]; the sample: [fed rows, ML, K] with fed rows = prompt + all tokens but the last.
    const ML = gpu.moeLayerCount;
    const N = seq.length;
    const K = f.experts.length / (ML * N);
    const fed = N - 1;
    let bad = 0;
    const got = s.experts ?? [];
    for (let r = 0; r < fed; r++)
      for (let l = 0; l < ML; l++)
        for (let k = 0; k < K; k++) bad += got[(r * ML + l) * K + k] === f.experts[(l * N + r) * K + k] ? 0 : 1;
    report(got.length === fed * ML * K && bad === 0, `${name} rollout experts == forward experts`, `${got.length} entries (want ${fed * ML * K}), ${bad} differ`);
  }

  // 4b. A weights-only engine (rollout alone) samples the same tokens with the same logprobs, bit for bit.
  {
    const wo = await Engine.fromHfFolder(dir, { device: 'cuda:0', weightsOnly: true });
    const wgen = createGenerator(wo, { numBlocks, blockSize: 4, stepsPerCall: 3 });
    const a = await collect(gen, requests(ps, { temperature: 1, topP: 0.9 }, 700));
    const b = await collect(wgen, requests(ps, { temperature: 1, topP: 0.9 }, 700));
    let n = 0;
    let differ = 0;
    a.forEach((samples, i) =>
      samples.forEach((x, k) => {
        const y = b[i][k];
        n += x.tokens.length;
        if (x.tokens.length !== y.tokens.length) differ++;
        else x.tokens.forEach((t, j) => (differ += t !== y.tokens[j] || f32bits(x.logprobs[j]) !== f32bits(y.logprobs[j]) ? 1 : 0));
      }),
    );
    report(differ === 0 && n > 0, `${name} weights-only rollout == full`, `${n} tokens, ${differ} differ`);
    await wgen.close();
    await wo.dispose();
  }

  // 5. Blocks back after completion; cancel.
  const st = gen.stats();
  report(st.freeBlocks === numBlocks && st.reservedBlocks === 0 && st.activeSamples === 0, `${name} kv blocks returned`, JSON.stringify(st));
  const long = gen.generateAll({ prompt: ps[1], n: 4, maxNewTokens: 400, temperature: 1, seed: 9, requestId: 600 });
  while (gen.stats().activeSamples === 0) await new Promise((res) => setTimeout(res, 1)); // prefilled, decoding
  gen.cancel(600);
  const cancelled = await long;
  const reasons = cancelled.map((s) => s.finishReason);
  const after = gen.stats();
  report(
    reasons.every((r) => r === 'cancelled' || r === 'stop') && reasons.includes('cancelled') && after.freeBlocks === numBlocks && after.reservedBlocks === 0,
    `${name} cancel`,
    `reasons ${reasons.join(',')}, tokens ${cancelled.map((s) => s.tokens.length).join(',')}, then ${JSON.stringify(after)}`,
  );
  await gen.close();
  await eager.close();
  await cpu.dispose();
  await gpu.dispose();
}

async function main(): Promise<void> {
  for (const name of FIXTURES) {
    try {
      await runFixture(name);
    } catch (e) {
      failures++;
      console.log(`FAIL ${name} threw: ${(e as Error).stack ?? e}`);
    }
  }
  console.log(`generate-gpu: ${failures} failure(s)`);
  process.exit(failures === 0 ? 0 : 1);
}

await main();
