// prompts.jsonl -> pilot.v1.Prompt: one JSON object per line,
//   {"prompt": "..."} or {"text": "..."} or {"messages": [{"role": "user", "content": "..."}]},
//   plus "answer" (or "reference" / "reference_answer"), optional "id" and "metadata" (an object).
// A bad line is reported with its line number and skipped; every good line is kept.
import type { Prompt } from '../../proto/gen/pilot/v1/run.ts';

export interface PromptLineIssue {
  /** 1-based line number in the file. */
  line: number;
  message: string;
}

export interface ParsedPrompts {
  prompts: Prompt[];
  /** The file line each prompt came from (same order as prompts). */
  lines: number[];
  issues: PromptLineIssue[];
}

const TEXT_KEYS = ['prompt', 'text'] as const;
const ANSWER_KEYS = ['answer', 'reference', 'reference_answer'] as const;
const KNOWN_KEYS = new Set<string>(['id', 'messages', 'metadata', ...TEXT_KEYS, ...ANSWER_KEYS]);

/** Checks one parsed line; returns the Prompt or a message saying what is wrong. */
export function promptFromObject(obj: unknown): Prompt | string {
  if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) return `expected a JSON object, got ${Array.isArray(obj) ? 'an array' : JSON.stringify(obj)}`;
  const o = obj as Record<string, unknown>;
  const unknown = Object.keys(o).filter((k) => !KNOWN_KEYS.has(k));
  if (unknown.length) return `unknown field${unknown.length > 1 ? 's' : ''} ${unknown.map((k) => JSON.stringify(k)).join(', ')} (known: ${[...KNOWN_KEYS].join(', ')})`;
  const inputs = [...TEXT_KEYS, 'messages'].filter((k) => o[k] !== undefined);
  if (inputs.length !== 1) return inputs.length ? `give one of "prompt", "text" or "messages", not ${inputs.map((k) => `"${k}"`).join(' and ')}` : 'missing "prompt" (or "text" or "messages")';
  let input: Prompt['input'];
  if (inputs[0] === 'messages') {
    const m = o.messages;
    if (!Array.isArray(m) || m.length === 0) return '"messages" must be a non-empty array of {role, content}';
    const messages = [];
    for (let i = 0; i < m.length; i++) {
      const msg = m[i] as Record<string, unknown> | null;
      if (typeof msg !== 'object' || msg === null || typeof msg.role !== 'string' || typeof msg.content !== 'string') {
        return `messages[${i}] must be {"role": string, "content": string}`;
      }
      messages.push({ role: msg.role, content: msg.content });
    }
    input = { $case: 'messages', value: { messages } };
  } else {
    const text = o[inputs[0]];
    if (typeof text !== 'string' || text === '') return `"${inputs[0]}" must be a non-empty string`;
    input = { $case: 'text', value: text };
  }
  const answers = ANSWER_KEYS.filter((k) => o[k] !== undefined);
  if (answers.length > 1) return `give one of ${answers.map((k) => `"${k}"`).join(' or ')}, not both`;
  let referenceAnswer = '';
  if (answers.length) {
    const a = o[answers[0]];
    // Numbers are common answers in JSON ({"answer": 42}); they travel as text.
    if (typeof a === 'number' && Number.isFinite(a)) referenceAnswer = String(a);
    else if (typeof a === 'string') referenceAnswer = a;
    else return `"${answers[0]}" must be a string or a number`;
  }
  let id = '';
  if (o.id !== undefined) {
    if (typeof o.id !== 'string' && typeof o.id !== 'number') return '"id" must be a string or a number';
    id = String(o.id);
  }
  const metadata: Record<string, string> = {};
  if (o.metadata !== undefined) {
    if (typeof o.metadata !== 'object' || o.metadata === null || Array.isArray(o.metadata)) return '"metadata" must be an object';
    for (const [k, v] of Object.entries(o.metadata)) metadata[k] = typeof v === 'string' ? v : JSON.stringify(v);
  }
  return { id, input, referenceAnswer, metadata };
}

export function parsePromptsJsonl(text: string): ParsedPrompts {
  const out: ParsedPrompts = { prompts: [], lines: [], issues: [] };
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i].trim();
    if (raw === '') continue;
    let obj: unknown;
    try {
      obj = JSON.parse(raw);
    } catch (err) {
      out.issues.push({ line: i + 1, message: `not valid JSON: ${(err as Error).message}` });
      continue;
    }
    const p = promptFromObject(obj);
    if (typeof p === 'string') out.issues.push({ line: i + 1, message: p });
    else {
      out.prompts.push(p);
      out.lines.push(i + 1);
    }
  }
  return out;
}
