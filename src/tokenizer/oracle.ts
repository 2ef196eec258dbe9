// Checks this tokenizer against what Hugging Face's transformers produced for the same folder.
// <dir>/tokenizer_expected.json is written by the fixture generator from the Python reference:
//   { vocab_size?, add_special_tokens?,
//     cases: [{ text, ids, decoded }],
//     chat_cases: [{ messages, add_generation_prompt, rendered, tools? } | { messages, error }] }
// Every case is run through loadTokenizer(dir); each difference is counted and described.

import { join } from "node:path";

import type { ChatMessage } from "./chat-template.ts";
import { createDecodeStream } from "./decode-stream.ts";
import { ChatTemplateError, TokenizerFileError } from "./errors.ts";
import { type JsonObject, readJsonObject } from "./files.ts";
import { loadTokenizer } from "./tokenizer.ts";

export interface TokenizerFixtureReport {
  /** Encode/decode cases (and the vocabulary size) that differ from the reference. */
  tokenizer_mismatches: number;
  /** Chat-template cases that differ: other text, or an error on one side only. */
  chat_mismatches: number;
  /** One line per mismatch. */
  details: string[];
}

const preview = (s: string, max = 80): string => {
  const json = JSON.stringify(s);
  return json.length <= max ? json : `${json.slice(0, max - 4)}..."`;
};

/** Where two strings first differ, with a little context on both sides. */
function describeTextDiff(expected: string, actual: string): string {
  let i = 0;
  while (i < expected.length && i < actual.length && expected[i] === actual[i]) i++;
  const from = Math.max(0, i - 20);
  return `first difference at char ${i}: expected ${preview(expected.slice(from, i + 40))}, got ${preview(actual.slice(from, i + 40))}`;
}

function describeIdsDiff(expected: readonly number[], actual: readonly number[]): string | null {
  const n = Math.max(expected.length, actual.length);
  for (let i = 0; i < n; i++) {
    if (expected[i] !== actual[i]) {
      const from = Math.max(0, i - 3);
      return `ids differ at position ${i} (lengths ${expected.length} vs ${actual.length}): expected [${expected.slice(from, i + 5).join(", ")}...], got [${actual.slice(from, i + 5).join(", ")}...] (from position ${from})`;
    }
  }
  return null;
}

function isIdList(v: unknown): v is number[] {
  return Array.isArray(v) && v.every((x) => typeof x === "number" && Number.isInteger(x));
}

export async function checkTokenizerFixture(dir: string): Promise<TokenizerFixtureReport> {
  const file = join(dir, "tokenizer_expected.json");
  const expected = (await readJsonObject(file, true))!;
  const bad = (what: string): never => {
    throw new TokenizerFileError("invalid_content", file, what);
  };
  const cases = expected.cases ?? [];
  const chatCases = expected.chat_cases ?? [];
  if (!Array.isArray(cases)) bad("cases must be a list");
  if (!Array.isArray(chatCases)) bad("chat_cases must be a list");
  const addSpecialTokens = expected.add_special_tokens ?? true;
  if (typeof addSpecialTokens !== "boolean") bad("add_special_tokens must be true or false");

  const tokenizer = await loadTokenizer(dir);
  const details: string[] = [];
  let tokenizerMismatches = 0;
  let chatMismatches = 0;

  if (expected.vocab_size !== undefined && expected.vocab_size !== tokenizer.vocabSize) {
    tokenizerMismatches++;
    details.push(`vocab_size: expected ${String(expected.vocab_size)}, got ${tokenizer.vocabSize}`);
  }

  (cases as unknown[]).forEach((raw, i) => {
    const c = raw as JsonObject;
    if (typeof c?.text !== "string" || !isIdList(c.ids) || typeof c.decoded !== "string") {
      bad(`cases[${i}] must have string text, integer list ids and string decoded`);
    }
    const text = c.text as string;
    const ids = c.ids as number[];
    const label = `case ${i} (${preview(text, 40)})`;
    const problems: string[] = [];

    const got = tokenizer.encode(text, { addSpecialTokens: addSpecialTokens as boolean });
    const idsDiff = describeIdsDiff(ids, got);
    if (idsDiff !== null) problems.push(`encode: ${idsDiff}`);

    if (Array.isArray(c.tokens)) {
      const wrong = ids.findIndex((id, k) => tokenizer.idToToken(id) !== (c.tokens as unknown[])[k]);
      if (wrong >= 0) {
        problems.push(`idToToken(${ids[wrong]}) is ${JSON.stringify(tokenizer.idToToken(ids[wrong]))}, expected ${JSON.stringify((c.tokens as unknown[])[wrong])}`);
      }
    }
    // Decoding starts from the reference ids so a decode bug shows even when encode also differs.
    const decoded = tokenizer.decode(ids);
    if (decoded !== c.decoded) problems.push(`decode: ${describeTextDiff(c.decoded as string, decoded)}`);
    if (typeof c.decoded_skip_special === "string") {
      const skipped = tokenizer.decode(ids, { skipSpecialTokens: true });
      if (skipped !== c.decoded_skip_special) {
        problems.push(`decode(skip special): ${describeTextDiff(c.decoded_skip_special, skipped)}`);
      }
    }
    // Streaming must add up to the same text, one id at a time.
    const stream = createDecodeStream(tokenizer);
    const streamed = stream.pushMany(ids) + stream.flush();
    if (streamed !== c.decoded) problems.push(`decode stream: ${describeTextDiff(c.decoded as string, streamed)}`);

    if (problems.length > 0) {
      tokenizerMismatches++;
      details.push(`${label}: ${problems.join("; ")}`);
    }
  });

  (chatCases as unknown[]).forEach((raw, i) => {
    const c = raw as JsonObject;
    if (!Array.isArray(c?.messages)) bad(`chat_cases[${i}].messages must be a list`);
    const expectsError = "error" in c;
    if (!expectsError && typeof c.rendered !== "string") bad(`chat_cases[${i}] needs a string rendered or an error`);
    const label = `chat case ${i}`;
    let rendered: string | null = null;
    let failure: unknown = null;
    try {
      rendered = tokenizer.applyChatTemplate(c.messages as ChatMessage[], {
        addGenerationPrompt: c.add_generation_prompt === true,
        tools: Array.isArray(c.tools) ? c.tools : null,
        documents: Array.isArray(c.documents) ? c.documents : null,
        ...(typeof c.template_name === "string" ? { templateName: c.template_name } : {}),
        ...(typeof c.template_kwargs === "object" && c.template_kwargs !== null
          ? { variables: c.template_kwargs as Record<string, unknown> }
          : {}),
      });
    } catch (err) {
      failure = err;
    }

    if (expectsError) {
      if (rendered !== null) {
        chatMismatches++;
        details.push(`${label}: expected an error (${preview(String(c.error))}), but it rendered ${preview(rendered)}`);
        return;
      }
      // Both failed. When both are the template's own raise_exception, they must say the same thing.
      const expectedMessage = typeof c.error === "string" ? c.error : "";
      const raised = failure instanceof ChatTemplateError && failure.code === "raised" ? (failure.cause as Error).message : null;
      if (raised !== null && expectedMessage !== "" && !expectedMessage.includes(raised) && !raised.includes(expectedMessage)) {
        chatMismatches++;
        details.push(`${label}: the template raised ${preview(raised)}, expected ${preview(expectedMessage)}`);
      }
      return;
    }
    if (rendered === null) {
      chatMismatches++;
      details.push(`${label}: expected ${preview(c.rendered as string)}, got error: ${(failure as Error).message}`);
      return;
    }
    if (rendered !== c.rendered) {
      chatMismatches++;
      details.push(`${label}: ${describeTextDiff(c.rendered as string, rendered)}`);
    }
  });

  return { tokenizer_mismatches: tokenizerMismatches, chat_mismatches: chatMismatches, details };
}
