// The feed-forward blocks shared by the trainer's forward/backward and the rollout's prefill/decode:
// the MoE block (router, top-k routed experts, optional shared expert) and the dense SwiGLU MLP.
#pragma once
#include <climits>
#include <cstdint>
#include <vector>

#include "moepilot/model.h"

namespace moepilot {

using Vec = std::vector<float>;
using IVec = std::vector<int32_t>;


struct MoeActs {
  Vec router_logits, probs, weights;  // [N,E] [N,E] [N,K]
  IVec experts;                       // [N,K] global expert ids
  IVec order;                         // assignments (i*K+k) of local experts, grouped by expert, ascending
  std::vector<int> start;             // [El+1] offsets into order
  Vec xg, gate, up, act;              // [M,C] [M,H] [M,H] [M,H]: gathered rows, in `order`
  Vec eout;                           // [N*K, C]: each assignment's expert output (unweighted)
  Vec s_gate, s_up, s_act, s_out, s_logit;  // shared expert: [N,HS] x3, [N,C], [N]
};

struct MlpActs {
  Vec gate, up, act;  // [N, HD_] each
};

struct Weights {  // pointers into a flat buffer (params or grads) for one layer
  const LayerOffsets& o;
  float* base;
  float* at(size_t off) const { return off == SIZE_MAX ? nullptr : base + off; }
};

// out[N,C] = MoE(x[N,C]); replay (optional) [N,K] forces the experts. Row-invariant.
void moe_forward(const ModelConfig& cfg, const Weights& W, const float* x, float* out, MoeActs& a, int N,
                 const int32_t* replay);
// dx_acc += d/dx; parameter grads into G; aux_dp [E]: load-balancing gradient on each probability, or null.
void moe_backward(const ModelConfig& cfg, const Weights& W, const Weights& G, const float* x, const float* dout,
                  float* dx_acc, const MoeActs& a, int N, const float* aux_dp);
void mlp_forward(const ModelConfig& cfg, const Weights& W, const float* x, float* out, MlpActs& a, int N);
void mlp_backward(const ModelConfig& cfg, const Weights& W, const Weights& G, const float* x, const float* dout,
                  float* dx_acc, const MlpActs& a, int N);

}  // namespace moepilot
