// The demo's synthetic task: a prompt of digits, an answer a program can check. Three kinds:
//   sort:    "s3819=" -> "1389"   (the digits in ascending order)
//   reverse: "r3819=" -> "9183"
//   add:     "37+45=" -> "82"     (two numbers of `digits` digits, the sum without leading zeros)
// Every prompt of the kind is enumerated, shuffled by seed and split into disjoint train and held-out
// sets, so held-out accuracy measures generalisation to prompts never trained on.
import type { Generator } from '../engine/generator.ts';
import { createRng, shuffle } from './rng.ts';
import type { DemoTokenizer } from './tokenizer.ts';

export type TaskKind = 'sort' | 'reverse' | 'add';
export const TASK_KINDS: readonly TaskKind[] = ['sort', 'reverse', 'add'];

export interface TaskOptions {
  kind: TaskKind;
  /** Digits per prompt (sort, reverse) or per operand (add). */
  digits: number;
  /** Held-out prompts (taken first from the shuffled list). */
  heldOut: number;
  /** Train prompts; default: all prompts not held out. */
  train?: number;
  seed: number;
}

export interface Example {
  prompt: string;
  /** The exact answer text (without the end marker). */
  answer: string;
}

export interface Task {
  readonly options: Readonly<TaskOptions>;
  readonly train: readonly Example[];
  readonly heldOut: readonly Example[];
  /** Every character a prompt or answer may contain (for the tokenizer). */
  readonly alphabet: string;
  /** Longest answer in characters (sizes maxNewTokens: answer + end marker). */
  readonly maxAnswerChars: number;
}

/** The end-of-answer marker the model emits (the tokenizer's eos). */
export const END_MARKER = '<|im_end|>';
export const TASK_ALPHABET = '0123456789+=rs';

/** Prompts are enumerated; above this count the kind/digits pair is refused (the demo wants a small set). */
const MAX_PROMPTS = 1_000_000;

export function promptCount(kind: TaskKind, digits: number): number {
  return kind === 'add' ? 10 ** (2 * digits) : 10 ** digits;
}

/** The task's prompt and answer for the index-th prompt of its kind (index in [0, promptCount)). */
export function exampleAt(kind: TaskKind, digits: number, index: number): Example {
  if (kind === 'add') {
    const m = 10 ** digits;
    const a = Math.floor(index / m);
    const b = index % m;
    return { prompt: `${pad(a, digits)}+${pad(b, digits)}=`, answer: String(a + b) };
  }
  const s = pad(index, digits);
  if (kind === 'sort') return { prompt: `s${s}=`, answer: [...s].sort().join('') };
  return { prompt: `r${s}=`, answer: [...s].reverse().join('') };
}

function pad(n: number, width: number): string {
  return String(n).padStart(width, '0');
}

export function createTask(options: TaskOptions): Task {
  const { kind, digits, heldOut, seed } = options;
  if (!TASK_KINDS.includes(kind)) throw new TypeError(`task: kind must be one of ${TASK_KINDS.join(', ')}, got '${String(kind)}'`);
  if (!Number.isInteger(digits) || digits < 1) throw new RangeError(`task: digits must be an integer >= 1, got ${digits}`);
  const total = promptCount(kind, digits);
  if (total > MAX_PROMPTS) throw new RangeError(`task: ${kind} with ${digits} digits has ${total} prompts, more than the ${MAX_PROMPTS} this demo enumerates`);
  if (!Number.isInteger(heldOut) || heldOut < 1 || heldOut >= total) {
    throw new RangeError(`task: heldOut must be an integer in [1, ${total - 1}] (${total} prompts), got ${heldOut}`);
  }
  const trainCount = options.train ?? total - heldOut;
  if (!Number.isInteger(trainCount) || trainCount < 1 || trainCount > total - heldOut) {
    throw new RangeError(`task: train must be an integer in [1, ${total - heldOut}] (prompts left after the held-out set), got ${trainCount}`);
  }
  const order = shuffle(Array.from({ length: total }, (_, i) => i), createRng(seed));
  const held = order.slice(0, heldOut).map((i) => exampleAt(kind, digits, i));
  const train = order.slice(heldOut, heldOut + trainCount).map((i) => exampleAt(kind, digits, i));
  const maxAnswerChars = kind === 'add' ? String(2 * (10 ** digits - 1)).length : digits;
  return Object.freeze({
    options: Object.freeze({ ...options, train: trainCount }),
    train: Object.freeze(train),
    heldOut: Object.freeze(held),
    alphabet: TASK_ALPHABET,
    maxAnswerChars,
  });
}

/**
 * 1 when the completion is exactly the reference, optionally followed by the end marker; else 0.
 * A pure function of two strings (the reward service's scorer reuses it).
 */
export function reward(completion: string, reference: string): 0 | 1 {
  const text = completion.endsWith(END_MARKER) ? completion.slice(0, -END_MARKER.length) : completion;
  return text === reference ? 1 : 0;
}

/** What evaluation needs of the generator and tokenizer (structural, so fakes are not needed in tests). */
export interface EvalDeps {
  generator: Pick<Generator, 'generateAll'>;
  tokenizer: Pick<DemoTokenizer, 'encode' | 'decode' | 'eosId'>;
}

export interface EvalResult {
  accuracy: number;
  correct: number;
  total: number;
}

/**
 * Greedy accuracy: each prompt decoded with temperature 0 up to the longest answer plus the end marker,
 * scored by `reward`. All prompts are submitted at once; the generator batches them.
 */
export async function evaluateGreedy(deps: EvalDeps, task: Task, examples: readonly Example[] = task.heldOut): Promise<EvalResult> {
  const { generator, tokenizer } = deps;
  const maxNewTokens = task.maxAnswerChars + 1;
  const results = await Promise.all(
    examples.map(async (ex, i) => {
      const [s] = await generator.generateAll({
        prompt: tokenizer.encode(ex.prompt),
        n: 1,
        maxNewTokens,
        temperature: 0,
        seed: 0,
        requestId: i,
        stopTokenIds: [tokenizer.eosId],
      });
      return reward(tokenizer.decode(s.tokens), ex.answer);
    }),
  );
  const correct = results.reduce<number>((a, r) => a + r, 0);
  return { accuracy: correct / examples.length, correct, total: examples.length };
}
