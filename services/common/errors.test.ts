import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Metadata, status, type ServiceError } from '@grpc/grpc-js';
import {
  AbortedError,
  AlreadyExistsError,
  CancelledError,
  DeadlineExceededError,
  errorForStatus,
  FailedPreconditionError,
  fromServiceError,
  InternalError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  statusOf,
  toStatusObject,
  UnavailableError,
  UnimplementedError,
} from './errors.ts';

const classes = [
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
] as const;

test('every error class maps to its status and back', () => {
  for (const [cls, code] of classes) {
    const error = cls === InvalidArgumentError ? new InvalidArgumentError('f', 'bad') : new (cls as typeof NotFoundError)('boom');
    assert.equal(error.code, code, cls.name);
    assert.equal(statusOf(error), code, cls.name);
    assert.equal(error.name, cls.name);
    const back = errorForStatus(code, 'm');
    assert.ok(back instanceof cls, `${status[code]} -> ${back.name}`);
  }
});

test('InvalidArgumentError names its field in the message', () => {
  const error = new InvalidArgumentError('spec.scorers[0].weight', 'must be finite');
  assert.equal(error.message, 'spec.scorers[0].weight: must be finite');
  assert.equal(error.field, 'spec.scorers[0].weight');
});

test('engine errors map by their code; unknown errors are INTERNAL with their message', () => {
  const engine = Object.assign(new Error('no memory for experts'), { name: 'EngineError', code: 'OUT_OF_MEMORY' });
  assert.equal(statusOf(engine), status.RESOURCE_EXHAUSTED);
  assert.equal(statusOf(Object.assign(new Error('x'), { name: 'EngineError', code: 'INVALID_ARGUMENT' })), status.INVALID_ARGUMENT);
  assert.equal(statusOf(new TypeError('oops')), status.INTERNAL);
  assert.deepEqual(
    { code: toStatusObject(new TypeError('oops')).code, details: toStatusObject(new TypeError('oops')).details },
    { code: status.INTERNAL, details: 'TypeError: oops' },
  );
  assert.equal(toStatusObject('a string').details, 'a string');
  assert.equal(toStatusObject(new NotFoundError('run r1 not found')).details, 'run r1 not found');
});

test('fromServiceError keeps the server message and names the method', () => {
  const wire = Object.assign(new Error('5 NOT_FOUND: run r1 not found'), {
    code: status.NOT_FOUND,
    details: 'run r1 not found',
    metadata: new Metadata(),
  }) as ServiceError;
  const error = fromServiceError(wire, 'GetRun');
  assert.ok(error instanceof NotFoundError);
  assert.equal(error.message, 'GetRun: run r1 not found');
  assert.equal(error.cause, wire);
  const odd = errorForStatus(status.DATA_LOSS, 'lost');
  assert.ok(odd instanceof InternalError);
  assert.equal(odd.message, 'DATA_LOSS: lost');
});
