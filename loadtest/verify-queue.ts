// "Nothing accepted is lost": after a submit load run on a fresh dataset, the prompt stream must hold
// at least as many messages on that dataset's subject as the server reported accepted (more only if
// a call timed out on the client after the server had queued its prompts).
import { connect } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import { PROMPT_STREAM, promptSubject } from '../services/common/nats/names.ts';

export interface QueueCheck {
  dataset: string;
  subject: string;
  /** Prompts the server answered as accepted during the run. */
  accepted: number;
  /** Messages stored on the dataset's subject now. */
  stored: number;
  /** accepted <= stored: every accepted prompt is in the stream. */
  ok: boolean;
}

export async function checkQueue(natsUrl: string, dataset: string, accepted: number): Promise<QueueCheck> {
  const nc = await connect({ servers: natsUrl, timeout: 5000 });
  try {
    const jsm = await jetstreamManager(nc);
    const subject = promptSubject(dataset);
    const info = await jsm.streams.info(PROMPT_STREAM, { subjects_filter: subject });
    const stored = info.state.subjects?.[subject] ?? 0;
    return { dataset, subject, accepted, stored, ok: accepted <= stored };
  } finally {
    await nc.close();
  }
}
