// Incremental detokenization for streaming generation. Decoding one id at a time is wrong in two ways:
// a character may span several tokens (byte-level BPE and byte-fallback tokens carry single UTF-8 bytes,
// which decode to U+FFFD until the character is complete), and some decoders change a token's text by
// its position (a Metaspace decoder drops the leading space of the first token). So each step decodes a
// short window of ids, starting a few tokens back, and emits only what the newest ids added, holding
// text back while it ends in an unfinished character.

import type { DecodeOptions, Tokenizer } from "./tokenizer.ts";

const REPLACEMENT_CHAR = "\uFFFD";

export interface DecodeStream {
  /** Adds one generated id; returns the text it completes ("" while a character is unfinished). */
  push(id: number): string;
  /** Adds several ids; returns the text they complete. */
  pushMany(ids: readonly number[]): string;
  /**
   * Returns whatever is still held back (an unfinished character decodes to U+FFFD, as a full decode
   * would); call once generation has ended.
   */
  flush(): string;
  /** Every id pushed so far. */
  readonly ids: readonly number[];
}

export function createDecodeStream(tokenizer: Pick<Tokenizer, "decode">, options: DecodeOptions = {}): DecodeStream {
  const ids: number[] = [];
  // ids[prefixStart, readStart) were already emitted and serve as decoding context; ids[readStart, end)
  // are not emitted yet.
  let prefixStart = 0;
  let readStart = 0;

  const step = (final: boolean): string => {
    if (readStart === ids.length) return "";
    const prefixText = tokenizer.decode(ids.slice(prefixStart, readStart), options);
    const fullText = tokenizer.decode(ids.slice(prefixStart), options);
    // A trailing U+FFFD means the last token ended inside a multi-byte character: wait for the rest.
    if (!final && (fullText.length <= prefixText.length || fullText.endsWith(REPLACEMENT_CHAR))) return "";
    // The context text is normally a prefix of the longer decode; slicing by length keeps the stream
    // going even for decoders where it is not (the full decode stays the reference in that case).
    const delta = fullText.slice(prefixText.length);
    prefixStart = readStart;
    readStart = ids.length;
    return delta;
  };

  const push = (id: number): string => {
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0) {
      throw new TypeError(`decode stream: ${JSON.stringify(id)} is not a token id`);
    }
    ids.push(id);
    return step(false);
  };

  return {
    push,
    pushMany(more) {
      let out = "";
      for (const id of more) out += push(id);
      return out;
    },
    flush() {
      return step(true);
    },
    ids,
  };
}
