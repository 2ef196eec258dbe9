// `pilot oracle DIR`: checks the engine (and the tokenizer) against a reference folder and prints one JSON
// object with the maximum relative error of each quantity found and `ok`; exit code 0 only when ok.
import { existsSync } from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';

import { runModelOracle } from '../../oracle/model-oracle.ts';

export interface OracleResult {
  ok: boolean;
  [k: string]: unknown;
}

export async function runOracle(dir: string): Promise<OracleResult> {
  if (!existsSync(dir)) throw new Error(`oracle: folder ${dir} does not exist`);
  const out: OracleResult = { dir: path.resolve(dir), ok: true };
  let checked = false;
  if (existsSync(path.join(dir, 'expected.json'))) {
    const r = await runModelOracle(dir);
    out.family = r.family;
    Object.assign(out, r.errors);
    if (r.greedy_match !== undefined) out.greedy_match = r.greedy_match;
    if (Object.keys(r.worst_tensor).length) out.worst_tensor = r.worst_tensor;
    out.ok &&= r.ok;
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
    .action(async (dir: string) => {
      const r = await runOracle(dir);
      console.log(JSON.stringify(r));
      if (!r.ok) process.exitCode = 2;
    });
}
