// Group-relative advantages and the zero-variance test of DAPO dynamic sampling, as pure functions over
// rewards laid out group by group ([numGroups * G]). Same formula as src/demo/algo.ts so the services loop and
// the in-process reference loop train identically.

export interface AdvantageOptions {
  /** Divide by the group's (population) std: GRPO. Off: only subtract the group mean (Dr. GRPO). */
  stdNormalize: boolean;
  /** Added to the std before dividing. */
  eps: number;
}

export const ADVANTAGE_DEFAULTS: AdvantageOptions = { stdNormalize: true, eps: 1e-6 };

function checkLayout(what: string, n: number, G: number): void {
  if (!Number.isInteger(G) || G < 2) throw new RangeError(`${what}: group size G must be an integer >= 2, got ${G}`);
  if (n % G !== 0) throw new RangeError(`${what}: ${n} rewards is not a multiple of G = ${G}`);
}

/** A = (r - mean_group) [/ (std_group + eps)]; a group whose rewards are all equal gets 0 everywhere. */
export function groupAdvantages(rewards: ArrayLike<number>, G: number, options: Partial<AdvantageOptions> = {}): Float64Array {
  const o = { ...ADVANTAGE_DEFAULTS, ...options };
  checkLayout('groupAdvantages', rewards.length, G);
  if (!(o.eps >= 0)) throw new RangeError(`groupAdvantages: eps must be >= 0, got ${o.eps}`);
  const out = new Float64Array(rewards.length);
  for (let g = 0; g < rewards.length; g += G) {
    let mean = 0;
    for (let i = 0; i < G; i++) {
      const r = rewards[g + i];
      if (!Number.isFinite(r)) throw new RangeError(`groupAdvantages: reward ${g + i} is not finite (${r})`);
      mean += r;
    }
    mean /= G;
    let v = 0;
    for (let i = 0; i < G; i++) v += (rewards[g + i] - mean) ** 2;
    // Equal rewards carry no signal; the explicit branch keeps the advantages exactly 0 whatever eps is.
    if (v === 0) continue;
    const scale = o.stdNormalize ? 1 / (Math.sqrt(v / G) + o.eps) : 1;
    for (let i = 0; i < G; i++) out[g + i] = (rewards[g + i] - mean) * scale;
  }
  return out;
}

/** One flag per group: true when every reward of the group is equal (DAPO drops these groups). */
export function zeroVarianceGroups(rewards: ArrayLike<number>, G: number): boolean[] {
  checkLayout('zeroVarianceGroups', rewards.length, G);
  const out: boolean[] = [];
  for (let g = 0; g < rewards.length; g += G) {
    let same = true;
    for (let i = 1; i < G && same; i++) same = rewards[g + i] === rewards[g];
    out.push(same);
  }
  return out;
}
