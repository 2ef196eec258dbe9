// Where a call's native work spent its time, for its span: the addon's clock (Engine.nativeCallTimes) read before
// and after. Queued time is a thread pool busy with other work (a background checkpoint's file writes share it),
// resolve time a busy event loop; the rest is the engine itself.
import type { NativeCallTimes } from '../../src/engine/native.ts';

export type CallTimesReading = Record<string, NativeCallTimes>;

/** rank.native_* attributes for the calls made between two readings (all call names together). */
export function nativeTimeAttributes(before: CallTimesReading, after: CallTimesReading): Record<string, number> {
  let calls = 0;
  let queued = 0;
  let run = 0;
  let resolve = 0;
  for (const [name, a] of Object.entries(after)) {
    const b = before[name];
    calls += a.calls - (b?.calls ?? 0);
    queued += a.queuedMs - (b?.queuedMs ?? 0);
    run += a.runMs - (b?.runMs ?? 0);
    resolve += a.resolveMs - (b?.resolveMs ?? 0);
  }
  return { 'rank.native_calls': calls, 'rank.native_queued_ms': queued, 'rank.native_run_ms': run, 'rank.native_resolve_ms': resolve };
}
