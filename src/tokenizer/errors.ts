// One error class per condition, each naming the file it is about, so a caller (or a person reading a log)
// knows which file of the model folder to fix.

/** Why a tokenizer file could not be used. */
export type TokenizerFileErrorCode = "missing" | "unreadable" | "invalid_json" | "invalid_content";

/** A file of the model folder is missing, is not JSON, or holds something the tokenizer cannot use. */
export class TokenizerFileError extends Error {
  override readonly name = "TokenizerFileError";
  constructor(
    readonly code: TokenizerFileErrorCode,
    /** Path of the file at fault. */
    readonly file: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}: ${message}`, options);
  }
}

/** Why a chat template could not produce a prompt. */
export type ChatTemplateErrorCode =
  /** The folder has no chat template, or none with the requested name. */
  | "no_template"
  /** The template source is not valid Jinja. */
  | "syntax"
  /** Rendering failed (bad expression, unsupported filter, wrong message shape...). */
  | "render"
  /** The template itself called raise_exception(...), usually because the messages break its rules. */
  | "raised";

export class ChatTemplateError extends Error {
  override readonly name = "ChatTemplateError";
  constructor(
    readonly code: ChatTemplateErrorCode,
    /** File the template came from (tokenizer_config.json, chat_template.jinja, ...). */
    readonly file: string,
    /** Template name ("default" unless the file holds several). */
    readonly templateName: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`chat template "${templateName}" from ${file}: ${message}`, options);
  }
}
