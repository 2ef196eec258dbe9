// The tokenizer of a Hugging Face model folder: encode/decode through @huggingface/tokenizers (a port of
// Hugging Face's tokenizers), special-token ids from tokenizer_config.json and generation_config.json, and
// chat templates. Loading is offline: only the folder's files are read.

import { join } from "node:path";

import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";

import {
  type ApplyChatTemplateOptions,
  type ChatMessage,
  type CompiledChatTemplate,
  chatTemplateContext,
  compileChatTemplate,
  selectChatTemplate,
} from "./chat-template.ts";
import { TokenizerFileError } from "./errors.ts";
import {
  type ChatTemplateSource,
  collectChatTemplates,
  parseGenerationSettings,
  parseTokenizerSettings,
  readJsonObject,
} from "./files.ts";

export interface EncodeOptions {
  /**
   * Add the tokens the tokenizer puts around a text (BOS for Llama-style tokenizers), as transformers'
   * encode does by default. Default true. Pass false for text that already holds them, such as a prompt
   * rendered by applyChatTemplate.
   */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Leave special tokens (eos, im_start, ...) out of the text. Default false. */
  skipSpecialTokens?: boolean;
}

export interface Tokenizer {
  /** The model folder it was loaded from. */
  readonly dir: string;
  /** Number of distinct tokens, added tokens included (transformers' len(tokenizer)). */
  readonly vocabSize: number;
  /**
   * Ids that end a generation: the eos_token of tokenizer_config.json and every eos_token_id of
   * generation_config.json, without repeats, in that order.
   */
  readonly eosTokenIds: readonly number[];
  /** pad_token of tokenizer_config.json, else pad_token_id of generation_config.json, else null. */
  readonly padTokenId: number | null;
  readonly bosTokenId: number | null;
  /** Names of the chat templates the folder offers ("default", "tool_use", ...); empty when none. */
  readonly chatTemplateNames: readonly string[];
  encode(text: string, options?: EncodeOptions): number[];
  /** Ids the vocabulary does not know are skipped, as Hugging Face's tokenizers does. */
  decode(ids: readonly number[], options?: DecodeOptions): string;
  /** Renders the prompt text; encode it with addSpecialTokens: false (the template writes them). */
  applyChatTemplate(messages: readonly ChatMessage[], options: ApplyChatTemplateOptions): string;
  /** The token's string form (byte-level symbols for byte-level BPE); null for an unknown id. */
  idToToken(id: number): string | null;
  /** The id of a token given in its string form; null when it is not in the vocabulary. */
  tokenToId(token: string): number | null;
  /** Whether the id is a special token (the ones skipSpecialTokens drops). */
  isSpecialToken(id: number): boolean;
}

function checkIds(ids: readonly number[]): void {
  if (!Array.isArray(ids)) throw new TypeError("decode: ids must be an array of token ids");
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0) {
      throw new TypeError(`decode: ids[${i}] is ${JSON.stringify(id)}, not a non-negative integer`);
    }
  }
}

/**
 * Loads the tokenizer of a model folder. Needs tokenizer.json; reads tokenizer_config.json,
 * generation_config.json, chat_template.jinja and additional_chat_templates/ when present.
 * Throws TokenizerFileError naming the file at fault.
 */
export async function loadTokenizer(dir: string): Promise<Tokenizer> {
  const tokenizerFile = join(dir, "tokenizer.json");
  const configFile = join(dir, "tokenizer_config.json");
  const generationFile = join(dir, "generation_config.json");

  const tokenizerJson = (await readJsonObject(tokenizerFile, true))!;
  const rawConfig = await readJsonObject(configFile, false);
  const settings = parseTokenizerSettings(rawConfig, configFile);
  const generation = parseGenerationSettings(await readJsonObject(generationFile, false), generationFile);
  const templates: ChatTemplateSource[] = await collectChatTemplates(dir, rawConfig, configFile);

  if (typeof tokenizerJson.model !== "object" || tokenizerJson.model === null) {
    throw new TokenizerFileError("invalid_content", tokenizerFile, 'no "model" object: not a tokenizers library file');
  }
  // The library expects the list; tokenizer.json files written by hand sometimes leave it out.
  const withAddedTokens = { added_tokens: [], ...tokenizerJson };
  let hf: HfTokenizer;
  try {
    hf = new HfTokenizer(withAddedTokens, settings.libraryConfig);
  } catch (err) {
    throw new TokenizerFileError("invalid_content", tokenizerFile, `cannot build the tokenizer: ${(err as Error).message}`, { cause: err });
  }

  const vocab = hf.get_vocab(true);
  let vocabSize = 0;
  for (const token of vocab.keys()) if (token !== undefined) vocabSize++;

  const specialIds = new Set<number>();
  for (const [id, added] of hf.get_added_tokens_decoder()) if (added.special) specialIds.add(id);

  /** Id of a special-token slot; a named token that is not in the vocabulary is an error in that file. */
  const slotId = (content: string | undefined, slot: string): number | null => {
    if (content === undefined) return null;
    const id = hf.token_to_id(content);
    if (id === undefined) {
      throw new TokenizerFileError("invalid_content", configFile, `${slot} ${JSON.stringify(content)} is not in the vocabulary of ${tokenizerFile}`);
    }
    specialIds.add(id);
    return id;
  };
  const bosTokenId = slotId(settings.specialTokens.bos_token, "bos_token");
  const eosTokenId = slotId(settings.specialTokens.eos_token, "eos_token");
  const padFromConfig = slotId(settings.specialTokens.pad_token, "pad_token");
  for (const token of settings.additionalSpecialTokens) {
    const id = hf.token_to_id(token);
    if (id !== undefined) specialIds.add(id);
  }

  const eosTokenIds: number[] = [];
  for (const id of [...(eosTokenId === null ? [] : [eosTokenId]), ...generation.eosTokenIds]) {
    if (!eosTokenIds.includes(id)) eosTokenIds.push(id);
  }
  Object.freeze(eosTokenIds);

  // transformers rebuilds the post-processor from add_bos_token/add_eos_token when the config sets them
  // (Llama-style tokenizers); otherwise tokenizer.json's post-processor decides what encode adds.
  const ownPostProcess = settings.addBosToken !== null || settings.addEosToken !== null;
  if (settings.addBosToken === true && bosTokenId === null) {
    throw new TokenizerFileError("invalid_content", configFile, "add_bos_token is true but bos_token is not set");
  }
  if (settings.addEosToken === true && eosTokenId === null) {
    throw new TokenizerFileError("invalid_content", configFile, "add_eos_token is true but eos_token is not set");
  }

  const templateContextTokens: Record<string, unknown> = { ...settings.specialTokens, ...settings.namedExtraTokens };
  if (settings.additionalSpecialTokens.length > 0) templateContextTokens.additional_special_tokens = settings.additionalSpecialTokens;
  const compiled = new Map<string, CompiledChatTemplate>();

  return {
    dir,
    vocabSize,
    eosTokenIds,
    padTokenId: padFromConfig ?? generation.padTokenId,
    bosTokenId,
    chatTemplateNames: Object.freeze(templates.map((t) => t.name)),

    encode(text, options = {}) {
      if (typeof text !== "string") throw new TypeError("encode: text must be a string");
      const addSpecial = options.addSpecialTokens ?? true;
      const ids = hf.encode(text, { add_special_tokens: addSpecial && !ownPostProcess }).ids;
      if (addSpecial && ownPostProcess) {
        if (settings.addBosToken === true) ids.unshift(bosTokenId!);
        if (settings.addEosToken === true) ids.push(eosTokenId!);
      }
      return ids;
    },

    decode(ids, options = {}) {
      checkIds(ids);
      const known = ids.filter((id) => hf.id_to_token(id) !== undefined);
      if (known.length === 0) return "";
      return hf.decode(known, { skip_special_tokens: options.skipSpecialTokens ?? false });
    },

    applyChatTemplate(messages, options) {
      const source = selectChatTemplate(templates, options.templateName, (options.tools?.length ?? 0) > 0, dir);
      let template = compiled.get(source.name);
      if (template === undefined) {
        template = compileChatTemplate(source);
        compiled.set(source.name, template);
      }
      return template.render(chatTemplateContext(messages, options, templateContextTokens));
    },

    idToToken(id) {
      return hf.id_to_token(id) ?? null;
    },

    tokenToId(token) {
      return hf.token_to_id(token) ?? null;
    },

    isSpecialToken(id) {
      return specialIds.has(id);
    },
  };
}
