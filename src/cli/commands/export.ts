// `pilot export CHECKPOINT --out DIR`: writes a committed checkpoint as a Hugging Face folder (CheckpointService.Export).
// CHECKPOINT is a checkpoint id, or a run id for that run's newest checkpoint.
import { resolve } from 'node:path';
import type { Command } from 'commander';

import type { CheckpointServiceExportResponse } from '../../../proto/gen/pilot/v1/checkpoint.ts';
import { connectCheckpointService, type CheckpointClient } from '../../stack/connect.ts';
import { resolveStateDir } from '../../stack/state.ts';

export async function resolveCheckpointId(client: CheckpointClient, idOrRun: string): Promise<string> {
  const all = (await client.list({ runId: '' })).checkpoints;
  if (all.some((c) => c.id === idOrRun)) return idOrRun;
  const ofRun = all.filter((c) => c.runId === idOrRun);
  if (ofRun.length) return ofRun[ofRun.length - 1].id;
  const known = all.map((c) => c.id);
  throw new Error(`no committed checkpoint or run named "${idOrRun}"${known.length ? `; checkpoints: ${known.slice(-10).join(', ')}` : ' (there are no checkpoints yet)'}`);
}

export async function exportCheckpoint(client: CheckpointClient, idOrRun: string, outDir: string, dtype: string): Promise<CheckpointServiceExportResponse & { checkpointId: string }> {
  const checkpointId = await resolveCheckpointId(client, idOrRun);
  const r = await client.export({ checkpointId, outputDir: resolve(outDir), dtype });
  return { ...r, checkpointId };
}

export function registerExport(program: Command): void {
  program
    .command('export')
    .description('write a checkpoint as a Hugging Face folder')
    .argument('<checkpoint>', 'checkpoint id, or a run id for its newest checkpoint')
    .requiredOption('--out <dir>', 'output folder')
    .option('--dtype <dtype>', 'weights dtype: bf16 or f32', 'bf16')
    .option('--address <host:port>', 'CheckpointService address (default: the stack "pilot up" started)')
    .action(async (id: string, opts: { out: string; dtype: string; address?: string }) => {
      if (opts.dtype !== 'bf16' && opts.dtype !== 'f32') throw new Error(`--dtype must be bf16 or f32, got "${opts.dtype}"`);
      const client = await connectCheckpointService(resolveStateDir(process.cwd(), process.env), opts.address);
      try {
        const r = await exportCheckpoint(client, id, opts.out, opts.dtype);
        console.log(`exported ${r.checkpointId} to ${r.outputDir}: ${r.files.join(', ')}`);
      } finally {
        client.close();
      }
    });
}
