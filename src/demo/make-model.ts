// Writes a tiny, randomly initialised MoE model as a Hugging Face folder (config.json, model.safetensors,
// tokenizer.json, tokenizer_config.json, generation_config.json), so the demo needs no download. The
// tensor names and shapes come from the engine's own parameter table for the config, and the init follows
// HF's _init_weights: normal(0, initializer_range) for linear and embedding weights, ones for RMSNorm
// weights, zeros for biases.
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Engine } from '../engine/engine.ts';
import { parseHfConfig } from '../hf/config.ts';
import { createRng } from './rng.ts';
import { buildTokenizerFiles, EOS_TOKEN, PAD_TOKEN, writeTokenizerFiles } from './tokenizer.ts';

export interface TinyModelOptions {
  modelType: 'qwen2_moe' | 'qwen3_moe';
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  numExperts: number;
  topK: number;
  moeIntermediate: number;
  /** qwen2_moe only: the shared expert's width. */
  sharedIntermediate: number;
  routerAuxLossCoef: number;
  initStd: number;
  seed: number;
}

export const TINY_MODEL_DEFAULTS: Readonly<TinyModelOptions> = {
  modelType: 'qwen3_moe',
  // Tuned with the demo (src/demo/prototype.ts): at hidden 64 GRPO gains were 22-47 points over seeds,
  // at 96 28-45, at similar cost.
  hidden: 96,
  layers: 2,
  heads: 4,
  kvHeads: 2,
  headDim: 24,
  numExperts: 8,
  topK: 2,
  moeIntermediate: 64,
  sharedIntermediate: 64,
  routerAuxLossCoef: 0.001,
  initStd: 0.02,
  seed: 1,
};

/** config.json for the options and a vocabulary of `vocab` tokens (ids of pad and eos given). */
export function tinyConfig(o: TinyModelOptions, vocab: number, ids: { pad: number; eos: number }): Record<string, unknown> {
  const qwen3 = o.modelType === 'qwen3_moe';
  return {
    architectures: [qwen3 ? 'Qwen3MoeForCausalLM' : 'Qwen2MoeForCausalLM'],
    model_type: o.modelType,
    vocab_size: vocab,
    hidden_size: o.hidden,
    // Width of a dense MLP layer; every layer here is sparse, HF still reads the field.
    intermediate_size: 2 * o.hidden,
    moe_intermediate_size: o.moeIntermediate,
    ...(qwen3 ? {} : { shared_expert_intermediate_size: o.sharedIntermediate, qkv_bias: true }),
    num_hidden_layers: o.layers,
    num_attention_heads: o.heads,
    num_key_value_heads: o.kvHeads,
    head_dim: o.headDim,
    hidden_act: 'silu',
    max_position_embeddings: 256,
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    num_experts: o.numExperts,
    num_experts_per_tok: o.topK,
    norm_topk_prob: qwen3,
    decoder_sparse_step: 1,
    mlp_only_layers: [],
    router_aux_loss_coef: o.routerAuxLossCoef,
    output_router_logits: false,
    tie_word_embeddings: false,
    attention_bias: false,
    use_sliding_window: false,
    initializer_range: o.initStd,
    bos_token_id: null,
    eos_token_id: ids.eos,
    pad_token_id: ids.pad,
    dtype: 'float32',
  };
}

/** Fills an engine's parameters the way HF initialises a fresh model. */
export function initParams(engine: Engine, std: number, seed: number): void {
  const rng = createRng(seed);
  for (const [name, data] of engine.paramsByName()) {
    if (/norm\.weight$/.test(name)) data.fill(1);
    else if (name.endsWith('.bias')) data.fill(0);
    else for (let i = 0; i < data.length; i++) data[i] = std * rng.normal();
  }
}

function checkOptions(o: TinyModelOptions): void {
  for (const k of ['hidden', 'layers', 'heads', 'kvHeads', 'headDim', 'numExperts', 'topK', 'moeIntermediate', 'sharedIntermediate'] as const) {
    if (!Number.isInteger(o[k]) || o[k] < 1) throw new RangeError(`makeTinyModel: ${k} must be an integer >= 1, got ${o[k]}`);
  }
  if (o.modelType !== 'qwen2_moe' && o.modelType !== 'qwen3_moe') throw new TypeError(`makeTinyModel: modelType must be qwen2_moe or qwen3_moe, got '${String(o.modelType)}'`);
  if (!(o.initStd > 0)) throw new RangeError(`makeTinyModel: initStd must be > 0, got ${o.initStd}`);
}

/**
 * Writes the model folder for a task alphabet; returns the config.json written. The folder is created if
 * needed; files of the same names are replaced.
 */
export async function makeTinyModel(dir: string, alphabet: string, options: Partial<TinyModelOptions> = {}): Promise<Record<string, unknown>> {
  const o: TinyModelOptions = { ...TINY_MODEL_DEFAULTS, ...options };
  checkOptions(o);
  const { tokenizerJson } = buildTokenizerFiles(alphabet);
  const vocab = (tokenizerJson.model as { vocab: Record<string, number> }).vocab;
  const config = tinyConfig(o, Object.keys(vocab).length, { pad: vocab[PAD_TOKEN], eos: vocab[EOS_TOKEN] });
  const engine = Engine.fromConfig(parseHfConfig(config));
  try {
    initParams(engine, o.initStd, o.seed);
    await mkdir(dir, { recursive: true });
    // saveHfFolder writes config.json from the parsed raw config (dtype float32) and the weights.
    await engine.saveHfFolder(dir);
  } finally {
    await engine.dispose();
  }
  await writeTokenizerFiles(dir, alphabet);
  const generation = { eos_token_id: vocab[EOS_TOKEN], pad_token_id: vocab[PAD_TOKEN], bos_token_id: null };
  await writeFile(join(dir, 'generation_config.json'), JSON.stringify(generation, null, 2) + '\n');
  return config;
}
