// Run events against a real nats-server: replay from the start, live watch, and the trace context in the headers.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { ROOT_CONTEXT, TraceFlags, propagation, trace } from "@opentelemetry/api";
// The W3C propagator the tracing SDK registers in production; registered by hand here so no SDK is needed.
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { startTestNatsServer, type TestNatsServer } from "../../../test/harness/nats-server.ts";
import { createRunEvents, type RunRecord, type StepMetricsRecord } from "./run-events.ts";

let server: TestNatsServer;
let nc: NatsConnection;

before(async () => {
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
  server = await startTestNatsServer();
  nc = await connect({ servers: server.url });
});

after(async () => {
  await nc.close();
  await server.stop();
  propagation.disable();
});

const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
const spanId = "00f067aa0ba902b7";
const stepCtx = trace.setSpanContext(ROOT_CONTEXT, { traceId, spanId, traceFlags: TraceFlags.SAMPLED, isRemote: false });

describe("run events", () => {
  it("replays a run's metrics and events from the start, each carrying the publisher's traceparent", async () => {
    const events = await createRunEvents({ nc });
    await events.publishEvent("run-a", { type: "started", model: "tiny" }, stepCtx);
    await events.publishMetrics("run-a", 1, { loss: 0.5, reward_mean: 0.25, grad_norm: NaN }, stepCtx);
    await events.publishMetrics("run-b", 1, { loss: 9 }, stepCtx); // another run: must not show up
    await events.publishMetrics("run-a", 2, { loss: 0.4, reward_mean: 0.5, grad_norm: Infinity });
    await events.publishEvent("run-a", { type: "checkpoint_committed", step: 2 }, stepCtx);

    // A watcher that connects after the fact, on its own connection.
    const late = await connect({ servers: server.url });
    try {
      const watcher = await createRunEvents({ nc: late });
      const all = await watcher.replay("run-a");
      assert.deepEqual(
        all.map((r) => [r.kind, r.data]),
        [
          ["events", { type: "started", model: "tiny" }],
          ["metrics", { step: 1, metrics: { loss: 0.5, reward_mean: 0.25, grad_norm: NaN } }],
          ["metrics", { step: 2, metrics: { loss: 0.4, reward_mean: 0.5, grad_norm: Infinity } }],
          ["events", { type: "checkpoint_committed", step: 2 }],
        ],
      );
      assert.ok(all.every((r) => r.runId === "run-a"));
      assert.ok(all[0].seq < all[1].seq && all[1].seq < all[2].seq);

      // Explicit context: the W3C header as the spec spells it, and the extracted span context matches.
      assert.equal(all[0].headers.traceparent, `00-${traceId}-${spanId}-01`);
      const sc = trace.getSpanContext(all[1].context);
      assert.deepEqual([sc?.traceId, sc?.spanId, sc?.traceFlags, sc?.isRemote], [traceId, spanId, 1, true]);
      // No context given and none active: nothing to propagate.
      assert.equal(all[2].headers.traceparent, undefined);
      assert.equal(trace.getSpanContext(all[2].context), undefined);

      const metricsOnly = await watcher.replay("run-a", { kinds: ["metrics"] });
      assert.deepEqual(metricsOnly.map((r) => (r.data as StepMetricsRecord).step), [1, 2]);
      assert.deepEqual(await watcher.replay("run-none"), []);
    } finally {
      await late.close();
    }
  });

  it("a live watch delivers the backlog, then new records as they are published", async () => {
    const events = await createRunEvents({ nc });
    await events.publishMetrics("live", 1, { loss: 1 }, stepCtx);
    const w = await events.watch("live");
    const seen: RunRecord[] = [];
    const done = (async () => {
      for await (const r of w) {
        seen.push(r);
        if (seen.length === 3) break;
      }
    })();
    await events.publishMetrics("live", 2, { loss: 0.9 }, stepCtx);
    await events.publishEvent("live", { type: "finished" }, stepCtx);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([done, new Promise((_, rej) => (timer = setTimeout(() => rej(new Error("watch timed out")), 5000)))]);
    clearTimeout(timer);
    w.stop();
    assert.deepEqual(
      seen.map((r) => r.data),
      [{ step: 1, metrics: { loss: 1 } }, { step: 2, metrics: { loss: 0.9 } }, { type: "finished" }],
    );
    assert.ok(seen.every((r) => r.headers.traceparent === `00-${traceId}-${spanId}-01`));

    // Resuming after a known sequence skips what was already seen.
    const rest = await events.watch("live", { afterSeq: seen[0].seq });
    const first = await rest[Symbol.asyncIterator]().next();
    rest.stop();
    assert.equal((first.value as RunRecord).seq, seen[1].seq);
  });

  it("rejects run ids that would break the subject and malformed records", async () => {
    const events = await createRunEvents({ nc });
    await assert.rejects(events.publishMetrics("a.b", 1, { loss: 1 }), /run id "a.b" may only contain/);
    await assert.rejects(events.publishMetrics("ok", -1, { loss: 1 }), /step must be a non-negative integer/);
    await assert.rejects(events.publishMetrics("ok", 1, { loss: "low" as never }), /metric "loss" must be a number/);
    await assert.rejects(events.publishEvent("ok", { type: "" }), /non-empty string "type"/);
    await assert.rejects(events.replay("ok", { kinds: ["logs" as never] }), /unknown run record kind "logs"/);
  });
});
