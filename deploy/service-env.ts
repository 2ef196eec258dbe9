// What environment a service's main.ts reads, found by reading its source: the deployment files
// (compose, Kubernetes) are checked against it so the two cannot drift (deploy/deploy.test.ts).
//
// Each service's main.ts is the only place that reads the environment (a project rule), in the
// forms `env.X` (after `const env = process.env`), `process.env.X` or `process.env['X']`. A read is
// "defaulted" when `??` or `||` follows it, and "required" when it has no default and the name
// appears in an error the service raises when it is missing (`program.error(...)`, `throw ...`,
// `.requiredOption(...)`).

export interface EnvRead {
  name: string;
  /** A fallback follows the read (`env.X ?? 50053`). */
  defaulted: boolean;
  /** The service refuses to start without it. */
  required: boolean;
}

const READ = /\b(?:process\.env|env)(?:\.([A-Z][A-Z0-9_]*)|\[\s*['"]([A-Z][A-Z0-9_]*)['"]\s*\])/g;

/** Environment variables a main.ts reads, in order of first appearance. */
export function readServiceEnv(source: string): EnvRead[] {
  const code = stripComments(source);
  const reads = new Map<string, EnvRead>();
  for (const m of code.matchAll(READ)) {
    const name = (m[1] ?? m[2])!;
    const after = code.slice(m.index! + m[0].length).trimStart();
    const defaulted = after.startsWith('??') || after.startsWith('||');
    const prev = reads.get(name);
    // A variable read once with a default and once without is optional where it has the default.
    reads.set(name, { name, defaulted: (prev?.defaulted ?? false) || defaulted, required: false });
  }
  const errorTexts = [...code.matchAll(/(?:program\.error|throw\s+new\s+\w+|\.requiredOption)\s*\(([^;]*)/g)].map((m) => m[1]!);
  for (const read of reads.values()) {
    read.required = !read.defaulted && errorTexts.some((t) => new RegExp(`\\b${read.name}\\b`).test(t));
  }
  return [...reads.values()];
}

/** Removes // and /* *\/ comments (outside strings), so commented-out reads do not count. */
function stripComments(source: string): string {
  let out = '';
  let i = 0;
  let quote: string | null = null;
  while (i < source.length) {
    const c = source[i]!;
    if (quote) {
      out += c;
      if (c === '\\') {
        out += source[i + 1] ?? '';
        i += 2;
        continue;
      }
      if (c === quote) quote = null;
      i++;
    } else if (c === '"' || c === "'" || c === '`') {
      quote = c;
      out += c;
      i++;
    } else if (source.startsWith('//', i)) {
      while (i < source.length && source[i] !== '\n') i++;
    } else if (source.startsWith('/*', i)) {
      const end = source.indexOf('*/', i + 2);
      i = end < 0 ? source.length : end + 2;
    } else {
      out += c;
      i++;
    }
  }
  return out;
}

/**
 * Variables a deployment sets for libraries and the runtime rather than for main.ts: NCCL, OpenMP and
 * OpenBLAS threads, libuv's pool, Node options. Anything else set in a deployment must be read by
 * the service's main.ts.
 */
export function isRuntimeVariable(name: string): boolean {
  return /^(NCCL_|GLOO_|CUDA_|NVIDIA_)/.test(name) || ['OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'UV_THREADPOOL_SIZE', 'NODE_OPTIONS', 'NODE_ENV'].includes(name);
}
