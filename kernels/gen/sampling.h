// Token sampling for rollout generation: one row of logits [V] in, one token and its logprob out.
//
// Dimension legend: V vocabulary size, R rows (one row per sequence being generated in a batch).
//
// Definition of the sampled distribution (what every backend must reproduce):
//   1. z = logits / T (double), w_i = fp32(exp(z_i - max z)): unnormalised probabilities, max weight exactly 1.
//      w_i = 0 where fp32(z_i - max z) < kWeightFloor (-86: weights under ~4.5e-38, which no mass can register,
//      as every mass holds the max weight 1; the exponential then never takes the subnormal path, which the GPU
//      kernel's instruction count feels). Sums of weights are taken in double, in index order. Temperature 0
//      means greedy (see 5).
//   2. Filters, each keeping an upper set of the weights, combined as HF/vLLM chain them:
//      top-k (k > 0):  keep i iff #{j : w_j > w_i} < k. Ties at the k-th largest weight are ALL kept, so more
//                      than k tokens may survive (the rule needs no index order, as a GPU block needs).
//      top-p (p < 1):  over the top-k set renormalised: keep i iff  sum{w_j : w_j > w_i} < p * Z_k, where Z_k is
//                      the mass of the top-k set (the whole mass when top-k is off). Tokens tied with i fall
//                      together: the kept set is the smallest upper set whose mass reaches p * Z_k.
//      min-p (m > 0):  keep i iff w_i >= m * max w (= m). Relative to the max, so unchanged by renormalising.
//      A token is kept iff it passes every active filter; the top token always is.
//   3. The result is drawn from w restricted to the kept set, renormalised (exact up to the 2^-24 resolution of
//      the uniforms and double rounding of the CDF).
//   4. logprob = log_softmax(logits / T)[token] over the FULL vocabulary (the trainer's distribution, not the
//      truncated one), computed from the same pass.
//   5. Greedy (T == 0): argmax of the logits, lowest index on ties; logprob = log_softmax(logits)[token], i.e.
//      at temperature 1, since log_softmax at T -> 0 is degenerate (0 or -inf).
//
// Algorithm (no sort of the vocabulary; each step is a pass a GPU block can run as a reduction/scan):
// sorting-free rejection sampling in the style FlashInfer describes, dual-pivot variant. The state is a low
// pivot (every kept token has w > low) and a high pivot (some token with w <= high is kept, hence all tokens
// above high are). Each round draws t by inverse CDF over {w > low}; if t is kept it is returned. Since every
// round samples from a superset of the kept set, conditioning on acceptance gives exactly the renormalised
// kept distribution. Otherwise low rises to w_t and a second pivot (w_t + high) / 2, tested in the same pass,
// moves low or high: the interval halves each round, so rounds grow like log(1 / gap), not with V.
// min-p is a single pivot set before the first round. Top-p with top-k needs Z_k; it is found lazily, only
// when a check cannot be settled by the bound Z_k <= total mass, by bisection on the fp32 bit pattern of the
// weights (at most 31 counting passes, still no sort).
//
// Randomness: Philox4x32-10 (philox.h), key = seed (k0 = low 32 bits, k1 = high 32 bits), counter
//   c0 = (sample_index << 16) | (draw >> 2),  c1 = step,  c2 = request_id low 32,  c3 = request_id high 32;
// the draw-th uniform is word (draw & 3) of that block, converted by uniform_from_u32. A request's numbers
// depend only on (seed, request_id, sample_index, step), never on the batch. Hence sample_index < 2^16 and at
// most 2^18 uniforms per row and step (the rejection loop uses one per round, far fewer in practice).
#pragma once
#include <cstdint>

#include "gen/philox.h"

namespace moepilot::gen {

constexpr uint32_t kMaxSampleIndex = 1u << 16;  // sample_index must be below this
constexpr uint32_t kMaxDraws = 1u << 18;         // uniforms available per (request, sample, step)
constexpr float kWeightFloor = -86.0f;           // z - max z below this: weight 0 (definition step 1)

struct SamplingParams {
  float temperature = 1.0f;  // >= 0; 0 = greedy
  float top_p = 1.0f;        // (0, 1]; 1 = off
  float min_p = 0.0f;        // [0, 1); 0 = off
  int top_k = 0;             // >= 0; 0 = off
  uint64_t seed = 0;
  uint64_t request_id = 0;
  uint32_t sample_index = 0;  // < kMaxSampleIndex
  uint32_t step = 0;
};

struct SampleResult {
  int32_t token;
  float logprob;  // log_softmax(logits / T)[token]; T = 1 for greedy
};

// Throws moepilot::Error(InvalidArgument) naming the bad field.
void validate_sampling_params(const SamplingParams& p, int V);

// The draw-th uniform in [0, 1) of the stream (seed, request_id, sample_index, step).
float sampling_uniform(const SamplingParams& p, uint32_t draw);

// logits [V], scratch [V] (overwritten). rounds (optional): number of draws used (1 = accepted at once).
// Throws InvalidArgument on bad params or a NaN / +inf / all -inf row.
SampleResult sample_row(const float* logits, int V, const SamplingParams& p, float* scratch, int32_t* rounds = nullptr);

// logits [R, V], params [R], out [R], rounds [R] (optional). Rows run in parallel (OpenMP); each row's result
// depends only on its logits and params. Errors name the row.
void sample_rows(const float* logits, int R, int V, const SamplingParams* params, SampleResult* out,
                 int32_t* rounds = nullptr);

// Test oracle: the kept-and-renormalised distribution of (2)-(3), found by sorting the weights. out [V]
// (one-hot at the argmax for greedy). O(V log V); not used by the sampler.
void exact_filtered_probs(const float* logits, int V, const SamplingParams& p, double* out);

}  // namespace moepilot::gen
