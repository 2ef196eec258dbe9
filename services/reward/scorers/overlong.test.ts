import { test } from 'node:test';
import assert from 'node:assert/strict';
import { overlongPenalty, overlongScorer } from './overlong.ts';

test('overlong penalty is 0, then a linear ramp to -1 at max_length, then -1', () => {
  const p = { maxLength: 100, cacheLength: 20 };
  assert.equal(overlongPenalty(0, p), 0);
  assert.equal(overlongPenalty(80, p), 0);
  assert.equal(overlongPenalty(85, p), -0.25);
  assert.equal(overlongPenalty(90, p), -0.5);
  assert.equal(overlongPenalty(100, p), -1);
  assert.equal(overlongPenalty(101, p), -1);
  // Without a ramp it is a step at max_length.
  assert.equal(overlongPenalty(100, { maxLength: 100, cacheLength: 0 }), 0);
  assert.equal(overlongPenalty(101, { maxLength: 100, cacheLength: 0 }), -1);
});

test('overlong scorer reads completion_tokens and validates its params', () => {
  const score = overlongScorer.bind(overlongScorer.parseParams({ max_length: 16, cache_length: 4 }, 'p'));
  assert.equal(score({ completion: '', referenceAnswer: '', metadata: {}, completionTokens: 14, prompt: '' }), -0.5);
  assert.throws(() => overlongScorer.parseParams({ cache_length: 4 }, 'p'), /p\.max_length: is required/);
  assert.throws(() => overlongScorer.parseParams({ max_length: 4, cache_length: 8 }, 'p'), /p\.cache_length: must be <= max_length \(4\), got 8/);
  assert.throws(() => overlongScorer.parseParams({ max_length: 4.5, cache_length: 1 }, 'p'), /p\.max_length: must be an integer/);
});
