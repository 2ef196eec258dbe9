// `pilot oracle DIR`: checks the engine (and the tokenizer) against a reference folder and prints one JSON
// object with the maximum relative error of each quantity found and `ok`; exit code 0 only when ok.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { InvalidArgumentError, type Command } from 'commander';

import type { CommBackend } from '../../dist/communicator.ts';
import { runRanksOracle } from '../../dist/oracle-ranks.ts';
import { checkTokenizerFixture } from '../../tokenizer/index.ts';
import type { RopeFreqDtype } from '../../hf/config.ts';
import { runModelOracle, type ModelOracleReport } from '../../oracle/model-oracle.ts';

export interface OracleCommandOptions {
  /** CPU ranks (processes) for an expert-parallel run; 1 = in this process. */
  ranks?: number;
  ropeFreqDtype?: RopeFreqDtype;
  /** Collectives between the ranks: gloo (CPU, default) or nccl (one GPU per rank). */
  comm?: CommBackend;
}

export interface OracleResult {
  ok: boolean;
  [k: string]: unknown;
}

export async function runOracle(dir: string, options: OracleCommandOptions = {}): Promise<OracleResult> {
  if (!existsSync(dir)) throw new Error(`oracle: folder ${dir} does not exist`);
  const out: OracleResult = { dir: path.resolve(dir), ok: true };
  let checked = false;
  if (existsSync(path.join(dir, 'expected.json'))) {
    const ranks = options.ranks ?? 1;
    const r: ModelOracleReport =
      ranks > 1
        ? await runRanksOracle(dir, ranks, { ropeFreqDtype: options.ropeFreqDtype, comm: options.comm })
        : await runModelOracle(dir, { ropeFreqDtype: options.ropeFreqDtype });
    if (ranks > 1) {
      out.ranks = ranks;
      out.comm = options.comm ?? 'gloo';
    }
    out.family = r.family;
    Object.assign(out, r.errors);
    if (r.greedy_match !== undefined) out.greedy_match = r.greedy_match;
    if (Object.keys(r.worst_tensor).length) out.worst_tensor = r.worst_tensor;
    out.ok &&= r.ok;
    checked = true;
  }
  if (existsSync(path.join(dir, 'tokenizer_expected.json'))) {
    const t = await checkTokenizerFixture(dir);
    out.tokenizer_mismatches = t.tokenizer_mismatches;
    out.chat_mismatches = t.chat_mismatches;
    if (t.details.length) out.tokenizer_details = t.details.slice(0, 20);
    out.ok &&= t.tokenizer_mismatches === 0 && t.chat_mismatches === 0;
    checked = true;
  }
  if (!checked) throw new Error(`oracle: ${dir} holds no expected.json (model reference) or tokenizer_expected.json (tokenizer reference)`);
  return out;
}

export function registerOracle(program: Command): void {
  program
    .command('oracle')
    .description('check the engine against a reference folder (model + expected.* files) and print JSON')
    .argument('<dir>', 'reference folder')
    .option('--ranks <n>', 'CPU ranks, one process each (expert parallel over Gloo)', (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError('--ranks must be an integer >= 1');
      return n;
    }, 1)
    .option('--rope-freq-dtype <dtype>', 'RoPE frequency precision of the reference model (float32, bfloat16, float16)', (v) => {
      if (v !== 'float32' && v !== 'bfloat16' && v !== 'float16') throw new InvalidArgumentError('--rope-freq-dtype must be float32, bfloat16 or float16');
      return v;
    })
    .option('--comm <backend>', 'collectives between the ranks: gloo (CPU) or nccl (one GPU per rank)', (v) => {
      if (v !== 'gloo' && v !== 'nccl') throw new InvalidArgumentError('--comm must be gloo or nccl');
      return v;
    })
    .action(async (dir: string, opts: { ranks: number; ropeFreqDtype?: RopeFreqDtype; comm?: CommBackend }) => {
      const r = await runOracle(dir, opts);
      console.log(JSON.stringify(r));
      if (!r.ok) process.exitCode = 2;
    });
}
