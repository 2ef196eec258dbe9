// Public surface of the engine package: the user-facing class, its types and helpers. The native
// binding (native.ts) stays internal apart from the error class and the loader.
export {
  Engine,
  WeightsError,
  buildLossSpec,
  packBatch,
  packRows,
  unpackRows,
  FORWARD_DEFAULTS,
  LOSS_DEFAULTS,
  ADAMW_DEFAULTS,
  SIDE_FILES,
  type AdamWOptions,
  type Aggregation,
  type ForwardRequest,
  type ForwardResult,
  type ExpertGradDtype,
  type FromHfOptions,
  type KlEstimator,
  type LossInput,
  type LossResult,
  type LossType,
  type PackedBatch,
  type ParamInfo,
  type SaveHfOptions,
} from './engine.ts';
export { EngineError, loadNative, DEFAULT_ADDON_PATH } from './native.ts';
export { HfConfigError, parseHfConfig, readHfConfig, type EngineModelConfig, type ModelType, type ParsedHfConfig } from '../hf/config.ts';
export { SafetensorsError } from '../hf/safetensors.ts';
