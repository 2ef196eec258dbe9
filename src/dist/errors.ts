// Errors of the distributed layer. `code` is stable and shared with the native engine's codes, so a
// caller can tell a timeout (a peer did not answer in time) from a broken connection.

export type CommErrorCode = 'COMM' | 'TIMEOUT' | 'INVALID_ARGUMENT' | 'INTERNAL';

export class CommError extends Error {
  override readonly name: string = 'CommError';
  constructor(
    message: string,
    readonly code: CommErrorCode,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

// The rendezvous service answered with an error (or could not be reached). `grpcCode` is the status.
export class RendezvousError extends CommError {
  override readonly name: string = 'RendezvousError';
  constructor(
    message: string,
    code: CommErrorCode,
    readonly grpcCode: number,
    options?: { cause?: unknown },
  ) {
    super(message, code, options);
  }
}

const knownCodes: ReadonlySet<string> = new Set(['COMM', 'TIMEOUT', 'INVALID_ARGUMENT', 'INTERNAL']);

// Native errors arrive as Error named "EngineError" with a string `code`; gives them our class.
export function toCommError(e: unknown): unknown {
  if (e instanceof CommError) return e;
  if (e instanceof Error && e.name === 'EngineError') {
    const raw = (e as Error & { code?: unknown }).code;
    const code = typeof raw === 'string' && knownCodes.has(raw) ? (raw as CommErrorCode) : 'INTERNAL';
    return new CommError(e.message, code, { cause: e });
  }
  return e;
}
