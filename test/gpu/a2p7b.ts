// The Qwen1.5-MoE-A2.7B shape the GPU benchmarks run (hidden 2048, 16 heads, 60 experts top-4, expert hidden
// 1408, shared expert 5632, vocab 151936), as a config.json object with `layers` decoder layers (24 in the
// released model).
export const A2P7B_VOCAB = 151936;

export function a2p7bConfig(layers: number): Record<string, unknown> {
  return {
    model_type: 'qwen2_moe',
    architectures: ['Qwen2MoeForCausalLM'],
    vocab_size: A2P7B_VOCAB,
    hidden_size: 2048,
    intermediate_size: 5632,
    num_hidden_layers: layers,
    num_attention_heads: 16,
    num_key_value_heads: 16,
    max_position_embeddings: 8192,
    rope_theta: 1000000.0,
    rms_norm_eps: 1e-6,
    num_experts: 60,
    num_experts_per_tok: 4,
    moe_intermediate_size: 1408,
    shared_expert_intermediate_size: 5632,
    norm_topk_prob: false,
    decoder_sparse_step: 1,
    mlp_only_layers: [],
    tie_word_embeddings: false,
    router_aux_loss_coef: 0.001,
    qkv_bias: true,
    hidden_act: 'silu',
    torch_dtype: 'bfloat16',
  };
}
