// Parameter layout: one list, in buffer order, of every tensor under its Hugging Face hub name,
// each tagged dense or expert from its name as it is registered.
#include <climits>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <string>

#include "moepilot/error.h"
#include "moepilot/model.h"

namespace moepilot {

int ModelConfig::moe_layer_count() const {
  int n = 0;
  for (uint8_t m : layer_is_moe) n += m ? 1 : 0;
  return n;
}

static float round_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

static float round_to_f16(float f) {  // through _Float16: IEEE round to nearest even
  return (float)(_Float16)f;
}

std::vector<double> ModelConfig::rope_inv_freq() const {
  std::vector<double> inv(head_dim / 2);
  for (int j = 0; j < head_dim / 2; j++) {
    // HF computes the frequencies in float32: 1 / theta^(2j/HD).
    const float f = (float)(1.0 / std::pow((double)rope_theta, (2.0 * j) / head_dim));
    switch (rope_freq_dtype) {
      case RopeFreqDtype::F32: inv[j] = f; break;
      case RopeFreqDtype::BF16: inv[j] = round_to_bf16(f); break;
      case RopeFreqDtype::F16: inv[j] = round_to_f16(f); break;
    }
  }
  return inv;
}

void ModelConfig::validate() const {
  auto pos = [](int v, const char* name) {
    MP_CHECK_ARG(v > 0, std::string("model config: ") + name + " must be > 0, got " + std::to_string(v));
  };
  pos(vocab, "vocab_size");
  pos(hidden, "hidden_size");
  pos(layers, "num_hidden_layers");
  pos(heads, "num_attention_heads");
  pos(kv_heads, "num_key_value_heads");
  pos(head_dim, "head_dim");
  MP_CHECK_ARG(heads % kv_heads == 0, "model config: num_attention_heads must be a multiple of num_key_value_heads");
  MP_CHECK_ARG(head_dim % 2 == 0, "model config: head_dim must be even (RoPE)");
  MP_CHECK_ARG((int)layer_is_moe.size() == layers, "model config: layer_is_moe must have one entry per layer");
  bool any_moe = false, any_dense = false;
  for (uint8_t m : layer_is_moe) (m ? any_moe : any_dense) = true;
  if (any_moe) {
    pos(num_experts, "num_experts");
    pos(top_k, "num_experts_per_tok");
    pos(moe_intermediate, "moe_intermediate_size");
    MP_CHECK_ARG(top_k <= num_experts, "model config: num_experts_per_tok exceeds num_experts");
    MP_CHECK_ARG(expert_begin >= 0 && expert_begin <= expert_end && expert_end <= num_experts,
                 "model config: local expert range [" + std::to_string(expert_begin) + ", " +
                     std::to_string(expert_end) + ") is outside [0, " + std::to_string(num_experts) + ")");
  }
  if (any_dense) pos(dense_intermediate, "intermediate_size");
  MP_CHECK_ARG(shared_intermediate >= 0, "model config: shared_expert_intermediate_size must be >= 0");
  MP_CHECK_ARG(rms_eps > 0.f, "model config: rms_norm_eps must be > 0");
  MP_CHECK_ARG(rope_theta > 0.f, "model config: rope_theta must be > 0");
}

namespace {

struct LayoutBuilder {
  ParamLayout& out;
  size_t add(const std::string& name, std::vector<int64_t> shape, ParamKind kind = ParamKind::Dense, int layer = -1,
             int expert = -1) {
    ParamInfo p;
    p.name = name;
    p.offset = out.total;
    p.shape = std::move(shape);
    p.numel = 1;
    for (int64_t d : p.shape) p.numel *= (size_t)d;
    p.kind = kind;
    p.layer = layer;
    p.expert = expert;
    out.total += p.numel;
    out.tensors.push_back(std::move(p));
    return out.tensors.back().offset;
  }
};

}  // namespace

ParamLayout build_layout(const ModelConfig& cfg) {
  cfg.validate();
  const int64_t C = cfg.hidden, V = cfg.vocab, HD = cfg.head_dim;
  const int64_t QD = (int64_t)cfg.heads * HD, KVD = (int64_t)cfg.kv_heads * HD;
  ParamLayout L;
  LayoutBuilder b{L};
  L.embed = b.add("model.embed_tokens.weight", {V, C});
  const bool mixtral = cfg.family == Family::Mixtral;
  const std::string moe_prefix = mixtral ? "block_sparse_moe" : "mlp";
  for (int l = 0; l < cfg.layers; l++) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerOffsets o;
    const size_t none = SIZE_MAX;
    o = LayerOffsets{none, none, none, none, none, none, none, none, none, none, none, none,
                     none, none, none, none, none, none, none, none, none, none};
    o.attn_norm = b.add(p + "input_layernorm.weight", {C}, ParamKind::Dense, l);
    o.wq = b.add(p + "self_attn.q_proj.weight", {QD, C}, ParamKind::Dense, l);
    if (cfg.qkv_bias) o.bq = b.add(p + "self_attn.q_proj.bias", {QD}, ParamKind::Dense, l);
    o.wk = b.add(p + "self_attn.k_proj.weight", {KVD, C}, ParamKind::Dense, l);
    if (cfg.qkv_bias) o.bk = b.add(p + "self_attn.k_proj.bias", {KVD}, ParamKind::Dense, l);
    o.wv = b.add(p + "self_attn.v_proj.weight", {KVD, C}, ParamKind::Dense, l);
    if (cfg.qkv_bias) o.bv = b.add(p + "self_attn.v_proj.bias", {KVD}, ParamKind::Dense, l);
    o.wo = b.add(p + "self_attn.o_proj.weight", {C, QD}, ParamKind::Dense, l);
    if (cfg.qk_norm) {
      o.q_norm = b.add(p + "self_attn.q_norm.weight", {HD}, ParamKind::Dense, l);
      o.k_norm = b.add(p + "self_attn.k_norm.weight", {HD}, ParamKind::Dense, l);
    }
    o.mlp_norm = b.add(p + "post_attention_layernorm.weight", {C}, ParamKind::Dense, l);
    if (cfg.layer_is_moe[l]) {
      o.router = b.add(p + moe_prefix + ".gate.weight", {cfg.num_experts, C}, ParamKind::Dense, l);
      if (cfg.shared_intermediate > 0) {
        const int64_t HS = cfg.shared_intermediate;
        o.shared_gate = b.add(p + "mlp.shared_expert.gate_proj.weight", {HS, C}, ParamKind::Dense, l);
        o.shared_up = b.add(p + "mlp.shared_expert.up_proj.weight", {HS, C}, ParamKind::Dense, l);
        o.shared_down = b.add(p + "mlp.shared_expert.down_proj.weight", {C, HS}, ParamKind::Dense, l);
        o.shared_expert_gate = b.add(p + "mlp.shared_expert_gate.weight", {1, C}, ParamKind::Dense, l);
      }
    } else {
      const int64_t HDn = cfg.dense_intermediate;
      o.dense_gate = b.add(p + "mlp.gate_proj.weight", {HDn, C}, ParamKind::Dense, l);
      o.dense_up = b.add(p + "mlp.up_proj.weight", {HDn, C}, ParamKind::Dense, l);
      o.dense_down = b.add(p + "mlp.down_proj.weight", {C, HDn}, ParamKind::Dense, l);
    }
    L.layers.push_back(o);
  }
  L.final_norm = b.add("model.norm.weight", {C});
  L.lm_head = cfg.tie_embeddings ? L.embed : b.add("lm_head.weight", {V, C});
  // Expert tensors after every dense one: [dense | experts]. Data-parallel reduction and the ZeRO shards
  // then cover one contiguous range, and each rank's expert block is contiguous too.
  L.dense_total = L.total;
  const char* gate = mixtral ? "w1" : "gate_proj";
  const char* up = mixtral ? "w3" : "up_proj";
  const char* down = mixtral ? "w2" : "down_proj";
  const int64_t H = cfg.moe_intermediate;
  for (int l = 0; l < cfg.layers; l++) {
    if (!cfg.layer_is_moe[l]) continue;
    const std::string p = "model.layers." + std::to_string(l) + "." + moe_prefix + ".experts.";
    LayerOffsets& o = L.layers[l];
    // Each projection contiguous over the local experts: expert e's matrix at base + (e - begin) * size.
    o.expert_gate = L.total;
    for (int e = cfg.expert_begin; e < cfg.expert_end; e++)
      b.add(p + std::to_string(e) + "." + gate + ".weight", {H, C}, ParamKind::Expert, l, e);
    o.expert_up = L.total;
    for (int e = cfg.expert_begin; e < cfg.expert_end; e++)
      b.add(p + std::to_string(e) + "." + up + ".weight", {H, C}, ParamKind::Expert, l, e);
    o.expert_down = L.total;
    for (int e = cfg.expert_begin; e < cfg.expert_end; e++)
      b.add(p + std::to_string(e) + "." + down + ".weight", {C, H}, ParamKind::Expert, l, e);
  }
  return L;
}

}  // namespace moepilot
