// Scorers by name. A failed lookup names the valid scorers, so a typo in a run config is obvious.
import type { Context } from '@opentelemetry/api';
import { InvalidArgumentError } from '../../common/errors.ts';
import type { ServerSurfaceCall } from '../../common/errors.ts';
import { formatScorer } from './format.ts';
import { mathScorer } from './math.ts';
import { overlongScorer } from './overlong.ts';
import type { LocalScorer, RawParams, ScoreInput } from './types.ts';

/** What a batch scorer gets besides the items: the call being served (for deadline propagation). */
export interface BatchContext {
  parent: ServerSurfaceCall | null;
  signal: AbortSignal | null;
  traceContext?: Context;
}

/** A scorer that works on a whole batch asynchronously (calls out, e.g. `external`). */
export interface BatchScorer<P = unknown> {
  kind: 'batch';
  name: string;
  description: string;
  parseParams(raw: RawParams, field: string): P;
  scoreBatch(items: ScoreInput[], params: P, ctx: BatchContext): Promise<number[]>;
}

export type Scorer = LocalScorer<any> | BatchScorer<any>;

export interface ScorerRegistry {
  /** The scorer called `name`; InvalidArgumentError at `field` listing the valid names otherwise. */
  get(name: string, field?: string): Scorer;
  /** Local scorers only (what a worker thread can run). */
  getLocal(name: string, field?: string): LocalScorer<unknown>;
  names(): string[];
}

/** The pure scorers every registry has; workers build their registry from this list. */
export const LOCAL_SCORERS: readonly LocalScorer<any>[] = [mathScorer, formatScorer, overlongScorer];

export function createScorerRegistry(scorers: readonly Scorer[]): ScorerRegistry {
  const byName = new Map<string, Scorer>();
  for (const scorer of scorers) {
    if (byName.has(scorer.name)) throw new InvalidArgumentError('scorers', `duplicate scorer name "${scorer.name}"`);
    byName.set(scorer.name, scorer);
  }
  const names = () => [...byName.keys()].sort();
  const get = (name: string, field = 'name'): Scorer => {
    const scorer = byName.get(name);
    if (!scorer) {
      const shown = name === '' ? 'empty scorer name' : `unknown scorer "${name}"`;
      throw new InvalidArgumentError(field, `${shown}; valid names: ${names().join(', ')}`);
    }
    return scorer;
  };
  return {
    get,
    getLocal(name, field = 'name') {
      const scorer = get(name, field);
      if (scorer.kind !== 'local') throw new InvalidArgumentError(field, `scorer "${name}" cannot run in a worker`);
      return scorer;
    },
    names,
  };
}
