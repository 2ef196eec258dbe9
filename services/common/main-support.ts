// What every service's main.ts shares: integer flag parsing and the shutdown on SIGTERM/SIGINT.
import { InvalidArgumentError as CliError } from 'commander';

/** A commander argument parser for integers >= min. */
export function integer(min: number): (value: string) => number {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min) throw new CliError(`expected an integer >= ${min}, got "${value}"`);
    return n;
  };
}

/**
 * Stops the service once on SIGTERM or SIGINT: prints a machine-readable `stopping` line, lets calls in
 * flight finish (`shutdown`), flushes the spans, exits. Returns the stop function for other exit paths.
 */
export function stopOnSignals(
  line: Record<string, unknown>,
  shutdown: () => Promise<void>,
  tracing: { shutdown(): Promise<void> },
): (signal: string, code?: number) => Promise<void> {
  let stopping = false;
  const stop = async (signal: string, code = 0): Promise<void> => {
    if (stopping) return;
    stopping = true;
    console.log(JSON.stringify({ ...line, event: 'stopping', signal }));
    await shutdown();
    await tracing.shutdown();
    process.exit(code);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
  return stop;
}
