import { test } from 'node:test';
import assert from 'node:assert/strict';
import { formatScorer } from './format.ts';
import type { ScoreInput } from './types.ts';

const input = (completion: string): ScoreInput => ({ completion, referenceAnswer: '', metadata: {}, completionTokens: 0, prompt: '' });

test('format requires every tag pair, in order by default', () => {
  const score = formatScorer.bind(formatScorer.parseParams({ tags: ['think', 'answer'] }, 'p'));
  assert.equal(score(input('<think>hmm</think><answer>4</answer>')), 1);
  assert.equal(score(input('<think>hmm</think> 4')), 0);
  assert.equal(score(input('<answer>4</answer><think>hmm</think>')), 0);
  assert.equal(score(input('<think>hmm <answer>4</answer>')), 0);
  const unordered = formatScorer.bind(formatScorer.parseParams({ tags: ['think', 'answer'], ordered: false }, 'p'));
  assert.equal(unordered(input('<answer>4</answer><think>hmm</think>')), 1);
});

test('format matches a regex (dotAll by default) and gives partial credit when asked', () => {
  const regex = formatScorer.bind(formatScorer.parseParams({ pattern: '^<think>.*</think>\\s*\\\\boxed\\{.+\\}$' }, 'p'));
  assert.equal(regex(input('<think>a\nb</think> \\boxed{3}')), 1);
  assert.equal(regex(input('<think>a</think> 3')), 0);
  const partial = formatScorer.bind(formatScorer.parseParams({ tags: ['think', 'answer'], pattern: 'boxed', partial: true }, 'p'));
  assert.equal(partial(input('<think>x</think> boxed')), 2 / 3);
  assert.equal(partial(input('nothing')), 0);
});

test('format params are validated', () => {
  assert.throws(() => formatScorer.parseParams({}, 'spec.scorers[1].params'), /spec\.scorers\[1\]\.params: format needs at least one of tags or pattern/);
  assert.throws(() => formatScorer.parseParams({ pattern: '(' }, 'p'), /p\.pattern: invalid regular expression/);
  assert.throws(() => formatScorer.parseParams({ tags: ['<think>'] }, 'p'), /p\.tags\[0\]: not a tag name/);
  assert.throws(() => formatScorer.parseParams({ tags: 'think' }, 'p'), /p\.tags: must be a list of strings/);
});
