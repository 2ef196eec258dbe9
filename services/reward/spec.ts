// Validation of a RewardSpec against a registry: every problem is an InvalidArgumentError naming
// the request field (spec.scorers[i].name, .weight, .label, .params.<key>).
import { InvalidArgumentError } from '../common/errors.ts';
import type { RewardSpec } from '../../proto/gen/pilot/v1/reward.ts';
import type { Scorer, ScorerRegistry } from './scorers/registry.ts';

export interface ResolvedScorer {
  name: string;
  label: string;
  weight: number;
  params: unknown;
  scorer: Scorer;
}

export function resolveSpec(registry: ScorerRegistry, spec: RewardSpec | undefined): ResolvedScorer[] {
  if (!spec) throw new InvalidArgumentError('spec', 'is required');
  if (spec.scorers.length === 0) throw new InvalidArgumentError('spec.scorers', 'must list at least one scorer');
  const labels = new Set<string>();
  return spec.scorers.map((s, i) => {
    const field = `spec.scorers[${i}]`;
    const scorer = registry.get(s.name, `${field}.name`);
    if (!Number.isFinite(s.weight)) throw new InvalidArgumentError(`${field}.weight`, `must be finite, got ${s.weight}`);
    const label = s.label || s.name;
    if (labels.has(label)) {
      throw new InvalidArgumentError(`${field}.label`, `duplicate label "${label}"; give each scorer of the same name its own label`);
    }
    labels.add(label);
    const params = scorer.parseParams(s.params, `${field}.params`);
    return { name: s.name, label, weight: s.weight, params, scorer };
  });
}
