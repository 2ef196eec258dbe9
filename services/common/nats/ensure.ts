// Idempotent creation of the pilot's streams and consumers: every service may call these at start-up; the first
// creates, the others find what exists and bring the settings the pilot owns up to date.
import {
  JetStreamApiCodes,
  JetStreamApiError,
  type ConsumerConfig,
  type ConsumerInfo,
  type JetStreamManager,
  type StreamConfig,
  type StreamInfo,
} from "@nats-io/jetstream";

export async function ensureStream(
  jsm: JetStreamManager,
  cfg: Partial<StreamConfig> & { name: string },
): Promise<StreamInfo> {
  let info: StreamInfo;
  try {
    info = await jsm.streams.info(cfg.name);
  } catch (err) {
    if (isApiError(err, JetStreamApiCodes.StreamNotFound)) return jsm.streams.add(cfg);
    throw err;
  }
  // Retention cannot change on a live stream; a mismatch means someone else owns a stream by this name.
  if (cfg.retention !== undefined && info.config.retention !== cfg.retention) {
    throw new Error(
      `stream ${cfg.name} exists with retention "${info.config.retention}", expected "${cfg.retention}"; ` +
        `delete it or choose another stream name`,
    );
  }
  const wanted = { ...info.config, ...cfg };
  if (differs(info.config, wanted)) return jsm.streams.update(cfg.name, wanted);
  return info;
}

export async function ensureDurableConsumer(
  jsm: JetStreamManager,
  stream: string,
  cfg: Partial<ConsumerConfig> & { durable_name: string },
): Promise<ConsumerInfo> {
  let info: ConsumerInfo;
  try {
    info = await jsm.consumers.info(stream, cfg.durable_name);
  } catch (err) {
    if (isApiError(err, JetStreamApiCodes.ConsumerNotFound)) return jsm.consumers.add(stream, cfg);
    throw err;
  }
  const wanted = { ...info.config, ...cfg };
  if (differs(info.config, wanted)) return jsm.consumers.update(stream, cfg.durable_name, wanted);
  return info;
}

export function isApiError(err: unknown, code: number): boolean {
  return err instanceof JetStreamApiError && err.code === code;
}

function differs(have: object, want: object): boolean {
  const h = have as Record<string, unknown>;
  return Object.entries(want).some(([k, v]) => JSON.stringify(h[k]) !== JSON.stringify(v));
}
