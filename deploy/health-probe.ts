// Container health check: exits 0 when every named gRPC service of a server answers SERVING on the
// standard health service, 1 otherwise (with the reason on stderr). Compose and Kubernetes run it
// inside the service's own container:
//   node --import tsx deploy/health-probe.ts 127.0.0.1:50053 pilot.v1.RewardService
// No service names checks the server as a whole ("").
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkHealth } from '../services/common/grpc-probes.ts';

export interface ProbeResult {
  ok: boolean;
  /** Status per probed service ("" = the whole server); an error message when the call failed. */
  statuses: Record<string, string>;
}

/** Probes each service once, in parallel, within timeoutMs. */
export async function probe(address: string, services: string[], timeoutMs: number): Promise<ProbeResult> {
  const names = services.length ? services : [''];
  const statuses: Record<string, string> = {};
  await Promise.all(
    names.map(async (name) => {
      try {
        statuses[name] = await checkHealth(address, name, timeoutMs);
      } catch (error) {
        statuses[name] = (error as Error).message;
      }
    }),
  );
  return { ok: names.every((n) => statuses[n] === 'SERVING'), statuses };
}

function usage(message: string): never {
  console.error(`health-probe: ${message}\nusage: health-probe.ts <host:port> [service ...]  (HEALTH_PROBE_TIMEOUT_MS, default 3000)`);
  process.exit(2);
}

// Run as a script (not when imported by the test).
if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const [address, ...services] = process.argv.slice(2);
  if (!address || !/^[^\s]+:\d+$/.test(address)) usage(`expected host:port, got "${address ?? ''}"`);
  const timeoutMs = Number(process.env.HEALTH_PROBE_TIMEOUT_MS ?? 3000);
  if (!(timeoutMs > 0)) usage(`HEALTH_PROBE_TIMEOUT_MS must be > 0, got "${process.env.HEALTH_PROBE_TIMEOUT_MS}"`);
  const result = await probe(address!, services, timeoutMs);
  if (!result.ok) {
    console.error(`health-probe ${address}: ${Object.entries(result.statuses).map(([s, v]) => `${s || '(server)'}=${v}`).join(', ')}`);
  }
  process.exit(result.ok ? 0 : 1);
}
