import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { context, ROOT_CONTEXT, SpanStatusCode, trace } from '@opentelemetry/api';
import { createTracing, extractContext, injectContext, type SpanRecord } from './tracing.ts';

function readSpans(path: string): SpanRecord[] {
  return readFileSync(path, 'utf8').trim().split('\n').map((line) => JSON.parse(line));
}

test('the span file gets one JSON line per span with ids, parent, times and attributes', async () => {
  const path = join(mkdtempSync(join(tmpdir(), 'spans-')), 'nested', 'spans.jsonl');
  const tracing = createTracing({ serviceName: 'unit', otlpEndpoint: null, spanFile: path });
  const before = BigInt(Date.now()) * 1_000_000n;
  await tracing.tracer.startActiveSpan('outer', async (outer) => {
    outer.setAttribute('step', 3);
    await new Promise((r) => setTimeout(r, 5));
    tracing.tracer.startActiveSpan('inner', (inner) => {
      inner.setStatus({ code: SpanStatusCode.ERROR, message: 'bad' });
      inner.addEvent('retry', { attempt: 1 });
      inner.end();
    });
    outer.end();
  });
  await tracing.forceFlush();
  const spans = readSpans(path);
  assert.equal(spans.length, 2);
  const [inner, outer] = spans;
  assert.equal(inner.name, 'inner');
  assert.equal(outer.name, 'outer');
  assert.equal(inner.traceId, outer.traceId);
  assert.match(outer.traceId, /^[0-9a-f]{32}$/);
  assert.match(outer.spanId, /^[0-9a-f]{16}$/);
  assert.equal(inner.parentSpanId, outer.spanId);
  assert.equal(outer.parentSpanId, null);
  assert.equal(outer.service, 'unit');
  assert.deepEqual(outer.attributes, { step: 3 });
  assert.deepEqual(inner.status, { code: 'ERROR', message: 'bad' });
  assert.equal(inner.events[0].name, 'retry');
  assert.ok(BigInt(outer.startTimeUnixNano) >= before - 1_000_000n);
  assert.ok(BigInt(outer.endTimeUnixNano) > BigInt(outer.startTimeUnixNano));
  assert.ok(outer.durationMs >= 4, `duration ${outer.durationMs}`);
  await tracing.shutdown();
});

test('no exporter configured: spans are made but written nowhere', async () => {
  const tracing = createTracing({ serviceName: 'quiet', otlpEndpoint: null, spanFile: null });
  const span = tracing.tracer.startSpan('x');
  assert.ok(span.spanContext().traceId);
  span.end();
  await tracing.shutdown();
});

test('context survives a round trip through a plain headers map (NATS)', async () => {
  const tracing = createTracing({ serviceName: 'unit', otlpEndpoint: null, spanFile: null });
  const span = tracing.tracer.startSpan('publish');
  const headers = context.with(trace.setSpan(ROOT_CONTEXT, span), () => injectContext({ subject: 'prompts' }));
  assert.equal(headers.subject, 'prompts');
  assert.match(headers.traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
  const extracted = trace.getSpanContext(extractContext(headers));
  assert.equal(extracted?.traceId, span.spanContext().traceId);
  assert.equal(extracted?.spanId, span.spanContext().spanId);
  assert.equal(extracted?.isRemote, true);
  const child = tracing.tracer.startSpan('consume', {}, extractContext(headers));
  assert.equal(child.spanContext().traceId, span.spanContext().traceId);
  // Nothing to extract: a fresh root.
  assert.equal(trace.getSpanContext(extractContext({})), undefined);
  child.end();
  span.end();
  await tracing.shutdown();
});
