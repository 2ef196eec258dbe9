#!/usr/bin/env node
// The `pilot` command: runs the TypeScript CLI through tsx (no build step for TypeScript).
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { createRequire } from "node:module";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
const tsx = require.resolve("tsx");
const r = spawnSync(process.execPath, ["--import", tsx, path.join(root, "src/cli/pilot.ts"), ...process.argv.slice(2)], {
  stdio: "inherit",
  env: { UV_THREADPOOL_SIZE: "8", ...process.env },
});
process.exit(r.status ?? (r.signal ? 1 : 0));
