// GRPO helpers: group advantages and the packed row layout.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { groupAdvantages, packCompletions, packGroup } from './algo.ts';

function close(a: ArrayLike<number>, b: ArrayLike<number>, tol = 1e-6): void {
  assert.equal(a.length, b.length);
  for (let i = 0; i < a.length; i++) assert.ok(Math.abs(a[i] - b[i]) <= tol, `index ${i}: ${a[i]} vs ${b[i]}`);
}

test('advantages are (r - mean) / (std + eps) per group, population std', () => {
  // group 1: [1,0,0,0] mean 0.25 std sqrt(0.1875); group 2: [1,1,0,0] mean 0.5 std 0.5
  const a = groupAdvantages([1, 0, 0, 0, 1, 1, 0, 0], 4, { normalizeStd: true });
  const s1 = Math.sqrt(0.1875) + 1e-6;
  close(a, [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1, 0.5 / 0.500001, 0.5 / 0.500001, -0.5 / 0.500001, -0.5 / 0.500001]);
});

test('groups with equal rewards get zero advantage, others are untouched by them', () => {
  const a = groupAdvantages([1, 1, 1, 0, 0, 0, 0, 1, 0], 3, { normalizeStd: true });
  close(a.subarray(0, 6), [0, 0, 0, 0, 0, 0]);
  assert.ok(a[7] > 0 && a[6] < 0 && a[8] < 0);
  close([a[6] + a[7] + a[8]], [0]);
});

test('without std normalisation advantages are the centred rewards', () => {
  close(groupAdvantages([0.5, 1, 0, 2], 2, { normalizeStd: false }), [-0.25, 0.25, -1, 1]);
});

test('the per-group loop equals a direct two-pass formula on random rewards', () => {
  let s = 12345;
  const rnd = () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648);
  const G = 6;
  const r: number[] = Array.from({ length: G * 20 }, () => (rnd() < 0.4 ? 1 : 0));
  const got = groupAdvantages(r, G, { normalizeStd: true });
  for (let g = 0; g < 20; g++) {
    const xs = r.slice(g * G, (g + 1) * G);
    const m = xs.reduce((a, b) => a + b, 0) / G;
    const sd = Math.sqrt(xs.reduce((a, b) => a + (b - m) ** 2, 0) / G);
    const want = xs.map((x) => (sd === 0 ? 0 : (x - m) / (sd + 1e-6)));
    close(got.subarray(g * G, (g + 1) * G), want, 1e-5);
  }
});

test('advantage input errors name the problem', () => {
  assert.throws(() => groupAdvantages([1, 0, 1], 2, { normalizeStd: true }), /3 rewards is not a multiple of G = 2/);
  assert.throws(() => groupAdvantages([1, NaN], 2, { normalizeStd: true }), /rewards\[1\] is not finite/);
  assert.throws(() => groupAdvantages([1], 0, { normalizeStd: true }), /G must be an integer >= 1/);
});

test('packCompletions masks exactly the rows that predict completion tokens', () => {
  const { batch, mask } = packCompletions([
    { prompt: [5, 6, 7], completion: [8, 9] },
    { prompt: [4], completion: [3, 2, 1] },
  ]);
  assert.deepEqual([...batch.tokens], [5, 6, 7, 8, 9, 4, 3, 2, 1]);
  assert.deepEqual([...batch.seqLens], [5, 4]);
  // row 2 predicts 8, row 3 predicts 9, row 4 (last of seq 0) nothing; rows 5..7 predict 3, 2, 1.
  assert.deepEqual([...mask], [0, 0, 1, 1, 0, 1, 1, 1, 0]);
});

test('packGroup puts each completion token logprob and its sample advantage on its row', () => {
  const p = packGroup([
    { prompt: [1, 2], completion: [3, 4, 5], logprobs: [-0.1, -0.2, -0.3], advantage: 1.5 },
    { prompt: [1, 2], completion: [6], logprobs: [-0.7], advantage: -0.5 },
  ]);
  assert.deepEqual([...p.batch.tokens], [1, 2, 3, 4, 5, 1, 2, 6]);
  assert.deepEqual([...p.mask], [0, 1, 1, 1, 0, 0, 1, 0]);
  close(p.oldLogprobs, [0, -0.1, -0.2, -0.3, 0, 0, -0.7, 0]);
  close(p.advantages, [0, 1.5, 1.5, 1.5, 0, 0, -0.5, 0]);
  assert.equal(p.completionTokens, 4);
});

test('packing errors name the item', () => {
  assert.throws(() => packCompletions([]), /no items/);
  assert.throws(() => packCompletions([{ prompt: [], completion: [1] }]), /item 0 has an empty prompt/);
  assert.throws(() => packCompletions([{ prompt: [1], completion: [2] }, { prompt: [1], completion: [] }]), /item 1 has an empty completion/);
  assert.throws(() => packGroup([{ prompt: [1], completion: [2, 3], logprobs: [-1], advantage: 0 }]), /item 0 has 1 logprobs for 2 completion tokens/);
  assert.throws(() => packGroup([{ prompt: [1], completion: [2], logprobs: [-1], advantage: Infinity }]), /item 0 advantage is not finite/);
});
