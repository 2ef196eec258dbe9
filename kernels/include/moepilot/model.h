// The model: configuration, parameter layout and the flat parameter/gradient buffers.
//
// Dimension legend (used in shape comments throughout kernels/):
//   B sequences, N packed tokens (sum of sequence lengths), C hidden, V vocab, L layers,
//   NH query heads, KVH key/value heads, HD head dim, E experts (El local), K top-k,
//   H expert hidden (moe_intermediate), HS shared-expert hidden, HD_ dense-MLP hidden.
//
// Sequences are packed: token i of sequence b sits at row offsets[b] + i; no padding rows exist.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moepilot {

enum class Family : int { Qwen2Moe = 0, Qwen3Moe = 1, Mixtral = 2 };

// Fully specified by the TypeScript loader (src/hf/config.ts) from config.json; native code only checks.
struct ModelConfig {
  Family family = Family::Qwen2Moe;
  int vocab = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float rope_theta = 10000.f, rms_eps = 1e-6f;
  // Precision of RoPE's inverse frequencies. HF keeps inv_freq as a buffer that is cast with the model:
  // a model cast to bf16/f16 rotates with rounded frequencies, and matching it needs the same rounding.
  enum class RopeFreqDtype : int { F32 = 0, BF16 = 1, F16 = 2 } rope_freq_dtype = RopeFreqDtype::F32;
  int num_experts = 0, top_k = 0;
  bool norm_topk_prob = false;
  int moe_intermediate = 0;     // H
  int shared_intermediate = 0;  // HS, 0 = no shared expert
  int dense_intermediate = 0;   // MLP width of layers that are not MoE
  bool qkv_bias = false, qk_norm = false, tie_embeddings = false;
  float router_aux_loss_coef = 0.f;
  std::vector<uint8_t> layer_is_moe;  // [L]
  // Experts held by this process: [expert_begin, expert_end). The whole range on one rank.
  int expert_begin = 0, expert_end = 0;

  int local_experts() const { return expert_end - expert_begin; }
  std::vector<double> rope_inv_freq() const;  // [HD/2]: theta^(-2j/HD), rounded as rope_freq_dtype says
  int moe_layer_count() const;
  void validate() const;  // throws Error(InvalidArgument) naming the bad field
};

enum class ParamKind : int { Dense = 0, Expert = 1 };

// One tensor of the flat buffer, under its Hugging Face hub name.
struct ParamInfo {
  std::string name;
  size_t offset = 0;  // in floats, into the flat buffer
  std::vector<int64_t> shape;
  size_t numel = 0;
  ParamKind kind = ParamKind::Dense;
  int layer = -1;   // -1 for embeddings, final norm, lm head
  int expert = -1;  // global expert index for ParamKind::Expert
};

// Offsets (in floats) of one layer's tensors; SIZE_MAX where the tensor does not exist.
// Local experts are stored contiguously per projection so that expert e's matrix is
// base + (e - expert_begin) * size: gate/up [El, H, C], down [El, C, H].
struct LayerOffsets {
  size_t attn_norm, wq, bq, wk, bk, wv, bv, wo, q_norm, k_norm, mlp_norm;
  size_t router;                            // [E, C]
  size_t expert_gate, expert_up, expert_down;
  size_t shared_gate, shared_up, shared_down, shared_expert_gate;  // [HS,C] [HS,C] [C,HS] [1,C]
  size_t dense_gate, dense_up, dense_down;                         // [HD_,C] [HD_,C] [C,HD_]
};

// The buffer is [dense tensors | expert tensors]: dense_total floats of replicated (data-parallel)
// parameters, then this rank's experts.
struct ParamLayout {
  std::vector<ParamInfo> tensors;  // in buffer order
  size_t total = 0;                // floats
  size_t dense_total = 0;          // floats of dense tensors, all before the first expert tensor
  size_t embed = 0, final_norm = 0, lm_head = 0;  // lm_head == embed when tied
  std::vector<LayerOffsets> layers;
};

ParamLayout build_layout(const ModelConfig& cfg);

}  // namespace moepilot
