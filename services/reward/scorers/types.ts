// What a scorer is: a pure function of one completion, bound to validated parameters.
import { InvalidArgumentError } from '../../common/errors.ts';

/** One completion to score (the fields of pilot.v1.ScoreItem, plain data so it crosses to workers). */
export interface ScoreInput {
  completion: string;
  referenceAnswer: string;
  metadata: Record<string, string>;
  /** Response length in tokens. */
  completionTokens: number;
  prompt: string;
}

/** Raw scorer parameters as they come from the wire (google.protobuf.Struct). */
export type RawParams = Record<string, unknown> | undefined;

/**
 * A scorer that runs anywhere, workers included. `parseParams` validates and fills defaults (its
 * result must survive structured clone); `bind` prepares the scoring function once per batch.
 */
export interface LocalScorer<P = unknown> {
  kind: 'local';
  name: string;
  description: string;
  parseParams(raw: RawParams, field: string): P;
  bind(params: P): (input: ScoreInput) => number;
}

// --- parameter readers: each names the offending field in its error ---

function checkKnown(raw: RawParams, field: string, known: readonly string[]): Record<string, unknown> {
  const params = raw ?? {};
  for (const key of Object.keys(params)) {
    if (!known.includes(key)) {
      throw new InvalidArgumentError(
        `${field}.${key}`,
        `unknown parameter; valid parameters: ${known.length ? known.join(', ') : '(none)'}`,
      );
    }
  }
  return params;
}

export function readParams(raw: RawParams, field: string, known: readonly string[]) {
  const params = checkKnown(raw, field, known);
  return {
    number(key: string, fallback: number, check?: (v: number) => string | null): number {
      const v = params[key];
      if (v === undefined || v === null) return fallback;
      if (typeof v !== 'number' || !Number.isFinite(v)) {
        throw new InvalidArgumentError(`${field}.${key}`, `must be a finite number, got ${JSON.stringify(v)}`);
      }
      const problem = check?.(v) ?? null;
      if (problem) throw new InvalidArgumentError(`${field}.${key}`, `${problem}, got ${v}`);
      return v;
    },
    requiredNumber(key: string, check?: (v: number) => string | null): number {
      if (params[key] === undefined || params[key] === null) {
        throw new InvalidArgumentError(`${field}.${key}`, 'is required');
      }
      return this.number(key, 0, check);
    },
    boolean(key: string, fallback: boolean): boolean {
      const v = params[key];
      if (v === undefined || v === null) return fallback;
      if (typeof v !== 'boolean') throw new InvalidArgumentError(`${field}.${key}`, `must be a boolean, got ${JSON.stringify(v)}`);
      return v;
    },
    string(key: string, fallback: string | null): string | null {
      const v = params[key];
      if (v === undefined || v === null) return fallback;
      if (typeof v !== 'string') throw new InvalidArgumentError(`${field}.${key}`, `must be a string, got ${JSON.stringify(v)}`);
      return v;
    },
    stringList(key: string): string[] {
      const v = params[key];
      if (v === undefined || v === null) return [];
      if (!Array.isArray(v) || v.some((x) => typeof x !== 'string')) {
        throw new InvalidArgumentError(`${field}.${key}`, `must be a list of strings, got ${JSON.stringify(v)}`);
      }
      return v as string[];
    },
    raw(key: string): unknown {
      return params[key];
    },
  };
}

export const isInteger = (v: number) => (Number.isInteger(v) ? null : 'must be an integer');
export const isPositive = (v: number) => (v > 0 ? null : 'must be > 0');
export const isNonNegative = (v: number) => (v >= 0 ? null : 'must be >= 0');
