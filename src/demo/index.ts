// Public surface of the demo: the task and its reward, the tiny model maker, the tokenizer, the GRPO helpers
// and the in-process reference loops.
export { createTask, evaluateGreedy, exampleAt, promptCount, reward, END_MARKER, TASK_ALPHABET, TASK_KINDS } from './task.ts';
export type { EvalDeps, EvalResult, Example, Task, TaskKind, TaskOptions } from './task.ts';
export { makeTinyModel, initParams, tinyConfig, TINY_MODEL_DEFAULTS, type TinyModelOptions } from './make-model.ts';
export {
  buildTokenizerFiles,
  createDemoTokenizer,
  loadDemoTokenizer,
  writeTokenizerFiles,
  BOS_TOKEN,
  EOS_TOKEN,
  PAD_TOKEN,
  SPECIAL_TOKENS,
  type DemoTokenizer,
  type TokenizerFiles,
} from './tokenizer.ts';
export { groupAdvantages, packCompletions, packGroup, type AdvantageOptions, type GrpoPack, type PackItem, type RolloutItem, type SftPack } from './algo.ts';
export { encodeExample, grpoTrain, rolloutGroups, sftWarmup, type GrpoOptions, type GrpoStepInfo, type RolloutGroup, type SftOptions, type SftStepInfo } from './train.ts';
export { createRng, shuffle, type Rng } from './rng.ts';
export { DEMO_DEFAULTS, parseDemoArgs, runDemo, type DemoConfig, type DemoSummary } from './prototype.ts';
