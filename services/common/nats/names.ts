// Every NATS stream, consumer and subject name the pilot uses, in one place, so producers and consumers cannot drift.
//
// Subjects: tokens are separated by "."; a run id becomes one token, so it must not contain ".", "*", ">" or
// whitespace (checkToken enforces it).

/** Work-queue stream of prompts waiting to be trained on; a message is removed when the coordinator acks it. */
export const PROMPT_STREAM = "PILOT_PROMPTS";
/** Prompts are published on pilot.prompts.<queue>; the stream captures them all. */
export const PROMPT_SUBJECT_PREFIX = "pilot.prompts";
export const DEFAULT_PROMPT_QUEUE = "default";
/** The coordinator's durable pull consumer on the prompt stream. */
export const PROMPT_CONSUMER = "coordinator";

/** Limits-retention stream of run events and step metrics, kept so a watcher can replay a run from its start. */
export const RUN_STREAM = "PILOT_RUNS";
export const RUN_SUBJECT_PREFIX = "pilot.run";

export type RunRecordKind = "metrics" | "events";
export const RUN_RECORD_KINDS: readonly RunRecordKind[] = ["metrics", "events"];

export function promptSubject(queue: string): string {
  return `${PROMPT_SUBJECT_PREFIX}.${checkToken("prompt queue name", queue)}`;
}

export function promptStreamSubjects(): string[] {
  return [`${PROMPT_SUBJECT_PREFIX}.>`];
}

/** pilot.run.<id>.metrics or pilot.run.<id>.events */
export function runSubject(runId: string, kind: RunRecordKind): string {
  return `${RUN_SUBJECT_PREFIX}.${checkToken("run id", runId)}.${kind}`;
}

export function runStreamSubjects(): string[] {
  return [`${RUN_SUBJECT_PREFIX}.*.*`];
}

const TOKEN = /^[A-Za-z0-9_-]+$/;

/** Returns the token when it is safe as one subject token; otherwise throws naming what is wrong. */
export function checkToken(what: string, token: string): string {
  if (typeof token !== "string" || token.length === 0) {
    throw new TypeError(`${what} must be a non-empty string`);
  }
  if (!TOKEN.test(token)) {
    throw new TypeError(`${what} "${token}" may only contain letters, digits, "_" and "-" (it becomes a NATS subject token)`);
  }
  return token;
}
