// Two expert-parallel drills (test/gpu/ep-stack.ts records) of the same model, seed and prompts at different
// numbers of ranks, compared on their first step, the one both take from the same weights. Equal exactly: the
// completions' token count and the rewards (rollout is batch-invariant, and a prompt's samples come from Philox
// streams keyed by the prompt, not by the rank that generates it) and the tokens each expert of each layer received
// (routing is row-invariant). Equal within a tolerance: the loss, entropy and gradient norm, whose sums over ranks
// and micro-batches run in another order (fp32 on CPU ranks; bf16 GEMM operands with fp32 accumulation on GPUs).
// Later steps are not compared: after one optimizer step the weights differ in their last bits, and a sample may
// then part at a near-tie.

/** The part of an ep-stack per-step record the comparison reads. */
export interface DrillStep {
  step: number;
  expert_load?: Record<string, number>;
  [metric: string]: unknown;
}

export interface DrillRecord {
  ranks: number;
  per_step: DrillStep[];
}

export interface Check {
  what: string;
  a: number | string;
  b: number | string;
  ok: boolean;
  /** |b - a| / max(|a|, the metric's floor), for the checks with a tolerance. */
  rel?: number;
}

const EXACT = ['completion_tokens', 'trained_tokens', 'reward_mean'];
// Each with the scale its difference is measured against: at least |A's value|, and for the losses at least 1. A
// GRPO loss is a mean of advantage-weighted ratios; the advantages are O(1) but, normalized within each group, sum
// to about zero, so the first step's loss is ~1e-9 and its last bits are noise against that value itself.
const CLOSE: [string, number][] = [['loss', 1], ['pg_loss', 1], ['entropy', 1e-12], ['grad_norm', 1e-12]];

/** B's first step against A's; relTol bounds the relative difference of the toleranced metrics. */
export function compareFirstStep(a: DrillRecord, b: DrillRecord, relTol: number): { ok: boolean; checks: Check[] } {
  const first = (r: DrillRecord, label: string) => {
    const s = r.per_step?.find((x) => x.step === 1);
    if (!s) throw new Error(`${label}: no step 1 among the record's steps`);
    return s;
  };
  const [sa, sb] = [first(a, 'A'), first(b, 'B')];
  const checks: Check[] = [];
  for (const k of EXACT) {
    if (!(k in sa) && !(k in sb)) continue;
    checks.push({ what: k, a: sa[k] as number, b: sb[k] as number, ok: sa[k] === sb[k] });
  }
  for (const [k, floor] of CLOSE) {
    if (!(k in sa) && !(k in sb)) continue;
    const [x, y] = [sa[k] as number, sb[k] as number];
    const rel = Math.abs(y - x) / Math.max(Math.abs(x), floor);
    checks.push({ what: k, a: x, b: y, rel, ok: Number.isFinite(rel) && rel <= relTol });
  }
  const experts = (s: DrillStep) => new Map(Object.entries(s.expert_load ?? {}).filter(([k]) => /^experts\/L\d+\/E\d+$/.test(k)));
  const [ea, eb] = [experts(sa), experts(sb)];
  const differing = [...new Set([...ea.keys(), ...eb.keys()])].filter((k) => ea.get(k) !== eb.get(k));
  checks.push({
    what: 'tokens per expert per layer',
    a: `${ea.size} (layer, expert) counts`,
    b: differing.length ? `${differing.length} differ (first ${differing[0]}: ${ea.get(differing[0])} vs ${eb.get(differing[0])})` : 'all equal',
    ok: ea.size > 0 && differing.length === 0,
  });
  return { ok: checks.every((c) => c.ok), checks };
}

export function formatCheck(c: Check): string {
  return `${c.ok ? 'ok  ' : 'FAIL'} ${c.what}: ${c.a} vs ${c.b}${c.rel !== undefined ? ` (rel ${c.rel.toExponential(2)})` : ''}`;
}
