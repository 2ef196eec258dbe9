// Public surface of services/common: what services import.
export * from './errors.ts';
export { callDeadline, createClient, type CallOptions, type ClientConfig, type ClientDeps, type PromiseClient, type ServiceDef } from './grpc-client.ts';
export { createGrpcServer, pilotProtoFiles, serviceNameOf, type GrpcServer, type GrpcServerConfig, type GrpcServerDeps, type ServiceImpl } from './grpc-server.ts';
export { checkHealth, listServicesByReflection, reflectFilesForSymbol, waitForServing } from './grpc-probes.ts';
export {
  createSpanFileExporter,
  createTracing,
  createTracingClientInterceptor,
  ensureContextManager,
  extractContext,
  extractMetadata,
  injectContext,
  injectMetadata,
  spanToRecord,
  withServerSpan,
  withServerSpanStream,
  type SpanRecord,
  type Tracing,
  type TracingConfig,
} from './tracing.ts';
