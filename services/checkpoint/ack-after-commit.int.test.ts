// The contract between the prompt queue and the checkpoint store that the coordinator relies on: prompts are acked
// only after the checkpoint of the step that trained on them is committed, so a crash anywhere before the ack
// redelivers them, and the manifest's prompt ids tell the restarted coordinator which redelivered prompts are already
// in the weights.
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, it } from "node:test";
import { connect } from "@nats-io/transport-node";
import { startTestNatsServer, type TestNatsServer } from "../../test/harness/nats-server.ts";
import { createPromptQueue, type PromptLease, type PromptQueue } from "../common/nats/prompt-queue.ts";
import { createCheckpointStore, type CheckpointStore } from "./store.ts";

let server: TestNatsServer;
let root: string;

before(async () => {
  server = await startTestNatsServer();
  root = await mkdtemp(join(tmpdir(), "moe-pilot-ack-"));
});

after(async () => {
  await server.stop();
  await rm(root, { recursive: true, force: true });
});

/** One training step as the coordinator runs it, up to (not including) the ack. */
async function trainAndCheckpoint(queue: PromptQueue, store: CheckpointStore, step: number, leases: PromptLease[]) {
  const hb = queue.heartbeat(leases, 300);
  try {
    const p = await store.begin(step);
    await p.writeShard("weights.bin", Buffer.from(leases.map((l) => l.prompt.text).join("|")));
    return await p.commit({ promptIds: leases.map((l) => l.prompt.id) });
  } finally {
    hb.stop();
  }
}

it("a crash between commit and ack redelivers prompts that the checkpoint already covers", async () => {
  const ackWaitMs = 1500;
  const ncA = await connect({ servers: server.url });
  const queueA = await createPromptQueue({ nc: ncA }, { ackWaitMs });
  await queueA.submit(["a", "b", "c", "d"].map((t) => ({ id: `q-${t}`, text: t })));
  const storeA = await createCheckpointStore({ root, keepLast: 3, runId: "r1" });

  // Step 1 completes normally.
  const step1 = await queueA.take(2, { timeoutMs: 2000 });
  await trainAndCheckpoint(queueA, storeA, 1, step1);
  for (const l of step1) await l.ack();

  // Step 2 is committed, then the coordinator dies before acking.
  const step2 = await queueA.take(2, { timeoutMs: 2000 });
  await trainAndCheckpoint(queueA, storeA, 2, step2);
  await storeA.close();
  await ncA.close();

  // The restarted coordinator resumes from the newest good checkpoint ...
  const ncB = await connect({ servers: server.url });
  try {
    const queueB = await createPromptQueue({ nc: ncB }, { ackWaitMs });
    const storeB = await createCheckpointStore({ root, keepLast: 3, runId: "r1" });
    const resume = await storeB.latest({ verified: true });
    assert.equal(resume?.step, 2);
    const covered = new Set(resume!.manifest.metadata.promptIds as string[]);

    // ... gets step 2's prompts back once their lease runs out, and acks them without training them again.
    const back = await queueB.take(4, { timeoutMs: ackWaitMs + 3000 });
    assert.deepEqual(back.map((l) => l.prompt.id).sort(), ["q-c", "q-d"]);
    assert.ok(back.every((l) => l.redelivered && covered.has(l.prompt.id)));
    for (const l of back) await l.ack();
    assert.deepEqual(await queueB.pending(), { waiting: 0, leased: 0, stored: 0 });
    await storeB.close();
  } finally {
    await ncB.close();
  }
});
