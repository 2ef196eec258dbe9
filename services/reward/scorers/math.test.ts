import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  answersMatch,
  extractAnswer,
  extractBoxed,
  extractHashAnswer,
  extractLastNumber,
  mathScorer,
  normalizeAnswer,
  parseNumber,
} from './math.ts';
import type { ScoreInput } from './types.ts';

const input = (completion: string, referenceAnswer: string): ScoreInput => ({
  completion,
  referenceAnswer,
  metadata: {},
  completionTokens: 10,
  prompt: '',
});

test('extractBoxed takes the last box and balances nested braces', () => {
  assert.equal(extractBoxed('so \\boxed{\\frac{1}{2}}'), '\\frac{1}{2}');
  assert.equal(extractBoxed('\\boxed{1} then \\boxed{2}'), '2');
  assert.equal(extractBoxed('\\boxed{{a}+{b}}'), '{a}+{b}');
  assert.equal(extractBoxed('\\fbox{7}'), '7');
  assert.equal(extractBoxed('\\boxed 5 is it'), '5');
  assert.equal(extractBoxed('\\boxed{\\{1,2\\}}'), '\\{1,2\\}');
  assert.equal(extractBoxed('no box here'), null);
  // A truncated last box falls back to the previous complete one.
  assert.equal(extractBoxed('\\boxed{3} and finally \\boxed{4'), '3');
});

test('extractHashAnswer reads the GSM8K marker line', () => {
  assert.equal(extractHashAnswer('work\n#### 42'), '42');
  assert.equal(extractHashAnswer('#### 1,234\nextra'), '1,234');
  assert.equal(extractHashAnswer('#### 1\n#### 2'), '2');
  assert.equal(extractHashAnswer('####   '), null);
  assert.equal(extractHashAnswer('none'), null);
});

test('extractLastNumber finds decimals, commas, signs and fractions', () => {
  assert.equal(extractLastNumber('I have 3 apples and 12.5 pears'), '12.5');
  assert.equal(extractLastNumber('total is 1,234,567 dollars'), '1,234,567');
  assert.equal(extractLastNumber('it went to -7'), '-7');
  assert.equal(extractLastNumber('half is 1/2'), '1/2');
  assert.equal(extractLastNumber('so $\\frac{3}{4}$'), '\\frac{3}{4}');
  assert.equal(extractLastNumber('about .5'), '.5');
  assert.equal(extractLastNumber('no digits'), null);
});

test('extractAnswer prefers a box, then ####, then the last number unless disabled', () => {
  assert.equal(extractAnswer('3 ... \\boxed{5} ... 9'), '5');
  assert.equal(extractAnswer('3 ... #### 5\n 9'), '5');
  assert.equal(extractAnswer('3 then 9'), '9');
  assert.equal(extractAnswer('3 then 9', false), null);
});

test('normalizeAnswer strips LaTeX, units and separators', () => {
  const cases: [string, string][] = [
    ['$42$', '42'],
    ['\\(42\\)', '42'],
    ['1,234', '1234'],
    ['1,234,567.5', '1234567.5'],
    ['1,2', '1,2'],
    ['\\frac{1}{2}', '1/2'],
    ['\\dfrac{3}{4}', '3/4'],
    ['\\tfrac12', '1/2'],
    ['-\\frac{1}{2}', '-1/2'],
    ['\\frac{a+b}{2}', '(a+b)/2'],
    ['90^\\circ', '90'],
    ['90^{\\circ}', '90'],
    ['50\\%', '50'],
    ['\\$5', '5'],
    ['\\text{5 apples}', '5apples'],
    ['x = 5', '5'],
    ['5.', '5'],
    ['{7}', '7'],
    ['\\left( 1, 2 \\right)', '(1,2)'],
    ['  3\\,000 ', '3000'],
    ['−3', '-3'],
    ['\\mathrm{Yes}', 'yes'],
    ['72 \\text{ clips}', '72'],
    ['5\\mbox{cm}', '5'],
    ['\\$18.00', '18.00'],
    ['\\text{(B)}', 'b'],
  ];
  for (const [raw, expected] of cases) assert.equal(normalizeAnswer(raw), expected, raw);
});

test('parseNumber reads decimals, exponents and fractions', () => {
  assert.equal(parseNumber('42'), 42);
  assert.equal(parseNumber('-0.25'), -0.25);
  assert.equal(parseNumber('1e3'), 1000);
  assert.equal(parseNumber('.5'), 0.5);
  assert.equal(parseNumber('3/4'), 0.75);
  assert.equal(parseNumber('-1/2'), -0.5);
  assert.equal(parseNumber('1/0'), null);
  assert.equal(parseNumber('(a+b)/2'), null);
  assert.equal(parseNumber('abc'), null);
  assert.equal(parseNumber('1,2'), null);
});

test('answersMatch compares numerically with tolerance, else as strings', () => {
  assert.equal(answersMatch('0.5', '\\frac{1}{2}', 1e-6), true);
  assert.equal(answersMatch('1/2', '0.5', 1e-6), true);
  assert.equal(answersMatch('1,000', '1000', 1e-6), true);
  assert.equal(answersMatch('42.0', '42', 1e-6), true);
  assert.equal(answersMatch('0.3333', '1/3', 1e-6), false);
  assert.equal(answersMatch('0.3333', '1/3', 1e-3), true);
  assert.equal(answersMatch('1000001', '1000000', 1e-6), true); // relative tolerance
  assert.equal(answersMatch('1000002', '1000000', 1e-6), false);
  assert.equal(answersMatch('41', '42', 1e-6), false);
  assert.equal(answersMatch('\\sqrt{2}', '\\sqrt2', 1e-6), true);
  assert.equal(answersMatch('(1, 2)', '(1,2)', 1e-6), true);
  assert.equal(answersMatch('Yes', '\\text{yes}', 1e-6), true);
  assert.equal(answersMatch('', '0', 1e-6), false);
  assert.equal(answersMatch('72 \\text{ clips}', '72', 1e-6), true);
  assert.equal(answersMatch('\\$18.00', '18', 1e-6), true);
  assert.equal(answersMatch('\\text{(B)}', 'B', 1e-6), true);
  // A variable is not a unit: 2x is not 2.
  assert.equal(answersMatch('2x', '2', 1e-6), false);
});

test('math scorer scores whole completions against references', () => {
  const score = mathScorer.bind(mathScorer.parseParams(undefined, 'params'));
  assert.equal(score(input('The total is \\boxed{1,234}.', '1234')), 1);
  assert.equal(score(input('Natalia sold 48/2 = 24 clips in May.\n#### 72', '#### 72')), 1);
  assert.equal(score(input('so x = \\boxed{\\dfrac{1}{2}}', '0.5')), 1);
  assert.equal(score(input('I think it is 12.', 'Step 1... #### 12')), 1);
  assert.equal(score(input('It is 13.', '12')), 0);
  assert.equal(score(input('no answer given', '12')), 0);
  assert.equal(score(input('\\boxed{-3}', '$-3$')), 1);
  assert.equal(score(input('\\boxed{90^\\circ}', '90')), 1);
  // The box wins over a later stray number.
  assert.equal(score(input('\\boxed{7} (checked in 2 ways)', '7')), 1);
  const strict = mathScorer.bind(mathScorer.parseParams({ last_number_fallback: false }, 'params'));
  assert.equal(strict(input('I think it is 12.', '12')), 0);
});

test('math params are validated with the field named', () => {
  assert.throws(() => mathScorer.parseParams({ tolerance: -1 }, 'spec.scorers[0].params'), /spec\.scorers\[0\]\.params\.tolerance: must be >= 0/);
  assert.throws(() => mathScorer.parseParams({ tolerance: 'x' }, 'p'), /p\.tolerance: must be a finite number/);
  assert.throws(() => mathScorer.parseParams({ tol: 1 }, 'p'), /p\.tol: unknown parameter; valid parameters: tolerance, last_number_fallback/);
});
