"""The Qwen1.5-MoE-A2.7B shape as transformers' Qwen2MoeConfig arguments (hidden 2048, 16 heads, 60 experts top-4,
expert hidden 1408, shared expert 5632, vocab 151936), for the benchmarks' PyTorch baselines and the random model
maker (scripts/make-random-moe.py). test/gpu/a2p7b.ts is the same shape as a config.json for the engine's side.
No import of transformers here: callers pass the result to Qwen2MoeConfig(**...).
"""


def a2p7b_kwargs(layers, **overrides):
    """Qwen2MoeConfig keyword arguments of the A2.7B shape with `layers` decoder layers (24 in the released model);
    `overrides` replace or add arguments."""
    kw = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192, rope_theta=1e6,
        rms_norm_eps=1e-6, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False, router_aux_loss_coef=0.001,
    )
    kw.update(overrides)
    return kw
