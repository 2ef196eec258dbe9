// OTLP/gRPC export against a real gRPC endpoint that accepts the collector's Export method and
// keeps the raw request bytes (no protobuf decoding needed to find a span's name and trace id).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Server, ServerCredentials, type ServiceDefinition } from '@grpc/grpc-js';
import { createTracing } from './tracing.ts';

const collectorService: ServiceDefinition = {
  export: {
    path: '/opentelemetry.proto.collector.trace.v1.TraceService/Export',
    requestStream: false,
    responseStream: false,
    requestSerialize: (b: Buffer) => b,
    requestDeserialize: (b: Buffer) => b,
    // An empty ExportTraceServiceResponse encodes to zero bytes.
    responseSerialize: () => Buffer.alloc(0),
    responseDeserialize: (b: Buffer) => b,
  },
};

test('with an OTLP endpoint, spans are exported over gRPC to it', async () => {
  const received: Buffer[] = [];
  const server = new Server();
  server.addService(collectorService, {
    export: (call: { request: Buffer }, callback: (e: null, r: Buffer) => void) => {
      received.push(call.request);
      callback(null, Buffer.alloc(0));
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  const tracing = createTracing({ serviceName: 'otlp-test', otlpEndpoint: `http://127.0.0.1:${port}`, spanFile: null });
  try {
    const span = tracing.tracer.startSpan('coordinator.step');
    span.setAttribute('step', 7);
    span.end();
    await tracing.forceFlush();
    assert.equal(received.length, 1);
    const body = received[0];
    assert.ok(body.includes(Buffer.from('coordinator.step')), 'span name in the export request');
    assert.ok(body.includes(Buffer.from('otlp-test')), 'service name in the resource');
    assert.ok(body.includes(Buffer.from(span.spanContext().traceId, 'hex')), 'trace id bytes');
  } finally {
    await tracing.shutdown();
    server.forceShutdown();
  }
});
