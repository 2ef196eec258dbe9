// Public surface of the tokenizer module.
export { loadTokenizer } from "./tokenizer.ts";
export type { Tokenizer, EncodeOptions, DecodeOptions } from "./tokenizer.ts";
export type { ChatMessage, ApplyChatTemplateOptions } from "./chat-template.ts";
export { createDecodeStream } from "./decode-stream.ts";
export type { DecodeStream } from "./decode-stream.ts";
export { findStopString, partialStopLength, createStopStringFilter } from "./stop-strings.ts";
export type { StopStringMatch, StopStringFilter, StopStringStep } from "./stop-strings.ts";
export { TokenizerFileError, ChatTemplateError } from "./errors.ts";
export type { TokenizerFileErrorCode, ChatTemplateErrorCode } from "./errors.ts";
export { checkTokenizerFixture } from "./oracle.ts";
export type { TokenizerFixtureReport } from "./oracle.ts";
