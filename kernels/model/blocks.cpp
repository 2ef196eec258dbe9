// Feed-forward blocks: MoE and dense MLP, forward and backward.
#include "model/blocks.h"

#include <cmath>
#include <cstring>

#include "cpu/ops.h"

namespace moepilot {

// ------------------------------------------------------------------ MoE block
void moe_forward(const ModelConfig& cfg, const Weights& W, const float* x, float* out, MoeActs& a, int N,
                 const int32_t* replay) {
  const int C = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, H = cfg.moe_intermediate;
  const int e0 = cfg.expert_begin, El = cfg.local_experts();
  a.router_logits.assign((size_t)N * E, 0.f);
  a.probs.assign((size_t)N * E, 0.f);
  a.weights.assign((size_t)N * K, 0.f);
  a.experts.assign((size_t)N * K, 0);
  cpu::matmul_forward(a.router_logits.data(), x, W.at(W.o.router), nullptr, N, C, E);
  cpu::router_forward(a.probs.data(), a.weights.data(), a.experts.data(), a.router_logits.data(), N, E, K,
                      cfg.norm_topk_prob);
  if (replay) {  // router replay: the given experts, weighted by this model's probabilities
    for (int i = 0; i < N; i++) {
      float sum = 0;
      for (int k = 0; k < K; k++) {
        const int e = replay[(size_t)i * K + k];
        a.experts[(size_t)i * K + k] = e;
        a.weights[(size_t)i * K + k] = a.probs[(size_t)i * E + e];
        sum += a.weights[(size_t)i * K + k];
      }
      if (cfg.norm_topk_prob)
        for (int k = 0; k < K; k++) a.weights[(size_t)i * K + k] /= sum;
    }
  }
  // Group assignments by local expert in ascending (token, k) order: a deterministic permutation.
  a.start.assign(El + 1, 0);
  for (int i = 0; i < N * K; i++) {
    const int e = a.experts[i] - e0;
    if (e >= 0 && e < El) a.start[e + 1]++;
  }
  for (int e = 0; e < El; e++) a.start[e + 1] += a.start[e];
  const int M = a.start[El];
  a.order.assign(M, 0);
  {
    std::vector<int> fill(a.start.begin(), a.start.end() - 1);
    for (int i = 0; i < N * K; i++) {
      const int e = a.experts[i] - e0;
      if (e >= 0 && e < El) a.order[fill[e]++] = i;
    }
  }
  a.xg.assign((size_t)M * C, 0.f);
  for (int m = 0; m < M; m++) std::memcpy(&a.xg[(size_t)m * C], x + (size_t)(a.order[m] / K) * C, C * sizeof(float));
  a.gate.assign((size_t)M * H, 0.f);
  a.up.assign((size_t)M * H, 0.f);
  a.act.assign((size_t)M * H, 0.f);
  a.eout.assign((size_t)N * K * C, 0.f);
  Vec y((size_t)M * C);
  for (int e = 0; e < El; e++) {
    const int m0 = a.start[e], mn = a.start[e + 1] - m0;
    if (mn == 0) continue;
    const float* wg = W.at(W.o.expert_gate) + (size_t)e * H * C;
    const float* wu = W.at(W.o.expert_up) + (size_t)e * H * C;
    const float* wd = W.at(W.o.expert_down) + (size_t)e * C * H;
    cpu::matmul_forward(&a.gate[(size_t)m0 * H], &a.xg[(size_t)m0 * C], wg, nullptr, mn, C, H);
    cpu::matmul_forward(&a.up[(size_t)m0 * H], &a.xg[(size_t)m0 * C], wu, nullptr, mn, C, H);
    cpu::swiglu_forward(&a.act[(size_t)m0 * H], &a.gate[(size_t)m0 * H], &a.up[(size_t)m0 * H], (size_t)mn * H);
    cpu::matmul_forward(&y[(size_t)m0 * C], &a.act[(size_t)m0 * H], wd, nullptr, mn, H, C);
  }
  for (int m = 0; m < M; m++) std::memcpy(&a.eout[(size_t)a.order[m] * C], &y[(size_t)m * C], C * sizeof(float));
  // Combine in k order per token (batch-invariant).
  for (int i = 0; i < N; i++) {
    float* o = out + (size_t)i * C;
    for (int c = 0; c < C; c++) o[c] = 0.f;
    for (int k = 0; k < K; k++) {
      const float w = a.weights[(size_t)i * K + k];
      const float* eo = &a.eout[((size_t)i * K + k) * C];
      for (int c = 0; c < C; c++) o[c] += w * eo[c];
    }
  }
  if (cfg.shared_intermediate > 0) {
    const int HS = cfg.shared_intermediate;
    a.s_gate.assign((size_t)N * HS, 0.f);
    a.s_up.assign((size_t)N * HS, 0.f);
    a.s_act.assign((size_t)N * HS, 0.f);
    a.s_out.assign((size_t)N * C, 0.f);
    a.s_logit.assign(N, 0.f);
    cpu::matmul_forward(a.s_gate.data(), x, W.at(W.o.shared_gate), nullptr, N, C, HS);
    cpu::matmul_forward(a.s_up.data(), x, W.at(W.o.shared_up), nullptr, N, C, HS);
    cpu::swiglu_forward(a.s_act.data(), a.s_gate.data(), a.s_up.data(), (size_t)N * HS);
    cpu::matmul_forward(a.s_out.data(), a.s_act.data(), W.at(W.o.shared_down), nullptr, N, HS, C);
    cpu::matmul_forward(a.s_logit.data(), x, W.at(W.o.shared_expert_gate), nullptr, N, C, 1);
    for (int i = 0; i < N; i++) {
      const float s = 1.f / (1.f + std::exp(-a.s_logit[i]));
      for (int c = 0; c < C; c++) out[(size_t)i * C + c] += s * a.s_out[(size_t)i * C + c];
    }
  }
}

void moe_backward(const ModelConfig& cfg, const Weights& W, const Weights& G, const float* x, const float* dout,
                  float* dx_acc, const MoeActs& a, int N, const float* aux_dp) {
  const int C = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, H = cfg.moe_intermediate;
  const int El = cfg.local_experts();
  if (cfg.shared_intermediate > 0) {
    const int HS = cfg.shared_intermediate;
    Vec ds_out((size_t)N * C), dlogit(N), dact((size_t)N * HS, 0.f), dg((size_t)N * HS), du((size_t)N * HS);
    for (int i = 0; i < N; i++) {
      const float s = 1.f / (1.f + std::exp(-a.s_logit[i]));
      double d = 0;
      for (int c = 0; c < C; c++) {
        ds_out[(size_t)i * C + c] = s * dout[(size_t)i * C + c];
        d += (double)dout[(size_t)i * C + c] * a.s_out[(size_t)i * C + c];
      }
      dlogit[i] = (float)d * s * (1.f - s);
    }
    cpu::matmul_backward(dact.data(), G.at(G.o.shared_down), nullptr, ds_out.data(), a.s_act.data(),
                         W.at(W.o.shared_down), N, HS, C);
    cpu::swiglu_backward(dg.data(), du.data(), dact.data(), a.s_gate.data(), a.s_up.data(), (size_t)N * HS);
    cpu::matmul_backward(dx_acc, G.at(G.o.shared_gate), nullptr, dg.data(), x, W.at(W.o.shared_gate), N, C, HS);
    cpu::matmul_backward(dx_acc, G.at(G.o.shared_up), nullptr, du.data(), x, W.at(W.o.shared_up), N, C, HS);
    cpu::matmul_backward(dx_acc, G.at(G.o.shared_expert_gate), nullptr, dlogit.data(), x,
                         W.at(W.o.shared_expert_gate), N, C, 1);
  }
  // Routed experts: d eout[a] = w_a * dout_i; d w_a = dout_i . eout[a].
  Vec dweights((size_t)N * K);
  for (int i = 0; i < N; i++)
    for (int k = 0; k < K; k++) {
      const float* eo = &a.eout[((size_t)i * K + k) * C];
      double d = 0;
      for (int c = 0; c < C; c++) d += (double)dout[(size_t)i * C + c] * eo[c];
      dweights[(size_t)i * K + k] = (float)d;
    }
  const int M = a.start[El];
  Vec dy((size_t)M * C), dact((size_t)M * H), dg((size_t)M * H), du((size_t)M * H), dxg((size_t)M * C, 0.f);
  for (int m = 0; m < M; m++) {
    const int as = a.order[m];
    const float w = a.weights[as];
    const float* d = dout + (size_t)(as / K) * C;
    for (int c = 0; c < C; c++) dy[(size_t)m * C + c] = w * d[c];
  }
  for (int e = 0; e < El; e++) {
    const int m0 = a.start[e], mn = a.start[e + 1] - m0;
    if (mn == 0) continue;
    const size_t gofs = (size_t)e * H * C;
    std::fill(dact.begin() + (size_t)m0 * H, dact.begin() + (size_t)(m0 + mn) * H, 0.f);
    cpu::matmul_backward(&dact[(size_t)m0 * H], G.at(G.o.expert_down) + gofs, nullptr, &dy[(size_t)m0 * C],
                         &a.act[(size_t)m0 * H], W.at(W.o.expert_down) + gofs, mn, H, C);
    cpu::swiglu_backward(&dg[(size_t)m0 * H], &du[(size_t)m0 * H], &dact[(size_t)m0 * H], &a.gate[(size_t)m0 * H],
                         &a.up[(size_t)m0 * H], (size_t)mn * H);
    cpu::matmul_backward(&dxg[(size_t)m0 * C], G.at(G.o.expert_gate) + gofs, nullptr, &dg[(size_t)m0 * H],
                         &a.xg[(size_t)m0 * C], W.at(W.o.expert_gate) + gofs, mn, C, H);
    cpu::matmul_backward(&dxg[(size_t)m0 * C], G.at(G.o.expert_up) + gofs, nullptr, &du[(size_t)m0 * H],
                         &a.xg[(size_t)m0 * C], W.at(W.o.expert_up) + gofs, mn, C, H);
  }
  // Scatter back in assignment order (deterministic).
  for (int m = 0; m < M; m++) {
    float* d = dx_acc + (size_t)(a.order[m] / K) * C;
    for (int c = 0; c < C; c++) d[c] += dxg[(size_t)m * C + c];
  }
  // Router.
  Vec dlogits((size_t)N * E), extra;
  if (aux_dp) {
    extra.resize((size_t)N * E);
    for (int i = 0; i < N; i++) std::memcpy(&extra[(size_t)i * E], aux_dp, E * sizeof(float));
  }
  cpu::router_backward(dlogits.data(), dweights.data(), aux_dp ? extra.data() : nullptr, a.probs.data(),
                       a.weights.data(), a.experts.data(), N, E, K, cfg.norm_topk_prob);
  cpu::matmul_backward(dx_acc, G.at(G.o.router), nullptr, dlogits.data(), x, W.at(W.o.router), N, C, E);
}

// ------------------------------------------------------------------ dense MLP block
void mlp_forward(const ModelConfig& cfg, const Weights& W, const float* x, float* out, MlpActs& a, int N) {
  const int C = cfg.hidden, HD = cfg.dense_intermediate;
  a.gate.assign((size_t)N * HD, 0.f);
  a.up.assign((size_t)N * HD, 0.f);
  a.act.assign((size_t)N * HD, 0.f);
  cpu::matmul_forward(a.gate.data(), x, W.at(W.o.dense_gate), nullptr, N, C, HD);
  cpu::matmul_forward(a.up.data(), x, W.at(W.o.dense_up), nullptr, N, C, HD);
  cpu::swiglu_forward(a.act.data(), a.gate.data(), a.up.data(), (size_t)N * HD);
  cpu::matmul_forward(out, a.act.data(), W.at(W.o.dense_down), nullptr, N, HD, C);
}

void mlp_backward(const ModelConfig& cfg, const Weights& W, const Weights& G, const float* x, const float* dout,
                  float* dx_acc, const MlpActs& a, int N) {
  const int C = cfg.hidden, HD = cfg.dense_intermediate;
  Vec dact((size_t)N * HD, 0.f), dg((size_t)N * HD), du((size_t)N * HD);
  cpu::matmul_backward(dact.data(), G.at(G.o.dense_down), nullptr, dout, a.act.data(), W.at(W.o.dense_down), N,
                       HD, C);
  cpu::swiglu_backward(dg.data(), du.data(), dact.data(), a.gate.data(), a.up.data(), (size_t)N * HD);
  cpu::matmul_backward(dx_acc, G.at(G.o.dense_gate), nullptr, dg.data(), x, W.at(W.o.dense_gate), N, C, HD);
  cpu::matmul_backward(dx_acc, G.at(G.o.dense_up), nullptr, du.data(), x, W.at(W.o.dense_up), N, C, HD);
}

}  // namespace moepilot
