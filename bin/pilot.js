#!/usr/bin/env node
// The `pilot` command: runs the TypeScript CLI through tsx (no build step for TypeScript). SIGTERM and SIGHUP
// sent to this wrapper are passed on to the CLI, which stops what it started. Ctrl-C's SIGINT reaches the
// CLI directly (same process group): the wrapper only waits for it, so the CLI does not get it twice.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { createRequire } from "node:module";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
const tsx = require.resolve("tsx");
const child = spawn(process.execPath, ["--import", tsx, path.join(root, "src/cli/pilot.ts"), ...process.argv.slice(2)], {
  stdio: "inherit",
  env: { UV_THREADPOOL_SIZE: "8", ...process.env },
});
for (const sig of ["SIGTERM", "SIGHUP"]) process.on(sig, () => child.kill(sig));
process.on("SIGINT", () => {});
child.on("exit", (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
