// `pilot generate --model DIR --prompt TEXT ...`: samples completions in this process (engine + tokenizer), no
// stack needed. Prints each sample's text, or one JSON object per sample with --json.
import { InvalidArgumentError, type Command } from 'commander';

import { Engine } from '../../engine/engine.ts';
import { createGenerator, type Sample } from '../../engine/generator.ts';
import { loadTokenizer } from '../../tokenizer/index.ts';

export interface GenerateOptions {
  model: string;
  /** Text prompt; or promptIds (already encoded) instead. */
  prompt?: string;
  promptIds?: number[];
  chat: boolean;
  n: number;
  maxNewTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  minP: number;
  seed: number;
  /** Keep generating past the end-of-sequence tokens (until maxNewTokens). */
  ignoreEos: boolean;
}

export interface GeneratedSample {
  index: number;
  text: string;
  token_ids: number[];
  logprobs: number[];
  finish_reason: Sample['finishReason'];
  prompt_tokens: number;
}

export async function generateSamples(o: GenerateOptions): Promise<GeneratedSample[]> {
  const tokenizer = await loadTokenizer(o.model);
  if ((o.prompt === undefined) === (o.promptIds === undefined)) throw new Error('give either --prompt or --prompt-ids');
  let prompt: number[];
  if (o.promptIds) {
    if (o.chat) throw new Error('--chat needs a text --prompt, not --prompt-ids');
    prompt = o.promptIds;
  } else {
    const text = o.chat ? tokenizer.applyChatTemplate([{ role: 'user', content: o.prompt! }], { addGenerationPrompt: true }) : o.prompt!;
    // A chat template writes its own special tokens; a raw prompt gets the tokenizer's usual ones.
    prompt = tokenizer.encode(text, { addSpecialTokens: !o.chat });
  }
  if (prompt.length === 0) throw new Error('the prompt encodes to no tokens');
  const engine = await Engine.fromHfFolder(o.model);
  const blockSize = 16;
  const generator = createGenerator(engine, {
    numBlocks: o.n * (Math.ceil((prompt.length + o.maxNewTokens) / blockSize) + 1) + 1,
    blockSize,
    decoder: tokenizer,
  });
  try {
    const samples = await generator.generateAll({
      prompt,
      n: o.n,
      maxNewTokens: o.maxNewTokens,
      temperature: o.temperature,
      topP: o.topP,
      topK: o.topK,
      minP: o.minP,
      seed: o.seed,
      requestId: 0,
      stopTokenIds: o.ignoreEos ? [] : tokenizer.eosTokenIds,
    });
    return samples.map((s) => ({
      index: s.sampleIndex,
      text: s.text ?? tokenizer.decode(s.tokens),
      token_ids: s.tokens,
      logprobs: s.logprobs,
      finish_reason: s.finishReason,
      prompt_tokens: prompt.length,
    }));
  } finally {
    await generator.close();
    await engine.dispose();
  }
}

function num(name: string, min: number, max = Infinity, integer = false) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < min || n > max || (integer && !Number.isInteger(n))) {
      throw new InvalidArgumentError(`${name} must be ${integer ? 'an integer' : 'a number'} in [${min}, ${max === Infinity ? '∞' : max}], got "${v}"`);
    }
    return n;
  };
}

export function registerGenerate(program: Command): void {
  program
    .command('generate')
    .description('sample completions from a model folder in this process')
    .requiredOption('--model <dir>', 'Hugging Face model folder')
    .option('--prompt <text>', 'prompt text')
    .option('--prompt-ids <ids>', 'the prompt as comma-separated token ids (instead of --prompt)', (v) => {
      const ids = v.split(',').map((x) => Number(x.trim()));
      if (ids.length === 0 || ids.some((x) => !Number.isInteger(x) || x < 0)) throw new InvalidArgumentError(`--prompt-ids must be comma-separated token ids, got "${v}"`);
      return ids;
    })
    .option('--chat', "wrap the prompt as a user message with the model's chat template", false)
    .option('--n <n>', 'samples', num('--n', 1, 4096, true), 1)
    .option('--max-new-tokens <m>', 'tokens per sample at most', num('--max-new-tokens', 1, 1 << 20, true), 64)
    .option('--temperature <t>', '0 = greedy', num('--temperature', 0), 1)
    .option('--top-p <p>', '1 = off', num('--top-p', 0, 1), 1)
    .option('--top-k <k>', '0 = off', num('--top-k', 0, Infinity, true), 0)
    .option('--min-p <q>', '0 = off', num('--min-p', 0, 1), 0)
    .option('--seed <s>', 'random seed', num('--seed', 0, Number.MAX_SAFE_INTEGER, true), 0)
    .option('--ignore-eos', 'do not stop at end-of-sequence tokens', false)
    .option('--json', 'one JSON object per sample', false)
    .action(async (opts: GenerateOptions & { json: boolean }) => {
      const samples = await generateSamples(opts);
      for (const s of samples) {
        if (opts.json) console.log(JSON.stringify(s));
        else console.log(`--- sample ${s.index} (${s.token_ids.length} tokens, ${s.finish_reason})\n${s.text}`);
      }
    });
}
