#!/usr/bin/env node
// Bundles the `pilot` CLI and the oracle's rank worker into plain JavaScript for machines without
// node_modules or tsx (the GPU machine has Node 20 and only node-addon-api, to build the addon):
//   <out>/pilot.mjs               the CLI (src/cli/pilot.ts)
//   <out>/oracle-rank-worker.mjs  the process src/dist/oracle-ranks.ts forks per rank, found beside the CLI
//   <out>/rank-device.mjs         a rank service with its policy on a GPU (test/gpu/rank-device.ts)
//   <out>/<service>-main.mjs      the stack's services (reward, checkpoint, rank, coordinator), which the bundled
//                                 CLI's `pilot up` starts
//   <out>/assets/...              the .proto files bundled packages read at run time
// Run: node scripts/device/bundle-cli.mjs [out folder, default test/gpu/bundle] [--only stack]; then
//   MOEPILOT_ADDON=/path/moepilot.node node <out>/pilot.mjs oracle --ranks 2 --comm nccl DIR
// --only stack bundles only what scripts/device/ep-stack.sh runs (the services, the reward worker, ep-stack.mjs):
// about 12 MB, which with Node and a nats-server stays under the device tool's 64 MiB carry.
// The native addon stays outside (MOEPILOT_ADDON names it); the output is ignored by git.
//
// Modules that read files of a package at run time (grpc-health-check loads its health.proto through
// __dirname when imported; the gRPC probes find the reflection protos through the package.json) would
// find nothing at the bundle's location, which has no node_modules: those packages' package.json and
// .proto files are copied under <out>/assets/<package name>, and the modules are pointed there.
import { cpSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const args = process.argv.slice(2);
const onlyAt = args.indexOf('--only');
const only = onlyAt >= 0 ? args.splice(onlyAt, 2)[1] : null;
if (only !== null && only !== 'stack') {
  console.error(`bundle-cli: --only takes "stack", not ${JSON.stringify(only)}`);
  process.exit(2);
}
const out = path.resolve(args[0] ?? path.join(root, 'test/gpu/bundle'));

// Path of a file inside node_modules relative to node_modules (e.g. grpc-health-check/build/src/health.js).
function packageRelative(file) {
  const i = file.lastIndexOf(`${path.sep}node_modules${path.sep}`);
  return i < 0 ? null : file.slice(i + '/node_modules/'.length);
}

// Package name of a node_modules-relative path (scoped packages have two segments).
function packageName(rel) {
  const parts = rel.split(path.sep);
  return parts[0].startsWith('@') ? parts.slice(0, 2).join('/') : parts[0];
}

// The files a package reads at run time beside its code (its package.json and .proto files), copied
// under <out>/assets/<package name> in the same layout.
const shipped = new Set();
function shipPackage(dir, name) {
  if (shipped.has(dir)) return;
  shipped.add(dir);
  const walk = (from, rel) => {
    for (const e of readdirSync(from, { withFileTypes: true })) {
      if (e.name === 'node_modules') continue;
      const f = path.join(from, e.name);
      if (e.isDirectory()) walk(f, path.join(rel, e.name));
      else if (e.name.endsWith('.proto') || (rel === '' && e.name === 'package.json')) {
        mkdirSync(path.join(out, 'assets', name, rel), { recursive: true });
        cpSync(f, path.join(out, 'assets', name, rel, e.name));
      }
    }
  };
  walk(dir, '');
}

// A dependency's module that uses __dirname (grpc-health-check loads its health.proto when imported)
// gets its own __dirname under <out>/assets/<package path>, and the package's files are shipped there.
const dirnamePlugin = {
  name: 'module-dirname',
  setup(build) {
    build.onLoad({ filter: /node_modules[\\/].*\.[cm]?js$/ }, (args) => {
      const text = readFileSync(args.path, 'utf8');
      if (!/\b__dirname\b|\b__filename\b/.test(text)) return undefined;
      const rel = packageRelative(args.path);
      if (!rel) return undefined;
      const name = packageName(rel);
      shipPackage(args.path.slice(0, args.path.length - rel.length) + name, name);
      const posix = rel.split(path.sep).join('/');
      const shim =
        `var __dirname = __bundleAssets + ${JSON.stringify(`/${path.posix.dirname(posix)}`)};` +
        ` var __filename = __bundleAssets + ${JSON.stringify(`/${posix}`)};\n`;
      return { contents: shim + text, loader: 'js' };
    });
  },
};

// The project's own modules, three rewrites (and the proto root, below):
// - A module that locates a package's files through require.resolve('<package>/package.json') (the
//   reflection protos) gets the shipped copy's path.
// - A module that runs a main block when started directly tests import.meta.url against argv[1]. In
//   a bundle every module shares the bundle's URL, so that test would hold for all of them: outside
//   the entry points it becomes false (no bundled module is the process's main script).
const resolvePackageJson = /require\.resolve\(\s*(['"])((?:@[^'"/]+\/)?[^'"/]+)\/package\.json\1\s*\)/g;
const mainTest = /import\.meta\.url\s*===\s*pathToFileURL\(\s*process\.argv\[1\][^)]*\)\.href/g;
// The project's proto import root, found from a module's own location (services/common/grpc-server.ts serves
// reflection from it): the .proto files are shipped under <out>/assets/proto.
const protoRoot = /join\(dirname\(fileURLToPath\(import\.meta\.url\)\),\s*'\.\.',\s*'\.\.',\s*'proto'\)/g;
function shipProtos() {
  cpSync(path.join(root, 'proto', 'pilot'), path.join(out, 'assets', 'proto', 'pilot'), {
    recursive: true,
    filter: (f) => statSync(f).isDirectory() || f.endsWith('.proto'),
  });
}
const sourcePlugin = (entry) => ({
  name: 'project-sources',
  setup(build) {
    build.onLoad({ filter: /\.ts$/ }, (args) => {
      if (args.path.includes(`${path.sep}node_modules${path.sep}`)) return undefined;
      let text = readFileSync(args.path, 'utf8');
      const before = text;
      text = text.replace(resolvePackageJson, (_, _q, name) => {
        const pkgJson = createRequire(args.path).resolve(`${name}/package.json`);
        shipPackage(path.dirname(pkgJson), name);
        return `(__bundleAssets + ${JSON.stringify(`/${name}/package.json`)})`;
      });
      text = text.replace(protoRoot, () => {
        shipProtos();
        return '(__bundleAssets + "/proto")';
      });
      if (args.path !== entry) text = text.replace(mainTest, 'false');
      return text === before ? undefined : { contents: text, loader: 'ts' };
    });
  },
});

// ESM output: CommonJS dependencies call require() (a real one, from createRequire), and the assets
// folder is found from the bundle's own URL.
const banner = [
  "import { createRequire as __bundleCreateRequire } from 'node:module';",
  "import { fileURLToPath as __bundleFileURLToPath } from 'node:url';",
  'const require = __bundleCreateRequire(import.meta.url);',
  "const __bundleAssets = __bundleFileURLToPath(new URL('./assets', import.meta.url));",
].join('\n');

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const allEntries = [
  ['src/cli/pilot.ts', 'pilot.mjs'],
  ['src/dist/oracle-rank-worker.ts', 'oracle-rank-worker.mjs'],
  ['test/gpu/rank-device.ts', 'rank-device.mjs'],
  // The stack's services: the bundled CLI's `pilot up` starts these (src/stack/stack.ts finds them beside it).
  ['services/reward/main.ts', 'reward-main.mjs'],
  ['services/reward/scoring-worker.ts', 'scoring-worker.mjs'],  // the reward service's worker threads
  ['services/checkpoint/main.ts', 'checkpoint-main.mjs'],
  ['services/rank/main.ts', 'rank-main.mjs'],
  ['services/coordinator/main.ts', 'coordinator-main.mjs'],
  ['test/gpu/ep-stack.ts', 'ep-stack.mjs'],  // a GRPO run through that stack on GPU ranks (scripts/device/ep-stack.sh)
];
const STACK = new Set(['reward-main.mjs', 'scoring-worker.mjs', 'checkpoint-main.mjs', 'rank-main.mjs', 'coordinator-main.mjs', 'ep-stack.mjs']);
const entries = only === 'stack' ? allEntries.filter(([, file]) => STACK.has(file)) : allEntries;
for (const [entry, file] of entries) {
  await esbuild.build({
    entryPoints: [path.join(root, entry)],
    outfile: path.join(out, file),
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    external: ['*.node'],
    banner: { js: banner },
    plugins: [dirnamePlugin, sourcePlugin(path.join(root, entry))],
    logLevel: 'warning',
  });
}
let bytes = 0;
for (const [, file] of entries) bytes += statSync(path.join(out, file)).size;
console.log(`bundled ${entries.map(([, f]) => f).join(', ')} into ${path.relative(process.cwd(), out) || '.'} (${(bytes / 1e6).toFixed(1)} MB)`);
