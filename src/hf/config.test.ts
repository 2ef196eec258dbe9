import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { HfConfigError, expertTensorName, parseExpertTensorName, parseHfConfig, readHfConfig } from './config.ts';

const FIXTURE = fileURLToPath(new URL('../../test/fixtures/qwen2_moe-tiny/', import.meta.url));

function qwen3(): Record<string, unknown> {
  return {
    model_type: 'qwen3_moe',
    vocab_size: 100,
    hidden_size: 32,
    num_hidden_layers: 4,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 16,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000.0,
    rope_scaling: null,
    hidden_act: 'silu',
    num_experts: 6,
    num_experts_per_tok: 2,
    norm_topk_prob: true,
    moe_intermediate_size: 8,
    intermediate_size: 24,
    decoder_sparse_step: 2,
    mlp_only_layers: [3],
    attention_bias: false,
    use_sliding_window: false,
    sliding_window: null,
    tie_word_embeddings: true,
    router_aux_loss_coef: 0.01,
  };
}

function mixtral(): Record<string, unknown> {
  return {
    model_type: 'mixtral',
    vocab_size: 120,
    hidden_size: 48,
    num_hidden_layers: 3,
    num_attention_heads: 6,
    num_key_value_heads: 2,
    head_dim: null,
    rms_norm_eps: 1e-5,
    rope_theta: 1e6,
    hidden_act: 'silu',
    num_local_experts: 4,
    num_experts_per_tok: 2,
    intermediate_size: 20,
    sliding_window: null,
    max_position_embeddings: 4096,
    router_aux_loss_coef: 0.02,
  };
}

function rejects(raw: Record<string, unknown>, message: string, options = {}) {
  assert.throws(() => parseHfConfig(raw, options), (e: unknown) => {
    assert.ok(e instanceof HfConfigError, `expected HfConfigError, got ${String(e)}`);
    assert.equal(e.message, message);
    return true;
  });
}

test('the qwen2_moe fixture parses into the flat engine config', async () => {
  const p = await readHfConfig(FIXTURE);
  assert.equal(p.modelType, 'qwen2_moe');
  assert.deepEqual(p.engine, {
    family: 0,
    vocab: 512,
    hidden: 64,
    layers: 2,
    heads: 4,
    kvHeads: 2,
    headDim: 16,
    ropeTheta: 10000,
    rmsEps: 1e-6,
    numExperts: 8,
    topK: 2,
    normTopkProb: false,
    moeIntermediate: 32,
    sharedIntermediate: 48,
    denseIntermediate: 96,
    qkvBias: true,
    qkNorm: false,
    tieEmbeddings: false,
    routerAuxLossCoef: 0.001,
    ropeFreqDtype: 'float32',
    layerIsMoe: [true, true],
    expertBegin: 0,
    expertEnd: 8,
  });
  assert.equal(p.raw.model_type, 'qwen2_moe');
});

test('qwen3_moe: qk norm, no qkv bias, sparse step and mlp-only layers, local expert range', () => {
  const p = parseHfConfig(qwen3(), { expertRange: [2, 5] });
  assert.equal(p.engine.family, 1);
  assert.equal(p.engine.qkNorm, true);
  assert.equal(p.engine.qkvBias, false);
  assert.equal(p.engine.sharedIntermediate, 0);
  assert.equal(p.engine.normTopkProb, true);
  assert.equal(p.engine.ropeTheta, 1e6);
  assert.equal(p.engine.tieEmbeddings, true);
  assert.equal(p.engine.routerAuxLossCoef, 0.01);
  // (i+1) % 2 == 0 -> layers 1 and 3; layer 3 is listed as mlp-only.
  assert.deepEqual(p.engine.layerIsMoe, [false, true, false, false]);
  assert.equal(p.engine.denseIntermediate, 24);
  assert.equal(p.engine.moeIntermediate, 8);
  assert.deepEqual([p.engine.expertBegin, p.engine.expertEnd], [2, 5]);
  // norm_topk_prob absent: HF's default for Qwen MoE is false.
  const raw = qwen3();
  delete raw.norm_topk_prob;
  assert.equal(parseHfConfig(raw).engine.normTopkProb, false);
});

test('mixtral: local experts, expert width from intermediate_size, head_dim derived, always renormalised', () => {
  const p = parseHfConfig(mixtral());
  assert.equal(p.engine.family, 2);
  assert.equal(p.engine.numExperts, 4);
  assert.equal(p.engine.moeIntermediate, 20);
  assert.equal(p.engine.headDim, 8);
  assert.equal(p.engine.normTopkProb, true);
  assert.equal(p.engine.qkvBias, false);
  assert.equal(p.engine.qkNorm, false);
  assert.equal(p.engine.tieEmbeddings, false);
  assert.deepEqual(p.engine.layerIsMoe, [true, true, true]);
  // A window as long as the context is full attention.
  assert.equal(parseHfConfig({ ...mixtral(), sliding_window: 4096 }).engine.layers, 3);
});

test('an older qwen2_moe config (no qkv_bias field, sliding window off) has qkv biases', () => {
  const raw: Record<string, unknown> = { ...qwen3(), model_type: 'qwen2_moe', shared_expert_intermediate_size: 12, sliding_window: 32768, use_sliding_window: false };
  delete raw.attention_bias;
  const p = parseHfConfig(raw);
  assert.equal(p.engine.family, 0);
  assert.equal(p.engine.qkvBias, true);
  assert.equal(p.engine.qkNorm, false);
  assert.equal(p.engine.sharedIntermediate, 12);
  assert.equal(parseHfConfig({ ...raw, qkv_bias: false }).engine.qkvBias, false);
});

test('rope_theta is read from rope_parameters (transformers 5) or the top level', () => {
  const raw = qwen3();
  delete raw.rope_theta;
  raw.rope_parameters = { rope_type: 'default', rope_theta: 5e5 };
  assert.equal(parseHfConfig(raw).engine.ropeTheta, 5e5);
});

test('bad configs are rejected naming config.json and the field', () => {
  rejects({ ...qwen3(), model_type: 'llama' }, "config.json: model_type 'llama' is not supported (supported: qwen2_moe, qwen3_moe, mixtral)");
  const noVocab = qwen3();
  delete noVocab.vocab_size;
  rejects(noVocab, 'config.json: missing field vocab_size (a positive integer)');
  rejects({ ...qwen3(), hidden_size: '32' }, 'config.json: field hidden_size must be a positive integer, got "32"');
  rejects({ ...qwen3(), num_key_value_heads: 3 }, 'config.json: num_attention_heads (4) must be a multiple of num_key_value_heads (3)');
  rejects({ ...qwen3(), rms_norm_eps: 0 }, 'config.json: field rms_norm_eps must be a positive number, got 0');
  rejects({ ...qwen3(), norm_topk_prob: 'yes' }, 'config.json: field norm_topk_prob must be a boolean, got "yes"');
  rejects({ ...qwen3(), num_experts_per_tok: 7 }, 'config.json: num_experts_per_tok (7) exceeds num_experts (6)');
  rejects({ ...qwen3(), hidden_act: 'gelu' }, "config.json: hidden_act 'gelu' is not supported (only silu)");
  rejects({ ...qwen3(), rope_scaling: { type: 'yarn', factor: 4 } }, "config.json: rope_scaling: rope type 'yarn' is not supported (only 'default')");
  rejects(
    { ...qwen3(), rope_parameters: { rope_type: 'linear', rope_theta: 1e4, factor: 2 } },
    "config.json: rope_parameters: rope type 'linear' is not supported (only 'default')",
  );
  const noTheta = qwen3();
  delete noTheta.rope_theta;
  rejects(noTheta, 'config.json: missing field rope_theta (or rope_parameters.rope_theta)');
  rejects({ ...qwen3(), use_sliding_window: true }, 'config.json: use_sliding_window true is not supported (sliding-window attention is not implemented)');
  rejects(
    { ...qwen3(), layer_types: ['full_attention', 'sliding_attention', 'full_attention', 'full_attention'] },
    "config.json: layer_types[1] 'sliding_attention' is not supported (only full_attention)",
  );
  rejects({ ...mixtral(), sliding_window: 1024 }, 'config.json: sliding_window 1024 is not supported (sliding-window attention is not implemented)');
  rejects({ ...qwen3(), attention_bias: true }, 'config.json: attention_bias true is not supported for qwen3_moe');
  rejects({ ...qwen3(), mlp_only_layers: [9] }, 'config.json: field mlp_only_layers must be an array of layer indices in [0, 4)');
  rejects({ ...qwen3(), quantization_config: { quant_method: 'fp8' } }, 'config.json: quantization_config: quantized checkpoints are not supported');
  const noShared = { ...qwen3(), model_type: 'qwen2_moe' };
  rejects(noShared, 'config.json: missing field shared_expert_intermediate_size (a non-negative integer)');
  const noLocal = mixtral();
  delete noLocal.num_local_experts;
  rejects(noLocal, 'config.json: missing field num_local_experts (a positive integer)');
  rejects(qwen3(), 'expertRange [4, 4) must be a non-empty integer range within [0, 6)', { expertRange: [4, 4] });
  rejects(qwen3(), 'expertRange [0, 7) must be a non-empty integer range within [0, 6)', { expertRange: [0, 7] });
  assert.throws(() => parseHfConfig([1, 2]), /config\.json: expected a JSON object/);
});

test('readHfConfig names the file when it is missing or not JSON', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'hfcfg-'));
  try {
    await assert.rejects(readHfConfig(dir), (e: Error) => e instanceof HfConfigError && e.message.startsWith(`config.json: cannot read ${join(dir, 'config.json')}`));
    await writeFile(join(dir, 'config.json'), '{"model_type": "qwen3_moe",');
    await assert.rejects(readHfConfig(dir), (e: Error) => e instanceof HfConfigError && e.message.startsWith(`config.json: ${join(dir, 'config.json')} is not valid JSON`));
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('expert tensor names round-trip through the hub convention', () => {
  const n = expertTensorName('mixtral', 3, 17, 'w2');
  assert.equal(n, 'model.layers.3.block_sparse_moe.experts.17.w2.weight');
  assert.deepEqual(parseExpertTensorName(n), { layer: 3, block: 'block_sparse_moe', expert: 17, proj: 'w2' });
  assert.equal(parseExpertTensorName('model.layers.3.mlp.shared_expert.up_proj.weight'), null);
});
