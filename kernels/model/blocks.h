// The feed-forward blocks shared by the trainer's forward/backward and the rollout's prefill/decode:
// the MoE block (router, top-k routed experts, optional shared expert) and the dense SwiGLU MLP.
#pragma once
#include <climits>
#include <cstdint>
#include <vector>

#include "moepilot/comm.h"
#include "moepilot/model.h"

namespace moepilot {

using Vec = std::vector<float>;
using IVec = std::vector<int32_t>;


// Expert parallelism: which rank owns which experts, and the communicator for the token exchange.
// Rank r owns experts [bounds[r], bounds[r+1]).
struct ExpertParallel {
  Collectives* comm = nullptr;
  std::vector<int> bounds;  // [ranks + 1]
  int owner(int expert) const;
};

struct MoeActs {
  Vec router_logits, probs, weights;  // [N,E] [N,E] [N,K]
  IVec experts;                       // [N,K] global expert ids
  // Dispatch (this rank's tokens): S = N*K assignments sent in send order; rows per destination rank.
  IVec send_assign;                   // [S] assignment index i*K+k of each sent row
  std::vector<int64_t> send_rows, recv_rows;  // [ranks]
  // Rows received for this rank's experts (R of them), grouped by local expert.
  IVec group_order;                   // [R] received row index of each grouped row
  std::vector<int> start;             // [El+1] offsets of each local expert's rows in the grouped order
  Vec xg, gate, up, act;              // [R,C] [R,H] [R,H] [R,H]: grouped rows
  Vec eout;                           // [N*K, C]: each assignment's expert output (unweighted)
  Vec s_gate, s_up, s_act, s_out, s_logit;  // shared expert: [N,HS] x3, [N,C], [N]
  // Wall time of the phases (ms), for tracing: token exchange between ranks, expert compute (routed and
  // shared). Written by the forward; the backward's are mutable since the backward reads the acts as const.
  double fwd_alltoall_ms = 0, fwd_experts_ms = 0, fwd_alltoall_bytes = 0;
  mutable double bwd_alltoall_ms = 0, bwd_experts_ms = 0, bwd_alltoall_bytes = 0;
};

struct MlpActs {
  Vec gate, up, act;  // [N, HD_] each
};

struct Weights {  // pointers into a flat buffer (params or grads) for one layer
  const LayerOffsets& o;
  float* base;
  float* at(size_t off) const { return off == SIZE_MAX ? nullptr : base + off; }
};

// out[N,C] = MoE(x[N,C]); replay (optional) [N,K] forces the experts. Row-invariant. With `ep` (several
// ranks) tokens travel to their experts' ranks and back: every rank must call it, also with N = 0.
void moe_forward(const ModelConfig& cfg, const Weights& W, const float* x, float* out, MoeActs& a, int N,
                 const int32_t* replay, const ExpertParallel* ep);
// dx_acc += d/dx; parameter grads into G; aux_dp [E]: load-balancing gradient on each probability, or null.
void moe_backward(const ModelConfig& cfg, const Weights& W, const Weights& G, const float* x, const float* dout,
                  float* dx_acc, const MoeActs& a, int N, const float* aux_dp, const ExpertParallel* ep);
// The routed-experts part of the two above (dispatch, local experts, combine).
void route_and_run_experts(const ModelConfig& cfg, const Weights& W, const float* x, MoeActs& a, int N,
                           const ExpertParallel* ep);
void experts_backward(const ModelConfig& cfg, const Weights& W, const Weights& G, const float* dout, float* dx_acc,
                      const MoeActs& a, int N, const ExpertParallel* ep);
void mlp_forward(const ModelConfig& cfg, const Weights& W, const float* x, float* out, MlpActs& a, int N);
void mlp_backward(const ModelConfig& cfg, const Weights& W, const Weights& G, const float* x, const float* dout,
                  float* dx_acc, const MlpActs& a, int N);

}  // namespace moepilot
