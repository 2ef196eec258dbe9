// Chat templates: Jinja programs shipped with a model that turn a list of messages into the prompt text.
// They run on @huggingface/jinja (a Jinja interpreter). The render context follows what transformers'
// apply_chat_template passes: messages, tools, documents, add_generation_prompt, every special token
// (bos_token, eos_token, ...) and caller-chosen extra variables, plus the raise_exception and
// strftime_now helpers that templates call.

import { Environment, Interpreter, Template } from "@huggingface/jinja";

import { ChatTemplateError } from "./errors.ts";
import type { ChatTemplateSource } from "./files.ts";

/** One chat message. content is usually a string; templates may also accept a list of parts, tool_calls, ... */
export interface ChatMessage {
  role: string;
  content?: unknown;
  [key: string]: unknown;
}

export interface ApplyChatTemplateOptions {
  /** Append the opening of an assistant turn so the model writes the reply. */
  addGenerationPrompt: boolean;
  /** Tool (function) schemas in the JSON form templates expect; null/absent means no tools. */
  tools?: readonly unknown[] | null;
  /** Documents for retrieval-augmented templates; null/absent means none. */
  documents?: readonly unknown[] | null;
  /** Which template to use when the folder has several; see selectChatTemplate. */
  templateName?: string;
  /** Extra variables some templates read (enable_thinking, date_string, ...). */
  variables?: Readonly<Record<string, unknown>>;
}

/** The context keys set by the caller's options; `variables` may not override them. */
const RESERVED_KEYS = new Set(["messages", "tools", "documents", "add_generation_prompt"]);

/** Thrown by the template's raise_exception(); turned into a ChatTemplateError with code "raised". */
class TemplateRaised extends Error {}

/** Python's range(stop) / range(start, stop[, step]), which templates use for index loops. */
function pythonRange(...args: unknown[]): number[] {
  const nums = args.map((a) => {
    if (typeof a !== "number" || !Number.isInteger(a)) throw new TypeError(`range() arguments must be integers, got ${JSON.stringify(a)}`);
    return a;
  });
  if (nums.length < 1 || nums.length > 3) throw new TypeError(`range expected 1 to 3 arguments, got ${nums.length}`);
  const [start, stop, step] = nums.length === 1 ? [0, nums[0], 1] : [nums[0], nums[1], nums[2] ?? 1];
  if (step === 0) throw new RangeError("range() arg 3 must not be zero");
  const out: number[] = [];
  for (let i = start; step > 0 ? i < stop : i > stop; i += step) out.push(i);
  return out;
}

const MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/** Python's strftime for the directives chat templates use (Llama 3 writes today's date with "%d %b %Y"). */
export function strftime(date: Date, format: string): string {
  const pad = (n: number, width = 2): string => String(n).padStart(width, "0");
  const dayOfYear = Math.floor(
    (Date.UTC(date.getFullYear(), date.getMonth(), date.getDate()) - Date.UTC(date.getFullYear(), 0, 1)) / 86_400_000,
  ) + 1;
  return format.replace(/%([a-zA-Z%])/g, (whole, directive: string) => {
    switch (directive) {
      case "Y": return String(date.getFullYear());
      case "y": return pad(date.getFullYear() % 100);
      case "m": return pad(date.getMonth() + 1);
      case "d": return pad(date.getDate());
      case "e": return String(date.getDate()).padStart(2, " ");
      case "B": return MONTHS[date.getMonth()];
      case "b": return MONTHS[date.getMonth()].slice(0, 3);
      case "A": return WEEKDAYS[date.getDay()];
      case "a": return WEEKDAYS[date.getDay()].slice(0, 3);
      case "H": return pad(date.getHours());
      case "I": return pad(date.getHours() % 12 === 0 ? 12 : date.getHours() % 12);
      case "p": return date.getHours() < 12 ? "AM" : "PM";
      case "M": return pad(date.getMinutes());
      case "S": return pad(date.getSeconds());
      case "j": return pad(dayOfYear, 3);
      case "%": return "%";
      default:
        throw new RangeError(`strftime_now: unsupported directive ${whole}`);
    }
  });
}

/** A parsed chat template, ready to render any number of times. */
export interface CompiledChatTemplate {
  readonly name: string;
  readonly file: string;
  render(context: Record<string, unknown>): string;
}

export function compileChatTemplate(template: ChatTemplateSource, now: () => Date = () => new Date()): CompiledChatTemplate {
  let parsed: Template;
  try {
    // Template's constructor lexes with trim_blocks and lstrip_blocks on, as transformers does.
    parsed = new Template(template.source);
  } catch (err) {
    throw new ChatTemplateError("syntax", template.file, template.name, `invalid Jinja: ${(err as Error).message}`, { cause: err });
  }
  return {
    name: template.name,
    file: template.file,
    render(context) {
      // A fresh environment per render: no state leaks between prompts. The globals are declared here
      // rather than through Template.render so that raise_exception can be told apart from other failures.
      const env = new Environment();
      const globals: Record<string, unknown> = {
        true: true, false: false, none: null, True: true, False: false, None: null,
        range: pythonRange,
        strftime_now: (format: unknown) => {
          if (typeof format !== "string") throw new TypeError("strftime_now() expects a format string");
          return strftime(now(), format);
        },
        raise_exception: (message: unknown) => {
          throw new TemplateRaised(typeof message === "string" ? message : JSON.stringify(message));
        },
      };
      try {
        for (const [key, value] of Object.entries({ ...globals, ...context })) env.set(key, value);
        const result = new Interpreter(env).run(parsed.parsed);
        if (typeof result.value !== "string") {
          throw new TypeError(`template produced ${result.type}, not a string`);
        }
        return result.value;
      } catch (err) {
        if (err instanceof TemplateRaised) {
          throw new ChatTemplateError("raised", template.file, template.name, `raise_exception: ${err.message}`, { cause: err });
        }
        throw new ChatTemplateError("render", template.file, template.name, `render failed: ${(err as Error).message}`, { cause: err });
      }
    },
  };
}

/**
 * Picks the template as transformers does: the requested name; else "tool_use" when tools are given and the
 * folder has one; else "default"; a folder with a single template uses it whatever its name.
 */
export function selectChatTemplate(
  templates: readonly ChatTemplateSource[],
  requested: string | undefined,
  hasTools: boolean,
  dir: string,
): ChatTemplateSource {
  const names = templates.map((t) => t.name);
  const find = (name: string): ChatTemplateSource | undefined => templates.find((t) => t.name === name);
  if (templates.length === 0) {
    throw new ChatTemplateError(
      "no_template",
      dir,
      requested ?? "default",
      "the folder has no chat template (none in tokenizer_config.json, no chat_template.jinja)",
    );
  }
  if (requested !== undefined) {
    const hit = find(requested);
    if (hit === undefined) {
      throw new ChatTemplateError("no_template", dir, requested, `no template of that name; available: ${names.join(", ")}`);
    }
    return hit;
  }
  if (hasTools) {
    const toolUse = find("tool_use");
    if (toolUse !== undefined) return toolUse;
  }
  const fallback = find("default") ?? (templates.length === 1 ? templates[0] : undefined);
  if (fallback === undefined) {
    throw new ChatTemplateError("no_template", dir, "default", `no "default" template; pass templateName, one of: ${names.join(", ")}`);
  }
  return fallback;
}

/** Builds the render context; special tokens first so that caller variables may replace them. */
export function chatTemplateContext(
  messages: readonly ChatMessage[],
  options: ApplyChatTemplateOptions,
  specialTokens: Readonly<Record<string, unknown>>,
): Record<string, unknown> {
  if (!Array.isArray(messages)) throw new TypeError("applyChatTemplate: messages must be an array");
  messages.forEach((m, i) => {
    if (typeof m !== "object" || m === null || typeof m.role !== "string") {
      throw new TypeError(`applyChatTemplate: messages[${i}] must be an object with a string role`);
    }
  });
  for (const key of Object.keys(options.variables ?? {})) {
    if (RESERVED_KEYS.has(key)) throw new TypeError(`applyChatTemplate: variables.${key} is set by the options themselves`);
  }
  return {
    ...specialTokens,
    ...options.variables,
    messages,
    tools: options.tools ?? null,
    documents: options.documents ?? null,
    add_generation_prompt: options.addGenerationPrompt,
  };
}
