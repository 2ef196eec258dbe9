// Weighted combination of scorer components: reward = sum_i weight_i * component_i.

export interface WeightedComponent {
  label: string;
  weight: number;
}

/**
 * Per item, the weighted sum and the unweighted components by label.
 * `values[s][i]` is scorer s's value for item i.
 */
export function combineScores(
  scorers: readonly WeightedComponent[],
  values: readonly (readonly number[])[],
  itemCount: number,
): { score: number; components: Record<string, number> }[] {
  const out: { score: number; components: Record<string, number> }[] = [];
  for (let i = 0; i < itemCount; i += 1) {
    let score = 0;
    const components: Record<string, number> = {};
    scorers.forEach((scorer, s) => {
      const value = values[s][i];
      components[scorer.label] = value;
      score += scorer.weight * value;
    });
    out.push({ score, components });
  }
  return out;
}
