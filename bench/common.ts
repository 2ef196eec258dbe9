// Shared by the benchmark scripts: the machine's name (CPU model and core count, or the GPU), and writing
// a result file under bench/results/.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const resultsDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), 'results');

export function machine(): { device: string; cores: number; node: string } {
  let model = os.cpus()[0]?.model ?? 'unknown CPU';
  try {
    const m = /model name\s*:\s*(.+)/.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) model = m[1].trim();
  } catch {
    // not Linux: os.cpus() already named it
  }
  return { device: `CPU: ${model}`, cores: os.cpus().length, node: process.version };
}

export function writeResult(name: string, result: Record<string, unknown>): string {
  mkdirSync(resultsDir, { recursive: true });
  const file = path.join(resultsDir, `${name}.json`);
  writeFileSync(file, JSON.stringify({ ...result, machine: machine(), date: new Date().toISOString() }, null, 2) + '\n');
  return file;
}

/** Median of repeated timings (seconds). */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}
