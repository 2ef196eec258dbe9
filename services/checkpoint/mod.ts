// Public surface of the checkpoint library (the gRPC server wiring lives elsewhere and imports from here).
export {
  createCheckpointStore,
  MANIFEST_FILE,
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  type CheckpointInfo,
  type CheckpointManifest,
  type CheckpointStore,
  type CheckpointStoreConfig,
  type PendingCheckpoint,
  type RestoredCheckpoint,
  type ShardData,
  type ShardEntry,
} from "./store.ts";
export * from "./errors.ts";
