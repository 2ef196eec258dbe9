// OpenTelemetry for one service: a tracer provider that exports either over OTLP/gRPC or to a
// JSON-lines span file, gRPC client/server propagation through W3C traceparent metadata, and
// inject/extract helpers for plain header maps (NATS message headers).
//
// The tracer provider is not registered globally, so two services can live in one process (tests);
// each service passes its `tracer` to the code that makes spans. Only the async context manager is
// global, because `context.with` needs one to follow async calls.
import { appendFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import {
  context as otelContext,
  propagation,
  ROOT_CONTEXT,
  SpanKind,
  SpanStatusCode,
  trace,
  type Context,
  type HrTime,
  type Span,
  type TextMapGetter,
  type TextMapSetter,
  type Tracer,
} from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { ExportResultCode, W3CTraceContextPropagator, type ExportResult } from '@opentelemetry/core';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-grpc';
import { resourceFromAttributes } from '@opentelemetry/resources';
import {
  BatchSpanProcessor,
  NodeTracerProvider,
  SimpleSpanProcessor,
  type ReadableSpan,
  type SpanExporter,
  type SpanProcessor,
} from '@opentelemetry/sdk-trace-node';
import {
  InterceptingCall,
  Metadata,
  status as grpcStatus,
  type Interceptor,
} from '@grpc/grpc-js';
import { statusOf } from './errors.ts';

export interface TracingConfig {
  serviceName: string;
  /** OTLP/gRPC collector, e.g. "http://localhost:4317". When set, spans go there. */
  otlpEndpoint: string | null;
  /** JSON-lines file that receives one span per line when no OTLP endpoint is set; null = no export. */
  spanFile: string | null;
}

export interface Tracing {
  readonly serviceName: string;
  readonly tracer: Tracer;
  readonly provider: NodeTracerProvider;
  /** Exports every finished span now. */
  forceFlush(): Promise<void>;
  shutdown(): Promise<void>;
}

// W3C traceparent/tracestate; used explicitly rather than through the global propagator.
const propagator = new W3CTraceContextPropagator();

/** Installs the AsyncLocalStorage context manager once per process (no-op if one is already set). */
export function ensureContextManager(): void {
  const probe = ROOT_CONTEXT.setValue(Symbol('probe'), true);
  // With the default no-op manager `context.with` does not make the context active.
  const works = otelContext.with(probe, () => otelContext.active() === probe);
  if (!works) otelContext.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
}

export function createTracing(config: TracingConfig): Tracing {
  ensureContextManager();
  const processors: SpanProcessor[] = [];
  if (config.otlpEndpoint !== null) {
    processors.push(new BatchSpanProcessor(new OTLPTraceExporter({ url: config.otlpEndpoint })));
  } else if (config.spanFile !== null) {
    // Simple (one export per span) keeps the file complete at any moment, which is what tests and
    // post-mortems read; the file exporter's append is synchronous and cheap.
    processors.push(new SimpleSpanProcessor(createSpanFileExporter({ path: config.spanFile })));
  }
  const provider = new NodeTracerProvider({
    resource: resourceFromAttributes({ 'service.name': config.serviceName }),
    spanProcessors: processors,
  });
  return {
    serviceName: config.serviceName,
    tracer: provider.getTracer(config.serviceName),
    provider,
    forceFlush: () => provider.forceFlush(),
    shutdown: () => provider.shutdown(),
  };
}

/** One line of a span file. Times are decimal strings of nanoseconds since the epoch (beyond 2^53). */
export interface SpanRecord {
  traceId: string;
  spanId: string;
  parentSpanId: string | null;
  name: string;
  kind: string;
  startTimeUnixNano: string;
  endTimeUnixNano: string;
  durationMs: number;
  status: { code: string; message?: string };
  attributes: Record<string, unknown>;
  events: { name: string; timeUnixNano: string; attributes: Record<string, unknown> }[];
  service: string;
}

function hrTimeToNanos(time: HrTime): bigint {
  return BigInt(time[0]) * 1_000_000_000n + BigInt(time[1]);
}

export function spanToRecord(span: ReadableSpan): SpanRecord {
  const ctx = span.spanContext();
  const start = hrTimeToNanos(span.startTime);
  const end = hrTimeToNanos(span.endTime);
  const service = span.resource.attributes['service.name'];
  return {
    traceId: ctx.traceId,
    spanId: ctx.spanId,
    parentSpanId: span.parentSpanContext?.spanId ?? null,
    name: span.name,
    kind: SpanKind[span.kind],
    startTimeUnixNano: start.toString(),
    endTimeUnixNano: end.toString(),
    durationMs: Number(end - start) / 1e6,
    status: span.status.message
      ? { code: SpanStatusCode[span.status.code], message: span.status.message }
      : { code: SpanStatusCode[span.status.code] },
    attributes: { ...span.attributes },
    events: span.events.map((e) => ({
      name: e.name,
      timeUnixNano: hrTimeToNanos(e.time).toString(),
      attributes: { ...(e.attributes ?? {}) },
    })),
    service: typeof service === 'string' ? service : 'unknown',
  };
}

/** Appends one JSON object per finished span to `path` (created with its folder if missing). */
export function createSpanFileExporter(config: { path: string; truncate?: boolean }): SpanExporter {
  mkdirSync(dirname(config.path), { recursive: true });
  if (config.truncate) writeFileSync(config.path, '');
  let stopped = false;
  return {
    export(spans: ReadableSpan[], done: (result: ExportResult) => void): void {
      if (stopped) {
        done({ code: ExportResultCode.FAILED, error: new Error('span file exporter is shut down') });
        return;
      }
      try {
        const lines = spans.map((s) => JSON.stringify(spanToRecord(s))).join('\n');
        if (lines) appendFileSync(config.path, lines + '\n');
        done({ code: ExportResultCode.SUCCESS });
      } catch (error) {
        done({ code: ExportResultCode.FAILED, error: error as Error });
      }
    },
    async shutdown(): Promise<void> {
      stopped = true;
    },
    async forceFlush(): Promise<void> {},
  };
}

// --- plain header maps (NATS) ---

const recordSetter: TextMapSetter<Record<string, string>> = {
  set: (carrier, key, value) => {
    carrier[key] = value;
  },
};
const recordGetter: TextMapGetter<Record<string, string>> = {
  keys: (carrier) => Object.keys(carrier),
  get: (carrier, key) => carrier[key] ?? carrier[key.toLowerCase()],
};

/** Writes the trace context of `ctx` (default: the active one) into `headers`; returns `headers`. */
export function injectContext(
  headers: Record<string, string>,
  ctx: Context = otelContext.active(),
): Record<string, string> {
  propagator.inject(ctx, headers, recordSetter);
  return headers;
}

/** Reads a trace context from `headers`; the result parents spans started in it. */
export function extractContext(headers: Record<string, string>, base: Context = ROOT_CONTEXT): Context {
  return propagator.extract(base, headers, recordGetter);
}

// --- gRPC metadata ---

const metadataSetter: TextMapSetter<Metadata> = {
  set: (carrier, key, value) => carrier.set(key, value),
};
const metadataGetter: TextMapGetter<Metadata> = {
  keys: (carrier) => Object.keys(carrier.getMap()),
  get: (carrier, key) => {
    const values = carrier.get(key).filter((v): v is string => typeof v === 'string');
    return values.length === 0 ? undefined : values.length === 1 ? values[0] : values;
  },
};

export function injectMetadata(metadata: Metadata, ctx: Context = otelContext.active()): Metadata {
  propagator.inject(ctx, metadata, metadataSetter);
  return metadata;
}

export function extractMetadata(metadata: Metadata, base: Context = ROOT_CONTEXT): Context {
  return propagator.extract(base, metadata, metadataGetter);
}

/** Splits "/pilot.v1.RewardService/Score" into its service and method names. */
export function splitMethodPath(path: string): { service: string; method: string } {
  const match = /^\/([^/]+)\/([^/]+)$/.exec(path);
  return match ? { service: match[1], method: match[2] } : { service: 'unknown', method: path };
}

function rpcAttributes(path: string): Record<string, string> {
  const { service, method } = splitMethodPath(path);
  return { 'rpc.system': 'grpc', 'rpc.service': service, 'rpc.method': method };
}

/**
 * Client interceptor: one CLIENT span per call, child of the context active when the call is made,
 * with traceparent in the call's metadata so the server's span joins the same trace.
 */
export function createTracingClientInterceptor(tracer: Tracer): Interceptor {
  return (options, nextCall) => {
    const path = options.method_definition.path;
    const span = tracer.startSpan(
      path.slice(1),
      { kind: SpanKind.CLIENT, attributes: rpcAttributes(path) },
      otelContext.active(),
    );
    return new InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        injectMetadata(metadata, trace.setSpan(otelContext.active(), span));
        next(metadata, {
          onReceiveStatus(status, nextStatus) {
            span.setAttribute('rpc.grpc.status_code', status.code);
            if (status.code !== grpcStatus.OK) {
              span.setStatus({ code: SpanStatusCode.ERROR, message: `${grpcStatus[status.code]}: ${status.details}` });
            }
            span.end();
            nextStatus(status);
          },
        });
      },
    });
  };
}

/** Starts the SERVER span of a call, parented by the trace context in its metadata. */
export function startServerSpan(tracer: Tracer, path: string, metadata: Metadata): { span: Span; ctx: Context } {
  const parent = extractMetadata(metadata);
  const span = tracer.startSpan(path.slice(1), { kind: SpanKind.SERVER, attributes: rpcAttributes(path) }, parent);
  return { span, ctx: trace.setSpan(parent, span) };
}

/** Ends a server span with the gRPC status the call is answered with. */
export function endServerSpan(span: Span, error?: unknown): void {
  if (error === undefined) {
    span.setAttribute('rpc.grpc.status_code', grpcStatus.OK);
  } else {
    span.setAttribute('rpc.grpc.status_code', statusOf(error));
    span.recordException(error instanceof Error ? error : String(error));
    span.setStatus({ code: SpanStatusCode.ERROR, message: error instanceof Error ? error.message : String(error) });
  }
  span.end();
}

/**
 * Runs a server handler inside its SERVER span; the span is active while `fn` runs, so client calls
 * it makes (and NATS messages it publishes) become its children.
 */
export async function withServerSpan<T>(
  tracer: Tracer,
  path: string,
  metadata: Metadata,
  fn: (span: Span) => Promise<T>,
): Promise<T> {
  const { span, ctx } = startServerSpan(tracer, path, metadata);
  try {
    const result = await otelContext.with(ctx, () => fn(span));
    endServerSpan(span);
    return result;
  } catch (error) {
    endServerSpan(span, error);
    throw error;
  }
}

/** Same for a server-streaming handler: every step of the iterable runs with the span active. */
export async function* withServerSpanStream<T>(
  tracer: Tracer,
  path: string,
  metadata: Metadata,
  fn: (span: Span) => AsyncIterable<T>,
): AsyncGenerator<T> {
  const { span, ctx } = startServerSpan(tracer, path, metadata);
  let failure: unknown;
  try {
    const it = otelContext.with(ctx, () => fn(span)[Symbol.asyncIterator]());
    for (;;) {
      const next = await otelContext.with(ctx, () => it.next());
      if (next.done) break;
      yield next.value;
    }
  } catch (error) {
    failure = error;
    throw error;
  } finally {
    endServerSpan(span, failure);
  }
}
