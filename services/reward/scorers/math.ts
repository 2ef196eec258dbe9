// Verifiable math reward: extract the final answer of a completion, normalise it and the reference,
// and compare them as numbers (with tolerance) when both parse, else as normalised strings.
//
// Extraction order: the last \boxed{...} (nested braces allowed), then the last "#### answer" line
// (GSM8K), then (unless disabled) the last number in the text.
import { isNonNegative, readParams, type LocalScorer } from './types.ts';

export interface MathParams {
  /** Numbers match when |a - b| <= tolerance * max(1, |b|). */
  tolerance: number;
  /** Fall back to the last number of the completion when it has no \boxed{} or ####. */
  lastNumberFallback: boolean;
}

/** Content of the last \boxed{...} / \fbox{...} (or "\boxed 5"), braces balanced; null if none. */
export function extractBoxed(text: string): string | null {
  let at = Math.max(text.lastIndexOf('\\boxed'), text.lastIndexOf('\\fbox'));
  while (at >= 0) {
    const commandEnd = text.startsWith('\\boxed', at) ? at + 6 : at + 5;
    let i = commandEnd;
    while (i < text.length && text[i] === ' ') i += 1;
    if (text[i] === '{') {
      let depth = 0;
      for (let j = i; j < text.length; j += 1) {
        const c = text[j];
        if (c === '\\') {
          j += 1; // an escaped brace (\{) does not count
          continue;
        }
        if (c === '{') depth += 1;
        else if (c === '}') {
          depth -= 1;
          if (depth === 0) return text.slice(i + 1, j);
        }
      }
      // Unbalanced (truncated output): look at an earlier box.
    } else if (i > commandEnd) {
      // "\boxed 5": the argument is the next token.
      const match = /^[^\s$]+/.exec(text.slice(i));
      if (match) return match[0];
    }
    const prev = text.slice(0, at);
    at = Math.max(prev.lastIndexOf('\\boxed'), prev.lastIndexOf('\\fbox'));
  }
  return null;
}

/** The text after the last "####" marker, up to the end of its line; null if none. */
export function extractHashAnswer(text: string): string | null {
  const at = text.lastIndexOf('####');
  if (at < 0) return null;
  const line = text.slice(at + 4).split('\n', 1)[0].trim();
  return line === '' ? null : line;
}

// A number as written in text: optional sign, digits with optional thousands commas, decimals,
// exponent; or a \frac; or a plain fraction a/b.
const NUMBER_IN_TEXT =
  /-?\\[dt]?frac\s*\{[^{}]*\}\s*\{[^{}]*\}|-?\\[dt]?frac\d\d|[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*\/\s*\d+(?:\.\d+)?)?(?:[eE][-+]?\d+)?|[-−]?\.\d+/g;

/** The last number-like token of the text (see NUMBER_IN_TEXT); null if none. */
export function extractLastNumber(text: string): string | null {
  let last: string | null = null;
  for (const match of text.matchAll(NUMBER_IN_TEXT)) last = match[0];
  return last;
}

/** The final answer of a completion, or null when it gives none. */
export function extractAnswer(text: string, lastNumberFallback = true): string | null {
  return extractBoxed(text) ?? extractHashAnswer(text) ?? (lastNumberFallback ? extractLastNumber(text) : null);
}

/** The reference answer: marked answers are extracted, otherwise the whole string is the answer. */
export function extractReference(text: string): string {
  return extractBoxed(text) ?? extractHashAnswer(text) ?? text;
}

/** Replaces \cmd{x} by x for text-like commands, innermost first. */
function unwrapCommand(s: string, commands: string): string {
  const re = new RegExp(`\\\\(?:${commands})\\s*\\{([^{}]*)\\}`, 'g');
  let prev: string;
  do {
    prev = s;
    s = s.replace(re, '$1');
  } while (s !== prev);
  return s;
}

/** \frac{a}{b} -> (a)/(b), simple operands without parentheses; \frac12 -> 1/2. */
function replaceFractions(s: string): string {
  let prev: string;
  do {
    prev = s;
    s = s.replace(/\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}/g, (_m, a: string, b: string) => {
      const wrap = (x: string) => (/^[\w.]+$/.test(x) ? x : `(${x})`);
      return `${wrap(a)}/${wrap(b)}`;
    });
  } while (s !== prev);
  return s.replace(/\\frac(\d)(\d)/g, '$1/$2').replace(/\\frac\s*\{([^{}]*)\}\s*(\d)/g, '$1/$2');
}

/**
 * Canonical form of an answer: LaTeX wrappers, spacing commands, units of degrees and percent,
 * dollar signs, thousands separators and a leading "x =" removed; \frac rewritten as a/b;
 * whitespace dropped; lower case.
 */
export function normalizeAnswer(answer: string): string {
  let s = answer.trim();
  s = s.replace(/^\\\(|\\\)$/g, '').replace(/^\\\[|\\\]$/g, '');
  s = s.replace(/^\$+|\$+$/g, '');
  s = s.replace(/−/g, '-');
  s = s.replace(/\\[dt]frac/g, '\\frac');
  s = s.replace(/\\left|\\right/g, '');
  s = s.replace(/\\[!,;:> ]|~/g, '');
  s = s.replace(/\^\s*\{?\\circ\}?|°/g, '');
  s = s.replace(/\\%|%/g, '');
  s = s.replace(/\\\$/g, '');
  // Units written as text after a number ("72 \text{ clips}", "5\mbox{cm}") are not part of the value.
  s = s.replace(/(\d)\s*\\(?:text|mbox|mathrm)\s*\{\s*[a-zA-Z][a-zA-Z\s.]*\}\s*$/, '$1');
  s = unwrapCommand(s, 'text|textbf|textit|mathrm|mathbf|mbox|operatorname');
  s = s.replace(/\\displaystyle/g, '');
  s = replaceFractions(s);
  s = s.replace(/\s+/g, '');
  // "x=5", "k = 3": a single-letter variable assignment gives its value.
  s = s.replace(/^[a-zA-Z]=(?!=)/, '');
  s = s.replace(/[.]+$/, '');
  // Thousands separators only where the grouping is exact (so "1,2" stays a list).
  if (/^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$/.test(s)) s = s.replace(/,/g, '');
  // A multiple-choice letter in parentheses: (B) -> B.
  s = s.replace(/^\(([a-zA-Z])\)$/, '$1');
  // A lone pair of braces around the whole answer: {5} -> 5.
  while (/^\{[^{}]*\}$/.test(s)) s = s.slice(1, -1);
  return s.toLowerCase();
}

const DECIMAL = /^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$/;

/** The value of a normalised answer that is a number or a fraction of numbers; null otherwise. */
export function parseNumber(normalized: string): number | null {
  if (DECIMAL.test(normalized)) return Number(normalized);
  const fraction = /^([-+]?)\(?([-+]?[\d.e+-]+)\)?\/\(?([-+]?[\d.e+-]+)\)?$/.exec(normalized);
  if (fraction && DECIMAL.test(fraction[2]) && DECIMAL.test(fraction[3])) {
    const denominator = Number(fraction[3]);
    if (denominator === 0) return null;
    const value = Number(fraction[2]) / denominator;
    return fraction[1] === '-' ? -value : value;
  }
  return null;
}

/** Whether two raw answers are equal: as numbers within tolerance, or as normalised strings. */
export function answersMatch(candidate: string, reference: string, tolerance: number): boolean {
  const a = normalizeAnswer(candidate);
  const b = normalizeAnswer(reference);
  if (a === '' || b === '') return false;
  const x = parseNumber(a);
  const y = parseNumber(b);
  if (x !== null && y !== null) return Math.abs(x - y) <= tolerance * Math.max(1, Math.abs(y));
  if (a === b) return true;
  // Braces are grouping only once LaTeX is gone: "\sqrt{2}" == "\sqrt2".
  return a.replace(/[{}]/g, '') === b.replace(/[{}]/g, '');
}

export const mathScorer: LocalScorer<MathParams> = {
  kind: 'local',
  name: 'math',
  description: '1 when the final answer matches the reference (numbers within tolerance, else normalised text); params tolerance (1e-6), last_number_fallback (true)',
  parseParams(raw, field) {
    const p = readParams(raw, field, ['tolerance', 'last_number_fallback']);
    return {
      tolerance: p.number('tolerance', 1e-6, isNonNegative),
      lastNumberFallback: p.boolean('last_number_fallback', true),
    };
  },
  bind(params) {
    return (input) => {
      const answer = extractAnswer(input.completion, params.lastNumberFallback);
      if (answer === null) return 0;
      return answersMatch(answer, extractReference(input.referenceAnswer), params.tolerance) ? 1 : 0;
    };
  },
};
