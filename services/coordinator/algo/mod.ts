// Public surface of the coordinator's pure GRPO algorithms (no I/O).
export * from './advantages.ts';
export * from './batching.ts';
export * from './metrics.ts';
export * from './pack.ts';
