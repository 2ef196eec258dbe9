// CPU ops other than matmul: RMSNorm, RoPE, attention, SwiGLU, router, LM head.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/matmul_rows.h"
#include "cpu/ops.h"

namespace moepilot::cpu {

// ---------------------------------------------------------------- RMSNorm
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C, float eps) {
#pragma omp parallel for if (N > 64)
  for (int i = 0; i < N; i++) {
    const float* x = inp + (size_t)i * C;
    double ss = 0;
    for (int c = 0; c < C; c++) ss += (double)x[c] * x[c];
    const float r = (float)(1.0 / std::sqrt(ss / C + (double)eps));
    float* o = out + (size_t)i * C;
    for (int c = 0; c < C; c++) o[c] = weight[c] * (x[c] * r);
    if (rstd) rstd[i] = r;
  }
}

void rmsnorm_backward(float* dinp_acc, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int N, int C) {
  for (int i = 0; i < N; i++) {
    const float* x = inp + (size_t)i * C;
    const float* dy = dout + (size_t)i * C;
    const float r = rstd[i];
    double dot = 0;  // sum_c (w*dy)_c * x_c
    for (int c = 0; c < C; c++) dot += (double)weight[c] * dy[c] * x[c];
    const float k = (float)(dot * r * r * r / C);
    float* dx = dinp_acc + (size_t)i * C;
    for (int c = 0; c < C; c++) {
      dx[c] += weight[c] * dy[c] * r - x[c] * k;
      dweight[c] += dy[c] * x[c] * r;
    }
  }
}

// ---------------------------------------------------------------- RoPE
// Angles in double, then rounded: what a float64 reference computes.
static inline void rope_angles(double pos, double inv_freq, float* c, float* s) {
  const double a = pos * inv_freq;
  *c = (float)std::cos(a);
  *s = (float)std::sin(a);
}

void rope_forward(float* x, const int32_t* pos, int N, int heads, int HD, const double* inv_freq) {
  const int half = HD / 2;
#pragma omp parallel for if (N > 64)
  for (int i = 0; i < N; i++) {
    std::vector<float> cs(half), sn(half);
    for (int j = 0; j < half; j++) rope_angles(pos[i], inv_freq[j], &cs[j], &sn[j]);
    for (int h = 0; h < heads; h++) {
      float* v = x + ((size_t)i * heads + h) * HD;
      for (int j = 0; j < half; j++) {
        const float x1 = v[j], x2 = v[j + half];
        v[j] = x1 * cs[j] - x2 * sn[j];
        v[j + half] = x2 * cs[j] + x1 * sn[j];
      }
    }
  }
}

void rope_backward(float* dx, const int32_t* pos, int N, int heads, int HD, const double* inv_freq) {
  const int half = HD / 2;
  for (int i = 0; i < N; i++) {
    std::vector<float> cs(half), sn(half);
    for (int j = 0; j < half; j++) rope_angles(pos[i], inv_freq[j], &cs[j], &sn[j]);
    for (int h = 0; h < heads; h++) {
      float* v = dx + ((size_t)i * heads + h) * HD;
      for (int j = 0; j < half; j++) {
        const float d1 = v[j], d2 = v[j + half];
        v[j] = d1 * cs[j] + d2 * sn[j];
        v[j + half] = -d1 * sn[j] + d2 * cs[j];
      }
    }
  }
}

// ---------------------------------------------------------------- attention
void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v, int T, int NH,
                       int KVH, int HD, int q_stride, int kv_stride) {
  const int group = NH / KVH;
  const float scale = 1.f / std::sqrt((float)HD);
#pragma omp parallel for collapse(2) if (T > 16)
  for (int h = 0; h < NH; h++) {
    for (int t = 0; t < T; t++) {
      const int kvh = h / group;
      const float* qt = q + (size_t)t * q_stride + h * HD;
      float* p = probs + ((size_t)h * T + t) * T;
      attention_row(out + (size_t)t * q_stride + h * HD, p, qt, t + 1, HD, scale,
                    [&](int j) { return k + (size_t)j * kv_stride + kvh * HD; },
                    [&](int j) { return v + (size_t)j * kv_stride + kvh * HD; });
    }
  }
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* probs, const float* q,
                        const float* k, const float* v, int T, int NH, int KVH, int HD, int q_stride, int kv_stride) {
  const int group = NH / KVH;
  const float scale = 1.f / std::sqrt((float)HD);
  // Parallel over KV heads: each owns its dk/dv slices, so no two threads write the same element.
#pragma omp parallel for if (T > 16 && KVH > 1)
  for (int kvh = 0; kvh < KVH; kvh++) {
    std::vector<float> dp(T);
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
      for (int t = 0; t < T; t++) {
        const float* p = probs + ((size_t)h * T + t) * T;
        const float* dot = dout + (size_t)t * q_stride + h * HD;
        const float* qt = q + (size_t)t * q_stride + h * HD;
        float* dqt = dq + (size_t)t * q_stride + h * HD;
        double sum = 0;
        for (int j = 0; j <= t; j++) {
          const float* vj = v + (size_t)j * kv_stride + kvh * HD;
          float d = 0;
          for (int c = 0; c < HD; c++) d += dot[c] * vj[c];
          dp[j] = d;
          sum += (double)p[j] * d;
        }
        for (int j = 0; j <= t; j++) {
          const float ds = p[j] * (dp[j] - (float)sum) * scale;
          const float* kj = k + (size_t)j * kv_stride + kvh * HD;
          float* dkj = dk + (size_t)j * kv_stride + kvh * HD;
          float* dvj = dv + (size_t)j * kv_stride + kvh * HD;
          for (int c = 0; c < HD; c++) {
            dqt[c] += ds * kj[c];
            dkj[c] += ds * qt[c];
            dvj[c] += p[j] * dot[c];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- SwiGLU
static inline float silu(float x) { return x / (1.f + std::exp(-x)); }

void swiglu_forward(float* act, const float* gate, const float* up, size_t n) {
  for (size_t i = 0; i < n; i++) act[i] = silu(gate[i]) * up[i];
}

void swiglu_backward(float* dgate, float* dup, const float* dact, const float* gate, const float* up, size_t n) {
  for (size_t i = 0; i < n; i++) {
    const float sg = 1.f / (1.f + std::exp(-gate[i]));
    const float s = gate[i] * sg;
    dup[i] = dact[i] * s;
    dgate[i] = dact[i] * up[i] * (sg * (1.f + gate[i] * (1.f - sg)));
  }
}

// ---------------------------------------------------------------- router
void router_forward(float* probs, float* weights, int32_t* experts, const float* logits, int N, int E, int K,
                    bool renormalize) {
  for (int i = 0; i < N; i++) {
    const float* z = logits + (size_t)i * E;
    float* p = probs + (size_t)i * E;
    float mx = z[0];
    for (int e = 1; e < E; e++) mx = std::max(mx, z[e]);
    double s = 0;
    for (int e = 0; e < E; e++) s += std::exp((double)z[e] - mx);
    for (int e = 0; e < E; e++) p[e] = (float)(std::exp((double)z[e] - mx) / s);
    int32_t* ex = experts + (size_t)i * K;
    float* w = weights + (size_t)i * K;
    // Top-k by selection: K passes, each taking the largest probability not yet taken (lowest index on ties).
    for (int kk = 0; kk < K; kk++) {
      int best = -1;
      for (int e = 0; e < E; e++) {
        bool taken = false;
        for (int j = 0; j < kk; j++) taken |= ex[j] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      ex[kk] = best;
      w[kk] = p[best];
    }
    if (renormalize) {
      float sum = 0;
      for (int kk = 0; kk < K; kk++) sum += w[kk];
      for (int kk = 0; kk < K; kk++) w[kk] /= sum;
    }
  }
}

void router_backward(float* dlogits, const float* dweights, const float* dprobs_extra, const float* probs,
                     const float* weights, const int32_t* experts, int N, int E, int K, bool renormalize) {
  std::vector<float> dp(E);
  for (int i = 0; i < N; i++) {
    const float* p = probs + (size_t)i * E;
    const float* w = weights + (size_t)i * K;
    const float* dw = dweights + (size_t)i * K;
    const int32_t* ex = experts + (size_t)i * K;
    for (int e = 0; e < E; e++) dp[e] = dprobs_extra ? dprobs_extra[(size_t)i * E + e] : 0.f;
    if (renormalize) {
      // w_k = p_k / S, S = sum_j p_j  =>  dp_k = (dw_k - sum_j w_j dw_j) / S
      float S = 0, wdw = 0;
      for (int kk = 0; kk < K; kk++) {
        S += p[ex[kk]];
        wdw += w[kk] * dw[kk];
      }
      for (int kk = 0; kk < K; kk++) dp[ex[kk]] += (dw[kk] - wdw) / S;
    } else {
      for (int kk = 0; kk < K; kk++) dp[ex[kk]] += dw[kk];
    }
    double pdp = 0;
    for (int e = 0; e < E; e++) pdp += (double)p[e] * dp[e];
    float* dz = dlogits + (size_t)i * E;
    for (int e = 0; e < E; e++) dz[e] = p[e] * (dp[e] - (float)pdp);
  }
}

// ---------------------------------------------------------------- LM head
void lm_head_forward(float* logprob, float* lse, float* entropy, float* logits_out, const float* x, const float* W,
                     const int32_t* target, int N, int C, int V, float temperature) {
  const int R = 16;  // rows per chunk: the [R, V] logits of one chunk are all that is ever alive
  std::vector<float> chunk((size_t)R * V);
  for (int r0 = 0; r0 < N; r0 += R) {
    const int rn = std::min(R, N - r0);
    float* lg = logits_out ? logits_out + (size_t)r0 * V : chunk.data();
    matmul_forward(lg, x + (size_t)r0 * C, W, nullptr, rn, C, V);
    std::vector<float> scaled(temperature != 1.f ? V : 0);
    for (int r = 0; r < rn; r++) {
      const int i = r0 + r;
      const float* row = lg + (size_t)r * V;
      if (temperature != 1.f) {
        std::memcpy(scaled.data(), row, V * sizeof(float));
        scale_logits(scaled.data(), V, temperature);
        row = scaled.data();
      }
      LogSoftmaxRow s = log_softmax_row(row, V, entropy != nullptr);
      lse[i] = s.lse;
      if (entropy) entropy[i] = s.entropy;
      if (logprob) logprob[i] = target && target[i] >= 0 ? row[target[i]] - s.lse : 0.f;
    }
  }
}

void lm_head_backward(float* dx, float* dW, const float* g, const float* lse, const float* x, const float* W,
                      const int32_t* target, int N, int C, int V, float temperature) {
  const int R = 64;
  std::vector<float> lg((size_t)R * V);
  std::memset(dx, 0, (size_t)N * C * sizeof(float));
  for (int r0 = 0; r0 < N; r0 += R) {
    const int rn = std::min(R, N - r0);
    bool any = false;
    for (int r = 0; r < rn; r++) any |= g[r0 + r] != 0.f;
    if (!any) continue;
    matmul_forward(lg.data(), x + (size_t)r0 * C, W, nullptr, rn, C, V);
    // d logprob_i / d logits = (onehot(target) - softmax(logits / T)) / T; times g_i.
    for (int r = 0; r < rn; r++) {
      const int i = r0 + r;
      float* row = lg.data() + (size_t)r * V;
      const float gi = g[i];
      if (gi == 0.f || target[i] < 0) {
        std::memset(row, 0, (size_t)V * sizeof(float));
        continue;
      }
      scale_logits(row, V, temperature);
      const float gt = gi / temperature;
      for (int v = 0; v < V; v++) row[v] = -gt * std::exp(row[v] - lse[i]);
      row[target[i]] += gt;
    }
    matmul_backward(dx + (size_t)r0 * C, dW, nullptr, lg.data(), x + (size_t)r0 * C, W, rn, C, V);
  }
}

}  // namespace moepilot::cpu
