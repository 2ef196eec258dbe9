// Format reward: the completion must contain required tag pairs (<think>...</think>) and/or match a
// regular expression. All-or-nothing by default; `partial` gives the share of requirements met.
import { InvalidArgumentError } from '../../common/errors.ts';
import { readParams, type LocalScorer } from './types.ts';

export interface FormatParams {
  tags: string[];
  ordered: boolean;
  pattern: string | null;
  flags: string;
  partial: boolean;
}

const TAG_NAME = /^[A-Za-z_][\w.-]*$/;

/** Whether `<tag>` appears followed later by `</tag>`, from `from`; returns the index after the close, or -1. */
function findTagPair(text: string, tag: string, from: number): number {
  const open = text.indexOf(`<${tag}>`, from);
  if (open < 0) return -1;
  const close = text.indexOf(`</${tag}>`, open + tag.length + 2);
  return close < 0 ? -1 : close + tag.length + 3;
}

/** Number of requirements met and their count. */
export function checkFormat(text: string, params: FormatParams, regex: RegExp | null): { met: number; total: number } {
  let met = 0;
  let cursor = 0;
  for (const tag of params.tags) {
    const end = findTagPair(text, tag, params.ordered ? cursor : 0);
    if (end >= 0) {
      met += 1;
      if (params.ordered) cursor = end;
    }
  }
  let total = params.tags.length;
  if (regex) {
    total += 1;
    regex.lastIndex = 0;
    if (regex.test(text)) met += 1;
  }
  return { met, total };
}

export const formatScorer: LocalScorer<FormatParams> = {
  kind: 'local',
  name: 'format',
  description: 'required tag pairs and/or a regex: params tags, ordered (true), pattern, flags ("s"), partial (false)',
  parseParams(raw, field) {
    const p = readParams(raw, field, ['tags', 'ordered', 'pattern', 'flags', 'partial']);
    const tags = p.stringList('tags');
    tags.forEach((tag, i) => {
      if (!TAG_NAME.test(tag)) {
        throw new InvalidArgumentError(`${field}.tags[${i}]`, `not a tag name: ${JSON.stringify(tag)} (write "think", not "<think>")`);
      }
    });
    const pattern = p.string('pattern', null);
    const flags = p.string('flags', 's') as string;
    if (pattern !== null) {
      try {
        new RegExp(pattern, flags);
      } catch (error) {
        throw new InvalidArgumentError(`${field}.pattern`, `invalid regular expression: ${(error as Error).message}`);
      }
    }
    if (tags.length === 0 && pattern === null) {
      throw new InvalidArgumentError(field, 'format needs at least one of tags or pattern');
    }
    return { tags, ordered: p.boolean('ordered', true), pattern, flags, partial: p.boolean('partial', false) };
  },
  bind(params) {
    const regex = params.pattern === null ? null : new RegExp(params.pattern, params.flags);
    return (input) => {
      const { met, total } = checkFormat(input.completion, params, regex);
      if (params.partial) return met / total;
      return met === total ? 1 : 0;
    };
  },
};
