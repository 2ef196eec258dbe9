// The demo task: answers are right, the split is disjoint and fixed by the seed, the reward is exact.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createTask, END_MARKER, exampleAt, promptCount, reward, TASK_ALPHABET, TASK_KINDS } from './task.ts';

test('examples of each kind carry the right answer', () => {
  assert.deepEqual(exampleAt('sort', 5, 38190), { prompt: 's38190=', answer: '01389' });
  assert.deepEqual(exampleAt('reverse', 4, 3819), { prompt: 'r3819=', answer: '9183' });
  assert.deepEqual(exampleAt('sort', 3, 7), { prompt: 's007=', answer: '007' });
  // index = a * 10^digits + b
  assert.deepEqual(exampleAt('add', 2, 3745), { prompt: '37+45=', answer: '82' });
  assert.deepEqual(exampleAt('add', 2, 5), { prompt: '00+05=', answer: '5' });
  assert.deepEqual(exampleAt('add', 2, 9999), { prompt: '99+99=', answer: '198' });
});

test('train and held-out sets are disjoint, sized as asked and cover the prompts once', () => {
  for (const kind of TASK_KINDS) {
    const digits = kind === 'add' ? 2 : 4;
    const t = createTask({ kind, digits, heldOut: 300, seed: 9 });
    assert.equal(t.heldOut.length, 300);
    assert.equal(t.train.length, promptCount(kind, digits) - 300);
    const held = new Set(t.heldOut.map((e) => e.prompt));
    assert.equal(held.size, 300);
    const train = new Set(t.train.map((e) => e.prompt));
    assert.equal(train.size, t.train.length);
    for (const p of train) assert.ok(!held.has(p), `${p} is in both sets`);
    for (const e of [...t.train, ...t.heldOut]) {
      for (const c of e.prompt + e.answer) assert.ok(t.alphabet.includes(c), `${c} of ${e.prompt} not in the alphabet`);
      assert.ok(e.answer.length <= t.maxAnswerChars);
    }
  }
});

test('the split is fixed by the seed and changes with it', () => {
  const a = createTask({ kind: 'sort', digits: 4, heldOut: 100, train: 500, seed: 3 });
  const b = createTask({ kind: 'sort', digits: 4, heldOut: 100, train: 500, seed: 3 });
  const c = createTask({ kind: 'sort', digits: 4, heldOut: 100, train: 500, seed: 4 });
  assert.deepEqual(a.heldOut, b.heldOut);
  assert.deepEqual(a.train, b.train);
  assert.notDeepEqual(a.heldOut, c.heldOut);
  assert.equal(a.train.length, 500);
});

test('reward is 1 only for the exact answer, with or without the end marker', () => {
  assert.equal(reward('01389', '01389'), 1);
  assert.equal(reward(`01389${END_MARKER}`, '01389'), 1);
  assert.equal(reward('0138', '01389'), 0);
  assert.equal(reward('013890', '01389'), 0);
  assert.equal(reward(`01389${END_MARKER}${END_MARKER}`, '01389'), 0);
  assert.equal(reward(` 01389`, '01389'), 0);
  assert.equal(reward(END_MARKER, ''), 1);
  assert.equal(reward('', '1'), 0);
});

test('bad task options are refused with the field named', () => {
  assert.throws(() => createTask({ kind: 'max' as never, digits: 3, heldOut: 10, seed: 1 }), /kind must be one of sort, reverse, add/);
  assert.throws(() => createTask({ kind: 'sort', digits: 0, heldOut: 10, seed: 1 }), /digits must be an integer >= 1/);
  assert.throws(() => createTask({ kind: 'sort', digits: 2, heldOut: 100, seed: 1 }), /heldOut must be an integer in \[1, 99\]/);
  assert.throws(() => createTask({ kind: 'sort', digits: 2, heldOut: 10, train: 91, seed: 1 }), /train must be an integer in \[1, 90\]/);
  assert.throws(() => createTask({ kind: 'add', digits: 4, heldOut: 10, seed: 1 }), /more than the 1000000/);
  assert.equal(TASK_ALPHABET.length, new Set(TASK_ALPHABET).size);
});
