// The native sampler against its definition (kernels/gen/sampling.h): distribution tests by chi-square
// against the sorted oracle, the oracle against an independent HF-style chained-filter implementation,
// greedy, logprobs, batch independence of the random streams, Philox known answers and parameter errors.
// Needs the addon: bash scripts/build-native.sh
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  createSampler,
  loadSamplerNative,
  SamplingParamsError,
  type SamplingParamsInput,
} from "./sampler.ts";

const native = loadSamplerNative();
const sampler = createSampler({ native });

// ---------------------------------------------------------------------------------------------------------
// Helpers

/** Small deterministic generator for test inputs (not the sampler's randomness). */
function inputRng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = Math.imul(s ^ (s >>> 15), s | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function gaussianLogits(V: number, scale: number, seed: number): Float32Array {
  const rand = inputRng(seed);
  const out = new Float32Array(V);
  for (let i = 0; i < V; i++) {
    const u = 1 - rand();
    out[i] = scale * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rand());
  }
  return out;
}

/** log_softmax(logits / T) in double; T as the engine sees it (fp32). */
function logSoftmax(logits: Float32Array, temperature: number): Float64Array {
  const T = Math.fround(temperature);
  const z = Float64Array.from(logits, (x) => x / T);
  let m = -Infinity;
  for (const x of z) m = Math.max(m, x);
  let s = 0;
  for (const x of z) s += Math.exp(x - m);
  const lse = m + Math.log(s);
  return z.map((x) => x - lse);
}

/**
 * Independent oracle: the HF/vLLM warper chain applied literally on probabilities in double. top-k keeps
 * the k largest (plus ties), top-p runs over the renormalised survivors and removes, in ascending order,
 * tokens whose inclusive cumulative mass is <= 1 - p, min-p removes probs < minP * max.
 */
function chainedFilterOracle(logits: Float32Array, p: Required<SamplingParamsInput>): Float64Array {
  const V = logits.length;
  let probs = logSoftmax(logits, p.temperature).map(Math.exp);
  const renorm = (keep: (i: number) => boolean) => {
    let s = 0;
    for (let i = 0; i < V; i++) if (keep(i)) s += probs[i];
    probs = probs.map((x, i) => (keep(i) ? x / s : 0));
  };
  if (p.topK > 0 && p.topK < V) {
    const kth = [...probs].sort((a, b) => b - a)[p.topK - 1];
    renorm((i) => probs[i] >= kth);
  }
  if (p.topP < 1) {
    const asc = [...probs.keys()].filter((i) => probs[i] > 0).sort((a, b) => probs[a] - probs[b]);
    const removed = new Set<number>();
    let cum = 0;
    for (let j = 0; j < asc.length - 1; j++) {
      cum += probs[asc[j]];
      if (cum <= 1 - p.topP) removed.add(asc[j]);
    }
    renorm((i) => probs[i] > 0 && !removed.has(i));
  }
  if (p.minP > 0) {
    const max = Math.max(...probs);
    renorm((i) => probs[i] >= p.minP * max);
  }
  return probs;
}

/** Chi-square statistic of observed counts against n * q; bins with expected < 5 are pooled. */
function chiSquare(counts: number[], q: Float64Array, n: number): { stat: number; df: number } {
  const bins: { o: number; e: number }[] = [];
  for (let i = 0; i < q.length; i++) {
    if (q[i] === 0) {
      if (counts[i] > 0) return { stat: Infinity, df: 1 };
      continue;
    }
    bins.push({ o: counts[i], e: n * q[i] });
  }
  bins.sort((a, b) => a.e - b.e);
  const pooled: { o: number; e: number }[] = [];
  let acc = { o: 0, e: 0 };
  for (const b of bins) {
    acc = { o: acc.o + b.o, e: acc.e + b.e };
    if (acc.e >= 5) pooled.push(acc), (acc = { o: 0, e: 0 });
  }
  if (acc.e > 0) {
    if (pooled.length) pooled[pooled.length - 1] = { o: pooled[pooled.length - 1].o + acc.o, e: pooled[pooled.length - 1].e + acc.e };
    else pooled.push(acc);
  }
  let stat = 0;
  for (const b of pooled) stat += ((b.o - b.e) * (b.o - b.e)) / b.e;
  return { stat, df: pooled.length - 1 };
}

/** Upper alpha = 1e-3 quantile of chi-square(df), Wilson-Hilferty (within ~1% for df >= 3). */
function chiSquareCritical(df: number): number {
  const z = 3.090232; // standard normal upper 1e-3 quantile
  const a = 2 / (9 * df);
  return df * Math.pow(1 - a + z * Math.sqrt(a), 3);
}

function full(p: SamplingParamsInput): Required<SamplingParamsInput> {
  return { temperature: 1, topK: 0, topP: 1, minP: 0, ...p };
}

function support(q: Float64Array): number[] {
  return [...q.keys()].filter((i) => q[i] > 0);
}

async function drawMany(logits: Float32Array, base: SamplingParamsInput, n: number) {
  const V = logits.length;
  const batch = new Float32Array(n * V);
  for (let r = 0; r < n; r++) batch.set(logits, r * V);
  // Each draw is its own decode step of one request: n independent streams.
  const params = Array.from({ length: n }, (_, r) => ({ ...base, step: r }));
  const res = await sampler.sampleRows(batch, V, params);
  const counts = new Array<number>(V).fill(0);
  for (const t of res.tokens) counts[t]++;
  return { counts, res };
}

// ---------------------------------------------------------------------------------------------------------
// Philox

test("philox4x32-10 reproduces Random123's known-answer vectors", () => {
  const kat: [number[], number[], number[]][] = [
    [[0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]],
    [[0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]],
    [[0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0], [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]],
  ];
  for (const [ctr, key, want] of kat) {
    assert.deepEqual([...native.philox4x32(Uint32Array.from(ctr), Uint32Array.from(key))], want);
  }
});

// ---------------------------------------------------------------------------------------------------------
// Distribution

const V = 120;
const ROW = gaussianLogits(V, 2.0, 1234);
const N = 40_000;
const STREAM = { seed: 20261127n, requestId: 77n, sampleIndex: 3, step: 0 };

// Each case: its params and, for the power check, a neighbouring configuration whose distribution differs.
const CASES: { name: string; params: SamplingParamsInput; alternative: SamplingParamsInput }[] = [
  { name: "top-k", params: { ...STREAM, topK: 12 }, alternative: { ...STREAM, topK: 13 } },
  { name: "top-p", params: { ...STREAM, topP: 0.75 }, alternative: { ...STREAM, topP: 0.8 } },
  { name: "min-p", params: { ...STREAM, minP: 0.08 }, alternative: { ...STREAM, minP: 0.06 } },
  {
    name: "top-k + top-p",
    params: { ...STREAM, temperature: 0.8, topK: 25, topP: 0.85 },
    // top-p over the full distribution instead of over the renormalised top-k set
    alternative: { ...STREAM, temperature: 0.8, topP: 0.85 },
  },
  {
    // min-p sets the starting pivot, top-p is the binding cut and runs the rejection rounds
    name: "top-p + min-p",
    params: { ...STREAM, temperature: 1.1, topP: 0.85, minP: 0.03 },
    alternative: { ...STREAM, temperature: 1.1, topP: 0.9, minP: 0.03 },
  },
  {
    name: "top-k + top-p + min-p",
    params: { ...STREAM, temperature: 1.3, topK: 30, topP: 0.9, minP: 0.03 },
    alternative: { ...STREAM, temperature: 1.3, topP: 0.9, minP: 0.03 },
  },
];

test("the sorted oracle matches an independent HF-style chain of warpers", () => {
  for (const c of CASES) {
    const q = sampler.filteredProbs(ROW, c.params);
    const ref = chainedFilterOracle(ROW, full(c.params));
    assert.deepEqual(support(q), support(ref), `${c.name}: kept sets differ`);
    for (let i = 0; i < V; i++) assert.ok(Math.abs(q[i] - ref[i]) < 1e-6, `${c.name}: prob of ${i} ${q[i]} vs ${ref[i]}`);
  }
});

test("each case cuts the row and differs from its alternative", () => {
  // Otherwise a case would test nothing, or its power check would compare a distribution with itself.
  for (const c of CASES) {
    const kept = support(sampler.filteredProbs(ROW, c.params)).length;
    const alt = support(sampler.filteredProbs(ROW, c.alternative)).length;
    assert.ok(kept > 1 && kept < V, `${c.name}: keeps ${kept} of ${V}`);
    assert.notEqual(kept, alt, `${c.name}: the alternative keeps the same set`);
  }
});

test("filters combine as a chain: top-p runs over the renormalised top-k set, min-p intersects", () => {
  const kept = (p: SamplingParamsInput) => support(sampler.filteredProbs(ROW, p));
  const base = { ...STREAM, temperature: 1.3 };
  const all = kept({ ...base, topK: 30, topP: 0.9, minP: 0.03 });
  const topPAlone = kept({ ...base, topP: 0.9 });
  const topKAlone = kept({ ...base, topK: 30 });
  // Renormalising over the top-k set shrinks the top-p cut below both single-filter cuts.
  assert.ok(all.length < Math.min(topPAlone.length, topKAlone.length), `${all.length} vs ${topPAlone.length}, ${topKAlone.length}`);
  // min-p keeps everything the others keep here, so adding it changes nothing.
  assert.deepEqual(kept({ ...base, topK: 30, topP: 0.9 }), all);
  // When min-p is the strictest filter the result is exactly the min-p set.
  assert.deepEqual(kept({ ...base, topK: 30, topP: 0.9, minP: 0.3 }), kept({ ...base, minP: 0.3 }));
});

for (const c of CASES) {
  test(`${c.name}: ${N} draws fit the filtered distribution (chi-square, alpha 1e-3)`, async (t) => {
    const q = sampler.filteredProbs(ROW, c.params);
    const { counts, res } = await drawMany(ROW, c.params, N);
    for (let i = 0; i < V; i++) {
      if (q[i] === 0) assert.equal(counts[i], 0, `token ${i} is outside the filtered support but was drawn`);
    }
    const { stat, df } = chiSquare(counts, q, N);
    const crit = chiSquareCritical(df);
    assert.ok(stat < crit, `chi-square ${stat.toFixed(1)} >= critical ${crit.toFixed(1)} (df ${df})`);
    // Power: the same draws reject the neighbouring configuration.
    const alt = chiSquare(counts, sampler.filteredProbs(ROW, c.alternative), N);
    assert.ok(alt.stat > chiSquareCritical(alt.df), `the test cannot tell ${c.name} from its alternative`);
    let sum = 0;
    let max = 0;
    for (const r of res.rounds) (sum += r), (max = Math.max(max, r));
    t.diagnostic(`support ${support(q).length}, chi2 ${stat.toFixed(1)} (df ${df}, crit ${crit.toFixed(1)}), alt chi2 ${alt.stat.toFixed(0)}, rounds mean ${(sum / N).toFixed(3)} max ${max}`);
    assert.ok(sum / N < 4 && max <= 32, `rejection rounds: mean ${sum / N}, max ${max}`);
  });
}

test("ties at the k-th probability are all kept", async () => {
  const flat = new Float32Array(10).fill(0.5);
  flat[7] = 3; // one clear winner, then nine tied tokens
  const p = { ...STREAM, topK: 3 };
  const q = sampler.filteredProbs(flat, p);
  assert.equal(support(q).length, 10);
  const { counts } = await drawMany(flat, p, 5000);
  assert.equal(counts.filter((c) => c > 0).length, 10);
});

test("top-p keeps tokens tied at the cut together", () => {
  const logits = Float32Array.from([2, 1, 1, 1, 0, -1]);
  const probs = logSoftmax(logits, 1).map(Math.exp);
  // The top token alone falls just short of top-p, so the cut lands inside the three-way tie.
  const q = sampler.filteredProbs(logits, { ...STREAM, topP: probs[0] + 0.01 });
  assert.deepEqual(support(q), [0, 1, 2, 3]);
  assert.deepEqual(support(sampler.filteredProbs(logits, { ...STREAM, topP: probs[0] - 0.01 })), [0]);
});

test("a full-size vocabulary row samples inside the filtered support", async () => {
  const vocab = 151_936;
  const rows = 8;
  const logits = gaussianLogits(rows * vocab, 3.0, 4242);
  const params = Array.from({ length: rows }, (_, r) => ({ ...STREAM, step: r, topK: 50, topP: 0.95, minP: r % 2 ? 0.01 : 0 }));
  const res = await sampler.sampleRows(logits, vocab, params);
  for (let r = 0; r < rows; r++) {
    const row = logits.subarray(r * vocab, (r + 1) * vocab);
    assert.ok(sampler.filteredProbs(row, params[r])[res.tokens[r]] > 0, `row ${r}: token ${res.tokens[r]} outside the support`);
    assert.ok(Math.abs(res.logprobs[r] - logSoftmax(row, 1)[res.tokens[r]]) < 1e-5, `row ${r}: logprob`);
  }
});

test("a token more than 86 nats below the max has weight 0, one just above keeps its tiny weight", () => {
  // gen/sampling.h step 1: weights under e^-86 are 0 (at T = 1, z - max z is exact).
  const logits = Float32Array.from([3, 3 - 86.5, 3 - 85.5, 3 - 200, 3 - 86]);
  const q = sampler.filteredProbs(logits, { ...STREAM, temperature: 1 });
  assert.equal(q[1], 0);
  assert.equal(q[3], 0);
  assert.ok(q[2] > 0 && Math.abs(q[2] / Math.exp(-85.5) - 1) < 1e-6, `q[2] ${q[2]}`);
  assert.ok(q[4] > 0, "exactly at the floor the weight is kept");
  assert.deepEqual(support(q), [0, 2, 4]);
});

test("min-p keeps a token whose probability is exactly min-p times the max", async () => {
  const logits = Float32Array.from([0, -2.5, -1.25, -4, 0.5, -3]);
  // Weight of token 2 exactly as the engine forms it: fp32(exp(logit - max logit)).
  const minP = Math.fround(Math.exp(logits[2] - 0.5));
  const p = { ...STREAM, minP };
  const q = sampler.filteredProbs(logits, p);
  assert.deepEqual(support(q), [0, 2, 4]);
  const { counts } = await drawMany(logits, p, 3000);
  assert.ok(counts[2] > 0 && counts[1] === 0 && counts[3] === 0 && counts[5] === 0, `counts ${counts}`);
});

test("rejection rounds stay few on a flat row with a tight top-k", async (t) => {
  // Nearly uniform weights: the first draw is rarely in the top 2, so the pivots must do the work.
  const row = gaussianLogits(4000, 0.05, 99);
  const { res } = await drawMany(row, { ...STREAM, topK: 2 }, 2000);
  let sum = 0;
  let max = 0;
  for (const r of res.rounds) (sum += r), (max = Math.max(max, r));
  t.diagnostic(`V 4000, top-k 2: rounds mean ${(sum / 2000).toFixed(2)} max ${max}`);
  // Dual pivot: about 4 on average here; a single pivot (low := drawn weight only) needs about 8, max 18.
  assert.ok(sum / 2000 < 6 && max <= 12, `rounds mean ${sum / 2000}, max ${max}`);
  const q = sampler.filteredProbs(row, { ...STREAM, topK: 2 });
  for (const tok of res.tokens) assert.ok(q[tok] > 0, `token ${tok} outside the top-2`);
});

// ---------------------------------------------------------------------------------------------------------
// Greedy and logprobs

test("temperature 0 is argmax, lowest index on ties, logprob at temperature 1", async () => {
  const row = gaussianLogits(50, 1.5, 7);
  let best = 0;
  for (let i = 1; i < 50; i++) if (row[i] > row[best]) best = i;
  const tied = row.slice();
  tied[best + 1 < 50 ? best + 1 : best - 1] = row[best]; // a second maximum
  const lowest = Math.min(best, best + 1 < 50 ? best + 1 : best - 1);
  const res = await sampler.sampleRows(
    Float32Array.from([...row, ...tied]),
    50,
    [{ ...STREAM, temperature: 0 }, { ...STREAM, temperature: 0, topK: 5, topP: 0.5 }],
  );
  assert.deepEqual([...res.tokens], [best, lowest]);
  assert.ok(Math.abs(res.logprobs[0] - logSoftmax(row, 1)[best]) < 1e-6);
  assert.ok(Math.abs(res.logprobs[1] - logSoftmax(tied, 1)[lowest]) < 1e-6);
  assert.deepEqual([...res.rounds], [0, 0]);
});

test("logprob is log_softmax(logits / T)[token] over the full vocabulary", async () => {
  const rows = 64;
  const logits = gaussianLogits(rows * V, 3.0, 5);
  const temps = [0.3, 0.7, 1, 1.6];
  const params = Array.from({ length: rows }, (_, r) => ({
    ...STREAM,
    step: r,
    temperature: temps[r % 4],
    topK: r % 3 === 0 ? 10 : 0,
    topP: r % 2 === 0 ? 0.8 : 1,
  }));
  const res = await sampler.sampleRows(logits, V, params);
  for (let r = 0; r < rows; r++) {
    const lp = logSoftmax(logits.subarray(r * V, (r + 1) * V), params[r].temperature);
    const want = lp[res.tokens[r]];
    assert.ok(Math.abs(res.logprobs[r] - want) < 1e-6, `row ${r}: ${res.logprobs[r]} vs ${want}`);
  }
});

// ---------------------------------------------------------------------------------------------------------
// Random streams

test("a row's token does not depend on the batch it sits in", async () => {
  const probe = { ...STREAM, requestId: 5n, sampleIndex: 2, step: 17, topK: 30, topP: 0.9, minP: 0.01 };
  const probeRow = gaussianLogits(V, 2.5, 31);
  const alone = await sampler.sampleRows(probeRow, V, [probe]);
  for (const [size, at] of [[7, 3], [64, 0], [64, 63], [257, 128]]) {
    const logits = gaussianLogits(size * V, 2.0, 1000 + size);
    logits.set(probeRow, at * V);
    const params: SamplingParamsInput[] = Array.from({ length: size }, (_, r) => ({
      ...STREAM,
      requestId: BigInt(r),
      sampleIndex: r % 5,
      step: r,
      topP: 0.95,
    }));
    params[at] = probe;
    const res = await sampler.sampleRows(logits, V, params);
    assert.equal(res.tokens[at], alone.tokens[0], `batch ${size} at ${at}`);
    assert.equal(res.logprobs[at], alone.logprobs[0]);
    assert.equal(res.rounds[at], alone.rounds[0]);
  }
});

test("sample indices, requests and seeds give different streams; the same identity repeats", async () => {
  const steps = 300;
  const run = async (over: Partial<SamplingParamsInput>) => {
    const batch = new Float32Array(steps * V);
    for (let s = 0; s < steps; s++) batch.set(ROW, s * V);
    const params = Array.from({ length: steps }, (_, s) => ({ ...STREAM, ...over, step: s }));
    return [...(await sampler.sampleRows(batch, V, params)).tokens];
  };
  const a = await run({ sampleIndex: 0 });
  assert.deepEqual(await run({ sampleIndex: 0 }), a);
  for (const other of [{ sampleIndex: 1 }, { requestId: 78n }, { seed: 20261128n }, { seed: 20261127n + (1n << 32n) }]) {
    const b = await run({ sampleIndex: 0, ...other });
    const same = a.filter((t, i) => t === b[i]).length;
    // Independent draws from ROW's softmax agree with probability sum(p^2) (about 0.1 here).
    assert.ok(same < steps * 0.3, `${JSON.stringify(other, (_, v) => (typeof v === "bigint" ? `${v}` : v))}: ${same} of ${steps} equal`);
  }
});

// ---------------------------------------------------------------------------------------------------------
// Errors

test("bad parameters are rejected with errors that name the field", async () => {
  const one = (p: Partial<SamplingParamsInput> & Record<string, unknown>) =>
    sampler.sampleRows(ROW, V, [{ ...STREAM, ...p } as SamplingParamsInput]);
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ temperature: -0.5 }, /temperature must be >= 0/],
    [{ temperature: NaN }, /temperature must be a finite number/],
    [{ topP: 0 }, /topP must be in \(0, 1\]/],
    [{ topP: 1.2 }, /topP must be in \(0, 1\]/],
    [{ minP: 1 }, /minP must be in \[0, 1\)/],
    [{ minP: -0.1 }, /minP must be in \[0, 1\)/],
    [{ topK: 2.5 }, /topK must be an integer/],
    [{ topK: -1 }, /topK must be an integer/],
    [{ sampleIndex: 65536 }, /sampleIndex must be an integer in \[0, 65535\]/],
    [{ step: -1 }, /step must be an integer/],
    [{ seed: -1n }, /seed must be in \[0, 2\^64\)/],
    [{ requestId: 1.5 }, /requestId must be a bigint or a safe integer/],
    [{ top_p: 0.5 }, /unknown field 'top_p'/],
  ];
  for (const [p, re] of cases) {
    await assert.rejects(one(p), (e: Error) => e instanceof SamplingParamsError && re.test(e.message) && /params\[0\]/.test(e.message));
  }
  await assert.rejects(sampler.sampleRows(ROW, V + 1, [STREAM]), /logits has 120 elements, expected rows \* vocab = 1 \* 121/);
  assert.throws(() => sampler.filteredProbs(ROW, { ...STREAM, topP: 2 }), SamplingParamsError);
});

test("bad logits are rejected by the engine with the row named", async () => {
  const two = new Float32Array(2 * V);
  two.set(ROW, 0);
  two.set(ROW, V);
  two[V + 4] = NaN;
  await assert.rejects(
    sampler.sampleRows(two, V, [STREAM, { ...STREAM, step: 1 }]),
    (e: Error & { code?: string }) =>
      e.name === "EngineError" && e.code === "INVALID_ARGUMENT" && /row 1: logits contain NaN at index 4/.test(e.message),
  );
  await assert.rejects(
    sampler.sampleRows(new Float32Array(V).fill(-Infinity), V, [STREAM]),
    /all -inf/,
  );
});

test("the native layer checks its own arguments", () => {
  // Direct native calls bypass TS validation: the engine must still refuse, not misbehave.
  assert.throws(
    () => native.filteredProbs(ROW, { ...full(STREAM), seed: 1n, requestId: 0n, topP: 0 } as never),
    (e: Error & { code?: string }) => e.name === "EngineError" && e.code === "INVALID_ARGUMENT" && /top_p/.test(e.message),
  );
  assert.throws(() => native.filteredProbs(ROW, { ...full(STREAM), seed: 1 } as never), /field 'seed' must be a bigint/);
});
