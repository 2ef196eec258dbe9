// Builds small but real model folders on disk for the tests: a SentencePiece-style BPE tokenizer with
// byte fallback (the Llama 2 layout: Metaspace-like normalizer, byte tokens <0xNN>, a BOS-adding
// post-processor), so tests cover the code paths the byte-level fixture does not.

import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A fresh empty folder under the system temp dir. */
export function makeTempDir(prefix = "moe-pilot-tokenizer-"): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

/** Writes each entry as a file of dir: objects as JSON, strings as they are. */
export async function writeFolder(dir: string, files: Record<string, unknown>): Promise<void> {
  for (const [name, content] of Object.entries(files)) {
    await writeFile(join(dir, name), typeof content === "string" ? content : JSON.stringify(content, null, 1));
  }
}

const SPECIAL = ["<unk>", "<s>", "</s>"];
const PIECES = ["▁", ..."abcdefghijklmnopqrstuvwxyzHW,.!?'0123456789"];
// Merge rules, in priority order, that build a few whole words so encodings mix words and characters.
const MERGES: [string, string][] = [
  ["l", "l"], ["▁", "H"], ["ll", "o"], ["e", "llo"], ["▁H", "ello"],
  ["o", "r"], ["▁", "w"], ["▁w", "or"], ["l", "d"], ["▁wor", "ld"],
  ["▁", "t"], ["h", "e"], ["▁t", "he"],
];

/** tokenizer.json of a byte-fallback BPE tokenizer in the Llama 2 layout. */
export function llamaStyleTokenizerJson(): Record<string, unknown> {
  const vocab: Record<string, number> = {};
  const add = (token: string): void => {
    if (!(token in vocab)) vocab[token] = Object.keys(vocab).length;
  };
  SPECIAL.forEach(add);
  for (let b = 0; b < 256; b++) add(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
  PIECES.forEach(add);
  for (const [a, b] of MERGES) add(a + b);
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: SPECIAL.map((content, id) => ({
      id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
    })),
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: "▁" },
        { type: "Replace", pattern: { String: " " }, content: "▁" },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [
        { SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } },
        { SpecialToken: { id: "<s>", type_id: 1 } }, { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "▁" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges: MERGES.map(([a, b]) => `${a} ${b}`),
    },
  };
}

/** A Llama-2-like chat template: BOS at the start, [INST] turns, strict role alternation. */
export const LLAMA_STYLE_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}" +
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}" +
  "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}";

/** Writes a complete Llama-style folder; `config` entries replace those of tokenizer_config.json. */
export async function makeLlamaStyleFolder(config: Record<string, unknown> = {}): Promise<string> {
  const dir = await makeTempDir();
  await writeFolder(dir, {
    "tokenizer.json": llamaStyleTokenizerJson(),
    "tokenizer_config.json": {
      tokenizer_class: "LlamaTokenizer",
      bos_token: { __type: "AddedToken", content: "<s>", lstrip: false, normalized: false, rstrip: false, single_word: false },
      eos_token: { __type: "AddedToken", content: "</s>", lstrip: false, normalized: false, rstrip: false, single_word: false },
      unk_token: "<unk>",
      pad_token: null,
      add_bos_token: true,
      add_eos_token: false,
      clean_up_tokenization_spaces: false,
      chat_template: LLAMA_STYLE_TEMPLATE,
      ...config,
    },
  });
  return dir;
}
