// Run events and step metrics on pilot.run.<id>.events / pilot.run.<id>.metrics.
//
// They go to a limits-retention JetStream stream rather than plain NATS subjects, so `pilot watch` started late (or
// restarted) replays a run from its first record instead of seeing only what happens next. Each message carries the
// publisher's OpenTelemetry context in its headers (W3C traceparent/tracestate through the registered propagator),
// so a watcher or a downstream service can continue the trace of the step that produced the record.
import { context as otelContext, propagation, type Context, type TextMapGetter, type TextMapSetter } from "@opentelemetry/api";
import {
  DeliverPolicy,
  RetentionPolicy,
  StorageType,
  jetstream,
  jetstreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import { headers as natsHeaders, Match, nanos, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { ensureStream } from "./ensure.ts";
import { RUN_RECORD_KINDS, RUN_STREAM, checkToken, runStreamSubjects, runSubject, type RunRecordKind } from "./names.ts";

/** Metric values: NaN and infinities are kept (a diverging loss is worth seeing), encoded as strings on the wire. */
export type MetricValue = number | null;

export interface StepMetricsRecord {
  step: number;
  metrics: Record<string, MetricValue>;
}

export interface RunEventRecord {
  /** What happened: "started", "step_done", "checkpoint_committed", "failed", ... */
  type: string;
  [field: string]: unknown;
}

export interface RunRecord {
  runId: string;
  kind: RunRecordKind;
  /** Stream sequence: a watcher can resume after it. */
  seq: number;
  time: Date;
  data: StepMetricsRecord | RunEventRecord;
  /** The publisher's trace context; start child spans with it. */
  context: Context;
  /** The headers as received (traceparent among them). */
  headers: Record<string, string>;
}

export interface RunWatch extends AsyncIterable<RunRecord> {
  stop(): void;
}

/** The subset of OpenTelemetry's propagation API used here; the global `propagation` by default. */
export interface Propagator {
  inject<C>(context: Context, carrier: C, setter?: TextMapSetter<C>): void;
  extract<C>(context: Context, carrier: C, getter?: TextMapGetter<C>): Context;
}

export interface RunEventsDeps {
  nc: NatsConnection;
  propagator?: Propagator;
}

export interface RunEventsConfig {
  stream: string;
  /** How long records are kept. */
  maxAgeMs: number;
}

export const RUN_EVENTS_DEFAULTS: RunEventsConfig = {
  stream: RUN_STREAM,
  maxAgeMs: 30 * 24 * 3600_000,
};

export interface RunEvents {
  publishMetrics(runId: string, step: number, metrics: Record<string, MetricValue>, ctx?: Context): Promise<{ seq: number }>;
  publishEvent(runId: string, event: RunEventRecord, ctx?: Context): Promise<{ seq: number }>;
  /** Every stored record of the run (of the given kinds), oldest first, then waits for new ones until stop(). */
  watch(runId: string, opts?: { kinds?: RunRecordKind[]; afterSeq?: number }): Promise<RunWatch>;
  /** The records stored so far, oldest first. */
  replay(runId: string, opts?: { kinds?: RunRecordKind[] }): Promise<RunRecord[]>;
}

/** Writes propagation fields into NATS headers. */
export const natsHeaderSetter: TextMapSetter<MsgHdrs> = {
  set: (carrier, key, value) => carrier.set(key, value),
};

/** Reads propagation fields from NATS headers; header names are matched without case, as HTTP does. */
export const natsHeaderGetter: TextMapGetter<MsgHdrs | undefined> = {
  keys: (carrier) => (carrier ? carrier.keys() : []),
  get: (carrier, key) => {
    if (!carrier || !carrier.has(key, Match.IgnoreCase)) return undefined;
    return carrier.get(key, Match.IgnoreCase);
  },
};

export async function createRunEvents(deps: RunEventsDeps, config: Partial<RunEventsConfig> = {}): Promise<RunEvents> {
  const cfg: RunEventsConfig = { ...RUN_EVENTS_DEFAULTS, ...config };
  if (!(cfg.maxAgeMs >= 1000)) throw new RangeError(`maxAgeMs must be at least 1000, got ${cfg.maxAgeMs}`);
  const prop = deps.propagator ?? propagation;
  const { nc } = deps;
  const jsm = await jetstreamManager(nc);
  const js = jetstream(nc);
  await ensureStream(jsm, {
    name: cfg.stream,
    subjects: runStreamSubjects(),
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    max_age: nanos(cfg.maxAgeMs),
  });

  async function publish(runId: string, kind: RunRecordKind, data: unknown, ctx: Context | undefined) {
    const subject = runSubject(runId, kind);
    const h = natsHeaders();
    prop.inject(ctx ?? otelContext.active(), h, natsHeaderSetter);
    const ack = await js.publish(subject, JSON.stringify(data, encodeNonFinite), { headers: h });
    return { seq: ack.seq };
  }

  async function publishMetrics(runId: string, step: number, metrics: Record<string, MetricValue>, ctx?: Context) {
    if (!Number.isInteger(step) || step < 0) throw new TypeError(`step must be a non-negative integer, got ${step}`);
    if (typeof metrics !== "object" || metrics === null || Array.isArray(metrics)) {
      throw new TypeError("metrics must be an object of name -> number");
    }
    for (const [k, v] of Object.entries(metrics)) {
      if (v !== null && typeof v !== "number") throw new TypeError(`metric "${k}" must be a number or null, got ${typeof v}`);
    }
    const record: StepMetricsRecord = { step, metrics };
    return publish(runId, "metrics", record, ctx);
  }

  async function publishEvent(runId: string, event: RunEventRecord, ctx?: Context) {
    if (typeof event !== "object" || event === null || typeof event.type !== "string" || event.type.length === 0) {
      throw new TypeError("a run event must be an object with a non-empty string \"type\"");
    }
    return publish(runId, "events", event, ctx);
  }

  function subjectFor(runId: string, kinds: RunRecordKind[] | undefined): string {
    checkToken("run id", runId);
    const ks = kinds ?? [...RUN_RECORD_KINDS];
    for (const k of ks) {
      if (!RUN_RECORD_KINDS.includes(k)) throw new TypeError(`unknown run record kind "${k}" (known: ${RUN_RECORD_KINDS.join(", ")})`);
    }
    // One filter subject (servers before 2.10 take only one): the kind token is a wildcard when both are wanted.
    return ks.length === 1 ? runSubject(runId, ks[0]) : runSubject(runId, "events").replace(/\.events$/, ".*");
  }

  function toRecord(m: JsMsg): RunRecord {
    const tokens = m.subject.split(".");
    const h: Record<string, string> = {};
    if (m.headers) for (const [k, v] of m.headers) h[k] = v.join(", ");
    return {
      runId: tokens[2],
      kind: tokens[3] as RunRecordKind,
      seq: m.seq,
      time: m.time,
      data: JSON.parse(m.string(), decodeNonFinite) as StepMetricsRecord | RunEventRecord,
      context: prop.extract(otelContext.active(), m.headers, natsHeaderGetter),
      headers: h,
    };
  }

  async function orderedConsumer(runId: string, kinds: RunRecordKind[] | undefined, afterSeq?: number) {
    const filter = subjectFor(runId, kinds);
    return js.consumers.get(
      cfg.stream,
      afterSeq === undefined
        ? { filter_subjects: filter, deliver_policy: DeliverPolicy.All }
        : { filter_subjects: filter, deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: afterSeq + 1 },
    );
  }

  async function watch(runId: string, opts: { kinds?: RunRecordKind[]; afterSeq?: number } = {}): Promise<RunWatch> {
    const consumer = await orderedConsumer(runId, opts.kinds, opts.afterSeq);
    const messages = await consumer.consume();
    return {
      async *[Symbol.asyncIterator]() {
        for await (const m of messages) yield toRecord(m);
      },
      stop: () => void messages.stop(),
    };
  }

  async function replay(runId: string, opts: { kinds?: RunRecordKind[] } = {}): Promise<RunRecord[]> {
    const consumer = await orderedConsumer(runId, opts.kinds);
    const info = await consumer.info();
    if (info.num_pending === 0) return [];
    const out: RunRecord[] = [];
    const messages = await consumer.consume();
    try {
      for await (const m of messages) {
        out.push(toRecord(m));
        // pending counts what was stored after this message when it was delivered: 0 means we caught up.
        if (m.info.pending === 0) break;
      }
    } finally {
      messages.stop();
    }
    return out;
  }

  return { publishMetrics, publishEvent, watch, replay };
}

function encodeNonFinite(_key: string, value: unknown): unknown {
  if (typeof value === "number" && !Number.isFinite(value)) return { $num: String(value) };
  return value;
}

function decodeNonFinite(_key: string, value: unknown): unknown {
  if (typeof value === "object" && value !== null && !Array.isArray(value)) {
    const v = value as Record<string, unknown>;
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === "$num" && typeof v.$num === "string") return Number(v.$num);
  }
  return value;
}
