// freePort: the ports handed to a stack's services come from below the kernel's ephemeral range (where outgoing
// connections take theirs), are free to listen on, and are never handed out twice to one caller.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { test } from 'node:test';

import { freePort, STACK_PORT_FLOOR } from './supervisor.ts';

function ephemeralStart(): number | null {
  try {
    return Number.parseInt(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0], 10);
  } catch {
    return null;
  }
}

function listen(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve()));
  });
}

test('stack ports come from below the ephemeral range, free, and distinct for one caller', async () => {
  const top = ephemeralStart();
  const taken = new Set<number>();
  for (let i = 0; i < 40; i++) {
    const port = await freePort('127.0.0.1', taken);
    assert.ok(!taken.has(port), `port ${port} handed out twice`);
    if (top !== null) assert.ok(port >= STACK_PORT_FLOOR && port < top, `port ${port} outside [${STACK_PORT_FLOOR}, ${top})`);
    await listen(port);
    taken.add(port);
  }
});
