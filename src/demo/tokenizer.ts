// A character-level tokenizer in the Hugging Face tokenizer.json format: one token per character of the
// task's alphabet plus Qwen-style special tokens. It is a BPE model with no merges behind a pre-tokenizer
// that isolates every character, so any HF loader (tokenizers, tokenizers.js) reads it as is.
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';

export const PAD_TOKEN = '<|endoftext|>';
export const BOS_TOKEN = '<|im_start|>';
export const EOS_TOKEN = '<|im_end|>';
export const SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN] as const;

export interface TokenizerFiles {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
}

/** The two files for an alphabet: specials take ids 0..2, then one id per distinct character in order. */
export function buildTokenizerFiles(alphabet: string): TokenizerFiles {
  const chars = [...new Set([...alphabet])];
  if (chars.length === 0) throw new RangeError('tokenizer: the alphabet is empty');
  for (const c of chars) {
    if (/\s/.test(c) && c !== ' ') throw new RangeError(`tokenizer: whitespace other than ' ' is not supported (got ${JSON.stringify(c)})`);
  }
  const vocab: Record<string, number> = {};
  SPECIAL_TOKENS.forEach((s, i) => (vocab[s] = i));
  chars.forEach((c, i) => (vocab[c] = SPECIAL_TOKENS.length + i));
  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: SPECIAL_TOKENS.map((content, id) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true })),
    normalizer: null,
    // Every character its own word, so the merge-less BPE maps it to its id.
    pre_tokenizer: { type: 'Split', pattern: { Regex: '.' }, behavior: 'Isolated', invert: false },
    post_processor: null,
    decoder: { type: 'Fuse' },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: [],
    },
  };
  const tokenizerConfig = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    bos_token: null,
    eos_token: EOS_TOKEN,
    pad_token: PAD_TOKEN,
    model_max_length: 256,
  };
  return { tokenizerJson, tokenizerConfig };
}

export async function writeTokenizerFiles(dir: string, alphabet: string): Promise<void> {
  const { tokenizerJson, tokenizerConfig } = buildTokenizerFiles(alphabet);
  await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson, null, 2) + '\n');
  await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(tokenizerConfig, null, 2) + '\n');
}

export interface DemoTokenizer {
  readonly vocabSize: number;
  readonly eosId: number;
  readonly padId: number;
  /** Ids of the text (special tokens written out are recognised); throws on characters outside the vocabulary. */
  encode(text: string): number[];
  decode(ids: readonly number[], options?: { skipSpecialTokens?: boolean }): string;
}

/** Wraps a tokenizers.js Tokenizer built from the two files' contents. */
export function createDemoTokenizer(files: TokenizerFiles): DemoTokenizer {
  const tok = new Tokenizer(files.tokenizerJson, files.tokenizerConfig);
  const vocab = tok.get_vocab(true);
  const id = (t: string) => {
    const v = tok.token_to_id(t);
    if (v === undefined) throw new Error(`tokenizer: special token ${t} is missing from the vocabulary`);
    return v;
  };
  const decode = (ids: readonly number[], options: { skipSpecialTokens?: boolean } = {}) =>
    tok.decode([...ids], { skip_special_tokens: options.skipSpecialTokens ?? false });
  return {
    vocabSize: vocab.size,
    eosId: id(EOS_TOKEN),
    padId: id(PAD_TOKEN),
    encode(text) {
      const ids = tok.encode(text, { add_special_tokens: false }).ids;
      // tokenizers.js drops characters it has no id for; a lossy encoding is an error here.
      const back = decode(ids);
      if (back !== text) {
        const bad = [...text].find((c) => !vocab.has(c)) ?? '?';
        throw new RangeError(`tokenizer: cannot encode ${JSON.stringify(text)}: character ${JSON.stringify(bad)} is not in the vocabulary`);
      }
      return ids;
    },
    decode,
  };
}

/** Loads tokenizer.json and tokenizer_config.json from a model folder. */
export async function loadDemoTokenizer(dir: string): Promise<DemoTokenizer> {
  const read = async (f: string) => JSON.parse(await readFile(join(dir, f), 'utf8')) as Record<string, unknown>;
  return createDemoTokenizer({ tokenizerJson: await read('tokenizer.json'), tokenizerConfig: await read('tokenizer_config.json') });
}
