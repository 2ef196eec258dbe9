// Hugging Face config.json -> the engine's flat, fully specified model config.
//
// Every field the native side reads (kernels/addon/engine_binding.cpp, config_from_js) is set here, with
// the same names; the native side only converts and re-checks sizes. Features the engine does not
// implement (sliding-window attention, RoPE scaling, other activations, biases it has no slot for) are
// rejected here, so a model never loads and then computes something different from the reference.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

export type ModelType = 'qwen2_moe' | 'qwen3_moe' | 'mixtral';

/** Native Family enum (kernels/include/moepilot/model.h). */
export const FAMILY: Readonly<Record<ModelType, number>> = { qwen2_moe: 0, qwen3_moe: 1, mixtral: 2 };

/** Mirrors moepilot::ModelConfig field by field (names as config_from_js reads them). */
export interface EngineModelConfig {
  family: number;
  vocab: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  ropeTheta: number;
  rmsEps: number;
  numExperts: number;
  topK: number;
  normTopkProb: boolean;
  moeIntermediate: number;
  sharedIntermediate: number;
  denseIntermediate: number;
  qkvBias: boolean;
  qkNorm: boolean;
  tieEmbeddings: boolean;
  routerAuxLossCoef: number;
  /** Precision of RoPE's inverse frequencies (see ModelConfig::rope_freq_dtype). */
  ropeFreqDtype: RopeFreqDtype;
  layerIsMoe: boolean[];
  expertBegin: number;
  expertEnd: number;
}

export type RopeFreqDtype = 'float32' | 'bfloat16' | 'float16';

export interface ParsedHfConfig {
  modelType: ModelType;
  engine: EngineModelConfig;
  /** The config.json object as read, kept so a save can write it back with few changes. */
  raw: Record<string, unknown>;
}

export interface ParseConfigOptions {
  /** Local experts [begin, end) held by this process; default: all experts. */
  expertRange?: readonly [number, number];
  /**
   * RoPE frequency precision; default float32, which is what HF's from_pretrained builds whatever the
   * checkpoint dtype. HF keeps inv_freq as a buffer that `model.to(dtype)` casts along with the weights: a
   * model cast that way in memory rotates with rounded frequencies, and matching it needs the same rounding.
   */
  ropeFreqDtype?: RopeFreqDtype;
  /** Names the source in error messages; default "config.json". */
  source?: string;
}

export class HfConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HfConfigError';
  }
}

export const SUPPORTED_MODEL_TYPES: readonly ModelType[] = ['qwen2_moe', 'qwen3_moe', 'mixtral'];

/** Prefix of the sparse block's tensors under model.layers.<l>. on the hub. */
export function moeBlockName(modelType: ModelType): string {
  return modelType === 'mixtral' ? 'block_sparse_moe' : 'mlp';
}

/** The three expert projections under their hub names: [gate, up, down]. */
export function expertProjNames(modelType: ModelType): readonly [string, string, string] {
  return modelType === 'mixtral' ? ['w1', 'w3', 'w2'] : ['gate_proj', 'up_proj', 'down_proj'];
}

/** Hub name of one expert projection, e.g. model.layers.3.mlp.experts.17.up_proj.weight. */
export function expertTensorName(modelType: ModelType, layer: number, expert: number, proj: string): string {
  return `model.layers.${layer}.${moeBlockName(modelType)}.experts.${expert}.${proj}.weight`;
}

const EXPERT_TENSOR = /^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.([A-Za-z0-9_]+)\.weight$/;

/** Splits an expert tensor's hub name into its parts; null for any other tensor. */
export function parseExpertTensorName(name: string): { layer: number; block: string; expert: number; proj: string } | null {
  const m = EXPERT_TENSOR.exec(name);
  if (!m) return null;
  return { layer: Number(m[1]), block: m[2], expert: Number(m[3]), proj: m[4] };
}

/** Buffers HF models register that are not parameters (older checkpoints saved them). */
export function isNonParameterTensor(name: string): boolean {
  return /\.rotary_emb\.inv_freq$/.test(name);
}

/** Reads and parses `<dir>/config.json`. */
export async function readHfConfig(dir: string, options: Omit<ParseConfigOptions, 'source'> = {}): Promise<ParsedHfConfig> {
  const path = join(dir, 'config.json');
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new HfConfigError(`config.json: cannot read ${path}: ${(e as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new HfConfigError(`config.json: ${path} is not valid JSON: ${(e as Error).message}`);
  }
  return parseHfConfig(raw, { ...options, source: 'config.json' });
}

/** Parses a config.json object (already JSON-decoded). */
export function parseHfConfig(raw: unknown, options: ParseConfigOptions = {}): ParsedHfConfig {
  const src = options.source ?? 'config.json';
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new HfConfigError(`${src}: expected a JSON object`);
  const r = new Reader(raw as Record<string, unknown>, src);

  const modelType = r.str('model_type');
  if (!(SUPPORTED_MODEL_TYPES as readonly string[]).includes(modelType)) {
    throw new HfConfigError(`${src}: model_type '${modelType}' is not supported (supported: ${SUPPORTED_MODEL_TYPES.join(', ')})`);
  }
  const type = modelType as ModelType;
  const mixtral = type === 'mixtral';

  if (r.has('quantization_config')) throw new HfConfigError(`${src}: quantization_config: quantized checkpoints are not supported`);
  const act = r.optStr('hidden_act') ?? 'silu';
  if (act !== 'silu') throw new HfConfigError(`${src}: hidden_act '${act}' is not supported (only silu)`);

  const vocab = r.posInt('vocab_size');
  const hidden = r.posInt('hidden_size');
  const layers = r.posInt('num_hidden_layers');
  const heads = r.posInt('num_attention_heads');
  const kvHeads = r.posInt('num_key_value_heads');
  if (heads % kvHeads !== 0) {
    throw new HfConfigError(`${src}: num_attention_heads (${heads}) must be a multiple of num_key_value_heads (${kvHeads})`);
  }
  // head_dim absent or null: HF derives it from hidden_size.
  let headDim = r.optPosInt('head_dim');
  if (headDim === undefined) {
    if (hidden % heads !== 0) {
      throw new HfConfigError(`${src}: head_dim is absent and hidden_size (${hidden}) is not a multiple of num_attention_heads (${heads})`);
    }
    headDim = hidden / heads;
  }
  if (headDim % 2 !== 0) throw new HfConfigError(`${src}: head_dim must be even for RoPE, got ${headDim}`);
  const rmsEps = r.posNum('rms_norm_eps');
  const ropeTheta = readRope(r, src);
  checkAttentionWindow(r, type, layers, src);

  // Transformers 5 names the expert count num_local_experts for qwen3_moe too; accept either name.
  const preferred = mixtral ? 'num_local_experts' : 'num_experts';
  const other = mixtral ? 'num_experts' : 'num_local_experts';
  const expertsField = !r.has(preferred) && r.has(other) ? other : preferred;
  const numExperts = r.posInt(expertsField);
  const topK = r.posInt('num_experts_per_tok');
  if (topK > numExperts) {
    throw new HfConfigError(`${src}: num_experts_per_tok (${topK}) exceeds ${expertsField} (${numExperts})`);
  }
  // Mixtral always renormalises the top-k weights; Qwen MoE models only with norm_topk_prob (HF default false).
  const normTopkProb = mixtral ? true : r.optBool('norm_topk_prob') ?? false;
  const denseIntermediate = r.posInt('intermediate_size');
  const moeIntermediate = mixtral ? denseIntermediate : r.posInt('moe_intermediate_size');
  const sharedIntermediate = type === 'qwen2_moe' ? r.nonNegInt('shared_expert_intermediate_size') : 0;

  let qkvBias = false;
  if (type === 'qwen2_moe') qkvBias = r.optBool('qkv_bias') ?? true;
  if (type === 'qwen3_moe' && (r.optBool('attention_bias') ?? false)) {
    // Qwen3 attention_bias also adds an o_proj bias, for which the engine has no parameter.
    throw new HfConfigError(`${src}: attention_bias true is not supported for qwen3_moe`);
  }
  if (mixtral && r.has('attention_bias') && r.optBool('attention_bias')) {
    throw new HfConfigError(`${src}: attention_bias true is not supported for mixtral`);
  }
  const qkNorm = type === 'qwen3_moe';
  const tieEmbeddings = r.optBool('tie_word_embeddings') ?? false;
  // HF's default coefficient for all three families.
  const routerAuxLossCoef = r.optNum('router_aux_loss_coef') ?? 0.001;
  if (routerAuxLossCoef < 0) throw new HfConfigError(`${src}: router_aux_loss_coef must be >= 0, got ${routerAuxLossCoef}`);

  const ropeFreqDtype = options.ropeFreqDtype ?? 'float32';
  const layerIsMoe = mixtral ? new Array<boolean>(layers).fill(true) : qwenMoeLayers(r, layers, numExperts, src);

  const [expertBegin, expertEnd] = options.expertRange ?? [0, numExperts];
  if (!Number.isInteger(expertBegin) || !Number.isInteger(expertEnd) || expertBegin < 0 || expertEnd > numExperts || expertBegin >= expertEnd) {
    throw new HfConfigError(`expertRange [${expertBegin}, ${expertEnd}) must be a non-empty integer range within [0, ${numExperts})`);
  }

  return {
    modelType: type,
    raw: raw as Record<string, unknown>,
    engine: {
      family: FAMILY[type],
      vocab,
      hidden,
      layers,
      heads,
      kvHeads,
      headDim,
      ropeTheta,
      rmsEps,
      numExperts,
      topK,
      normTopkProb,
      moeIntermediate,
      sharedIntermediate,
      denseIntermediate,
      qkvBias,
      qkNorm,
      tieEmbeddings,
      routerAuxLossCoef,
      ropeFreqDtype,
      layerIsMoe,
      expertBegin,
      expertEnd,
    },
  };
}

// rope_theta sits at the top level (transformers 4.x) or in rope_parameters (5.x). Only plain RoPE is
// implemented, so any scaling type (linear, dynamic, yarn, llama3, ...) is rejected.
function readRope(r: Reader, src: string): number {
  const params = r.optObj('rope_parameters');
  const scaling = r.optObj('rope_scaling');
  for (const [field, obj] of [['rope_parameters', params], ['rope_scaling', scaling]] as const) {
    if (!obj) continue;
    const t = obj.rope_type ?? obj.type ?? 'default';
    if (t !== 'default') throw new HfConfigError(`${src}: ${field}: rope type '${String(t)}' is not supported (only 'default')`);
  }
  let theta: unknown = params?.rope_theta;
  let field = 'rope_parameters.rope_theta';
  if (theta === undefined) {
    theta = r.get('rope_theta');
    field = 'rope_theta';
  }
  if (theta === undefined || theta === null) throw new HfConfigError(`${src}: missing field rope_theta (or rope_parameters.rope_theta)`);
  if (typeof theta !== 'number' || !Number.isFinite(theta) || theta <= 0) {
    throw new HfConfigError(`${src}: field ${field} must be a positive number, got ${JSON.stringify(theta)}`);
  }
  return theta;
}

// The engine implements full causal attention only.
function checkAttentionWindow(r: Reader, type: ModelType, layers: number, src: string): void {
  if (type === 'mixtral') {
    // Mixtral slides its window whenever sliding_window is set; a window no shorter than the longest
    // position is full attention.
    const w = r.get('sliding_window');
    if (w === undefined || w === null) return;
    if (typeof w !== 'number' || !Number.isInteger(w) || w <= 0) {
      throw new HfConfigError(`${src}: field sliding_window must be null or a positive integer, got ${JSON.stringify(w)}`);
    }
    const maxPos = r.optPosInt('max_position_embeddings');
    if (maxPos === undefined || w < maxPos) {
      throw new HfConfigError(`${src}: sliding_window ${w} is not supported (sliding-window attention is not implemented)`);
    }
    return;
  }
  if (r.optBool('use_sliding_window')) {
    throw new HfConfigError(`${src}: use_sliding_window true is not supported (sliding-window attention is not implemented)`);
  }
  const types = r.get('layer_types');
  if (types === undefined || types === null) return;
  if (!Array.isArray(types) || types.length !== layers) {
    throw new HfConfigError(`${src}: field layer_types must be an array of ${layers} strings`);
  }
  types.forEach((t, i) => {
    if (t !== 'full_attention') throw new HfConfigError(`${src}: layer_types[${i}] '${String(t)}' is not supported (only full_attention)`);
  });
}

// HF's rule for Qwen MoE models: layer i is sparse iff it is not in mlp_only_layers, there are experts,
// and (i + 1) is a multiple of decoder_sparse_step.
function qwenMoeLayers(r: Reader, layers: number, numExperts: number, src: string): boolean[] {
  const step = r.optPosInt('decoder_sparse_step') ?? 1;
  const only = r.get('mlp_only_layers') ?? [];
  if (!Array.isArray(only) || !only.every((x) => Number.isInteger(x) && x >= 0 && x < layers)) {
    throw new HfConfigError(`${src}: field mlp_only_layers must be an array of layer indices in [0, ${layers})`);
  }
  const dense = new Set(only as number[]);
  return Array.from({ length: layers }, (_, i) => !dense.has(i) && numExperts > 0 && (i + 1) % step === 0);
}

// Typed access to config.json fields; every error names the file and the field.
class Reader {
  constructor(
    private readonly o: Record<string, unknown>,
    private readonly src: string,
  ) {}
  get(k: string): unknown {
    return this.o[k];
  }
  has(k: string): boolean {
    return this.o[k] !== undefined && this.o[k] !== null;
  }
  private fail(k: string, what: string): never {
    const v = this.o[k];
    if (v === undefined) throw new HfConfigError(`${this.src}: missing field ${k} (${what})`);
    throw new HfConfigError(`${this.src}: field ${k} must be ${what}, got ${JSON.stringify(v)}`);
  }
  str(k: string): string {
    const v = this.o[k];
    if (typeof v !== 'string') this.fail(k, 'a string');
    return v as string;
  }
  optStr(k: string): string | undefined {
    return this.has(k) ? this.str(k) : undefined;
  }
  posInt(k: string): number {
    const v = this.o[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) this.fail(k, 'a positive integer');
    return v as number;
  }
  optPosInt(k: string): number | undefined {
    return this.has(k) ? this.posInt(k) : undefined;
  }
  nonNegInt(k: string): number {
    const v = this.o[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) this.fail(k, 'a non-negative integer');
    return v as number;
  }
  posNum(k: string): number {
    const v = this.o[k];
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) this.fail(k, 'a positive number');
    return v as number;
  }
  optNum(k: string): number | undefined {
    if (!this.has(k)) return undefined;
    const v = this.o[k];
    if (typeof v !== 'number' || !Number.isFinite(v)) this.fail(k, 'a number');
    return v as number;
  }
  optBool(k: string): boolean | undefined {
    if (!this.has(k)) return undefined;
    const v = this.o[k];
    if (typeof v !== 'boolean') this.fail(k, 'a boolean');
    return v as boolean;
  }
  optObj(k: string): Record<string, unknown> | undefined {
    if (!this.has(k)) return undefined;
    const v = this.o[k];
    if (typeof v !== 'object' || Array.isArray(v)) this.fail(k, 'an object');
    return v as Record<string, unknown>;
  }
}
