// The GPU engine against the CPU engine and the Hugging Face fixtures, run on the GPU machine with Node
// (bundled by scripts/device/bundle.sh: the machine has no node_modules). For each fixture: forward outputs,
// GRPO and SFT losses and every gradient (bf16 tolerances: relative L2 error per tensor), the load-balancing
// loss and its router gradient, router replay, a few AdamW steps tracking the CPU engine, and two identical runs
// giving identical bits. Prints one line per check; exit status 1 on any failure.
//
// Usage: MOEPILOT_ADDON=<moepilot.node> node model-gpu.mjs [fixtures folder [fixture name...]]
import path from 'node:path';

import { Engine, type LossInput, type PackedBatch } from '../../src/engine/engine.ts';
import { readReference, type Reference } from '../../src/oracle/model-oracle.ts';
import { SafetensorsFile } from '../../src/hf/safetensors.ts';

// Per-tensor gradient tolerance: bf16 GEMM operands against an fp32 CPU engine. Measured on an H100 (run 3 of the
// gpuengine session): worst 2.67e-2 (q/k-norm weights and router gates, small-gradient tensors that sum every
// row's bf16-rounded terms); every other quantity stays within 1e-2.
const TOL = { tensor: 3e-2, loss: 1e-2 };
const fixturesDir = process.argv[2] ?? path.join(process.env.REPO_ROOT ?? process.cwd(), 'test/fixtures');
// Fixture folders under fixturesDir: the project's four by default, or the names given after it (e.g. a larger
// model made on the GPU machine by scripts/make-fixtures.py).
const FIXTURES = process.argv.length > 3 ? process.argv.slice(3) : ['recomputed/qwen2_moe-tiny', 'qwen3_moe-tiny', 'mixtral-tiny', 'qwen2_moe-sparse-step'];

let failures = 0;
function report(ok: boolean, what: string, detail: string): void {
  if (!ok) failures++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}: ${detail}`);
}

/** ||a - e|| / max(||e||, floor), with the worst element. */
function relL2(a: ArrayLike<number>, e: ArrayLike<number>, floor = 0): { err: number; at: number; got: number; want: number } {
  if (a.length !== e.length) return { err: Infinity, at: -1, got: a.length, want: e.length };
  let num = 0;
  let den = 0;
  let worst = -1;
  let at = 0;
  for (let i = 0; i < e.length; i++) {
    const d = a[i] - e[i];
    num += d * d;
    den += e[i] * e[i];
    if (!(Math.abs(d) <= worst)) {
      worst = Math.abs(d);
      at = i;
    }
  }
  const err = Math.sqrt(num) / Math.max(Math.sqrt(den), floor, 1e-30);
  return { err: Number.isFinite(err) ? err : Infinity, at, got: a[at], want: e[at] };
}

function checkTensor(what: string, got: ArrayLike<number>, want: ArrayLike<number>, tol = TOL.tensor, floor = 0): void {
  const r = relL2(got, want, floor);
  report(r.err <= tol, what, `rel_l2 ${r.err.toExponential(3)} (tol ${tol}) worst at ${r.at}: got ${r.got} want ${r.want}`);
}

function checkScalar(what: string, got: number, want: number, tol = TOL.loss): void {
  const err = Math.abs(got - want) / Math.max(Math.abs(want), 1e-12);
  report(err <= tol, what, `got ${got} want ${want} rel ${err.toExponential(3)} (tol ${tol})`);
}

/** Per-tensor gradient errors: each tensor's rel L2 with a floor of 1e-2 of the largest tensor norm. */
function checkGrads(what: string, got: Map<string, Float32Array>, want: Map<string, Float32Array>): void {
  let maxNorm = 0;
  for (const e of want.values()) {
    let s = 0;
    for (let i = 0; i < e.length; i++) s += e[i] * e[i];
    maxNorm = Math.max(maxNorm, Math.sqrt(s));
  }
  const errs: { name: string; err: number; detail: string }[] = [];
  for (const [name, e] of want) {
    const g = got.get(name);
    if (!g) {
      errs.push({ name, err: Infinity, detail: 'missing' });
      continue;
    }
    const r = relL2(g, e, 1e-2 * maxNorm);
    errs.push({ name, err: r.err, detail: `at ${r.at}: got ${r.got} want ${r.want}` });
  }
  errs.sort((a, b) => b.err - a.err);
  const bad = errs.filter((x) => !(x.err <= TOL.tensor)).length;
  const top = errs.slice(0, bad > 0 ? 3 : 1).map((x) => `${x.name} ${x.err.toExponential(2)} (${x.detail})`);
  report(bad === 0, what, `${want.size} tensors, ${bad} over ${TOL.tensor}; worst ${top.join('; ')}`);
}

async function readGradFile(file: string, names: Iterable<string>): Promise<Map<string, Float32Array>> {
  const f = await SafetensorsFile.open(file);
  try {
    const out = new Map<string, Float32Array>();
    for (const n of names) out.set(n, await f.read(n));
    return out;
  } finally {
    await f.close();
  }
}

function copyGrads(e: Engine): Map<string, Float32Array> {
  return new Map([...e.gradsByName()].map(([n, g]) => [n, new Float32Array(g)]));
}

function bitsEqual(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

// Losses and gradients run with the CPU engine's routing replayed on both engines: a token whose top-k differs
// (a near-tie the bf16 router logits resolve the other way) would move whole rows of gradient between experts,
// which is routing, not arithmetic. Routing itself is checked on the forward above.
async function lossAndGrads(e: Engine, batch: PackedBatch, loss: LossInput) {
  await e.zeroGrad();
  const r = await e.forwardBackward(batch, loss);
  await e.syncToHost();
  return { r, grads: copyGrads(e) };
}

/** bf16 rounding (nearest even) of an fp32 value, as the device's cast does. */
function bf16Round(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer);
  u[0] = (u[0] + 0x7fff + ((u[0] >>> 16) & 1)) & 0xffff0000;
  return f[0];
}

// A weights-only copy (forward and rollout alone) holds the same bf16 weights and fp32 dense tensors as the full
// copy, so its forward gives the same bits; it takes the bf16 weights plus the dense fp32 range on the device (a
// full copy adds fp32 weights and gradients for everything); training calls are refused with a clear error; a
// download gives the dense tensors exactly and the experts rounded to bf16.
async function checkWeightsOnly(name: string, dir: string, gpu: Engine, cpu: Engine, ref: Reference, fg: Awaited<ReturnType<Engine['forward']>>): Promise<void> {
  const before = gpu.deviceMemory().current;
  const wo = await Engine.fromHfFolder(dir, { device: 'cuda:0', weightsOnly: true });
  try {
    const held = gpu.deviceMemory().current - before;
    let total = 0;
    let dense = 0;
    for (const p of wo.paramTable) {
      total += p.numel;
      if (p.kind === 'dense') dense += p.numel;
    }
    const bound = 2 * total + 4 * dense + (4 << 20);  // + the padded router copies, RoPE tables, norm scratch
    report(held <= bound, `${name} weights-only device memory`, `${held} bytes held after loading (bound ${bound}; a full copy needs ${10 * total} for weights and gradients alone)`);
    const fw = await wo.forward(ref.batch, { logits: true, logprobs: true, experts: true });
    report(bitsEqual(fw.logits, fg.logits) && bitsEqual(fw.logprobs, fg.logprobs), `${name} weights-only forward`, 'logits and logprobs: same bits as the full copy');
    const refused = await wo.forwardBackward(ref.batch, { type: 'sft', mask: ref.mask ?? new Float32Array(ref.batch.tokens.length).fill(1) }).then(
      () => 'no error',
      (e: { name?: string; code?: string; message?: string }) => (e.code === 'INVALID_ARGUMENT' && /weights only/.test(e.message ?? '') ? '' : `${e.name} ${e.code}: ${e.message}`),
    );
    report(refused === '', `${name} weights-only refuses training`, refused || 'forwardBackward rejected with INVALID_ARGUMENT');
    await wo.syncToHost();
    let bad = 0;
    let first = '';
    for (const p of wo.paramTable) {
      for (let i = 0; i < p.numel; i++) {
        const want = p.kind === 'dense' ? cpu.params[p.offset + i] : bf16Round(cpu.params[p.offset + i]);
        if (Object.is(wo.params[p.offset + i], want)) continue;
        if (!bad++) first = `${p.name}[${i}]: got ${wo.params[p.offset + i]} want ${want}`;
      }
    }
    report(bad === 0, `${name} weights-only download`, bad ? `${bad} values differ; first ${first}` : 'dense exact, experts bf16-rounded');
  } finally {
    await wo.dispose();
  }
}

// bf16 expert gradients (toDevice's expertGradDtype). The first backward after zeroGrad overwrites them, so each
// routed expert's gradient is the fp32 engine's rounded to bf16, bit for bit, and every other gradient and the
// logprobs keep their bits. A second backward without zeroGrad adds with one rounding (bf16(old + product)): within
// bf16 rounding of the fp32 engine's sum. The device holds less (the experts' gradients in half the bytes), and an
// AdamW step reads them widened: its norm within bf16 rounding of the fp32 engine's.
async function checkExpertGradsBf16(name: string, dir: string, probe: Engine, rb: PackedBatch, loss: LossInput, ga: Awaited<ReturnType<typeof lossAndGrads>>): Promise<void> {
  // (deviceMemory counts the process's allocations on the device: each engine's share is the growth it made)
  const m0 = probe.deviceMemory().current;
  const gpu = await Engine.fromHfFolder(dir, { device: 'cuda:0' });  // fp32 gradients, fresh (the caller's has stepped)
  const m1 = gpu.deviceMemory().current;
  const b16 = await Engine.fromHfFolder(dir, { device: 'cuda:0', expertGradDtype: 'bfloat16' });
  const m2 = b16.deviceMemory().current;
  try {
    const expertNumel = b16.paramTable.filter((p) => p.kind === 'expert').reduce((a, p) => a + p.numel, 0);
    const saved = m1 - m0 - (m2 - m1);
    report(saved >= 2 * expertNumel, `${name} bf16 expert grads device memory`, `${saved} bytes less than the fp32 engine (experts' gradients: ${4 * expertNumel} bytes in fp32)`);
    const gb = await lossAndGrads(b16, rb, loss);
    let bad = 0;
    let first = '';
    for (const p of b16.paramTable) {
      const got = gb.grads.get(p.name)!, want = ga.grads.get(p.name)!;
      const ok = p.kind === 'expert' ? got.every((v, i) => Object.is(v, bf16Round(want[i]))) : bitsEqual(got, want);
      if (!ok && bad++ === 0) first = p.name;
    }
    const sameLp = bitsEqual(gb.r.logprobs, ga.r.logprobs) && gb.r.loss === ga.r.loss;
    report(bad === 0 && sameLp, `${name} bf16 expert grads (one backward)`, bad || !sameLp ? `${bad} tensors differ, first ${first}; logprobs and loss ${sameLp ? 'equal' : 'differ'}` : 'experts: the fp32 gradients rounded; the rest: identical bits');
    // Accumulation over two backwards, against the fp32 engine's two.
    await gpu.zeroGrad();
    await b16.zeroGrad();
    for (let i = 0; i < 2; i++) {
      await gpu.forwardBackward(rb, loss);
      await b16.forwardBackward(rb, loss);
    }
    await gpu.syncToHost();
    await b16.syncToHost();
    const g32 = copyGrads(gpu), g16 = copyGrads(b16);
    let worst = 0;
    let where = '';
    for (const p of b16.paramTable) {
      if (p.kind !== 'expert') continue;
      const got = g16.get(p.name)!, want = g32.get(p.name)!;
      let scale = 0;
      for (const v of want) scale = Math.max(scale, Math.abs(v));
      for (let i = 0; i < got.length; i++) {
        const err = Math.abs(got[i] - want[i]) / (Math.abs(want[i]) + 1e-3 * scale + 1e-30);
        if (err > worst) (worst = err), (where = `${p.name}[${i}] ${got[i]} vs ${want[i]}`);
      }
    }
    report(worst <= 2 ** -7, `${name} bf16 expert grads (two backwards accumulated)`, `worst relative error ${worst.toExponential(3)} (tol ${2 ** -7}) at ${where}`);
    const opt = { lr: 1e-3, weightDecay: 0.01, maxGradNorm: 1.0 };
    const n32 = await gpu.adamwStep(opt);
    const n16 = await b16.adamwStep(opt);
    checkScalar(`${name} bf16 expert grads adamw grad norm vs fp32`, n16, n32, 1e-2);
  } finally {
    await b16.dispose();
    await gpu.dispose();
  }
}

async function runFixture(name: string): Promise<void> {
  const dir = path.join(fixturesDir, name);
  const ref = await readReference(dir);
  const cpu = await Engine.fromHfFolder(dir);
  const gpu = await Engine.fromHfFolder(dir, { device: 'cuda:0' });
  report(gpu.device === 'cuda:0', `${name} device`, gpu.device);
  const req = { logits: true, logprobs: true, routerLogits: true, experts: true, entropy: true };
  const fc = await cpu.forward(ref.batch, req);
  const t0 = performance.now();
  const fg = await gpu.forward(ref.batch, req);
  const ms = performance.now() - t0;
  checkTensor(`${name} logits vs cpu`, fg.logits, fc.logits);
  if (ref.logits) checkTensor(`${name} logits vs fixture`, fg.logits, ref.logits);
  const lastRows = new Set<number>();
  let o = 0;
  for (const l of ref.batch.seqLens) lastRows.add((o += l) - 1);
  checkTensor(`${name} logprobs vs cpu`, fg.logprobs, fc.logprobs);
  if (ref.logprobs) checkTensor(`${name} logprobs vs fixture`, fg.logprobs.map((v, i) => (lastRows.has(i) ? 0 : v)), ref.logprobs);
  checkTensor(`${name} entropy vs cpu`, fg.entropy, fc.entropy);
  checkTensor(`${name} router logits vs cpu`, fg.routerLogits, fc.routerLogits);
  if (ref.routerLogits) checkTensor(`${name} router logits vs fixture`, fg.routerLogits, ref.routerLogits);
  let same = 0;
  for (let i = 0; i < fc.experts.length; i++) same += fc.experts[i] === fg.experts[i] ? 1 : 0;
  report(same >= 0.97 * fc.experts.length, `${name} experts vs cpu`, `${same}/${fc.experts.length} equal (forward ${ms.toFixed(1)} ms)`);
  const tokSum = fg.expertTokens.reduce((a, b) => a + b, 0);
  report(tokSum === fg.experts.length, `${name} expert tokens`, `sum ${tokSum}, expected ${fg.experts.length}`);

  // Router replay of the GPU's own experts changes nothing, bit for bit.
  if (gpu.moeLayerCount > 0) {
    const fr = await gpu.forward({ ...ref.batch, replayExperts: fg.experts }, { logprobs: true });
    report(bitsEqual(fr.logprobs, fg.logprobs), `${name} replay of own experts`, 'identical logprobs');
    // Replaying the CPU's experts: logprobs track the CPU's.
    const frc = await gpu.forward({ ...ref.batch, replayExperts: fc.experts }, { logprobs: true });
    checkTensor(`${name} replay of cpu experts logprobs vs cpu`, frc.logprobs, fc.logprobs);
  }
  await checkWeightsOnly(name, dir, gpu, cpu, ref, fg);
  // Temperature: logprobs of logits / T.
  const fcT = await cpu.forward(ref.batch, { logprobs: true, entropy: true, temperature: 0.7 });
  const fgT = await gpu.forward(ref.batch, { logprobs: true, entropy: true, temperature: 0.7 });
  checkTensor(`${name} logprobs T=0.7 vs cpu`, fgT.logprobs, fcT.logprobs);
  checkTensor(`${name} entropy T=0.7 vs cpu`, fgT.entropy, fcT.entropy);

  // Losses and gradients (with the CPU's routing, see lossAndGrads), and once without replay (loss only).
  const rb: PackedBatch = gpu.moeLayerCount > 0 ? { ...ref.batch, replayExperts: fc.experts } : ref.batch;
  if (ref.mask) {
    const sft: LossInput = { type: 'sft', mask: ref.mask, auxLossCoef: 0 };
    await cpu.zeroGrad();
    await gpu.zeroGrad();
    const c = await cpu.forwardBackward(ref.batch, sft);
    const g = await gpu.forwardBackward(ref.batch, sft);
    checkScalar(`${name} sft loss (own routing) vs cpu`, g.loss, c.loss);
  }
  if (ref.grpo && ref.mask) {
    const grpo: LossInput = { ...ref.grpo, mask: ref.mask };
    const c = await lossAndGrads(cpu, rb, grpo);
    const g = await lossAndGrads(gpu, rb, grpo);
    checkScalar(`${name} grpo loss vs cpu`, g.r.loss, c.r.loss);
    if (ref.grpoLoss !== null) checkScalar(`${name} grpo loss vs fixture`, g.r.loss, ref.grpoLoss);
    checkScalar(`${name} grpo klSum vs cpu`, g.r.klSum, c.r.klSum, 5e-2);
    checkScalar(`${name} grpo ratioSum vs cpu`, g.r.ratioSum, c.r.ratioSum);
    checkScalar(`${name} grpo entropySum vs cpu`, g.r.entropySum, c.r.entropySum);
    checkGrads(`${name} grpo grads vs cpu`, g.grads, c.grads);
    if (ref.gradsGrpoFile) checkGrads(`${name} grpo grads vs fixture`, g.grads, await readGradFile(ref.gradsGrpoFile, g.grads.keys()));
    // Seq-mean-token-sum-norm aggregation with k1 KL at T = 0.8.
    const alt: LossInput = { ...grpo, aggregation: 'seq-mean-token-sum-norm', kl: 'k1', temperature: 0.8, normLength: 16 };
    const c2 = await lossAndGrads(cpu, rb, alt);
    const g2 = await lossAndGrads(gpu, rb, alt);
    checkScalar(`${name} grpo seq-sum-norm k1 T=0.8 loss vs cpu`, g2.r.loss, c2.r.loss);
    checkGrads(`${name} grpo seq-sum-norm k1 T=0.8 grads vs cpu`, g2.grads, c2.grads);
  }
  if (ref.mask) {
    const sft: LossInput = { type: 'sft', mask: ref.mask, auxLossCoef: 0 };
    const c = await lossAndGrads(cpu, rb, sft);
    const g = await lossAndGrads(gpu, rb, sft);
    checkScalar(`${name} sft loss vs cpu`, g.r.loss, c.r.loss);
    if (ref.sftLoss !== null) checkScalar(`${name} sft loss vs fixture`, g.r.loss, ref.sftLoss);
    checkGrads(`${name} sft grads vs cpu`, g.grads, c.grads);
    if (ref.gradsSftFile) checkGrads(`${name} sft grads vs fixture`, g.grads, await readGradFile(ref.gradsSftFile, g.grads.keys()));
    // With the load-balancing loss (seq-mean-token-mean): aux loss and the router gradients it adds.
    const aux: LossInput = { type: 'sft', mask: ref.mask, auxLossCoef: 0.05, aggregation: 'seq-mean-token-mean' };
    const ca = await lossAndGrads(cpu, rb, aux);
    const ga = await lossAndGrads(gpu, rb, aux);
    if (gpu.moeLayerCount > 0) checkScalar(`${name} aux loss vs cpu`, ga.r.auxLoss, ca.r.auxLoss);
    checkGrads(`${name} sft+aux grads vs cpu`, ga.grads, ca.grads);
    // Determinism: the same call again gives the same bits.
    const ga2 = await lossAndGrads(gpu, rb, aux);
    let identical = bitsEqual(ga2.r.logprobs, ga.r.logprobs);
    for (const [n, v] of ga.grads) identical &&= bitsEqual(v, ga2.grads.get(n)!);
    report(identical && ga.r.loss === ga2.r.loss, `${name} two identical runs`, identical ? 'identical bits' : 'bits differ');
    // One stream (MOEPILOT_TRAIN_OVERLAP=0, read when the GPU copy is made) against the side streams (q, k, v and the
    // shared expert beside the routed one, forward and backward; the weight gradients beside the input gradients and
    // in the background): the same bits.
    process.env.MOEPILOT_TRAIN_OVERLAP = '0';
    const serial = await Engine.fromHfFolder(dir, { device: 'cuda:0' }).finally(() => delete process.env.MOEPILOT_TRAIN_OVERLAP);
    const gs = await lossAndGrads(serial, rb, aux);
    let sameSerial = bitsEqual(gs.r.logprobs, ga.r.logprobs) && gs.r.loss === ga.r.loss;
    for (const [n, v] of ga.grads) sameSerial &&= bitsEqual(v, gs.grads.get(n)!);
    report(sameSerial, `${name} one stream vs side streams`, sameSerial ? 'identical bits' : 'bits differ');
    await serial.dispose();

    // AdamW steps tracking the CPU engine.
    const p0 = new Float32Array(cpu.params);
    const opt = { lr: 1e-3, weightDecay: 0.01, maxGradNorm: 1.0 };
    const losses: string[] = [];
    for (let step = 0; step < 3; step++) {
      await cpu.zeroGrad();
      await gpu.zeroGrad();
      const lc = await cpu.forwardBackward(rb, sft);
      const lg = await gpu.forwardBackward(rb, sft);
      const nc = await cpu.adamwStep(opt);
      const ng = await gpu.adamwStep(opt);
      losses.push(`${lg.loss.toFixed(5)}/${lc.loss.toFixed(5)}`);
      checkScalar(`${name} adamw step ${step + 1} loss vs cpu`, lg.loss, lc.loss);
      checkScalar(`${name} adamw step ${step + 1} grad norm vs cpu`, ng, nc, 2e-2);
    }
    await gpu.syncToHost();
    const dc = cpu.params.map((v, i) => v - p0[i]);
    const dg = gpu.params.map((v, i) => v - p0[i]);
    checkTensor(`${name} params after 3 adamw steps vs cpu`, gpu.params, cpu.params, 5e-2);
    checkTensor(`${name} param updates after 3 adamw steps vs cpu`, dg, dc, 0.5);
    const st = gpu.optimizerState();
    report(st.step === 3 && [...st.expertM, ...st.denseM].reduce((a, c) => a + c.length, 0) === gpu.paramCount, `${name} optimizer state synced`, `step ${st.step} losses gpu/cpu ${losses.join(' ')}`);
    if (gpu.moeLayerCount > 0) await checkExpertGradsBf16(name, dir, gpu, rb, aux, ga);
  }
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
  // Bad device index: a clear error, not a crash.
  try {
    await Engine.fromHfFolder(path.join(fixturesDir, FIXTURES[0]), { device: 'cuda:99' }); // the first model asked for
    report(false, 'toDevice(cuda:99)', 'no error');
  } catch (e) {
    const err = e as { name?: string; code?: string; message?: string };
    report(err.name === 'EngineError' && err.code === 'INVALID_ARGUMENT', 'toDevice(cuda:99)', `${err.name} ${err.code}: ${err.message}`);
  }
  console.log(`model-gpu: ${failures} failure(s)`);
  process.exit(failures === 0 ? 0 : 1);
}

await main();
