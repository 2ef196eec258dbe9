// `pilot trace`: reads JSON-lines span files (one SpanRecord per line, as services/common/tracing writes them),
// finds the span of a run's training step and prints it with everything under it as a tree with durations.
import { readFile } from 'node:fs/promises';
import type { SpanRecord } from '../../services/common/tracing.ts';

export interface SpanFileIssue {
  file: string;
  line: number;
  message: string;
}

export async function readSpanFiles(files: readonly string[]): Promise<{ spans: SpanRecord[]; issues: SpanFileIssue[] }> {
  const spans: SpanRecord[] = [];
  const issues: SpanFileIssue[] = [];
  for (const file of files) {
    const text = await readFile(file, 'utf8');
    text.split('\n').forEach((raw, i) => {
      if (raw.trim() === '') return;
      try {
        const s = JSON.parse(raw) as SpanRecord;
        if (typeof s.spanId !== 'string' || typeof s.name !== 'string' || typeof s.startTimeUnixNano !== 'string') {
          issues.push({ file, line: i + 1, message: 'not a span record (spanId, name, startTimeUnixNano missing)' });
        } else spans.push(s);
      } catch (err) {
        // A service killed mid-write leaves a partial last line; the rest of the file is still good.
        issues.push({ file, line: i + 1, message: `not valid JSON: ${(err as Error).message}` });
      }
    });
  }
  return { spans, issues };
}

// Attribute keys services put the run id and step under ("pilot.run_id", "run.id", "run_id", "pilot.step", ...).
function runIdOf(s: SpanRecord): string | null {
  for (const [k, v] of Object.entries(s.attributes ?? {})) {
    if (/(^|[._])run[._]id$/.test(k) && (typeof v === 'string' || typeof v === 'number')) return String(v);
  }
  return null;
}

function stepOf(s: SpanRecord): number | null {
  for (const [k, v] of Object.entries(s.attributes ?? {})) {
    if (/(^|[._])step$/.test(k)) {
      const n = typeof v === 'number' ? v : typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : NaN;
      if (Number.isInteger(n)) return n;
    }
  }
  return null;
}

/** Steps of a run that have spans, ascending. */
export function stepsOfRun(spans: readonly SpanRecord[], runId: string): number[] {
  const steps = new Set<number>();
  for (const s of spans) {
    if (runIdOf(s) !== runId) continue;
    const st = stepOf(s);
    if (st !== null) steps.add(st);
  }
  return [...steps].sort((a, b) => a - b);
}

export function runsInSpans(spans: readonly SpanRecord[]): string[] {
  return [...new Set(spans.map(runIdOf).filter((r): r is string => r !== null))].sort();
}

export interface SpanNode {
  span: SpanRecord;
  children: SpanNode[];
}

/**
 * The trees of a step: the top-most spans tagged with the run and step (a tagged span whose parent is tagged too
 * is inside another's tree), each with every span below it, children in start order.
 */
export function stepTrees(spans: readonly SpanRecord[], runId: string, step: number): SpanNode[] {
  const byId = new Map(spans.map((s) => [s.spanId, s]));
  const childrenOf = new Map<string, SpanRecord[]>();
  for (const s of spans) {
    if (s.parentSpanId === null) continue;
    const list = childrenOf.get(s.parentSpanId) ?? [];
    list.push(s);
    childrenOf.set(s.parentSpanId, list);
  }
  const tagged = (s: SpanRecord | undefined) => s !== undefined && runIdOf(s) === runId && stepOf(s) === step;
  const isBelowTagged = (s: SpanRecord): boolean => {
    // Walk up: any tagged ancestor means s is printed inside that ancestor's tree.
    const seen = new Set<string>();
    let p = s.parentSpanId ? byId.get(s.parentSpanId) : undefined;
    while (p && !seen.has(p.spanId)) {
      if (tagged(p)) return true;
      seen.add(p.spanId);
      p = p.parentSpanId ? byId.get(p.parentSpanId) : undefined;
    }
    return false;
  };
  const build = (s: SpanRecord, depth: number): SpanNode => ({
    span: s,
    children: depth > 64 ? [] : (childrenOf.get(s.spanId) ?? []).sort(byStart).map((c) => build(c, depth + 1)),
  });
  return spans.filter((s) => tagged(s) && !isBelowTagged(s)).sort(byStart).map((s) => build(s, 0));
}

function byStart(a: SpanRecord, b: SpanRecord): number {
  const d = BigInt(a.startTimeUnixNano) - BigInt(b.startTimeUnixNano);
  return d < 0n ? -1 : d > 0n ? 1 : 0;
}

export function formatDuration(ms: number): string {
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms >= 1) return `${ms.toFixed(1)} ms`;
  return `${(ms * 1000).toFixed(0)} µs`;
}

/** Indented tree, one span per line: name, duration, service, offset from the root's start, error status. */
export function formatTrees(trees: readonly SpanNode[]): string {
  const lines: string[] = [];
  for (const root of trees) {
    const t0 = BigInt(root.span.startTimeUnixNano);
    const line = (n: SpanNode, prefix: string, branch: string) => {
      const s = n.span;
      const offset = Number(BigInt(s.startTimeUnixNano) - t0) / 1e6;
      const err = s.status?.code === 'ERROR' ? `  ERROR${s.status.message ? `: ${s.status.message}` : ''}` : '';
      lines.push(`${prefix}${branch}${s.name}  ${formatDuration(s.durationMs)}  [${s.service}]${n === root ? '' : `  +${formatDuration(offset)}`}${err}`);
    };
    const walk = (n: SpanNode, prefix: string) => {
      n.children.forEach((c, i) => {
        const last = i === n.children.length - 1;
        line(c, prefix, last ? '└─ ' : '├─ ');
        walk(c, prefix + (last ? '   ' : '│  '));
      });
    };
    line(root, '', '');
    walk(root, '');
  }
  return lines.join('\n');
}
