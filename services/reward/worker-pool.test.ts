import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createScorerRegistry, LOCAL_SCORERS } from './scorers/registry.ts';
import type { ScoreInput } from './scorers/types.ts';
import { createScoringPool } from './worker-pool.ts';

const registry = createScorerRegistry(LOCAL_SCORERS);

function items(n: number): ScoreInput[] {
  return Array.from({ length: n }, (_, i) => ({
    completion: i % 3 === 0 ? `<think>x</think> \\boxed{${i}}` : `the answer is ${i + (i % 2)}`,
    referenceAnswer: `#### ${i}`,
    metadata: {},
    completionTokens: i,
    prompt: '',
  }));
}

const scorers = [
  { name: 'math', params: registry.get('math').parseParams(undefined, 'p') },
  { name: 'format', params: registry.get('format').parseParams({ tags: ['think'] }, 'p') },
  { name: 'overlong', params: registry.get('overlong').parseParams({ max_length: 200, cache_length: 50 }, 'p') },
];

test('worker threads give the same values as scoring inline, in item order', async () => {
  const batch = items(300);
  const inline = createScoringPool({ registry }, { size: 0, minChunk: 1 });
  const workers = createScoringPool({ registry }, { size: 3, minChunk: 16 });
  try {
    const expected = await inline.score(scorers, batch);
    const got = await workers.score(scorers, batch);
    assert.deepEqual(got, expected);
    // The batch really mixes outcomes, so equality is not trivially all-zero.
    assert.ok(expected[0].includes(1) && expected[0].includes(0));
    assert.equal(expected[2][199], -0.98);
    assert.equal(expected[2][201], -1);
    // Several calls at once share the workers.
    const many = await Promise.all([workers.score(scorers, batch.slice(0, 10)), workers.score(scorers, batch.slice(10, 40))]);
    assert.deepEqual(many[0], expected.map((v) => v.slice(0, 10)));
    assert.deepEqual(many[1], expected.map((v) => v.slice(10, 40)));
  } finally {
    await workers.close();
    await inline.close();
  }
});

test('a closed pool refuses work', async () => {
  const pool = createScoringPool({ registry }, { size: 1, minChunk: 1 });
  await pool.close();
  await assert.rejects(pool.score(scorers, items(2)), /scoring pool is closed/);
});
