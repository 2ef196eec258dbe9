// Child process for the checkpoint crash test: opens the store at argv[2], begins step argv[3], writes one shard,
// reports "ready" on stdout, then dies by SIGKILL, with no chance to clean up or release its lock.
import { createCheckpointStore } from "../../services/checkpoint/store.ts";

const [root, stepArg] = process.argv.slice(2);
const store = await createCheckpointStore({ root, keepLast: 3 });
const pending = await store.begin(Number(stepArg));
await pending.writeShard("half-written.bin", Buffer.alloc(4096, 7));
process.stdout.write("ready\n", () => process.kill(process.pid, "SIGKILL"));
