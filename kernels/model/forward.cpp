// The model's forward and backward passes on the CPU backend, over packed sequences.
// Forward: embedding -> L x [RMSNorm, attention (+qk-norm, RoPE, causal GQA), residual, RMSNorm,
// MoE (router, top-k experts, shared expert) or dense MLP, residual] -> RMSNorm -> LM head (chunked).
// Backward mirrors it bottom-up. Dimension legend in moepilot/model.h.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <numeric>

#include "cpu/ops.h"
#include "cuda/gpu_model.h"
#include "model/blocks.h"
#include "model/loss.h"
#include "moepilot/comm.h"
#include "moepilot/engine.h"
#include "moepilot/error.h"

namespace moepilot {
namespace {

struct LayerActs {
  Vec res_in, ln1, rstd1;        // [N,C] [N,C] [N]
  Vec q_raw, k_raw, q_rstd, k_rstd;  // qk-norm inputs [N,NH*HD] [N,KVH*HD], rstd per head row
  Vec q, k, v;                   // after bias/qk-norm/RoPE
  Vec probs;                     // per sequence [NH, T, T]
  Vec att;                       // [N, NH*HD]
  Vec res_mid, ln2, rstd2;       // [N,C] [N,C] [N]
  MlpActs mlp;                   // dense MLP
  MoeActs moe;
};

struct Acts {
  int N = 0, B = 0;
  std::vector<int> seq_off;    // [B+1]
  std::vector<size_t> prob_off;  // [B] offsets into LayerActs::probs
  IVec pos, target;            // [N]
  std::vector<LayerActs> layers;
  Vec h_final, lnf, rstdf, lse, logprob, entropy;  // [N,C] [N,C] [N] [N] [N] [N]
  // load balancing: F_e = fraction of (token, k) assignments to e over all MoE layers
  PhaseTimes phases;           // of the forward
  Vec aux_f;                   // [E]
  double aux_loss = 0;
  int n_global = 0;            // tokens of all ranks (the load-balancing average is over them)
};


// An empty batch is allowed only with expert parallelism: a rank with no sequences still takes part in
// the other ranks' token exchanges.
void check_batch(const ModelConfig& cfg, const Batch& b, bool parallel) {
  MP_CHECK_ARG(parallel || !b.seq_lens.empty(), "batch: at least one sequence required");
  size_t n = 0;
  for (size_t s = 0; s < b.seq_lens.size(); s++) {
    MP_CHECK_ARG(b.seq_lens[s] >= 1, "batch: sequence " + std::to_string(s) + " has length " +
                                         std::to_string(b.seq_lens[s]) + " (must be >= 1)");
    n += (size_t)b.seq_lens[s];
  }
  MP_CHECK_ARG(n == b.tokens.size(), "batch: sequence lengths sum to " + std::to_string(n) + " but " +
                                         std::to_string(b.tokens.size()) + " tokens were given");
  // Row and (row, k) indices are int32 in both backends.
  MP_CHECK_ARG(n < (size_t)INT32_MAX / std::max(cfg.top_k, 1), "batch: too many tokens (" + std::to_string(n) + ")");
  for (size_t i = 0; i < n; i++)
    MP_CHECK_ARG(b.tokens[i] >= 0 && b.tokens[i] < cfg.vocab,
                 "batch: token " + std::to_string(b.tokens[i]) + " at row " + std::to_string(i) +
                     " is outside the vocabulary [0, " + std::to_string(cfg.vocab) + ")");
  if (!b.replay_experts.empty()) {
    const size_t want = (size_t)cfg.moe_layer_count() * n * cfg.top_k;
    MP_CHECK_ARG(b.replay_experts.size() == want, "batch: replay_experts must hold moe_layers * N * K = " +
                                                      std::to_string(want) + " entries, got " +
                                                      std::to_string(b.replay_experts.size()));
    for (int32_t e : b.replay_experts)
      MP_CHECK_ARG(e >= 0 && e < cfg.num_experts, "batch: replayed expert " + std::to_string(e) + " out of range");
  }
}

// ------------------------------------------------------------------ whole model
using Clock = std::chrono::steady_clock;
double ms_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }

void model_forward(const ModelConfig& cfg, const ParamLayout& L, float* params, const Batch& batch, Acts& A,
                   bool want_logits, Vec* logits_out, bool want_entropy, float temperature, const ExpertParallel* ep) {
  const auto t_start = Clock::now();
  A.phases = PhaseTimes{};
  const int C = cfg.hidden, NH = cfg.heads, KVH = cfg.kv_heads, HD = cfg.head_dim;
  const int QD = NH * HD, KVD = KVH * HD;
  const int N = (int)batch.tokens.size(), B = (int)batch.seq_lens.size();
  A.N = N;
  A.B = B;
  A.seq_off.assign(B + 1, 0);
  for (int b = 0; b < B; b++) A.seq_off[b + 1] = A.seq_off[b] + batch.seq_lens[b];
  A.pos.assign(N, 0);
  A.target.assign(N, -1);
  A.prob_off.assign(B + 1, 0);
  for (int b = 0; b < B; b++) {
    const int o = A.seq_off[b], T = batch.seq_lens[b];
    for (int t = 0; t < T; t++) {
      A.pos[o + t] = t;
      A.target[o + t] = t + 1 < T ? batch.tokens[o + t + 1] : -1;
    }
    A.prob_off[b + 1] = A.prob_off[b] + (size_t)NH * T * T;
  }
  const std::vector<double> inv_freq = cfg.rope_inv_freq();
  Vec h((size_t)N * C);
  for (int i = 0; i < N; i++)
    std::memcpy(&h[(size_t)i * C], params + L.embed + (size_t)batch.tokens[i] * C, C * sizeof(float));
  A.layers.assign(cfg.layers, LayerActs{});
  const int E = cfg.num_experts;
  A.aux_f.assign(std::max(E, 0), 0.f);
  Vec aux_p(std::max(E, 0), 0.f);
  int moe_idx = 0;
  for (int l = 0; l < cfg.layers; l++) {
    LayerActs& a = A.layers[l];
    Weights W{L.layers[l], params};
    const auto t_attn = Clock::now();
    a.res_in = h;
    a.ln1.assign((size_t)N * C, 0.f);
    a.rstd1.assign(N, 0.f);
    cpu::rmsnorm_forward(a.ln1.data(), a.rstd1.data(), h.data(), W.at(W.o.attn_norm), N, C, cfg.rms_eps);
    a.q_raw.assign((size_t)N * QD, 0.f);
    a.k_raw.assign((size_t)N * KVD, 0.f);
    a.v.assign((size_t)N * KVD, 0.f);
    cpu::matmul_forward(a.q_raw.data(), a.ln1.data(), W.at(W.o.wq), W.at(W.o.bq), N, C, QD);
    cpu::matmul_forward(a.k_raw.data(), a.ln1.data(), W.at(W.o.wk), W.at(W.o.bk), N, C, KVD);
    cpu::matmul_forward(a.v.data(), a.ln1.data(), W.at(W.o.wv), W.at(W.o.bv), N, C, KVD);
    if (cfg.qk_norm) {
      a.q.assign((size_t)N * QD, 0.f);
      a.k.assign((size_t)N * KVD, 0.f);
      a.q_rstd.assign((size_t)N * NH, 0.f);
      a.k_rstd.assign((size_t)N * KVH, 0.f);
      cpu::rmsnorm_forward(a.q.data(), a.q_rstd.data(), a.q_raw.data(), W.at(W.o.q_norm), N * NH, HD, cfg.rms_eps);
      cpu::rmsnorm_forward(a.k.data(), a.k_rstd.data(), a.k_raw.data(), W.at(W.o.k_norm), N * KVH, HD, cfg.rms_eps);
    } else {
      a.q = a.q_raw;
      a.k = a.k_raw;
    }
    cpu::rope_forward(a.q.data(), A.pos.data(), N, NH, HD, inv_freq.data());
    cpu::rope_forward(a.k.data(), A.pos.data(), N, KVH, HD, inv_freq.data());
    a.probs.assign(A.prob_off[B], 0.f);
    a.att.assign((size_t)N * QD, 0.f);
    for (int b = 0; b < B; b++) {
      const size_t o = A.seq_off[b];
      cpu::attention_forward(&a.att[o * QD], &a.probs[A.prob_off[b]], &a.q[o * QD], &a.k[o * KVD], &a.v[o * KVD],
                             batch.seq_lens[b], NH, KVH, HD, QD, KVD);
    }
    Vec tmp((size_t)N * C);
    cpu::matmul_forward(tmp.data(), a.att.data(), W.at(W.o.wo), nullptr, N, QD, C);
    for (size_t i = 0; i < h.size(); i++) h[i] += tmp[i];
    A.phases.attention_ms += ms_between(t_attn, Clock::now());
    a.res_mid = h;
    a.ln2.assign((size_t)N * C, 0.f);
    a.rstd2.assign(N, 0.f);
    cpu::rmsnorm_forward(a.ln2.data(), a.rstd2.data(), h.data(), W.at(W.o.mlp_norm), N, C, cfg.rms_eps);
    if (cfg.layer_is_moe[l]) {
      const int32_t* replay =
          batch.replay_experts.empty() ? nullptr : batch.replay_experts.data() + (size_t)moe_idx * N * cfg.top_k;
      moe_forward(cfg, W, a.ln2.data(), tmp.data(), a.moe, N, replay, ep);
      A.phases.experts_ms += a.moe.fwd_experts_ms;
      A.phases.alltoall_ms += a.moe.fwd_alltoall_ms;
      A.phases.alltoall_bytes += a.moe.fwd_alltoall_bytes;
      for (int i = 0; i < N * cfg.top_k; i++) A.aux_f[a.moe.experts[i]] += 1.f;
      for (int i = 0; i < N; i++)
        for (int e = 0; e < E; e++) aux_p[e] += a.moe.probs[(size_t)i * E + e];
      moe_idx++;
    } else {
      mlp_forward(cfg, W, a.ln2.data(), tmp.data(), a.mlp, N);
    }
    for (size_t i = 0; i < h.size(); i++) h[i] += tmp[i];
  }
  // Switch-style load balancing over all MoE layers' tokens (as HF computes it): E * sum_e F_e * P_e,
  // over the tokens of every rank (so that the loss is the one of the whole batch).
  if (moe_idx > 0) {
    A.n_global = N;
    if (ep && ep->comm) {
      std::vector<double> sums(2 * E + 1);
      for (int e = 0; e < E; e++) {
        sums[e] = A.aux_f[e];
        sums[E + e] = aux_p[e];
      }
      sums[2 * E] = N;
      ep->comm->all_reduce_sum(sums.data(), sums.size());
      for (int e = 0; e < E; e++) {
        A.aux_f[e] = (float)sums[e];
        aux_p[e] = (float)sums[E + e];
      }
      A.n_global = (int)sums[2 * E];
    }
    const double denom = (double)moe_idx * std::max(A.n_global, 1);
    double aux = 0;
    for (int e = 0; e < E; e++) {
      A.aux_f[e] = (float)(A.aux_f[e] / denom);
      aux += (double)A.aux_f[e] * (aux_p[e] / denom);
    }
    A.aux_loss = aux * E;
  }
  A.h_final = h;
  A.lnf.assign((size_t)N * C, 0.f);
  A.rstdf.assign(N, 0.f);
  cpu::rmsnorm_forward(A.lnf.data(), A.rstdf.data(), h.data(), params + L.final_norm, N, C, cfg.rms_eps);
  const auto t_head = Clock::now();
  A.lse.assign(N, 0.f);
  A.logprob.assign(N, 0.f);
  A.entropy.assign(want_entropy ? N : 0, 0.f);
  if (want_logits) logits_out->assign((size_t)N * cfg.vocab, 0.f);
  cpu::lm_head_forward(A.logprob.data(), A.lse.data(), want_entropy ? A.entropy.data() : nullptr,
                       want_logits ? logits_out->data() : nullptr, A.lnf.data(), params + L.lm_head, A.target.data(),
                       N, C, cfg.vocab, temperature);
  A.phases.lm_head_ms = ms_between(t_head, Clock::now());
  A.phases.total_ms = ms_between(t_start, Clock::now());
}

PhaseTimes model_backward(const ModelConfig& cfg, const ParamLayout& L, float* params, float* grads, const Batch& batch,
                          const Acts& A, const float* g, float aux_coef, float temperature, const ExpertParallel* ep) {
  PhaseTimes t;
  const auto t_start = Clock::now();
  const int C = cfg.hidden, NH = cfg.heads, KVH = cfg.kv_heads, HD = cfg.head_dim, E = cfg.num_experts;
  const int QD = NH * HD, KVD = KVH * HD;
  const int N = A.N, B = A.B;
  const std::vector<double> inv_freq = cfg.rope_inv_freq();
  Vec dlnf((size_t)N * C), dh((size_t)N * C, 0.f);
  cpu::lm_head_backward(dlnf.data(), grads + L.lm_head, g, A.lse.data(), A.lnf.data(), params + L.lm_head,
                        A.target.data(), N, C, cfg.vocab, temperature);
  t.lm_head_ms = ms_between(t_start, Clock::now());
  cpu::rmsnorm_backward(dh.data(), grads + L.final_norm, dlnf.data(), A.h_final.data(), params + L.final_norm,
                        A.rstdf.data(), N, C);
  // d aux / d p_{t,e} = E * F_e / (moe_layers * N), the same for every token and MoE layer.
  Vec aux_dp;
  const int moe_layers = cfg.moe_layer_count();
  if (aux_coef != 0.f && moe_layers > 0) {
    aux_dp.resize(E);
    for (int e = 0; e < E; e++)
      aux_dp[e] = (float)(aux_coef * E * (double)A.aux_f[e] / ((double)moe_layers * std::max(A.n_global, 1)));
  }
  for (int l = cfg.layers - 1; l >= 0; l--) {
    const LayerActs& a = A.layers[l];
    Weights W{L.layers[l], params}, G{L.layers[l], grads};
    // MLP block: h_out = res_mid + mlp(rmsnorm(res_mid)); dh carries d h_out and becomes d res_mid.
    Vec dln2((size_t)N * C, 0.f);
    if (cfg.layer_is_moe[l])
    {
      moe_backward(cfg, W, G, a.ln2.data(), dh.data(), dln2.data(), a.moe, N, aux_dp.empty() ? nullptr : aux_dp.data(),
                   ep);
      t.experts_ms += a.moe.bwd_experts_ms;
      t.alltoall_ms += a.moe.bwd_alltoall_ms;
      t.alltoall_bytes += a.moe.bwd_alltoall_bytes;
    }
    else
      mlp_backward(cfg, W, G, a.ln2.data(), dh.data(), dln2.data(), a.mlp, N);
    cpu::rmsnorm_backward(dh.data(), G.at(G.o.mlp_norm), dln2.data(), a.res_mid.data(), W.at(W.o.mlp_norm),
                          a.rstd2.data(), N, C);
    // Attention block: res_mid = res_in + o_proj(attention(...)); dh becomes d res_in.
    const auto t_attn = Clock::now();
    Vec datt((size_t)N * QD, 0.f);
    cpu::matmul_backward(datt.data(), G.at(G.o.wo), nullptr, dh.data(), a.att.data(), W.at(W.o.wo), N, QD, C);
    Vec dq((size_t)N * QD, 0.f), dk((size_t)N * KVD, 0.f), dv((size_t)N * KVD, 0.f);
    for (int b = 0; b < B; b++) {
      const size_t o = A.seq_off[b];
      cpu::attention_backward(&dq[o * QD], &dk[o * KVD], &dv[o * KVD], &datt[o * QD], &a.probs[A.prob_off[b]],
                              &a.q[o * QD], &a.k[o * KVD], &a.v[o * KVD], batch.seq_lens[b], NH, KVH, HD, QD, KVD);
    }
    cpu::rope_backward(dq.data(), A.pos.data(), N, NH, HD, inv_freq.data());
    cpu::rope_backward(dk.data(), A.pos.data(), N, KVH, HD, inv_freq.data());
    if (cfg.qk_norm) {
      Vec dq_raw((size_t)N * QD, 0.f), dk_raw((size_t)N * KVD, 0.f);
      cpu::rmsnorm_backward(dq_raw.data(), G.at(G.o.q_norm), dq.data(), a.q_raw.data(), W.at(W.o.q_norm),
                            a.q_rstd.data(), N * NH, HD);
      cpu::rmsnorm_backward(dk_raw.data(), G.at(G.o.k_norm), dk.data(), a.k_raw.data(), W.at(W.o.k_norm),
                            a.k_rstd.data(), N * KVH, HD);
      dq.swap(dq_raw);
      dk.swap(dk_raw);
    }
    Vec dln1((size_t)N * C, 0.f);
    cpu::matmul_backward(dln1.data(), G.at(G.o.wq), G.at(G.o.bq), dq.data(), a.ln1.data(), W.at(W.o.wq), N, C, QD);
    cpu::matmul_backward(dln1.data(), G.at(G.o.wk), G.at(G.o.bk), dk.data(), a.ln1.data(), W.at(W.o.wk), N, C, KVD);
    cpu::matmul_backward(dln1.data(), G.at(G.o.wv), G.at(G.o.bv), dv.data(), a.ln1.data(), W.at(W.o.wv), N, C, KVD);
    cpu::rmsnorm_backward(dh.data(), G.at(G.o.attn_norm), dln1.data(), a.res_in.data(), W.at(W.o.attn_norm),
                          a.rstd1.data(), N, C);
    t.attention_ms += ms_between(t_attn, Clock::now());
  }
  for (int i = 0; i < N; i++) {
    float* d = grads + L.embed + (size_t)batch.tokens[i] * C;
    for (int c = 0; c < C; c++) d[c] += dh[(size_t)i * C + c];
  }
  t.total_ms = ms_between(t_start, Clock::now());
  return t;
}

void collect_router_outputs(const ModelConfig& cfg, const Acts& A, bool logits, bool experts, ForwardResult& r) {
  const int N = A.N, E = cfg.num_experts, K = cfg.top_k;
  const int ml = cfg.moe_layer_count();
  if (logits) r.router_logits.reserve((size_t)ml * N * E);
  if (experts) r.experts.reserve((size_t)ml * N * K);
  r.expert_tokens.assign((size_t)ml * E, 0);
  int m = 0;
  for (int l = 0; l < cfg.layers; l++) {
    if (!cfg.layer_is_moe[l]) continue;
    const MoeActs& a = A.layers[l].moe;
    if (logits) r.router_logits.insert(r.router_logits.end(), a.router_logits.begin(), a.router_logits.end());
    if (experts) r.experts.insert(r.experts.end(), a.experts.begin(), a.experts.end());
    for (int32_t e : a.experts) r.expert_tokens[(size_t)m * E + e]++;
    m++;
  }
}

}  // namespace

ForwardResult Engine::forward(const Batch& batch, const ForwardRequest& req) {
  check_batch(cfg_, batch, comm_ != nullptr);
  if (gpu_) return gpu_->forward(batch, req);
  ExpertParallel ep{comm_.get(), expert_bounds_};
  Acts A;
  ForwardResult r;
  MP_CHECK_ARG(req.temperature > 0, "forward: temperature must be > 0");
  model_forward(cfg_, layout_, params_.data(), batch, A, req.want_logits, &r.logits, req.want_entropy,
                req.temperature, comm_ ? &ep : nullptr);
  if (req.want_logprobs) r.logprobs = A.logprob;
  if (req.want_entropy) r.entropy = A.entropy;
  r.phases = A.phases;
  collect_router_outputs(cfg_, A, req.want_router_logits, req.want_experts, r);
  return r;
}

LossResult Engine::forward_backward(const Batch& batch, const LossSpec& spec) {
  check_batch(cfg_, batch, comm_ != nullptr);
  if (gpu_) return gpu_->forward_backward(batch, spec);
  ExpertParallel ep{comm_.get(), expert_bounds_};
  const int N = (int)batch.tokens.size(), B = (int)batch.seq_lens.size();
  check_loss_spec(spec, N);
  Acts A;
  model_forward(cfg_, layout_, params_.data(), batch, A, false, nullptr, true, spec.temperature,
                comm_ ? &ep : nullptr);

  LossResult r;
  Vec g;
  policy_loss(spec, A.seq_off.data(), B, A.target.data(), A.logprob.data(), A.entropy.data(), N, r, g);
  r.aux_loss = A.aux_loss;
  r.logprobs = A.logprob;
  const float coef = spec.aux_loss_coef >= 0 ? spec.aux_loss_coef : cfg_.router_aux_loss_coef;
  r.forward_phases = A.phases;
  r.backward_phases = model_backward(cfg_, layout_, params_.data(), grads_.data(), batch, A, g.data(), (float)(coef * spec.aux_scale),
                 spec.temperature, comm_ ? &ep : nullptr);
  ForwardResult fr;
  collect_router_outputs(cfg_, A, false, false, fr);
  r.expert_tokens = std::move(fr.expert_tokens);
  return r;
}

}  // namespace moepilot
