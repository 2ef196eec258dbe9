// sha256 of a file, streamed on the calling thread: rank shards and checkpoint files are verified by it (and the
// checkpoint service's hash threads must give the same digests).
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';

/** The file's sha256 as lowercase hex. */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}
