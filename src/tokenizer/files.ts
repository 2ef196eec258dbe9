// Reading and checking the files of a Hugging Face model folder that describe its tokenizer:
// tokenizer.json (required), tokenizer_config.json, generation_config.json and chat templates.
// Everything here turns loosely typed JSON into plain, checked values; the tokenizer itself lives in
// tokenizer.ts.

import { readFile, readdir } from "node:fs/promises";
import { join } from "node:path";

import { TokenizerFileError } from "./errors.ts";

export type JsonObject = Record<string, unknown>;

/** Special-token slots of tokenizer_config.json, in the order transformers lists them. */
export const SPECIAL_TOKEN_KEYS = [
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
] as const;
export type SpecialTokenKey = (typeof SPECIAL_TOKEN_KEYS)[number];

/** One chat template and where it came from (for error messages). */
export interface ChatTemplateSource {
  name: string;
  source: string;
  file: string;
}

/** What tokenizer_config.json says, with every token written as its plain content string. */
export interface TokenizerSettings {
  file: string;
  /** Set slots only; a slot that is null or absent is left out. */
  specialTokens: Partial<Record<SpecialTokenKey, string>>;
  /** additional_special_tokens plus (transformers 5) extra_special_tokens, as content strings. */
  additionalSpecialTokens: string[];
  /** Named extra special tokens (extra_special_tokens written as an object), exposed to chat templates. */
  namedExtraTokens: Record<string, string>;
  /** null when the key is absent: then tokenizer.json's post-processor alone decides. */
  addBosToken: boolean | null;
  addEosToken: boolean | null;
  cleanUpTokenizationSpaces: boolean;
  /** The object handed to @huggingface/tokenizers, token slots flattened to strings. */
  libraryConfig: JsonObject;
}

export interface GenerationSettings {
  file: string;
  eosTokenIds: number[];
  padTokenId: number | null;
}

/** Reads and parses one JSON object file; null when the file is absent and not required. */
export async function readJsonObject(path: string, required: boolean): Promise<JsonObject | null> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") {
      if (!required) return null;
      throw new TokenizerFileError("missing", path, "file not found", { cause: err });
    }
    throw new TokenizerFileError("unreadable", path, `cannot read file (${code ?? String(err)})`, { cause: err });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new TokenizerFileError("invalid_json", path, `not valid JSON (${(err as Error).message})`, { cause: err });
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new TokenizerFileError("invalid_content", path, "expected a JSON object at the top level");
  }
  return value as JsonObject;
}

/** Reads a text file; null when it does not exist. */
export async function readOptionalText(path: string): Promise<string | null> {
  try {
    return await readFile(path, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return null;
    throw new TokenizerFileError("unreadable", path, `cannot read file (${code ?? String(err)})`, { cause: err });
  }
}

/**
 * A token as tokenizer_config.json writes it: a plain string, an AddedToken object ({content, ...},
 * sometimes tagged "__type": "AddedToken"), or null. Returns the content string or null.
 */
export function tokenContent(value: unknown, what: string, file: string): string | null {
  if (value === null || value === undefined) return null;
  if (typeof value === "string") return value;
  if (typeof value === "object" && !Array.isArray(value)) {
    const content = (value as JsonObject).content;
    if (typeof content === "string") return content;
  }
  throw new TokenizerFileError(
    "invalid_content",
    file,
    `${what} must be a string, an object with a string "content", or null; got ${JSON.stringify(value)}`,
  );
}

function optionalBoolean(config: JsonObject, key: string, file: string): boolean | null {
  const value = config[key];
  if (value === undefined || value === null) return null;
  if (typeof value !== "boolean") {
    throw new TokenizerFileError("invalid_content", file, `${key} must be true or false; got ${JSON.stringify(value)}`);
  }
  return value;
}

export function parseTokenizerSettings(raw: JsonObject | null, file: string): TokenizerSettings {
  const config = raw ?? {};
  const specialTokens: Partial<Record<SpecialTokenKey, string>> = {};
  for (const key of SPECIAL_TOKEN_KEYS) {
    const content = tokenContent(config[key], key, file);
    if (content !== null) specialTokens[key] = content;
  }

  const additional: string[] = [];
  const namedExtraTokens: Record<string, string> = {};
  const pushUnique = (token: string): void => {
    if (!additional.includes(token)) additional.push(token);
  };
  const additionalRaw = config.additional_special_tokens;
  if (additionalRaw !== undefined && additionalRaw !== null) {
    if (!Array.isArray(additionalRaw)) {
      throw new TokenizerFileError("invalid_content", file, "additional_special_tokens must be a list");
    }
    additionalRaw.forEach((t, i) => pushUnique(tokenContent(t, `additional_special_tokens[${i}]`, file) ?? ""));
  }
  // transformers 5 writes extra_special_tokens, either as a list or as {name: token}.
  const extraRaw = config.extra_special_tokens;
  if (Array.isArray(extraRaw)) {
    extraRaw.forEach((t, i) => pushUnique(tokenContent(t, `extra_special_tokens[${i}]`, file) ?? ""));
  } else if (typeof extraRaw === "object" && extraRaw !== null) {
    for (const [name, t] of Object.entries(extraRaw)) {
      const content = tokenContent(t, `extra_special_tokens.${name}`, file);
      if (content === null) continue;
      namedExtraTokens[name] = content;
      pushUnique(content);
    }
  } else if (extraRaw !== undefined && extraRaw !== null) {
    throw new TokenizerFileError("invalid_content", file, "extra_special_tokens must be a list or an object");
  }
  const cleanedAdditional = additional.filter((t) => t !== "");

  // @huggingface/tokenizers reads these slots as strings; AddedToken objects would reach it as
  // "[object Object]", so it gets a copy with every slot flattened.
  const libraryConfig: JsonObject = { ...config };
  for (const key of SPECIAL_TOKEN_KEYS) {
    if (key in libraryConfig) libraryConfig[key] = specialTokens[key] ?? null;
  }
  libraryConfig.additional_special_tokens = cleanedAdditional;
  // Hugging Face's tokenizers library is the reference: it never cleans up spaces unless asked, and
  // transformers only does so when the config says so. @huggingface/tokenizers would default to true.
  const cleanUp = optionalBoolean(config, "clean_up_tokenization_spaces", file) ?? false;
  libraryConfig.clean_up_tokenization_spaces = cleanUp;

  return {
    file,
    specialTokens,
    additionalSpecialTokens: cleanedAdditional,
    namedExtraTokens,
    addBosToken: optionalBoolean(config, "add_bos_token", file),
    addEosToken: optionalBoolean(config, "add_eos_token", file),
    cleanUpTokenizationSpaces: cleanUp,
    libraryConfig,
  };
}

function tokenIdValue(value: unknown, what: string, file: string): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0) {
    throw new TokenizerFileError("invalid_content", file, `${what} must be a non-negative integer; got ${JSON.stringify(value)}`);
  }
  return value;
}

/** generation_config.json: eos_token_id may be one id or a list of ids (Llama 3 lists several). */
export function parseGenerationSettings(raw: JsonObject | null, file: string): GenerationSettings {
  const eosTokenIds: number[] = [];
  let padTokenId: number | null = null;
  if (raw !== null) {
    const eos = raw.eos_token_id;
    if (Array.isArray(eos)) {
      eos.forEach((v, i) => eosTokenIds.push(tokenIdValue(v, `eos_token_id[${i}]`, file)));
    } else if (eos !== undefined && eos !== null) {
      eosTokenIds.push(tokenIdValue(eos, "eos_token_id", file));
    }
    const pad = raw.pad_token_id;
    if (pad !== undefined && pad !== null) padTokenId = tokenIdValue(pad, "pad_token_id", file);
  }
  return { file, eosTokenIds, padTokenId };
}

/**
 * Every chat template the folder offers. tokenizer_config.json may hold one (a string) or several
 * (a list of {name, template}, or an object name -> template); newer transformers write the default one to
 * chat_template.jinja and named ones to additional_chat_templates/<name>.jinja, and those files win.
 */
export async function collectChatTemplates(dir: string, config: JsonObject | null, configFile: string): Promise<ChatTemplateSource[]> {
  const byName = new Map<string, ChatTemplateSource>();
  const raw = config?.chat_template;
  if (typeof raw === "string") {
    byName.set("default", { name: "default", source: raw, file: configFile });
  } else if (Array.isArray(raw)) {
    raw.forEach((entry, i) => {
      const name = (entry as JsonObject | null)?.name;
      const template = (entry as JsonObject | null)?.template;
      if (typeof name !== "string" || typeof template !== "string") {
        throw new TokenizerFileError(
          "invalid_content",
          configFile,
          `chat_template[${i}] must be an object with string "name" and "template"`,
        );
      }
      byName.set(name, { name, source: template, file: configFile });
    });
  } else if (typeof raw === "object" && raw !== null) {
    for (const [name, template] of Object.entries(raw)) {
      if (typeof template !== "string") {
        throw new TokenizerFileError("invalid_content", configFile, `chat_template.${name} must be a string`);
      }
      byName.set(name, { name, source: template, file: configFile });
    }
  } else if (raw !== undefined && raw !== null) {
    throw new TokenizerFileError("invalid_content", configFile, "chat_template must be a string, a list of {name, template} or an object");
  }

  const jinjaFile = join(dir, "chat_template.jinja");
  const jinja = await readOptionalText(jinjaFile);
  if (jinja !== null) byName.set("default", { name: "default", source: jinja, file: jinjaFile });

  const extraDir = join(dir, "additional_chat_templates");
  let extraNames: string[] = [];
  try {
    extraNames = (await readdir(extraDir)).filter((n) => n.endsWith(".jinja")).sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
      throw new TokenizerFileError("unreadable", extraDir, `cannot list folder (${String(err)})`, { cause: err });
    }
  }
  for (const fileName of extraNames) {
    const file = join(extraDir, fileName);
    const source = (await readOptionalText(file)) ?? "";
    const name = fileName.slice(0, -".jinja".length);
    byName.set(name, { name, source, file });
  }
  return [...byName.values()];
}
