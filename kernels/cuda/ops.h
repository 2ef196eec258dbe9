// The CUDA backend's fused ops (everything but the GEMMs, cuda/gemm.h, and attention, cuda/attention.h).
// Each forward sits next to its backward; argument order is (outputs, inputs, dimensions, stream). Every
// pointer is device memory unless said otherwise; every call is asynchronous on the given stream and checks
// its launch. The CPU ops (kernels/cpu/ops.h) are the reference; kernels/cuda/tests/ops_test.cu checks each
// op against them.
//
// Precision: the residual stream and every gradient are fp32; tensors that only feed a GEMM (normed rows,
// SwiGLU outputs, gradients a GEMM backward consumes) are written as bf16 (raw bits, bf16_bits).
// Accumulation rule: parameter gradients +=; activation gradients = unless the flag `accumulate` says +=.
// Determinism: no floating-point atomics; every reduction runs in a fixed order, so two runs give the
// same bits.
//
// Dimension legend: see moepilot/model.h (N rows, C hidden, E experts, K top-k, H expert hidden, V vocab).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/vendor.h"

namespace moepilot::gpu {

using bf16_bits = uint16_t;

// ---------------------------------------------------------------- casts and copies
// out[n] = bf16(inp[n]) (round to nearest even, as torch's .to(bfloat16)).
void cast_f32_to_bf16(bf16_bits* out, const float* inp, size_t n, Stream s);
void cast_bf16_to_f32(float* out, const bf16_bits* inp, size_t n, Stream s);
// out[rows_pad, cols] = bf16(inp[rows, cols]) with zero rows below `rows`: weights whose output dimension is
// padded to the GEMM's multiple of 8 (a router of 60 experts, the shared expert's one-output gate).
void pad_rows_to_bf16(bf16_bits* out, const float* inp, int rows, int rows_pad, int cols, Stream s);
// dst[n] += src[n].
void add_inplace(float* dst, const float* src, size_t n, Stream s);
// x[n] = value (value == 0 for fill_uniform's "no randomness" case is a memset); fill_uniform: x[i] uniform in
// [-scale, scale) from a hash of (seed, i): the same values on every device and run (benchmarks' weights).
void fill_constant(float* x, float value, size_t n, Stream s);
void fill_uniform(float* x, size_t n, uint64_t seed, float scale, Stream s);

// ---------------------------------------------------------------- embedding
// out[N,C] = wte[tokens[i]].
void embedding_forward(float* out, const int32_t* tokens, const float* wte, int N, int C, Stream s);
// dwte[tok] += sum of dout rows of that token, in row order. The rows are grouped by token on the host
// (tokens are host data): order[N] rows sorted by token (stable), starts[U+1] the groups, uniq[U] their tokens.
void embedding_backward(float* dwte, const float* dout, const int32_t* order, const int32_t* starts,
                        const int32_t* uniq, int U, int C, Stream s);

// ---------------------------------------------------------------- RMSNorm
// out = weight * x * rstd, rstd = 1/sqrt(mean(x^2) + eps), over rows of C. out32 and/or out16 (either may be
// null); rstd[N] kept for backward.
void rmsnorm_forward(float* out32, bf16_bits* out16, float* rstd, const float* inp, const float* weight, int N, int C,
                     float eps, Stream s);
// dinp[N,C] (= or += with accumulate) and dweight[C] (+=) from dout[N,C]; with dinp16, dinp's values rounded to bf16
// there too (the bits of a cast_f32_to_bf16 after it: the operand of the GEMMs that read it). dweight null: skipped
// (rmsnorm_backward_dweight makes it, e.g. on another stream; the same bits).
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int N, int C, bool accumulate, Stream s, bf16_bits* dinp16 = nullptr);
void rmsnorm_backward_dweight(float* dweight, const float* dout, const float* inp, const float* rstd, int N, int C,
                              Stream s);

// ---------------------------------------------------------------- RoPE (rotate-half), in place on x[N, heads, HD]
// cos/sin [P, HD/2]: the angle table pos * inv_freq (computed on the host in double and rounded, as the CPU
// op does, so both backends rotate by the same numbers); pos[N] < P.
// Host: the tables for positions [0, P): cos/sin [P, HD/2] of pos * inv_freq[j], in double then rounded.
void rope_tables(std::vector<float>& cos, std::vector<float>& sin, int P, const std::vector<double>& inv_freq);
void rope_forward(float* x, const int32_t* pos, const float* cos, const float* sin, int N, int heads, int HD,
                  Stream s);
// The forward rotation of x written to out [N, heads, HD] as bf16, x unchanged: the same bits as rope_forward
// then cast_f32_to_bf16.
void rope_forward_bf16(bf16_bits* out, const float* x, const int32_t* pos, const float* cos, const float* sin, int N,
                       int heads, int HD, Stream s);
void rope_backward(float* dx, const int32_t* pos, const float* cos, const float* sin, int N, int heads, int HD,
                   Stream s);
// The backward rotation of dx written to out as bf16, dx unchanged: the bits of rope_backward then cast_f32_to_bf16.
void rope_backward_bf16(bf16_bits* out, const float* dx, const int32_t* pos, const float* cos, const float* sin, int N,
                        int heads, int HD, Stream s);

// ---------------------------------------------------------------- SwiGLU
// act[n] = bf16(silu(gate) * up).
void swiglu_forward(bf16_bits* act, const float* gate, const float* up, size_t n, Stream s);
// dgate, dup (bf16, for the GEMM backward) from dact (fp32). With width > 0 the n elements are rows of `width`
// and the outputs' rows are out_ld apart (grouped_gemm_backward_pair's dGU: dup = dgate + width, out_ld = 2 width).
void swiglu_backward(bf16_bits* dgate, bf16_bits* dup, const float* dact, const float* gate, const float* up,
                     size_t n, Stream s, int width = 0, int64_t out_ld = 0);

// ---------------------------------------------------------------- router
// probs[N,E] = softmax(logits[N, ld]); top-k descending (lower index wins ties), weights[N,K] and experts[N,K],
// renormalised to sum 1 when renormalize. E <= 1024, K <= 32.
void router_forward(float* probs, float* weights, int32_t* experts, const float* logits, int ld, int N, int E, int K,
                    bool renormalize, Stream s);
// Router replay: experts[N,K] = replay[N,K], weights = their probabilities (renormalised when asked).
void router_replay(float* weights, int32_t* experts, const float* probs, const int32_t* replay, int N, int E, int K,
                   bool renormalize, Stream s);
// dlogits[N, ld] (bf16; columns E..ld-1 zeroed) from dweights[N,K] and aux_dp[E] (the load-balancing gradient
// on every row's probabilities; may be null).
void router_backward(bf16_bits* dlogits, int ld, const float* dweights, const float* aux_dp, const float* probs,
                     const float* weights, const int32_t* experts, int N, int E, int K, bool renormalize, Stream s);
// out[E] (=) = column sums of x[N, E] (row stride ld), rows added in order: the router's probability mass.
void column_sums(float* out, const float* x, int ld, int N, int E, Stream s);

// ---------------------------------------------------------------- MoE dispatch (one device: all experts local)
// Counting sort of the N*K assignments a = i*K + k by expert, stable in a: order[m] = the assignment at
// grouped row m, pos_of[a] = its grouped row, offsets[E+1] the rows of each expert, counts[E] (=).
void moe_permute(int32_t* order, int32_t* pos_of, int32_t* offsets, int32_t* counts, const int32_t* experts, int NK,
                 int E, Stream s);
// xg[m, C] = x[order[m] / K, C] (bf16 rows).
void moe_gather(bf16_bits* xg, const bf16_bits* x, const int32_t* order, int NK, int K, int C, Stream s);
// h[i] = resid[i] + (sum_k w[i,k] * y[pos_of[i*K+k]] (k order) + sigmoid(s_logit[i*s_ld]) * s_out[i] (when s_out));
// resid null (or h): h += the same sum.
void moe_combine_forward(float* h, const float* y, const int32_t* pos_of, const float* weights, const float* s_out,
                         const float* s_logit, int s_ld, int N, int C, int K, Stream s, const float* resid = nullptr);
// From dh[N,C] (gradient of the block's output): dy[pos] = bf16(w * dh_i) (grouped rows), dweights[N,K] =
// dh_i . y[pos]; with the shared expert, ds_out = bf16(sigmoid * dh_i) and ds_logit[i, s_ld] = bf16(dh_i . s_out_i
// * s (1 - s)) in column 0, zeros in the pad columns.
void moe_combine_backward(bf16_bits* dy, float* dweights, bf16_bits* ds_out, bf16_bits* ds_logit, const float* dh,
                          const float* y, const int32_t* pos_of, const float* weights, const float* s_out,
                          const float* s_logit, int s_ld, int N, int C, int K, Stream s);
// dx[i] += sum_k (dxa[pos] + dxb[pos]) over the token's assignments (dxb may be null).
void moe_scatter_add(float* dx, const float* dxa, const float* dxb, const int32_t* pos_of, int N, int C, int K,
                     Stream s);

// ---------------------------------------------------------------- LM head
// Logits in vocabulary chunks of kLmHeadChunk columns, through gemm_forward, with an online max / sum of
// exponentials across chunks: never [N, V] logits unless logits_out asks for them. The one code path for the
// trainer's logprobs and the rollout's sampling distribution: for each row, lse[i] = log-sum-exp of
// fp32(logit / T); logprob[i] = fp32(logit[target] / T) - lse[i] (0 where target < 0); entropy[i] (optional);
// logits_out[N, V] (optional) the unscaled logits. A row's numbers never depend on the other rows (the GEMM is
// batch-invariant and the chunking depends only on V).
constexpr int kLmHeadChunk = 8192;
// Scratch (floats) lm_head_forward / lm_head_backward need for N rows.
size_t lm_head_scratch_floats(int N, int V);
// A second stream (and two events of the caller's) on which lm_head_forward runs each chunk's log-sum-exp pass
// beside the next chunk's GEMM: the pass reads memory while the GEMM keeps the tensor cores busy, and the two fit
// on an SM together. Needs logits_out (each chunk then has columns of its own); the same kernels in the same order,
// so the same bits.
struct LmHeadSide {
  Stream stream = nullptr;
  Event fork = nullptr, join = nullptr;
};
void lm_head_forward(float* logprob, float* lse, float* entropy, float* logits_out, const bf16_bits* x,
                     const bf16_bits* W, const int32_t* target, int N, int C, int V, float temperature, float* scratch,
                     Stream s, const LmHeadSide* side = nullptr);
// As lm_head_forward with one temperature per row: temperature [N] on the device, each > 0 (the rollout: every
// sampling row at its own temperature, greedy rows at 1). Row i's numbers are bit for bit those of
// lm_head_forward at temperature[i] (the same kernels; only where the temperature is read from differs).
void lm_head_forward_rows(float* logprob, float* lse, float* entropy, float* logits_out, const bf16_bits* x,
                          const bf16_bits* W, const int32_t* target, const float* temperature, int N, int C, int V,
                          float* scratch, Stream s);
// dx[N,C] (=) and dW[V,C] (+=; = when accumulate_dW is false) for the loss gradient g[N] on each row's logprob.
// logits [N,V]: the forward's logits_out when it kept them (saves recomputing them), or null. dlogits [N,V] bf16
// (optional, with logits; 16-byte aligned): room for the whole vocabulary's dlogits, so that one pass and two GEMMs
// over V replace the per-chunk ones (the same dlogits; dx and dW summed in another order). dW null: dx only (with
// dlogits, the caller can then make dW from them: gemm_backward over the whole vocabulary, the same bits).
void lm_head_backward(float* dx, float* dW, const float* g, const float* lse, const float* logits, const bf16_bits* x,
                      const bf16_bits* W, const int32_t* target, int N, int C, int V, float temperature, float* scratch,
                      Stream s, bool accumulate_dW = true, bf16_bits* dlogits = nullptr);

// ---------------------------------------------------------------- loss gradient
// The loss gradient on the device, so that a pass needs no host round trip between its forward and its backward.
// g[i] = fp32(w[i] * d per_token_i / d logprob_i), with policy_loss's arithmetic (model/loss.cpp, in double): SFT
// -1; GRPO the clipped surrogate's term (-ratio * A unless clipped) plus beta times the k1 (1) or k3 (1 - exp(ref -
// logprob)) KL term when ref_logprobs is given. w [N] (double) from loss_row_weights: 0 where the mask is 0, and g is
// then 0. advantages, old_logprobs: GRPO only (null for SFT).
struct PolicyGradArgs {
  bool grpo = false;
  float eps_low = 0, eps_high = 0, beta = 0;
  bool k3 = false;
  const float *advantages = nullptr, *old_logprobs = nullptr, *ref_logprobs = nullptr;
};
void policy_grad(float* g, const float* logprob, const double* w, const PolicyGradArgs& a, int N, Stream s);
// The load-balancing loss's gradient on each expert's probability, from one pass's per-layer assignment counts
// counts [moe_layers, E] over N rows: aux_dp[e] = fp32(coef * E * F_e / (moe_layers * N)), F_e = sum over layers
// of counts[., e] / (moe_layers * N) (forward_backward's host arithmetic, one rank).
void aux_load_grad(float* aux_dp, const int32_t* counts, int moe_layers, int E, int N, float coef, Stream s);

// ---------------------------------------------------------------- optimizer
// Blocks of sum_squares (scratch of that many doubles).
constexpr int kSumSquaresBlocks = 512;
// *out (device double, =) = sum of x^2, in a fixed order.
void sum_squares(double* out, const float* x, size_t n, double* scratch, Stream s);
void sum_squares(double* out, const bf16_bits* x, size_t n, double* scratch, Stream s);  // of the widened values
// AdamW with decoupled weight decay on n elements (the CPU op's arithmetic); also refreshes the bf16 copy
// param16 (may be null). bc1/bc2 = 1 - beta^step computed by the caller.
void adamw_update(float* param, bf16_bits* param16, const float* grad, float* m, float* v, size_t n, float lr,
                  float beta1, float beta2, float bc1, float bc2, float eps, float weight_decay, float grad_scale,
                  Stream s);
// Same with bf16 gradients (widened: the arithmetic above on the same fp32 value).
void adamw_update(float* param, bf16_bits* param16, const bf16_bits* grad, float* m, float* v, size_t n, float lr,
                  float beta1, float beta2, float bc1, float bc2, float eps, float weight_decay, float grad_scale,
                  Stream s);

}  // namespace moepilot::gpu
