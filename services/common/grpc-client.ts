// Promise/async-iterator clients over the ts-proto service definitions. Every call gets a deadline
// (the client's default unless the call names one); a call made while serving another call passes
// that call as `parent`, so the child never outlives the parent's deadline and is cancelled with it.
import {
  Client,
  credentials as grpcCredentials,
  Metadata,
  propagate,
  type CallOptions as GrpcCallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type ClientReadableStream,
  type Interceptor,
  type ServiceError,
} from '@grpc/grpc-js';
import type { Tracer } from '@opentelemetry/api';
import { DeadlineExceededError, fromServiceError, isServiceError, InvalidArgumentError, type ServerSurfaceCall } from './errors.ts';
import { createTracingClientInterceptor } from './tracing.ts';

/** The shape ts-proto (outputServices=grpc-js) gives each method of a service definition. */
export interface MethodDef<Req, Res> {
  path: string;
  requestStream: boolean;
  responseStream: boolean;
  requestSerialize: (value: Req) => Buffer;
  responseDeserialize: (value: Buffer) => Res;
}

export type ServiceDef = { [method: string]: MethodDef<any, any> };

export interface CallOptions {
  /** Overrides the client's default timeout for this call. */
  timeoutMs?: number;
  /** An absolute deadline (e.g. the end of a training step); wins over timeoutMs. */
  deadline?: Date;
  /** The server call being handled: its deadline caps this call's, its cancellation cancels it. */
  parent?: ServerSurfaceCall | null;
  metadata?: Metadata;
  /** Aborting cancels the call (it then rejects with CancelledError). */
  signal?: AbortSignal;
}

type MethodFn<M> = M extends MethodDef<infer Req, infer Res>
  ? M['requestStream'] extends true
    ? never // client and bidi streaming: not used by moe-pilot's services
    : M['responseStream'] extends true
      ? (request: Req, options?: CallOptions) => AsyncIterable<Res>
      : (request: Req, options?: CallOptions) => Promise<Res>
  : never;

export type PromiseClient<S extends ServiceDef> = { [K in keyof S]: MethodFn<S[K]> } & {
  /** Resolves once the channel is connected; rejects with DeadlineExceededError after timeoutMs. */
  waitForReady(timeoutMs: number): Promise<void>;
  close(): void;
};

export interface ClientConfig {
  /** "host:port" */
  address: string;
  /** Deadline of calls that set no timeoutMs. */
  defaultTimeoutMs: number;
  /** Insecure when null (loopback, cluster network). */
  credentials: ChannelCredentials | null;
  channelOptions?: ChannelOptions;
}

export interface ClientDeps {
  /** When given, every call gets a CLIENT span and carries its trace context. */
  tracer: Tracer | null;
  interceptors?: Interceptor[];
}

/**
 * The deadline of a call: `deadline` if given, else now + timeout; capped by the parent call's
 * deadline when there is one.
 */
export function callDeadline(
  timeoutMs: number,
  parent: Pick<ServerSurfaceCall, 'getDeadline'> | null | undefined,
  now = Date.now(),
  absolute?: Date,
): Date {
  if (!(timeoutMs > 0) || !Number.isFinite(timeoutMs)) {
    throw new InvalidArgumentError('timeoutMs', `must be a positive finite number of milliseconds, got ${timeoutMs}`);
  }
  let deadline = absolute ? absolute.getTime() : now + timeoutMs;
  if (parent) {
    const pd = parent.getDeadline();
    const parentMs = pd instanceof Date ? pd.getTime() : pd;
    if (Number.isFinite(parentMs) && parentMs < deadline) deadline = parentMs;
  }
  return new Date(deadline);
}

function methodNameOf(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}

export function createClient<S extends ServiceDef>(deps: ClientDeps, service: S, config: ClientConfig): PromiseClient<S> {
  if (!(config.defaultTimeoutMs > 0)) {
    throw new InvalidArgumentError('defaultTimeoutMs', `must be positive, got ${config.defaultTimeoutMs}`);
  }
  const interceptors = [...(deps.interceptors ?? [])];
  if (deps.tracer) interceptors.unshift(createTracingClientInterceptor(deps.tracer));
  const client = new Client(config.address, config.credentials ?? grpcCredentials.createInsecure(), {
    ...config.channelOptions,
    interceptors,
  });

  function grpcOptions(options: CallOptions | undefined): GrpcCallOptions {
    const timeoutMs = options?.timeoutMs ?? config.defaultTimeoutMs;
    const result: GrpcCallOptions = { deadline: callDeadline(timeoutMs, options?.parent, Date.now(), options?.deadline) };
    if (options?.parent) {
      // grpc-js also caps the deadline itself; we keep the explicit cap above so it is visible and
      // tested, and ask grpc-js for cancellation propagation.
      result.parent = options.parent as GrpcCallOptions['parent'];
      result.propagate_flags = propagate.DEFAULTS;
    }
    return result;
  }

  function unary(name: string, def: MethodDef<unknown, unknown>) {
    return (request: unknown, options?: CallOptions): Promise<unknown> =>
      new Promise((resolve, reject) => {
        if (options?.signal?.aborted) {
          reject(fromServiceError(cancelledError(), name));
          return;
        }
        const call = client.makeUnaryRequest(
          def.path,
          def.requestSerialize,
          def.responseDeserialize,
          request,
          options?.metadata ?? new Metadata(),
          grpcOptions(options),
          (error: ServiceError | null, response?: unknown) => {
            options?.signal?.removeEventListener('abort', onAbort);
            if (error) reject(fromServiceError(error, name));
            else resolve(response);
          },
        );
        const onAbort = () => call.cancel();
        options?.signal?.addEventListener('abort', onAbort, { once: true });
      });
  }

  function serverStream(name: string, def: MethodDef<unknown, unknown>) {
    return (request: unknown, options?: CallOptions): AsyncIterable<unknown> => ({
      async *[Symbol.asyncIterator]() {
        const call: ClientReadableStream<unknown> = client.makeServerStreamRequest(
          def.path,
          def.requestSerialize,
          def.responseDeserialize,
          request,
          options?.metadata ?? new Metadata(),
          grpcOptions(options),
        );
        const onAbort = () => call.cancel();
        options?.signal?.addEventListener('abort', onAbort, { once: true });
        let finished = false;
        try {
          for await (const message of call) yield message;
          finished = true;
        } catch (error) {
          finished = true;
          throw isServiceError(error) ? fromServiceError(error, name) : error;
        } finally {
          options?.signal?.removeEventListener('abort', onAbort);
          // The consumer stopped early (break/return): tell the server.
          if (!finished) call.cancel();
        }
      },
    });
  }

  const methods: Record<string, unknown> = {};
  for (const [key, def] of Object.entries(service)) {
    if (def.requestStream) continue;
    const name = methodNameOf(def.path);
    methods[key] = def.responseStream ? serverStream(name, def) : unary(name, def);
  }
  methods.waitForReady = (timeoutMs: number) =>
    new Promise<void>((resolve, reject) => {
      client.waitForReady(Date.now() + timeoutMs, (error?: Error) => {
        if (error) reject(new DeadlineExceededError(`${config.address} not ready within ${timeoutMs} ms: ${error.message}`));
        else resolve();
      });
    });
  methods.close = () => client.close();
  return methods as PromiseClient<S>;
}

function cancelledError(): ServiceError {
  return Object.assign(new Error('1 CANCELLED: aborted by the caller'), {
    code: 1,
    details: 'aborted by the caller',
    metadata: new Metadata(),
  }) as ServiceError;
}
