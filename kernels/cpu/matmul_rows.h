// Row-level primitives shared by the trainer's forward and the rollout's decode step. Both paths call
// exactly these functions, so a row's numbers do not depend on which path computed it.
#pragma once
#include <cmath>

namespace moepilot::cpu {

struct LogSoftmaxRow {
  float lse;      // log(sum(exp(logits)))
  float entropy;  // -sum p log p (0 unless asked for)
};

// Log-sum-exp of one row in a fixed order (max, then a double-precision sum).
inline LogSoftmaxRow log_softmax_row(const float* logits, int V, bool want_entropy) {
  float mx = logits[0];
  for (int v = 1; v < V; v++) mx = logits[v] > mx ? logits[v] : mx;
  double s = 0;
  for (int v = 0; v < V; v++) s += std::exp((double)logits[v] - mx);
  const double lse = mx + std::log(s);
  LogSoftmaxRow r{(float)lse, 0.f};
  if (want_entropy) {
    double h = 0;
    for (int v = 0; v < V; v++) {
      const double lp = (double)logits[v] - lse;
      h -= std::exp(lp) * lp;
    }
    r.entropy = (float)h;
  }
  return r;
}

// One query row of causal attention over n keys: probs[n] (softmax of scaled scores) and out[HD].
// key(j)/value(j) return pointers to key/value j: contiguous rows for the trainer, paged blocks for decode.
template <class KeyAt, class ValueAt>
inline void attention_row(float* out, float* probs, const float* q, int n, int HD, float scale, KeyAt key,
                          ValueAt value) {
  float mx = -INFINITY;
  for (int j = 0; j < n; j++) {
    const float* kj = key(j);
    float s = 0;
    for (int c = 0; c < HD; c++) s += q[c] * kj[c];
    s *= scale;
    probs[j] = s;
    mx = s > mx ? s : mx;
  }
  double sum = 0;
  for (int j = 0; j < n; j++) {
    probs[j] = std::exp(probs[j] - mx);
    sum += probs[j];
  }
  const float inv = (float)(1.0 / sum);
  for (int c = 0; c < HD; c++) out[c] = 0.f;
  for (int j = 0; j < n; j++) {
    probs[j] *= inv;
    const float* vj = value(j);
    const float pj = probs[j];
    for (int c = 0; c < HD; c++) out[c] += pj * vj[c];
  }
}

}  // namespace moepilot::cpu
