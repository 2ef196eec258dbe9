// CPU backend: one function per op, forward and backward side by side, argument order
// (outputs, inputs, dimensions). Accumulation rule: parameter gradients +=, activation gradients =,
// unless the argument is named `..._acc` (accumulated +=).
//
// The forward ops are batch-invariant: every output row is computed by the same instructions in the same
// order whatever other rows share the call. That is what makes rollout (decode, one row at a time) and the
// trainer (whole sequences) produce bit-identical logprobs. Backward ops use OpenBLAS.
// Dimension legend: see moepilot/model.h.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moepilot::cpu {

// ---- matmul: out[N,OC] = inp[N,C] @ weight[OC,C]^T + bias[OC] (bias may be null). Batch-invariant.
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int N, int C, int OC);
// dinp_acc[N,C] += dout[N,OC] @ weight[OC,C] (skipped when null); dweight[OC,C] += dout^T @ inp;
// dbias[OC] += column sums of dout (skipped when null).
void matmul_backward(float* dinp_acc, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int N, int C, int OC);

// ---- RMSNorm over rows of C: out = weight * x / sqrt(mean(x^2) + eps); rstd[N] kept for backward.
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C, float eps);
void rmsnorm_backward(float* dinp_acc, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int N, int C);

// ---- RoPE (rotate-half layout) in place on x[N, heads, HD], position pos[N], inv_freq[HD/2].
void rope_forward(float* x, const int32_t* pos, int N, int heads, int HD, const double* inv_freq);
void rope_backward(float* dx, const int32_t* pos, int N, int heads, int HD, const double* inv_freq);  // in place

// ---- causal GQA attention over one packed sequence of T rows.
// q [T, NH, HD], k/v [T, KVH, HD] (row stride given in floats), out [T, NH, HD], probs [NH, T, T] (lower
// triangle written). scale = 1/sqrt(HD).
void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v, int T, int NH,
                       int KVH, int HD, int q_stride, int kv_stride);
// dq/dk/dv are accumulated (+=) into the caller's zeroed buffers.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* probs, const float* q,
                        const float* k, const float* v, int T, int NH, int KVH, int HD, int q_stride, int kv_stride);

// ---- SwiGLU: act = silu(gate) * up over n elements.
void swiglu_forward(float* act, const float* gate, const float* up, size_t n);
void swiglu_backward(float* dgate, float* dup, const float* dact, const float* gate, const float* up, size_t n);

// ---- router: probs[N,E] = softmax(logits); top-k (descending, lower index wins ties) with optional
// renormalisation: weights[N,K], experts[N,K].
void router_forward(float* probs, float* weights, int32_t* experts, const float* logits, int N, int E, int K,
                    bool renormalize);
// dlogits[N,E] from dweights[N,K] and dprobs_extra[N,E] (an extra gradient on the probabilities, e.g.
// from the load-balancing loss; may be null).
void router_backward(float* dlogits, const float* dweights, const float* dprobs_extra, const float* probs,
                     const float* weights, const int32_t* experts, int N, int E, int K, bool renormalize);

// ---- LM head over rows, in chunks, without keeping [N, V] logits: for each row i with target[i] >= 0,
// logprob[i] = log_softmax(x[i] @ W^T / temperature)[target[i]]; lse[i] (of the scaled logits) kept for
// backward; entropy optional. logits_out (optional) receives the unscaled [N, V]. Batch-invariant.
void lm_head_forward(float* logprob, float* lse, float* entropy, float* logits_out, const float* x, const float* W,
                     const int32_t* target, int N, int C, int V, float temperature);
// dx[N,C] (=) and dW[V,C] (+=) for the loss gradient g[N] on each row's logprob (rows with g == 0 skip).
void lm_head_backward(float* dx, float* dW, const float* g, const float* lse, const float* x, const float* W,
                      const int32_t* target, int N, int C, int V, float temperature);
// Scales a logits row by 1/temperature in place, the one way both the trainer and the sampler do it.
inline void scale_logits(float* row, int V, float temperature) {
  if (temperature != 1.f)
    for (int v = 0; v < V; v++) row[v] = row[v] / temperature;
}

// ---- reductions and the optimizer
double sum_squares(const float* x, size_t n);
void adamw_update(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                  float eps, float weight_decay, float grad_scale, int64_t step);

}  // namespace moepilot::cpu
