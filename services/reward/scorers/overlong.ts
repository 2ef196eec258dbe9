// DAPO's soft overlong punishment: no penalty up to L_max - L_cache tokens, then a linear ramp down
// to -1 at L_max, and -1 beyond. It discourages truncated answers without a cliff at the limit.
import { InvalidArgumentError } from '../../common/errors.ts';
import { isInteger, isNonNegative, isPositive, readParams, type LocalScorer } from './types.ts';

export interface OverlongParams {
  maxLength: number;   // L_max, tokens
  cacheLength: number; // L_cache, tokens: width of the ramp
}

/** The penalty for a response of `length` tokens: 0, then linear to -1 at maxLength, -1 beyond. */
export function overlongPenalty(length: number, params: OverlongParams): number {
  const start = params.maxLength - params.cacheLength;
  if (length <= start) return 0;
  if (length > params.maxLength) return -1;
  return (start - length) / params.cacheLength;
}

export const overlongScorer: LocalScorer<OverlongParams> = {
  kind: 'local',
  name: 'overlong',
  description: 'DAPO soft overlong penalty from completion_tokens: params max_length, cache_length',
  parseParams(raw, field) {
    const p = readParams(raw, field, ['max_length', 'cache_length']);
    const maxLength = p.requiredNumber('max_length', (v) => isInteger(v) ?? isPositive(v));
    const cacheLength = p.requiredNumber('cache_length', (v) => isInteger(v) ?? isNonNegative(v));
    if (cacheLength > maxLength) {
      throw new InvalidArgumentError(`${field}.cache_length`, `must be <= max_length (${maxLength}), got ${cacheLength}`);
    }
    return { maxLength, cacheLength };
  },
  bind(params) {
    return (input) => overlongPenalty(input.completionTokens, params);
  },
};
