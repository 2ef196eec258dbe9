// One error class per condition, so callers (and the gRPC layer) can map them without parsing messages.

export class CheckpointNotFoundError extends Error {
  constructor(readonly step: number, root: string) {
    super(`no committed checkpoint for step ${step} in ${root}`);
    this.name = "CheckpointNotFoundError";
  }
}

/** A committed checkpoint whose manifest or shards do not match what was written. */
export class CheckpointCorruptError extends Error {
  constructor(
    readonly step: number,
    /** The shard at fault, "manifest.json" for the manifest itself. */
    readonly file: string,
    readonly reason: string,
  ) {
    super(`checkpoint step ${step} is corrupt: ${file}: ${reason}`);
    this.name = "CheckpointCorruptError";
  }
}

/** The step is already committed, or another writer is writing it right now. */
export class CheckpointConflictError extends Error {
  constructor(readonly step: number, reason: string) {
    super(`cannot begin checkpoint step ${step}: ${reason}`);
    this.name = "CheckpointConflictError";
  }
}

/** Another live process holds the store for writing. */
export class CheckpointStoreLockedError extends Error {
  constructor(root: string, holder: string) {
    super(`checkpoint store ${root} is open for writing by ${holder}; open it with readOnly: true to only read`);
    this.name = "CheckpointStoreLockedError";
  }
}

/** A call that does not fit the object's state: writing after commit, committing twice, writing to a read-only store. */
export class CheckpointStateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CheckpointStateError";
  }
}
