// Feed-forward blocks: MoE and dense MLP, forward and backward.
#include "model/blocks.h"

#include <chrono>
#include <cmath>
#include <cstring>

#include "cpu/ops.h"
#include "moepilot/error.h"

namespace moepilot {

// ------------------------------------------------------------------ MoE block
namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Moves rows of `width` floats between ranks: send[S] in send order -> recv[R] in receive order, with the
// per-rank row counts of the dispatch. Without a communicator (one rank) it is a copy. Adds its time to *ms.
void exchange_rows(const ExpertParallel* ep, const Vec& send, const std::vector<int64_t>& send_rows, Vec& recv,
                   const std::vector<int64_t>& recv_rows, int width, double* ms, double* bytes) {
  const auto t0 = std::chrono::steady_clock::now();
  struct Timer {
    double* ms;
    std::chrono::steady_clock::time_point t0;
    ~Timer() { *ms += ms_since(t0); }
  } timer{ms, t0};
  int64_t total = 0;
  for (int64_t r : recv_rows) total += r;
  recv.assign((size_t)total * width, 0.f);
  if (!ep || !ep->comm) {
    recv = send;
    return;
  }
  std::vector<int64_t> sc(send_rows.size()), rc(recv_rows.size());
  for (size_t r = 0; r < sc.size(); r++) sc[r] = send_rows[r] * width;
  for (size_t r = 0; r < rc.size(); r++) rc[r] = recv_rows[r] * width;
  for (int64_t n : sc) *bytes += (double)n * sizeof(float);
  ep->comm->all_to_all_v(send.data(), sc, recv.data(), rc);
}

}  // namespace

int ExpertParallel::owner(int expert) const {
  int r = 0;
  while (expert >= bounds[r + 1]) r++;
  return r;
}

// Dispatch -> local experts -> combine. Assignments (i*K+k) are sent in ascending (expert, assignment)
// order, which is also ascending destination rank since each rank owns a contiguous block of experts.
// Received rows are grouped by local expert with a stable sort (source rank, then the sender's order), so
// every order is fixed: no atomics, bitwise reproducible, and each row's result independent of the others.
void route_and_run_experts(const ModelConfig& cfg, const Weights& W, const float* x, MoeActs& a, int N,
                           const ExpertParallel* ep) {
  const int C = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, H = cfg.moe_intermediate;
  const int e0 = cfg.expert_begin, El = cfg.local_experts();
  const int ranks = ep && ep->comm ? ep->comm->size() : 1;
  // Send order: counting sort of assignments by expert.
  std::vector<int> by_expert(E + 1, 0);
  for (int i = 0; i < N * K; i++) by_expert[a.experts[i] + 1]++;
  for (int e = 0; e < E; e++) by_expert[e + 1] += by_expert[e];
  a.send_assign.assign((size_t)N * K, 0);
  {
    std::vector<int> fill(by_expert.begin(), by_expert.end() - 1);
    for (int i = 0; i < N * K; i++) a.send_assign[fill[a.experts[i]]++] = i;
  }
  a.send_rows.assign(ranks, 0);
  for (int i = 0; i < N * K; i++) a.send_rows[ranks == 1 ? 0 : ep->owner(a.experts[i])]++;
  Vec xs((size_t)N * K * C);
  IVec es((size_t)N * K);
  for (int s = 0; s < N * K; s++) {
    std::memcpy(&xs[(size_t)s * C], x + (size_t)(a.send_assign[s] / K) * C, C * sizeof(float));
    es[s] = a.experts[a.send_assign[s]];
  }
  // Dispatch: counts, then rows and their expert ids.
  IVec er;
  Vec xr;
  a.fwd_alltoall_ms = 0;
  a.fwd_alltoall_bytes = 0;
  a.fwd_experts_ms = 0;
  if (ranks > 1) {
    const auto tc = std::chrono::steady_clock::now();
    a.recv_rows = ep->comm->exchange_counts(a.send_rows);
    int64_t total = 0;
    for (int64_t r : a.recv_rows) total += r;
    er.assign(total, 0);
    ep->comm->all_to_all_v(es.data(), a.send_rows, er.data(), a.recv_rows);
    a.fwd_alltoall_ms += ms_since(tc);
  } else {
    a.recv_rows = a.send_rows;
    er = es;
  }
  exchange_rows(ep, xs, a.send_rows, xr, a.recv_rows, C, &a.fwd_alltoall_ms, &a.fwd_alltoall_bytes);
  const int R = (int)er.size();
  // Group received rows by local expert (stable).
  a.start.assign(El + 1, 0);
  for (int r = 0; r < R; r++) {
    MP_CHECK_INTERNAL(er[r] >= e0 && er[r] < e0 + El, "moe: received a row for an expert this rank does not own");
    a.start[er[r] - e0 + 1]++;
  }
  for (int e = 0; e < El; e++) a.start[e + 1] += a.start[e];
  a.group_order.assign(R, 0);
  {
    std::vector<int> fill(a.start.begin(), a.start.end() - 1);
    for (int r = 0; r < R; r++) a.group_order[fill[er[r] - e0]++] = r;
  }
  a.xg.assign((size_t)R * C, 0.f);
  for (int m = 0; m < R; m++) std::memcpy(&a.xg[(size_t)m * C], &xr[(size_t)a.group_order[m] * C], C * sizeof(float));
  a.gate.assign((size_t)R * H, 0.f);
  a.up.assign((size_t)R * H, 0.f);
  a.act.assign((size_t)R * H, 0.f);
  Vec yg((size_t)R * C);
  const auto te = std::chrono::steady_clock::now();
  for (int e = 0; e < El; e++) {
    const int m0 = a.start[e], mn = a.start[e + 1] - m0;
    if (mn == 0) continue;
    const float* wg = W.at(W.o.expert_gate) + (size_t)e * H * C;
    const float* wu = W.at(W.o.expert_up) + (size_t)e * H * C;
    const float* wd = W.at(W.o.expert_down) + (size_t)e * C * H;
    cpu::matmul_forward(&a.gate[(size_t)m0 * H], &a.xg[(size_t)m0 * C], wg, nullptr, mn, C, H);
    cpu::matmul_forward(&a.up[(size_t)m0 * H], &a.xg[(size_t)m0 * C], wu, nullptr, mn, C, H);
    cpu::swiglu_forward(&a.act[(size_t)m0 * H], &a.gate[(size_t)m0 * H], &a.up[(size_t)m0 * H], (size_t)mn * H);
    cpu::matmul_forward(&yg[(size_t)m0 * C], &a.act[(size_t)m0 * H], wd, nullptr, mn, H, C);
  }
  a.fwd_experts_ms += ms_since(te);
  // Combine: outputs back in receive order, home to their ranks, into each assignment's slot.
  Vec yr((size_t)R * C), ys;
  for (int m = 0; m < R; m++) std::memcpy(&yr[(size_t)a.group_order[m] * C], &yg[(size_t)m * C], C * sizeof(float));
  exchange_rows(ep, yr, a.recv_rows, ys, a.send_rows, C, &a.fwd_alltoall_ms, &a.fwd_alltoall_bytes);
  a.eout.assign((size_t)N * K * C, 0.f);
  for (int s = 0; s < N * K; s++) std::memcpy(&a.eout[(size_t)a.send_assign[s] * C], &ys[(size_t)s * C], C * sizeof(float));
}

// Mirror of the dispatch: each assignment's output gradient goes to the expert's rank, the expert's
// backward runs there (its weight gradients stay there), input gradients come home and are added in send
// order.
void experts_backward(const ModelConfig& cfg, const Weights& W, const Weights& G, const float* dout, float* dx_acc,
                      const MoeActs& a, int N, const ExpertParallel* ep) {
  const int C = cfg.hidden, K = cfg.top_k, H = cfg.moe_intermediate, El = cfg.local_experts();
  Vec dys((size_t)N * K * C), dyr;
  for (int s = 0; s < N * K; s++) {
    const int as = a.send_assign[s];
    const float w = a.weights[as];
    const float* d = dout + (size_t)(as / K) * C;
    for (int c = 0; c < C; c++) dys[(size_t)s * C + c] = w * d[c];
  }
  a.bwd_alltoall_ms = 0;
  a.bwd_alltoall_bytes = 0;
  a.bwd_experts_ms = 0;
  exchange_rows(ep, dys, a.send_rows, dyr, a.recv_rows, C, &a.bwd_alltoall_ms, &a.bwd_alltoall_bytes);
  const int R = (int)a.group_order.size();
  Vec dy((size_t)R * C), dact((size_t)R * H), dg((size_t)R * H), du((size_t)R * H), dxg((size_t)R * C, 0.f);
  for (int m = 0; m < R; m++) std::memcpy(&dy[(size_t)m * C], &dyr[(size_t)a.group_order[m] * C], C * sizeof(float));
  const auto te = std::chrono::steady_clock::now();
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
  a.bwd_experts_ms += ms_since(te);
  Vec dxr((size_t)R * C), dxs;
  for (int m = 0; m < R; m++) std::memcpy(&dxr[(size_t)a.group_order[m] * C], &dxg[(size_t)m * C], C * sizeof(float));
  exchange_rows(ep, dxr, a.recv_rows, dxs, a.send_rows, C, &a.bwd_alltoall_ms, &a.bwd_alltoall_bytes);
  for (int s = 0; s < N * K; s++) {
    float* d = dx_acc + (size_t)(a.send_assign[s] / K) * C;
    for (int c = 0; c < C; c++) d[c] += dxs[(size_t)s * C + c];
  }
}

void moe_forward(const ModelConfig& cfg, const Weights& W, const float* x, float* out, MoeActs& a, int N,
                 const int32_t* replay, const ExpertParallel* ep) {
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
  route_and_run_experts(cfg, W, x, a, N, ep);
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
                  float* dx_acc, const MoeActs& a, int N, const float* aux_dp, const ExpertParallel* ep) {
  const int C = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, H = cfg.moe_intermediate;
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
  experts_backward(cfg, W, G, dout, dx_acc, a, N, ep);
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
