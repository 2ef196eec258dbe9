import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InvalidArgumentError } from '../../common/errors.ts';
import { combineScores } from './combine.ts';
import { createScorerRegistry, LOCAL_SCORERS } from './registry.ts';

test('registry finds scorers and lists the valid names on a miss', () => {
  const registry = createScorerRegistry(LOCAL_SCORERS);
  assert.deepEqual(registry.names(), ['format', 'math', 'overlong']);
  assert.equal(registry.get('math').name, 'math');
  assert.throws(
    () => registry.get('maths', 'spec.scorers[2].name'),
    (error: unknown) =>
      error instanceof InvalidArgumentError &&
      error.field === 'spec.scorers[2].name' &&
      error.message === 'spec.scorers[2].name: unknown scorer "maths"; valid names: format, math, overlong',
  );
  assert.throws(() => registry.get(''), /empty scorer name; valid names/);
});

test('registry rejects duplicate names', () => {
  assert.throws(() => createScorerRegistry([...LOCAL_SCORERS, LOCAL_SCORERS[0]]), /duplicate scorer name "math"/);
});

test('combineScores weights components and keeps them unweighted by label', () => {
  const out = combineScores(
    [
      { label: 'math', weight: 1 },
      { label: 'format', weight: 0.5 },
      { label: 'overlong', weight: 1 },
    ],
    [
      [1, 0],
      [1, 1],
      [-0.5, 0],
    ],
    2,
  );
  assert.deepEqual(out, [
    { score: 1 + 0.5 - 0.5, components: { math: 1, format: 1, overlong: -0.5 } },
    { score: 0.5, components: { math: 0, format: 1, overlong: 0 } },
  ]);
});
