// Reports of a load run: the JSON result as written to bench/results/, a one-line text summary and a
// self-contained HTML page with inline SVG plots (latency over time, latency percentiles,
// throughput over time); no scripts, no external files.
import type { LoadResult } from './load.ts';

export function summaryLine(r: LoadResult): string {
  const load = r.mode === 'open' ? `rate ${r.rate}/s` : `concurrency ${r.concurrency}`;
  const l = r.latencyMs;
  const errors = Object.entries(r.errorsByCode).map(([k, v]) => `${k}=${v}`).join(' ') || 'none';
  return (
    `${r.target.kind} ${load} workers ${r.workers}: ${r.calls.ok} ok / ${r.calls.sent} sent (${r.calls.skipped} skipped) in ${r.elapsedS} s; ` +
    `${r.throughput.okCallsPerS} calls/s, ${r.throughput.unitsPerS} ${r.unit}/s; ` +
    `latency ms p50 ${l.p50} p95 ${l.p95} p99 ${l.p99} max ${l.max}; errors ${errors}`
  );
}

const esc = (s: string) => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);
const fmt = (x: number | null) => (x === null || !Number.isFinite(x) ? '-' : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));

interface Axis {
  min: number;
  max: number;
  log: boolean;
}

function scale(a: Axis, from: number, to: number): (v: number) => number {
  const f = a.log ? Math.log10 : (v: number) => v;
  const lo = f(a.min);
  const hi = f(a.max);
  return (v: number) => from + ((f(Math.min(a.max, Math.max(a.min, v))) - lo) / (hi - lo || 1)) * (to - from);
}

function ticks(a: Axis): number[] {
  if (a.log) {
    const out: number[] = [];
    for (let e = Math.floor(Math.log10(a.min)); e <= Math.ceil(Math.log10(a.max)); e++) {
      for (const m of [1, 2, 5]) {
        const v = m * 10 ** e;
        if (v >= a.min && v <= a.max) out.push(v);
      }
    }
    return out;
  }
  const step = niceStep((a.max - a.min) / 6);
  const out: number[] = [];
  for (let v = Math.ceil(a.min / step) * step; v <= a.max + 1e-9; v += step) out.push(Math.round(v * 1e6) / 1e6);
  return out;
}

function niceStep(raw: number): number {
  if (!(raw > 0)) return 1;
  const e = 10 ** Math.floor(Math.log10(raw));
  const m = raw / e;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * e;
}

const W = 760;
const H = 300;
const M = { l: 64, r: 16, t: 28, b: 40 };

function frame(title: string, x: Axis, y: Axis, xLabel: string, yLabel: string, body: string): string {
  const sx = scale(x, M.l, W - M.r);
  const sy = scale(y, H - M.b, M.t);
  let grid = '';
  for (const v of ticks(y)) grid += `<line x1="${M.l}" x2="${W - M.r}" y1="${sy(v)}" y2="${sy(v)}" class="g"/><text x="${M.l - 6}" y="${sy(v) + 4}" text-anchor="end">${fmt(v)}</text>`;
  for (const v of ticks(x)) grid += `<line y1="${M.t}" y2="${H - M.b}" x1="${sx(v)}" x2="${sx(v)}" class="g"/><text y="${H - M.b + 16}" x="${sx(v)}" text-anchor="middle">${fmt(v)}</text>`;
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">` +
    `<text x="${W / 2}" y="16" text-anchor="middle" class="t">${esc(title)}</text>${grid}` +
    `<text x="${W / 2}" y="${H - 6}" text-anchor="middle">${esc(xLabel)}</text>` +
    `<text transform="translate(14 ${H / 2}) rotate(-90)" text-anchor="middle">${esc(yLabel)}</text>` +
    `<rect x="${M.l}" y="${M.t}" width="${W - M.l - M.r}" height="${H - M.t - M.b}" class="f"/>${body}</svg>`
  );
}

function latencyOverTime(r: LoadResult): string {
  const lat = r.points.map((p) => p[1]).filter((v) => v > 0);
  const x: Axis = { min: 0, max: Math.max(r.elapsedS, 0.1), log: false };
  const y: Axis = { min: Math.max(0.01, Math.min(...lat, 1)), max: Math.max(...lat, 1) * 1.2, log: true };
  const sx = scale(x, M.l, W - M.r);
  const sy = scale(y, H - M.b, M.t);
  let body = '';
  for (const [t, ms, code] of r.points) body += `<circle cx="${sx(t).toFixed(1)}" cy="${sy(Math.max(ms, y.min)).toFixed(1)}" r="1.4" class="${code === 0 ? 'ok' : 'err'}"/>`;
  const line = (key: 'p50' | 'p99', cls: string) => {
    const pts = r.timeline.filter((b) => b[key] !== null).map((b) => `${sx(b.t).toFixed(1)},${sy(b[key]!).toFixed(1)}`);
    return pts.length > 1 ? `<polyline points="${pts.join(' ')}" class="${cls}"/>` : '';
  };
  body += line('p50', 'l50') + line('p99', 'l99');
  return frame('latency of each call (dots; red = error), p50 and p99 per interval (lines)', x, y, 'seconds since start', 'latency ms (log)', body);
}

function percentiles(r: LoadResult): string {
  const l = r.latencyMs;
  const qs: [string, number, number][] = [
    ['min', 0, l.min],
    ['p50', 0.5, l.p50],
    ['p90', 0.9, l.p90],
    ['p95', 0.95, l.p95],
    ['p99', 0.99, l.p99],
    ['p99.9', 0.999, l.p999],
    ['max', 0.9999, l.max],
  ];
  const valid = qs.filter((q) => Number.isFinite(q[2]) && q[2] > 0);
  if (!valid.length) return '';
  // x = -log10(1 - q): p50 at 0.3, p99 at 2, p99.9 at 3; max drawn at 4.
  const xs = (q: number) => -Math.log10(1 - q);
  const x: Axis = { min: 0, max: 4, log: false };
  const y: Axis = { min: Math.max(0.01, Math.min(...valid.map((q) => q[2]))), max: Math.max(...valid.map((q) => q[2])) * 1.2, log: true };
  const sx = scale(x, M.l, W - M.r);
  const sy = scale(y, H - M.b, M.t);
  const pts = valid.map((q) => `${sx(xs(q[1])).toFixed(1)},${sy(q[2]).toFixed(1)}`).join(' ');
  let body = `<polyline points="${pts}" class="l99"/>`;
  for (const q of valid) {
    const x = sx(xs(q[1]));
    // Labels near the right edge are drawn to the left of their point so they stay inside the plot.
    const label = x > W - M.r - 70 ? `<text x="${x - 4}" y="${sy(q[2]) + 14}" text-anchor="end">` : `<text x="${x + 4}" y="${sy(q[2]) - 6}">`;
    body += `<circle cx="${x}" cy="${sy(q[2])}" r="3" class="dot"/>${label}${q[0]} ${fmt(q[2])}</text>`;
  }
  return frame('latency percentiles of successful calls', x, y, 'percentile (-log10(1 - q): 1 = p90, 2 = p99, 3 = p99.9)', 'latency ms (log)', body);
}

function throughput(r: LoadResult): string {
  const bucketS = r.timeline.length > 1 ? r.timeline[1]!.t - r.timeline[0]!.t : Math.max(r.elapsedS, 0.1);
  // The last interval may be cut short by the end of the run: divide by its real width.
  const rates = r.timeline.map((b) => b.units / Math.max(1e-3, Math.min(bucketS, r.elapsedS - b.t)));
  const x: Axis = { min: 0, max: Math.max(r.elapsedS, 0.1), log: false };
  const y: Axis = { min: 0, max: Math.max(...rates, 1) * 1.1, log: false };
  const sx = scale(x, M.l, W - M.r);
  const sy = scale(y, H - M.b, M.t);
  let body = '';
  r.timeline.forEach((b, i) => {
    const x0 = sx(b.t);
    const x1 = sx(b.t + bucketS);
    body += `<rect x="${x0.toFixed(1)}" y="${sy(rates[i]!).toFixed(1)}" width="${Math.max(0.5, x1 - x0 - 0.5).toFixed(1)}" height="${(sy(0) - sy(rates[i]!)).toFixed(1)}" class="bar"/>`;
    if (b.errors) body += `<rect x="${x0.toFixed(1)}" y="${M.t}" width="${Math.max(0.5, x1 - x0 - 0.5).toFixed(1)}" height="4" class="errbar"/>`;
  });
  return frame(`throughput (${r.unit}/s per interval; red mark = errors in the interval)`, x, y, 'seconds since start', `${r.unit}/s`, body);
}

export function renderHtml(r: LoadResult, title: string): string {
  const l = r.latencyMs;
  const rows: [string, string][] = [
    ['target', `${r.target.kind} ${esc(JSON.stringify(r.target))}`],
    ['address', esc(r.address)],
    ['load', r.mode === 'open' ? `open loop, ${r.rate} calls/s` : `closed loop, ${r.concurrency} concurrent`],
    ['workers', String(r.workers)],
    ['calls', `${r.calls.sent} sent, ${r.calls.ok} ok, ${r.calls.errors} errors, ${r.calls.skipped} skipped (client in-flight cap)`],
    ['elapsed', `${r.elapsedS} s`],
    ['throughput', `${r.throughput.okCallsPerS} calls/s, ${r.throughput.unitsPerS} ${r.unit}/s`],
    ['latency ms', `p50 ${fmt(l.p50)}, p95 ${fmt(l.p95)}, p99 ${fmt(l.p99)}, max ${fmt(l.max)}, mean ${fmt(l.mean)}`],
    ['errors', Object.entries(r.errorsByCode).map(([k, v]) => `${k}: ${v}`).join(', ') || 'none'],
    ['send lag ms', `p99 ${fmt(r.sendLagMs.p99)}, max ${fmt(r.sendLagMs.max)}`],
    ['generator busy', r.workerUtilization.map((u) => `${Math.round(u * 100)}%`).join(', ') + ' of each worker thread'],
    ['host', esc(`${r.host.cpus} x ${r.host.cpuModel}, node ${r.host.node}, load average ${r.host.loadAvg1.join(' -> ')}`)],
  ];
  if (r.firstResponseMs) rows.splice(8, 0, ['first answer ms', `p50 ${fmt(r.firstResponseMs.p50)}, p99 ${fmt(r.firstResponseMs.p99)}`]);
  const samples = Object.entries(r.errorSamples).map(([k, v]) => `<li><b>${esc(k)}</b>: ${esc(v)}</li>`).join('');
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin-bottom:16px}td{padding:3px 10px;border-bottom:1px solid #ddd;vertical-align:top}
svg{display:block;margin:12px 0}svg text{font-size:11px;fill:#333}.t{font-size:13px;font-weight:600}
.g{stroke:#eee}.f{fill:none;stroke:#999}.ok{fill:#1f77b4;fill-opacity:.45}.err{fill:#d62728}
.l50{fill:none;stroke:#2ca02c;stroke-width:2}.l99{fill:none;stroke:#ff7f0e;stroke-width:2}.dot{fill:#ff7f0e}
.bar{fill:#1f77b4;fill-opacity:.7}.errbar{fill:#d62728}
</style></head><body>
<h2>${esc(title)}</h2>
<table>${rows.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join('')}</table>
${samples ? `<p>first error message per status:</p><ul>${samples}</ul>` : ''}
${latencyOverTime(r)}
${percentiles(r)}
${throughput(r)}
</body></html>
`;
}
