// The prompt queue against a real nats-server: leases, redelivery after a consumer crash, heartbeats, de-duplication
// and validation.
import assert from "node:assert/strict";
import { after, afterEach, before, describe, it } from "node:test";
import { jetstreamManager } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { startTestNatsServer, type TestNatsServer } from "../../../test/harness/nats-server.ts";
import { PROMPT_STREAM, promptSubject } from "./names.ts";
import { contentId, createPromptQueue, LeaseSettledError, type PromptQueueConfig } from "./prompt-queue.ts";

let server: TestNatsServer;
const conns: NatsConnection[] = [];

async function conn(): Promise<NatsConnection> {
  const nc = await connect({ servers: server.url });
  conns.push(nc);
  return nc;
}

async function queue(nc: NatsConnection, config: Partial<PromptQueueConfig> = {}) {
  return createPromptQueue({ nc }, config);
}

before(async () => {
  server = await startTestNatsServer();
});

// Every test starts from an empty stream and a fresh consumer.
afterEach(async () => {
  for (const nc of conns.splice(0)) if (!nc.isClosed()) await nc.close();
  const nc = await connect({ servers: server.url });
  const jsm = await jetstreamManager(nc);
  await jsm.streams.delete(PROMPT_STREAM).catch(() => undefined);
  await nc.close();
});

after(async () => {
  await server.stop();
});

describe("prompt queue", () => {
  it("de-duplicates within a queue only: the same prompt submitted to two queues is queued in each", async () => {
    const nc = await conn();
    const a = await queue(nc, { queue: "dedup-a", consumer: "dedup-a" });
    const b = await queue(nc, { queue: "dedup-b", consumer: "dedup-b" });
    const prompt = { text: "Sort 3 1 2.", reference: "1 2 3" };
    assert.equal((await a.submit([prompt])).accepted[0].duplicate, false);
    assert.equal((await b.submit([prompt])).accepted[0].duplicate, false);
    assert.equal((await a.submit([prompt])).accepted[0].duplicate, true);
    assert.equal((await a.take(5, { timeoutMs: 1500 })).length, 1);
    assert.equal((await b.take(5, { timeoutMs: 1500 })).length, 1);
  });

  it("hands out more prompts than JetStream's default ack-pending bound while none is acked", async () => {
    // A run holds its prompts unacked until a checkpoint covers them; 1000 (the default bound) must not stall it.
    const q = await queue(await conn());
    const n = 1200;
    const res = await q.submit(Array.from({ length: n }, (_, i) => ({ id: `many-${i}`, text: `prompt ${i}` })));
    assert.equal(res.accepted.length, n);
    const held = [];
    while (held.length < n) {
      const got = await q.take(Math.min(400, n - held.length), { timeoutMs: 3000 });
      assert.ok(got.length > 0, `stalled after ${held.length} unacked prompts`);
      held.push(...got);
    }
    assert.equal(new Set(held.map((l) => l.prompt.id)).size, n);
    for (const l of held) await l.ack();
  });

  it("submits, takes in order and acks; acked prompts leave the queue", async () => {
    const q = await queue(await conn());
    const res = await q.submit([
      { text: "What is 2+2?", reference: "4" },
      { id: "q-2", text: "Name a prime." },
      { text: "Spell cat.", metadata: { source: "unit" } },
    ]);
    assert.equal(res.rejected.length, 0);
    assert.deepEqual(
      res.accepted.map((a) => [a.index, a.duplicate]),
      [[0, false], [1, false], [2, false]],
    );
    assert.equal(res.accepted[0].id, contentId("What is 2+2?", "4"));
    assert.equal(res.accepted[1].id, "q-2");
    assert.deepEqual(await q.pending(), { waiting: 3, leased: 0, stored: 3 });

    const leases = await q.take(3, { timeoutMs: 2000 });
    assert.deepEqual(
      leases.map((l) => l.prompt),
      [
        { id: res.accepted[0].id, text: "What is 2+2?", reference: "4", metadata: {} },
        { id: "q-2", text: "Name a prime.", reference: null, metadata: {} },
        { id: res.accepted[2].id, text: "Spell cat.", reference: null, metadata: { source: "unit" } },
      ],
    );
    assert.deepEqual(leases.map((l) => l.seq), res.accepted.map((a) => a.seq));
    assert.ok(leases.every((l) => l.deliveryCount === 1 && !l.redelivered));
    assert.deepEqual(await q.pending(), { waiting: 0, leased: 3, stored: 3 });

    for (const l of leases) await l.ack();
    assert.ok(leases.every((l) => l.state === "acked"));
    await assert.rejects(leases[0].ack(), LeaseSettledError);
    assert.throws(() => leases[0].working(), LeaseSettledError);
    assert.deepEqual(await q.pending(), { waiting: 0, leased: 0, stored: 0 });
  });

  it("returns fewer than asked when the queue runs dry, and none from an empty queue", async () => {
    const q = await queue(await conn());
    await q.submit([{ text: "only one" }]);
    const t0 = Date.now();
    const leases = await q.take(4, { timeoutMs: 1500 });
    assert.equal(leases.length, 1);
    assert.ok(Date.now() - t0 < 5000);
    await leases[0].ack();
    assert.deepEqual(await q.take(2, { timeoutMs: 1000 }), []);
  });

  it("redelivers a prompt whose consumer crashed before acking, after ack_wait", async () => {
    const ackWaitMs = 3000;
    const crashing = await conn();
    const q1 = await queue(crashing, { ackWaitMs });
    const [sub] = (await q1.submit([{ text: "survive the crash" }])).accepted;
    const [lease] = await q1.take(1, { timeoutMs: 2000 });
    assert.equal(lease.prompt.id, sub.id);
    const leasedAt = Date.now();
    await crashing.close(); // the coordinator dies mid-step: no ack, no nak

    const q2 = await queue(await conn(), { ackWaitMs });
    // Still leased to the dead consumer: not handed out before ack_wait.
    assert.deepEqual(await q2.take(1, { timeoutMs: 1000 }), []);
    const [again] = await q2.take(1, { timeoutMs: ackWaitMs + 5000 });
    assert.ok(again, "the prompt was not redelivered");
    assert.ok(Date.now() - leasedAt >= ackWaitMs - 100, "redelivered before ack_wait ran out");
    assert.equal(again.prompt.id, sub.id);
    assert.equal(again.seq, sub.seq);
    assert.equal(again.redelivered, true);
    assert.equal(again.deliveryCount, 2);
    await again.ack();
    assert.deepEqual(await q2.pending(), { waiting: 0, leased: 0, stored: 0 });
  });

  it("keeps a prompt leased past ack_wait while it is heartbeated", async () => {
    const ackWaitMs = 1500;
    const q1 = await queue(await conn(), { ackWaitMs });
    await q1.submit([{ text: "a long step" }]);
    const leases = await q1.take(1, { timeoutMs: 2000 });
    const hb = q1.heartbeat(leases, 400);
    try {
      // Another coordinator polls for far longer than ack_wait and must not get the leased prompt.
      const q2 = await queue(await conn(), { ackWaitMs });
      assert.deepEqual(await q2.take(1, { timeoutMs: 3 * ackWaitMs }), []);
      assert.equal((await q2.pending()).leased, 1);
    } finally {
      hb.stop();
    }
    assert.equal(leases[0].deliveryCount, 1);
    await leases[0].ack();
    assert.deepEqual(await q1.pending(), { waiting: 0, leased: 0, stored: 0 });
  });

  it("a take that waits longer than ack_wait for more prompts does not hand one out twice", async () => {
    const ackWaitMs = 1000;
    const q = await queue(await conn(), { ackWaitMs });
    await q.submit([{ text: "first" }, { text: "second" }]);
    const leases = await q.take(5, { timeoutMs: 3500 });
    assert.deepEqual(leases.map((l) => [l.prompt.text, l.deliveryCount]), [["first", 1], ["second", 1]]);
    for (const l of leases) await l.ack();
  });

  it("nak hands the prompt back for immediate redelivery", async () => {
    const q = await queue(await conn());
    await q.submit([{ text: "try again" }]);
    const [first] = await q.take(1, { timeoutMs: 2000 });
    first.nak();
    assert.equal(first.state, "nakked");
    const [second] = await q.take(1, { timeoutMs: 2000 });
    assert.equal(second.prompt.id, first.prompt.id);
    assert.equal(second.deliveryCount, 2);
    await second.ack();
  });

  it("de-duplicates a re-submitted batch, also after the prompts were acked", async () => {
    const q = await queue(await conn());
    const batch = [{ text: "one" }, { id: "two", text: "two" }];
    const first = await q.submit(batch);
    const second = await q.submit(batch);
    assert.deepEqual(second.accepted.map((a) => a.duplicate), [true, true]);
    assert.deepEqual(second.accepted.map((a) => a.seq), first.accepted.map((a) => a.seq));
    assert.equal((await q.pending()).waiting, 2);

    for (const l of await q.take(5, { timeoutMs: 1500 })) await l.ack();
    const third = await q.submit(batch);
    assert.deepEqual(third.accepted.map((a) => a.duplicate), [true, true]);
    assert.deepEqual(await q.pending(), { waiting: 0, leased: 0, stored: 0 });
  });

  it("rejects bad prompts with a reason and still queues the good ones", async () => {
    const q = await queue(await conn());
    const res = await q.submit([
      { text: "good one" },
      { text: "   " },
      { text: "typo", answer: "42" },
      42,
      { text: "bad reference", reference: 7 },
      { id: "has space", text: "bad id" },
      { id: "dup", text: "first" },
      { id: "dup", text: "second, different" },
      { text: "good two", reference: "yes" },
    ]);
    assert.deepEqual(res.accepted.map((a) => a.index), [0, 6, 8]);
    assert.deepEqual(res.rejected.map((r) => r.index), [1, 2, 3, 4, 5, 7]);
    const reasons = res.rejected.map((r) => r.error);
    assert.match(reasons[0], /"text" is empty/);
    assert.match(reasons[1], /unknown prompt field "answer"/);
    assert.match(reasons[2], /must be an object/);
    assert.match(reasons[3], /"reference" must be a string or null/);
    assert.match(reasons[4], /"id" must be/);
    assert.match(reasons[5], /appears twice/);
    assert.ok(res.rejected.every((r) => !r.retryable));

    const leases = await q.take(10, { timeoutMs: 1500 });
    assert.deepEqual(leases.map((l) => l.prompt.text), ["good one", "first", "good two"]);
    for (const l of leases) await l.ack();
  });

  it("terminates a message that is not a prompt instead of redelivering it forever", async () => {
    const nc = await conn();
    const invalid: [number, string][] = [];
    const q = await createPromptQueue({ nc, onInvalidMessage: (seq, error) => invalid.push([seq, error]) }, {});
    const { jetstream } = await import("@nats-io/jetstream");
    const bad = await jetstream(nc).publish(promptSubject("default"), "not json");
    await q.submit([{ text: "valid" }]);
    const leases = await q.take(2, { timeoutMs: 1500 });
    assert.deepEqual(leases.map((l) => l.prompt.text), ["valid"]);
    assert.equal(invalid.length, 1);
    assert.equal(invalid[0][0], bad.seq);
    assert.match(invalid[0][1], /not JSON/);
    await leases[0].ack();
    assert.deepEqual(await q.pending(), { waiting: 0, leased: 0, stored: 0 });
  });

  it("refuses configurations the server would misbehave with", async () => {
    const nc = await conn();
    await assert.rejects(queue(nc, { ackWaitMs: 10 }), /ackWaitMs must be at least 1000/);
    await assert.rejects(queue(nc, { maxDeliver: 0 }), /maxDeliver must be -1 or a positive integer/);
    await assert.rejects(queue(nc, { queue: "a.b" }), /may only contain/);
  });
});
