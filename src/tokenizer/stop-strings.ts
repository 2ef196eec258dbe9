// Stop strings: generation ends where the text first contains one of them, and the text is cut there
// (the stop string itself is not part of the output). While streaming, text that could be the start of a
// stop string is held back until the next delta shows whether it is one.

export interface StopStringMatch {
  /** Where to cut: the output is text.slice(0, index). */
  index: number;
  /** The stop string found there. */
  stop: string;
}

function checkStops(stops: readonly string[]): void {
  if (!Array.isArray(stops)) throw new TypeError("stop strings must be an array of strings");
  stops.forEach((s, i) => {
    if (typeof s !== "string" || s.length === 0) {
      throw new TypeError(`stop string [${i}] must be a non-empty string, got ${JSON.stringify(s)}`);
    }
  });
}

/**
 * The earliest occurrence of any stop string in text at or after fromIndex (when two start at the same
 * place, the longer wins); null when there is none.
 */
export function findStopString(text: string, stops: readonly string[], fromIndex = 0): StopStringMatch | null {
  checkStops(stops);
  let best: StopStringMatch | null = null;
  for (const stop of stops) {
    const index = text.indexOf(stop, fromIndex);
    if (index < 0) continue;
    if (best === null || index < best.index || (index === best.index && stop.length > best.stop.length)) {
      best = { index, stop };
    }
  }
  return best;
}

/** Length of the longest end of text that is the start (but not the whole) of some stop string. */
export function partialStopLength(text: string, stops: readonly string[]): number {
  checkStops(stops);
  let longest = 0;
  for (const stop of stops) {
    for (let len = Math.min(stop.length - 1, text.length); len > longest; len--) {
      if (text.endsWith(stop.slice(0, len))) {
        longest = len;
        break;
      }
    }
  }
  return longest;
}

export interface StopStringStep {
  /** Text safe to hand on now. */
  text: string;
  /** True once a stop string was found; later pushes return "". */
  stopped: boolean;
  /** The stop string that ended generation, or null. */
  stop: string | null;
}

export interface StopStringFilter {
  push(delta: string): StopStringStep;
  /** At the end of generation: the held-back text (it was not a stop string after all). */
  flush(): string;
  /** All text handed on so far. */
  readonly text: string;
}

/** Streams text deltas through stop-string detection. With no stop strings it passes everything on. */
export function createStopStringFilter(stops: readonly string[]): StopStringFilter {
  checkStops(stops);
  const maxLen = Math.max(0, ...stops.map((s) => s.length));
  let full = "";
  let emitted = 0;
  let stop: string | null = null;

  return {
    push(delta) {
      if (stop !== null) return { text: "", stopped: true, stop };
      // A stop string can straddle the old end of the text, so search from maxLen - 1 characters before it.
      const from = Math.max(0, full.length - maxLen + 1);
      full += delta;
      const match = findStopString(full, stops, from);
      if (match !== null) {
        stop = match.stop;
        const text = full.slice(emitted, Math.max(emitted, match.index));
        full = full.slice(0, match.index);
        emitted = full.length;
        return { text, stopped: true, stop };
      }
      const safe = full.length - partialStopLength(full, stops);
      const text = full.slice(emitted, Math.max(emitted, safe));
      emitted = Math.max(emitted, safe);
      return { text, stopped: false, stop: null };
    },
    flush() {
      const text = full.slice(emitted);
      emitted = full.length;
      return text;
    },
    get text() {
      return full.slice(0, emitted);
    },
  };
}
