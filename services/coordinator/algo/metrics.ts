// Step metrics from what the phases returned, as pure functions. Names follow StepMetrics in run.proto.

export interface LossPart {
  loss: number;
  pgLoss: number;
  kl: number;
  entropy: number;
  clipFractionLow: number;
  clipFractionHigh: number;
  /** Masked tokens of the micro-batch: the weight of its per-token means. */
  tokens: number;
}

export interface StepInputs {
  step: number;
  rewards: readonly number[];
  /** Unweighted reward components per sample (ItemScore.components). */
  components: readonly Record<string, number>[];
  /** Component whose mean is the accuracy (a verifiable 0/1 reward); null: accuracy is NaN. */
  accuracyLabel: string | null;
  completionLengths: readonly number[];
  /**
   * TrainBatch metrics of every rank and micro-batch, per policy update (mu of them). With global normalisers
   * each part's loss is its share of the update's loss, so losses add up within an update.
   */
  updates: readonly { parts: readonly LossPart[]; gradNorm: number; lr: number }[];
  groupsKept: number;
  groupsFiltered: number;
  /** Seconds per phase ("rollout", "reward", "reference", "train", "optimizer", "checkpoint"). */
  phaseSeconds: Readonly<Record<string, number>>;
  stepSeconds: number;
  /** Tokens routed to each expert, [layers * experts] row-major, summed over ranks; null when unknown. */
  expertTokens: { layers: number; experts: number; counts: readonly number[] } | null;
}

export interface StepSummary {
  step: number;
  rewardMean: number;
  rewardStd: number;
  accuracy: number;
  loss: number;
  pgLoss: number;
  kl: number;
  entropy: number;
  clipFraction: number;
  gradNorm: number;
  lr: number;
  responseLengthMean: number;
  tokens: number;
  groupsKept: number;
  groupsFiltered: number;
  rolloutSeconds: number;
  trainSeconds: number;
  stepSeconds: number;
  extra: Record<string, number>;
}

export function mean(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  let s = 0;
  for (const x of xs) s += x;
  return s / xs.length;
}

/** Population std (the one the advantages use). */
export function std(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const m = mean(xs);
  let v = 0;
  for (const x of xs) v += (x - m) ** 2;
  return Math.sqrt(v / xs.length);
}

function tokenWeighted(parts: readonly LossPart[], pick: (p: LossPart) => number): number {
  let w = 0;
  let s = 0;
  for (const p of parts) {
    w += p.tokens;
    s += p.tokens * pick(p);
  }
  return w === 0 ? NaN : s / w;
}

export function summarizeStep(x: StepInputs): StepSummary {
  if (x.components.length !== x.rewards.length) {
    throw new RangeError(`summarizeStep: ${x.components.length} component records for ${x.rewards.length} rewards`);
  }
  let accuracy = NaN;
  if (x.accuracyLabel !== null) {
    const label = x.accuracyLabel;
    accuracy = mean(x.components.map((c, i) => {
      const v = c[label];
      if (v === undefined) throw new RangeError(`summarizeStep: sample ${i} has no reward component "${label}"`);
      return v;
    }));
  }
  const allParts = x.updates.flatMap((u) => u.parts);
  // Per update, the parts add up to the update's loss; over mu updates we report the mean update.
  const perUpdate = (pick: (p: LossPart) => number) => mean(x.updates.map((u) => u.parts.reduce((a, p) => a + pick(p), 0)));
  const tokens = x.updates.length === 0 ? 0 : x.updates[0].parts.reduce((a, p) => a + p.tokens, 0);
  const train = (x.phaseSeconds.train ?? 0) + (x.phaseSeconds.optimizer ?? 0) + (x.phaseSeconds.reference ?? 0);
  const extra: Record<string, number> = {
    clip_fraction_low: tokenWeighted(allParts, (p) => p.clipFractionLow),
    clip_fraction_high: tokenWeighted(allParts, (p) => p.clipFractionHigh),
    tokens_per_second: x.stepSeconds > 0 ? (tokens + x.completionLengths.reduce((a, b) => a + b, 0)) / x.stepSeconds : NaN,
    samples: x.rewards.length,
  };
  for (const [phase, s] of Object.entries(x.phaseSeconds)) extra[`time/${phase}`] = s;
  if (x.expertTokens) Object.assign(extra, expertLoadMetrics(x.expertTokens));
  return {
    step: x.step,
    rewardMean: mean(x.rewards),
    rewardStd: std(x.rewards),
    accuracy,
    loss: perUpdate((p) => p.loss),
    pgLoss: perUpdate((p) => p.pgLoss),
    kl: tokenWeighted(allParts, (p) => p.kl),
    entropy: tokenWeighted(allParts, (p) => p.entropy),
    clipFraction: tokenWeighted(allParts, (p) => p.clipFractionLow + p.clipFractionHigh),
    gradNorm: x.updates.length === 0 ? NaN : x.updates[x.updates.length - 1].gradNorm,
    lr: x.updates.length === 0 ? NaN : x.updates[x.updates.length - 1].lr,
    responseLengthMean: mean(x.completionLengths),
    tokens,
    groupsKept: x.groupsKept,
    groupsFiltered: x.groupsFiltered,
    rolloutSeconds: x.phaseSeconds.rollout ?? 0,
    trainSeconds: train,
    stepSeconds: x.stepSeconds,
    extra,
  };
}

/**
 * Tokens per expert per MoE layer ("experts/L<l>/E<e>") and each layer's imbalance (max load / mean load,
 * 1 = perfectly balanced).
 */
export function expertLoadMetrics(e: { layers: number; experts: number; counts: readonly number[] }): Record<string, number> {
  if (e.counts.length !== e.layers * e.experts) {
    throw new RangeError(`expert loads: ${e.counts.length} counts for ${e.layers} layers x ${e.experts} experts`);
  }
  const out: Record<string, number> = {};
  for (let l = 0; l < e.layers; l++) {
    const row = e.counts.slice(l * e.experts, (l + 1) * e.experts);
    row.forEach((c, i) => (out[`experts/L${l}/E${i}`] = c));
    const m = mean(row);
    out[`experts/L${l}/imbalance`] = m > 0 ? Math.max(...row) / m : NaN;
  }
  return out;
}

/** Flat name -> number record for NATS (StepSummary fields in snake_case, extras as they are). */
export function flattenSummary(s: StepSummary): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(s)) {
    if (k === 'extra' || k === 'step') continue;
    out[k.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase())] = v as number;
  }
  Object.assign(out, s.extra);
  return out;
}
