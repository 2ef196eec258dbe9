// The durable prompt queue between `pilot submit` and the coordinator.
//
// A JetStream work-queue stream holds the prompts; the coordinator leases them through one durable pull consumer with
// explicit acks. A prompt is acked only after the step that trained on it is checkpointed, so a crash at any point
// before that leaves the prompt unacked and the server redelivers it once ack_wait runs out. While a step runs, the
// coordinator heartbeats its leases (`working()`), which restarts the ack_wait clock, so a long step is not mistaken
// for a crash. Submits carry a Nats-Msg-Id derived from the prompt, so a client that retries a submit does not queue
// the same prompt twice (within the stream's duplicate window).
import { createHash } from "node:crypto";
import {
  AckPolicy,
  DeliverPolicy,
  RetentionPolicy,
  StorageType,
  jetstream,
  jetstreamManager,
  type Consumer,
  type JsMsg,
} from "@nats-io/jetstream";
import { nanos, type NatsConnection } from "@nats-io/transport-node";
import { ensureDurableConsumer, ensureStream } from "./ensure.ts";
import { DEFAULT_PROMPT_QUEUE, PROMPT_CONSUMER, PROMPT_STREAM, promptStreamSubjects, promptSubject } from "./names.ts";

/** What a client submits. */
export interface PromptInput {
  /** Stable id; also the de-duplication key. Derived from text and reference when absent. */
  id?: string;
  text: string;
  /** Reference answer for the reward scorer, when the task has one. */
  reference?: string | null;
  metadata?: Record<string, unknown>;
}

/** A prompt as stored in the queue: every field present, unset ones null/empty. */
export interface Prompt {
  id: string;
  text: string;
  reference: string | null;
  metadata: Record<string, unknown>;
}

export interface SubmittedPrompt {
  /** Position in the submitted array. */
  index: number;
  id: string;
  /** Stream sequence of the stored message (of the first copy when duplicate). */
  seq: number;
  /** True when this id was already submitted within the duplicate window; nothing new was queued. */
  duplicate: boolean;
}

export interface RejectedPrompt {
  index: number;
  /** The prompt's id when it had a usable one. */
  id: string | null;
  error: string;
  /** True when the prompt was valid but publishing failed; submitting it again is safe (de-duplicated). */
  retryable: boolean;
}

export interface SubmitResult {
  accepted: SubmittedPrompt[];
  rejected: RejectedPrompt[];
}

/**
 * "unconfirmed": the ack was sent but the server did not confirm it in time; it may or may not have landed, and the
 * client cannot send it again, so the prompt may be redelivered (delivery is at least once).
 */
export type LeaseState = "leased" | "acked" | "nakked" | "unconfirmed";

export interface PromptLease {
  readonly prompt: Prompt;
  /** Stream sequence of the message. */
  readonly seq: number;
  /** 1 on first delivery; more after crashes or naks. */
  readonly deliveryCount: number;
  readonly redelivered: boolean;
  readonly state: LeaseState;
  /** Restarts the server's ack_wait clock for this message: call while the step using it is still running. */
  working(): void;
  /** Removes the prompt from the queue; resolves once the server confirmed the ack. */
  ack(): Promise<void>;
  /** Hands the prompt back for redelivery, after delayMs when given. */
  nak(delayMs?: number): void;
}

export interface PromptQueueCounts {
  /** Stored and not yet delivered. */
  waiting: number;
  /** Delivered and not yet acked (leased, or awaiting redelivery after a crash). */
  leased: number;
  /** All messages in the stream. */
  stored: number;
}

export interface LeaseHeartbeat {
  /** Adds leases to heartbeat (e.g. prompts taken later for the same step). */
  add(leases: Iterable<PromptLease>): void;
  stop(): void;
}

export interface PromptQueue {
  readonly config: Readonly<PromptQueueConfig>;
  submit(prompts: readonly unknown[]): Promise<SubmitResult>;
  /**
   * Pulls up to n prompts, one message at a time, waiting at most timeoutMs in all (JetStream pulls wait at least
   * 1 s, so the effective minimum is 1000 ms). Returns fewer when the queue runs dry.
   */
  take(n: number, opts?: { timeoutMs?: number }): Promise<PromptLease[]>;
  /** Heartbeats the leases every intervalMs (default a third of ack_wait) until stop(); settled leases are skipped. */
  heartbeat(leases: Iterable<PromptLease>, intervalMs?: number): LeaseHeartbeat;
  pending(): Promise<PromptQueueCounts>;
}

export interface PromptQueueDeps {
  nc: NatsConnection;
  /** A message in the stream that is not a valid prompt: it is terminated (never redelivered) and reported here. */
  onInvalidMessage?: (seq: number, error: string) => void;
  /** A heartbeat that could not be sent (e.g. connection lost). */
  onHeartbeatError?: (lease: PromptLease, err: unknown) => void;
}

export interface PromptQueueConfig {
  stream: string;
  /** Prompts go to pilot.prompts.<queue>; the consumer reads only that queue. */
  queue: string;
  consumer: string;
  /** How long a delivered prompt may go without ack or heartbeat before the server redelivers it. */
  ackWaitMs: number;
  /** Deliveries before the server gives up on a prompt; -1 never gives up. */
  maxDeliver: number;
  /** Window in which a re-submitted id is recognised as a duplicate. */
  duplicateWindowMs: number;
  /** Largest accepted prompt text, in UTF-8 bytes. */
  maxTextBytes: number;
}

export const PROMPT_QUEUE_DEFAULTS: PromptQueueConfig = {
  stream: PROMPT_STREAM,
  queue: DEFAULT_PROMPT_QUEUE,
  consumer: PROMPT_CONSUMER,
  ackWaitMs: 10 * 60_000,
  maxDeliver: -1,
  duplicateWindowMs: 24 * 3600_000,
  maxTextBytes: 256 * 1024,
};

const PROMPT_FIELDS = new Set(["id", "text", "reference", "metadata"]);
const ID = /^[A-Za-z0-9._:-]{1,128}$/;

export class PromptValidationError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "PromptValidationError";
  }
}

export class LeaseSettledError extends Error {
  constructor(seq: number, state: LeaseState, action: string) {
    super(`cannot ${action} prompt message ${seq}: it is already ${state}`);
    this.name = "LeaseSettledError";
  }
}

/** Validates one submitted prompt and fills defaults; throws PromptValidationError naming the bad field. */
export function normalizePrompt(input: unknown, maxTextBytes = PROMPT_QUEUE_DEFAULTS.maxTextBytes): Prompt {
  if (typeof input !== "object" || input === null || Array.isArray(input)) {
    throw new PromptValidationError("a prompt must be an object with a \"text\" field");
  }
  const p = input as Record<string, unknown>;
  for (const k of Object.keys(p)) {
    if (!PROMPT_FIELDS.has(k)) {
      throw new PromptValidationError(`unknown prompt field "${k}" (allowed: ${[...PROMPT_FIELDS].join(", ")})`);
    }
  }
  if (typeof p.text !== "string") throw new PromptValidationError("prompt \"text\" must be a string");
  if (p.text.trim().length === 0) throw new PromptValidationError("prompt \"text\" is empty");
  const bytes = Buffer.byteLength(p.text, "utf8");
  if (bytes > maxTextBytes) {
    throw new PromptValidationError(`prompt "text" is ${bytes} bytes, more than the limit of ${maxTextBytes}`);
  }
  if (p.reference !== undefined && p.reference !== null && typeof p.reference !== "string") {
    throw new PromptValidationError("prompt \"reference\" must be a string or null");
  }
  const reference = (p.reference as string | null | undefined) ?? null;
  if (p.metadata !== undefined && (typeof p.metadata !== "object" || p.metadata === null || Array.isArray(p.metadata))) {
    throw new PromptValidationError("prompt \"metadata\" must be an object");
  }
  let id: string;
  if (p.id === undefined || p.id === null) {
    id = contentId(p.text, reference);
  } else if (typeof p.id !== "string" || !ID.test(p.id)) {
    throw new PromptValidationError(
      `prompt "id" must be 1..128 characters of letters, digits, ".", "_", ":" or "-", got ${JSON.stringify(p.id)}`,
    );
  } else {
    id = p.id;
  }
  return { id, text: p.text, reference, metadata: (p.metadata as Record<string, unknown> | undefined) ?? {} };
}

/** The id of a prompt submitted without one: the same text and reference always give the same id. */
export function contentId(text: string, reference: string | null): string {
  return "p-" + createHash("sha256").update(JSON.stringify([text, reference])).digest("hex").slice(0, 32);
}

export async function createPromptQueue(deps: PromptQueueDeps, config: Partial<PromptQueueConfig> = {}): Promise<PromptQueue> {
  const cfg: PromptQueueConfig = { ...PROMPT_QUEUE_DEFAULTS, ...config };
  if (!(cfg.ackWaitMs >= 1000)) throw new RangeError(`ackWaitMs must be at least 1000, got ${cfg.ackWaitMs}`);
  if (!(cfg.duplicateWindowMs >= 1000)) {
    throw new RangeError(`duplicateWindowMs must be at least 1000, got ${cfg.duplicateWindowMs}`);
  }
  if (!Number.isInteger(cfg.maxDeliver) || (cfg.maxDeliver < 1 && cfg.maxDeliver !== -1)) {
    throw new RangeError(`maxDeliver must be -1 or a positive integer, got ${cfg.maxDeliver}`);
  }
  const subject = promptSubject(cfg.queue);
  const { nc } = deps;
  const jsm = await jetstreamManager(nc);
  const js = jetstream(nc);

  await ensureStream(jsm, {
    name: cfg.stream,
    subjects: promptStreamSubjects(),
    retention: RetentionPolicy.Workqueue,
    storage: StorageType.File,
    duplicate_window: nanos(cfg.duplicateWindowMs),
  });
  await ensureDurableConsumer(jsm, cfg.stream, {
    durable_name: cfg.consumer,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: nanos(cfg.ackWaitMs),
    max_deliver: cfg.maxDeliver,
    // Prompts are acked only once a checkpoint covers the step that trained on them, so a run holds every
    // prompt since its last checkpoint unacked: no bound here (JetStream's default 1000 would stall a run
    // that trains on more prompts than that between checkpoints).
    max_ack_pending: -1,
    filter_subject: subject,
  });
  const consumer: Consumer = await js.consumers.get(cfg.stream, cfg.consumer);

  async function submit(prompts: readonly unknown[]): Promise<SubmitResult> {
    if (!Array.isArray(prompts)) throw new TypeError("submit expects an array of prompts");
    const accepted: SubmittedPrompt[] = [];
    const rejected: RejectedPrompt[] = [];
    // The same id twice in one batch with different content: the server would silently drop the second one.
    const seen = new Map<string, string>();
    const valid: { index: number; prompt: Prompt }[] = [];
    prompts.forEach((input, index) => {
      let prompt: Prompt;
      try {
        prompt = normalizePrompt(input, cfg.maxTextBytes);
      } catch (err) {
        const id = typeof (input as { id?: unknown } | null)?.id === "string" ? (input as { id: string }).id : null;
        rejected.push({ index, id, error: (err as Error).message, retryable: false });
        return;
      }
      const body = JSON.stringify(prompt);
      const earlier = seen.get(prompt.id);
      if (earlier !== undefined && earlier !== body) {
        rejected.push({
          index,
          id: prompt.id,
          error: `prompt id "${prompt.id}" appears twice in this submit with different content`,
          retryable: false,
        });
        return;
      }
      seen.set(prompt.id, body);
      valid.push({ index, prompt });
    });
    // Published in order on one connection, so the stream keeps submit order; acks are awaited together.
    const results = await Promise.allSettled(
      // De-duplication is per stream, across every queue in it: the id is qualified by the queue, so the same
      // prompt submitted to two queues (datasets) is queued in each, and a retry into one queue is not.
      valid.map(({ prompt }) => js.publish(subject, JSON.stringify(prompt), { msgID: `${cfg.queue}/${prompt.id}` })),
    );
    results.forEach((r, i) => {
      const { index, prompt } = valid[i];
      if (r.status === "fulfilled") {
        accepted.push({ index, id: prompt.id, seq: r.value.seq, duplicate: r.value.duplicate });
      } else {
        rejected.push({ index, id: prompt.id, error: `publish failed: ${(r.reason as Error).message}`, retryable: true });
      }
    });
    rejected.sort((a, b) => a.index - b.index);
    return { accepted, rejected };
  }

  async function take(n: number, opts: { timeoutMs?: number } = {}): Promise<PromptLease[]> {
    if (!Number.isInteger(n) || n < 1) throw new RangeError(`take expects a positive integer count, got ${n}`);
    const timeoutMs = opts.timeoutMs ?? 5000;
    const deadline = Date.now() + timeoutMs;
    const leases: PromptLease[] = [];
    // Leases taken early must not run out while take() waits for the rest (with a short ack_wait they would be
    // redelivered, and handed out twice, within this very call).
    const hb = heartbeat([]);
    try {
      await pull(n, deadline, leases, hb);
    } catch (err) {
      // The caller never sees these leases: hand them back now rather than after ack_wait.
      for (const l of leases) {
        try {
          l.nak();
        } catch {
          // connection gone: the server redelivers after ack_wait
        }
      }
      throw err;
    } finally {
      hb.stop();
    }
    return leases;
  }

  async function pull(n: number, deadline: number, leases: PromptLease[], hb: LeaseHeartbeat) {
    while (leases.length < n) {
      const remaining = deadline - Date.now();
      // At least one pull always happens, so timeoutMs 0 means "one short pull".
      if (remaining <= 0 && leases.length > 0) break;
      const m = await consumer.next({ expires: Math.max(1000, remaining) });
      if (m === null) break;
      let prompt: Prompt;
      try {
        prompt = normalizePrompt(m.json<unknown>(), Number.MAX_SAFE_INTEGER);
      } catch (err) {
        // Not from submit(): redelivering it would only fail again.
        m.term();
        deps.onInvalidMessage?.(m.seq, err instanceof SyntaxError ? `not JSON: ${err.message}` : (err as Error).message);
        continue;
      }
      const lease = createLease(m, prompt);
      leases.push(lease);
      hb.add([lease]);
    }
  }

  function heartbeat(leases: Iterable<PromptLease>, intervalMs = Math.floor(cfg.ackWaitMs / 3)): LeaseHeartbeat {
    if (!(intervalMs > 0) || intervalMs >= cfg.ackWaitMs) {
      throw new RangeError(`heartbeat interval must be in (0, ackWaitMs=${cfg.ackWaitMs}), got ${intervalMs}`);
    }
    const set = new Set<PromptLease>(leases);
    const timer = setInterval(() => {
      for (const lease of set) {
        if (lease.state !== "leased") {
          set.delete(lease);
          continue;
        }
        try {
          lease.working();
        } catch (err) {
          deps.onHeartbeatError?.(lease, err);
        }
      }
    }, intervalMs);
    // A heartbeat alone must not keep a process alive that has nothing else to do.
    timer.unref();
    return {
      add: (more) => {
        for (const l of more) set.add(l);
      },
      stop: () => clearInterval(timer),
    };
  }

  async function pending(): Promise<PromptQueueCounts> {
    const [ci, si] = await Promise.all([jsm.consumers.info(cfg.stream, cfg.consumer), jsm.streams.info(cfg.stream)]);
    return { waiting: ci.num_pending, leased: ci.num_ack_pending, stored: si.state.messages };
  }

  return { config: Object.freeze({ ...cfg }), submit, take, heartbeat, pending };
}

function createLease(m: JsMsg, prompt: Prompt): PromptLease {
  let state: LeaseState = "leased";
  const settle = (action: string, next: LeaseState) => {
    if (state !== "leased") throw new LeaseSettledError(m.seq, state, action);
    state = next;
  };
  return {
    prompt,
    seq: m.seq,
    deliveryCount: m.info.deliveryCount,
    redelivered: m.redelivered,
    get state() {
      return state;
    },
    working() {
      if (state !== "leased") throw new LeaseSettledError(m.seq, state, "heartbeat");
      m.working();
    },
    async ack() {
      settle("ack", "acked");
      let confirmed: boolean;
      try {
        confirmed = await m.ackAck();
      } catch (err) {
        state = "unconfirmed";
        throw new Error(
          `ack of prompt "${prompt.id}" (message ${m.seq}) was not confirmed: ${(err as Error).message}; ` +
            `the prompt may be delivered again`,
          { cause: err },
        );
      }
      if (!confirmed) {
        state = "unconfirmed";
        throw new Error(`ack of prompt "${prompt.id}" (message ${m.seq}) was not confirmed by the server`);
      }
    },
    nak(delayMs?: number) {
      settle("nak", "nakked");
      m.nak(delayMs);
    },
  };
}
