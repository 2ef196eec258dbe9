// gRPC server bootstrap shared by every service: the standard health service (one status per
// service plus the server as a whole under ""), server reflection built from the .proto files,
// handlers written as async functions (errors mapped to statuses, SERVER spans when traced), and a
// graceful shutdown that reports NOT_SERVING first, lets calls in flight finish, then forces.
import { dirname, join } from 'node:path';
import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  Server,
  ServerCredentials,
  type ServerOptions,
  type ServerUnaryCall,
  type ServerWritableStream,
  type UntypedServiceImplementation,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation, protoPath as healthProtoPath, type ServingStatus } from 'grpc-health-check';
import type { Tracer } from '@opentelemetry/api';
import { handleServerStream, handleUnary, InvalidArgumentError, type HandlerCall } from './errors.ts';
import type { MethodDef, ServiceDef } from './grpc-client.ts';
import { splitMethodPath, withServerSpan, withServerSpanStream } from './tracing.ts';

type UnaryImpl<Req, Res> = (request: Req, ctx: HandlerCall<ServerUnaryCall<Req, Res>>) => Promise<Res>;
type StreamImpl<Req, Res> = (request: Req, ctx: HandlerCall<ServerWritableStream<Req, Res>>) => AsyncIterable<Res>;

type ImplFn<M> = M extends MethodDef<infer Req, infer Res>
  ? M['requestStream'] extends true
    ? never
    : M['responseStream'] extends true
      ? StreamImpl<Req, Res>
      : UnaryImpl<Req, Res>
  : never;

/** A service written as async functions: unary methods return a Promise, server streams an AsyncIterable. */
export type ServiceImpl<S extends ServiceDef> = { [K in keyof S]: ImplFn<S[K]> };

export interface GrpcServerConfig {
  /** "0.0.0.0", "127.0.0.1", "[::]" */
  host: string;
  /** 0 picks a free port (see `start()`'s result). */
  port: number;
  /** Insecure when null. */
  credentials: ServerCredentials | null;
  /** .proto files served by reflection; [] disables reflection. Default: the project's (`pilotProtoFiles()`). */
  reflectionProtoFiles?: string[];
  /** Import root of those files (for "pilot/v1/common.proto" style imports). Default: proto/. */
  protoRoot?: string;
  /** How long shutdown waits for calls in flight before cancelling them. */
  shutdownGraceMs: number;
  serverOptions?: ServerOptions;
}

export interface GrpcServerDeps {
  tracer: Tracer | null;
}

export interface GrpcServer {
  /** Registers a service; its health status starts NOT_SERVING and turns SERVING on start(). */
  addService<S extends ServiceDef>(service: S, impl: ServiceImpl<S>): void;
  /** Binds and starts; resolves with the bound port. */
  start(): Promise<number>;
  /** Health status of one service ("pilot.v1.RewardService") or of the whole server (""). */
  setStatus(service: string, status: ServingStatus): void;
  /** NOT_SERVING everywhere, then waits up to shutdownGraceMs for calls in flight, then forces. */
  shutdown(): Promise<void>;
  readonly serviceNames: readonly string[];
  readonly grpc: Server;
}

const HEALTH_SERVICE = 'grpc.health.v1.Health';
const HEALTH_PROTO_ROOT = join(dirname(healthProtoPath), '..', '..');
const HEALTH_PROTO_FILE = 'health/v1/health.proto';
const PROTO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'proto');

/** The repository's proto import root and every pilot/v1 file in it, for reflection. */
export function pilotProtoFiles(): { protoRoot: string; files: string[] } {
  const dir = join(PROTO_ROOT, 'pilot', 'v1');
  const files = readdirSync(dir)
    .filter((f) => f.endsWith('.proto'))
    .sort()
    .map((f) => `pilot/v1/${f}`);
  return { protoRoot: PROTO_ROOT, files };
}

/** "pilot.v1.RewardService" from a ts-proto service definition. */
export function serviceNameOf(service: ServiceDef): string {
  const first = Object.values(service)[0];
  if (!first) throw new InvalidArgumentError('service', 'service definition has no methods');
  return splitMethodPath(first.path).service;
}

export function createGrpcServer(deps: GrpcServerDeps, config: GrpcServerConfig): GrpcServer {
  const server = new Server(config.serverOptions);
  const names: string[] = [];
  const health = new HealthImplementation({ '': 'NOT_SERVING' });
  health.addToServer(server);
  let started = false;
  let stopping: Promise<void> | null = null;

  // Reflection is added at start(), once the served services are known: it lists only those
  // (plus health), not every service of the .proto files.
  function addReflection(): void {
    const own = config.reflectionProtoFiles === undefined ? pilotProtoFiles() : null;
    const files = own?.files ?? config.reflectionProtoFiles!;
    const root = own?.protoRoot ?? config.protoRoot ?? PROTO_ROOT;
    if (files.length === 0) return;
    const pkg = loadSync([...files, HEALTH_PROTO_FILE], {
      includeDirs: [root, HEALTH_PROTO_ROOT],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    new ReflectionService(pkg, { services: [...names, HEALTH_SERVICE] }).addToServer(server);
  }

  function wrap(def: MethodDef<unknown, unknown>, fn: UnaryImpl<unknown, unknown> | StreamImpl<unknown, unknown>) {
    const tracer = deps.tracer;
    if (def.responseStream) {
      const impl = fn as StreamImpl<unknown, unknown>;
      return handleServerStream<unknown, unknown>(
        tracer ? (req, ctx) => withServerSpanStream(tracer, def.path, ctx.call.metadata, () => impl(req, ctx)) : impl,
      );
    }
    const impl = fn as UnaryImpl<unknown, unknown>;
    return handleUnary<unknown, unknown>(
      tracer ? (req, ctx) => withServerSpan(tracer, def.path, ctx.call.metadata, () => impl(req, ctx)) : impl,
    );
  }

  return {
    addService(service, impl) {
      if (started) throw new InvalidArgumentError('service', 'services must be added before start()');
      const name = serviceNameOf(service);
      const handlers: UntypedServiceImplementation = {};
      for (const [key, def] of Object.entries(service)) {
        const fn = (impl as Record<string, unknown>)[key];
        if (typeof fn !== 'function') {
          throw new InvalidArgumentError(`impl.${key}`, `${name} has no handler for method ${key}`);
        }
        if (def.requestStream) {
          throw new InvalidArgumentError(`impl.${key}`, 'client-streaming methods are not supported');
        }
        handlers[key] = wrap(def, fn as UnaryImpl<unknown, unknown>);
      }
      server.addService(service as never, handlers);
      names.push(name);
      health.setStatus(name, 'NOT_SERVING');
    },

    async start() {
      if (started) throw new InvalidArgumentError(null, 'server already started');
      addReflection();
      const address = `${config.host}:${config.port}`;
      const port = await new Promise<number>((resolve, reject) => {
        server.bindAsync(address, config.credentials ?? ServerCredentials.createInsecure(), (error, bound) => {
          if (error) reject(new Error(`cannot bind gRPC server to ${address}: ${error.message}`, { cause: error }));
          else resolve(bound);
        });
      });
      started = true;
      for (const name of names) health.setStatus(name, 'SERVING');
      health.setStatus('', 'SERVING');
      return port;
    },

    setStatus(service, status) {
      health.setStatus(service, status);
    },

    shutdown() {
      stopping ??= (async () => {
        for (const name of names) health.setStatus(name, 'NOT_SERVING');
        health.setStatus('', 'NOT_SERVING');
        if (!started) {
          server.forceShutdown();
          return;
        }
        await new Promise<void>((resolve) => {
          const force = setTimeout(() => {
            server.forceShutdown();
            resolve();
          }, config.shutdownGraceMs);
          server.tryShutdown(() => {
            clearTimeout(force);
            resolve();
          });
        });
      })();
      return stopping;
    },

    get serviceNames() {
      return [...names];
    },
    grpc: server,
  };
}
