// Errors of moe-pilot services: one class per condition, one table from class to gRPC status code,
// and the conversions both ways so a handler throws a class and a client catches the same class.
import { once } from 'node:events';
import {
  Metadata,
  status,
  type handleServerStreamingCall,
  type handleUnaryCall,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceError,
  type StatusObject,
} from '@grpc/grpc-js';

/** Base class: every service error carries the gRPC status it is answered with. */
export class PilotError extends Error {
  /** Set by subclasses through the table below; never passed by callers. */
  get code(): status {
    return statusOfError(this);
  }
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The request is malformed. `field` names the offending request field (e.g. "spec.scorers[1].name"). */
export class InvalidArgumentError extends PilotError {
  readonly field: string | null;
  constructor(field: string | null, message: string, options?: { cause?: unknown }) {
    super(field === null ? message : `${field}: ${message}`, options);
    this.field = field;
  }
}
export class NotFoundError extends PilotError {}
export class AlreadyExistsError extends PilotError {}
export class ResourceExhaustedError extends PilotError {}
/** The system is not in a state where the call can run (e.g. TrainBatch before LoadModel). */
export class FailedPreconditionError extends PilotError {}
/** Transient: the caller may retry (a dependency is down, the server is shutting down). */
export class UnavailableError extends PilotError {}
export class DeadlineExceededError extends PilotError {}
export class CancelledError extends PilotError {}
/** Concurrency conflict (e.g. two commits of one checkpoint); retry at a higher level. */
export class AbortedError extends PilotError {}
export class UnimplementedError extends PilotError {}
export class PermissionDeniedError extends PilotError {}
export class InternalError extends PilotError {}

type PilotErrorClass = abstract new (...args: never[]) => PilotError;

// The one table. Order matters only for subclasses of each other (none today): first match wins.
const STATUS_TABLE: ReadonlyArray<readonly [PilotErrorClass, status]> = [
  [InvalidArgumentError, status.INVALID_ARGUMENT],
  [NotFoundError, status.NOT_FOUND],
  [AlreadyExistsError, status.ALREADY_EXISTS],
  [ResourceExhaustedError, status.RESOURCE_EXHAUSTED],
  [FailedPreconditionError, status.FAILED_PRECONDITION],
  [UnavailableError, status.UNAVAILABLE],
  [DeadlineExceededError, status.DEADLINE_EXCEEDED],
  [CancelledError, status.CANCELLED],
  [AbortedError, status.ABORTED],
  [UnimplementedError, status.UNIMPLEMENTED],
  [PermissionDeniedError, status.PERMISSION_DENIED],
  [InternalError, status.INTERNAL],
];

// Codes of the native engine (kernels/include/moepilot/error.h) to gRPC codes.
const ENGINE_STATUS: Readonly<Record<string, status>> = {
  INVALID_ARGUMENT: status.INVALID_ARGUMENT,
  OUT_OF_MEMORY: status.RESOURCE_EXHAUSTED,
  IO: status.UNAVAILABLE,
  COMM: status.UNAVAILABLE,
  TIMEOUT: status.DEADLINE_EXCEEDED,
  INTERNAL: status.INTERNAL,
};

function statusOfError(error: PilotError): status {
  for (const [cls, code] of STATUS_TABLE) if (error instanceof cls) return code;
  return status.INTERNAL;
}

/** The gRPC status a thrown value is answered with. */
export function statusOf(error: unknown): status {
  if (error instanceof PilotError) return error.code;
  if (isServiceError(error)) return error.code;
  if (error instanceof Error && error.name === 'EngineError') {
    const code = (error as Error & { code?: unknown }).code;
    if (typeof code === 'string' && code in ENGINE_STATUS) return ENGINE_STATUS[code];
  }
  return status.INTERNAL;
}

/** Builds the PilotError subclass for a gRPC status code (client side). */
export function errorForStatus(code: status, message: string, cause?: unknown): PilotError {
  if (code === status.INVALID_ARGUMENT) return new InvalidArgumentError(null, message, { cause });
  for (const [cls, c] of STATUS_TABLE) {
    if (c === code) return new (cls as unknown as new (m: string, o?: { cause?: unknown }) => PilotError)(message, { cause });
  }
  // UNKNOWN, DATA_LOSS, UNAUTHENTICATED, OUT_OF_RANGE: no class of their own; keep the status name.
  return new InternalError(`${status[code] ?? code}: ${message}`, { cause });
}

export function isServiceError(error: unknown): error is ServiceError {
  return (
    error instanceof Error &&
    typeof (error as Partial<ServiceError>).code === 'number' &&
    (error as Partial<ServiceError>).metadata instanceof Metadata
  );
}

/**
 * Turns a client-side gRPC error into the matching PilotError, keeping the server's message
 * (grpc-js prefixes "<code> <NAME>: " to it) and naming the method that failed.
 */
export function fromServiceError(error: ServiceError, method?: string): PilotError {
  const details = error.details || error.message;
  const where = method ? `${method}: ` : '';
  return errorForStatus(error.code, `${where}${details}`, error);
}

/** The status object a handler answers with for a thrown value; unexpected errors keep their message. */
export function toStatusObject(error: unknown): Partial<StatusObject> {
  const code = statusOf(error);
  let details: string;
  if (error instanceof Error) {
    details = isServiceError(error) ? error.details || error.message : error.message;
    if (!(error instanceof PilotError) && !isServiceError(error) && error.name !== 'Error') {
      details = `${error.name}: ${details}`;
    }
  } else {
    details = String(error);
  }
  return { code, details: details || status[code], metadata: new Metadata() };
}

/** The parts every server call shares (grpc-js does not export its ServerSurfaceCall type). */
export type ServerSurfaceCall = ServerUnaryCall<unknown, unknown> | ServerWritableStream<unknown, unknown>;

/** What a handler sees besides its request. `signal` aborts when the client cancels or the deadline passes. */
export interface HandlerCall<Call> {
  call: Call;
  signal: AbortSignal;
}

function abortOnCancel(call: Pick<ServerSurfaceCall, 'on' | 'cancelled'>): AbortController {
  const controller = new AbortController();
  const cancel = () => {
    if (!controller.signal.aborted) controller.abort(new CancelledError('call cancelled or deadline exceeded'));
  };
  call.on('cancelled', cancel);
  if (call.cancelled) cancel();
  return controller;
}

/**
 * Adapts an async unary handler to grpc-js: its result is the response, anything it throws becomes
 * the status of the table above. The callback is called exactly once.
 */
export function handleUnary<Req, Res>(
  fn: (request: Req, ctx: HandlerCall<ServerUnaryCall<Req, Res>>) => Promise<Res>,
): handleUnaryCall<Req, Res> {
  return (call, callback) => {
    const controller = abortOnCancel(call);
    let result: Promise<Res>;
    try {
      result = fn(call.request, { call, signal: controller.signal });
    } catch (error) {
      result = Promise.reject(error);
    }
    result.then(
      (response) => callback(null, response),
      (error: unknown) => callback(toStatusObject(error)),
    );
  };
}

/**
 * Adapts a server-streaming handler written as an async iterable: every yielded message is written
 * (waiting for the stream to drain when its buffer is full); a throw ends the call with its status.
 */
export function handleServerStream<Req, Res>(
  fn: (request: Req, ctx: HandlerCall<ServerWritableStream<Req, Res>>) => AsyncIterable<Res>,
): handleServerStreamingCall<Req, Res> {
  return (call) => {
    const controller = abortOnCancel(call);
    (async () => {
      for await (const message of fn(call.request, { call, signal: controller.signal })) {
        if (controller.signal.aborted) return;
        if (!call.write(message)) await once(call, 'drain', { signal: controller.signal });
      }
    })().then(
      () => {
        if (!controller.signal.aborted) call.end();
      },
      (error: unknown) => {
        if (controller.signal.aborted) return;  // the client is gone; nobody to answer
        call.emit('error', toStatusObject(error));
      },
    );
  };
}
