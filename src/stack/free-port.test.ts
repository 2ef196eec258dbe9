// freePort: the ports handed to a stack's services come from below the kernel's ephemeral range (where outgoing
// connections take theirs), are free to listen on, and are never handed out twice to one caller.
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { test } from 'node:test';

import { ephemeralStart, freePort, STACK_PORT_FLOOR } from './supervisor.ts';

function listen(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve()));
  });
}

test('stack ports come from below the ephemeral range, free, and distinct for one caller', async () => {
  const top = await ephemeralStart();
  if (process.platform === 'linux') assert.ok(top !== null, 'the ephemeral range is readable on Linux');
  const taken = new Set<number>();
  for (let i = 0; i < 40; i++) {
    const port = await freePort('127.0.0.1', taken);
    assert.ok(!taken.has(port), `port ${port} handed out twice`);
    if (top !== null) assert.ok(port >= STACK_PORT_FLOOR && port < top, `port ${port} outside [${STACK_PORT_FLOOR}, ${top})`);
    await listen(port);
    taken.add(port);
  }
});
