// How one step's work is spread over ranks and micro-batches, as pure functions.
//
// With expert parallelism every engine call is collective: each rank makes the same calls in the same order.
// So every rank must see the same number of micro-batches (a rank with fewer sequences gets smaller or empty
// ones), and memory must not grow with G: a micro-batch never holds more than M sequences, more sequences
// give more micro-batches, not bigger ones.

/** Round-robin owner of each prompt: prompt i is generated (and trained) on rank i % W. */
export function assignPrompts(numPrompts: number, worldSize: number, offset = 0): number[] {
  if (!Number.isInteger(worldSize) || worldSize < 1) throw new RangeError(`worldSize must be an integer >= 1, got ${worldSize}`);
  if (!Number.isInteger(numPrompts) || numPrompts < 0) throw new RangeError(`numPrompts must be an integer >= 0, got ${numPrompts}`);
  return Array.from({ length: numPrompts }, (_, i) => (i + offset) % worldSize);
}

export interface MicroBatchPlan {
  /** Micro-batches every rank runs (the same on all ranks; at least 1 so the collective phase happens). */
  microBatches: number;
  /** ranges[r][k] = [begin, end) into rank r's own sequence list; may be empty. */
  ranges: [number, number][][];
}

/**
 * Splits each rank's sequences into K micro-batches of at most maxPerMicroBatch, with K the same on every rank:
 * K = max over ranks of ceil(n_r / M), and each rank spreads its n_r sequences over the K as evenly as it can.
 */
export function planMicroBatches(sequencesPerRank: readonly number[], maxPerMicroBatch: number): MicroBatchPlan {
  if (!Number.isInteger(maxPerMicroBatch) || maxPerMicroBatch < 1) {
    throw new RangeError(`micro-batch size must be an integer >= 1, got ${maxPerMicroBatch}`);
  }
  if (sequencesPerRank.length === 0) throw new RangeError('planMicroBatches: no ranks');
  for (const [r, n] of sequencesPerRank.entries()) {
    if (!Number.isInteger(n) || n < 0) throw new RangeError(`planMicroBatches: rank ${r} has ${n} sequences`);
  }
  const K = Math.max(1, ...sequencesPerRank.map((n) => Math.ceil(n / maxPerMicroBatch)));
  const ranges = sequencesPerRank.map((n) => {
    const out: [number, number][] = [];
    const base = Math.floor(n / K);
    const extra = n % K;
    let at = 0;
    for (let k = 0; k < K; k++) {
      const size = base + (k < extra ? 1 : 0);
      out.push([at, at + size]);
      at += size;
    }
    return out;
  });
  return { microBatches: K, ranges };
}

export interface SequenceCounts {
  /** Completion tokens that count in the loss. */
  completionTokens: number;
}

/** Loss normalisers over the whole step (every rank, every micro-batch), so accumulation adds up to one batch. */
export function globalNormalisers(sequences: readonly SequenceCounts[]): { globalTokens: number; globalSequences: number } {
  let tokens = 0;
  for (const s of sequences) tokens += s.completionTokens;
  return { globalTokens: tokens, globalSequences: sequences.length };
}
