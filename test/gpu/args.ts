// `--name value` command-line options of the GPU test and benchmark entry points (bundled one file each, so a
// dependency-free helper rather than commander).
export function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : def;
}
