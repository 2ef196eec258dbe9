// Sorting-free rejection sampling over one row of logits; the definition and the algorithm are described in
// gen/sampling.h. Every loop below is one pass over the row that a GPU block can run as a reduction or a
// scan; the CPU version keeps index order for every sum so that the sampler and the sorted oracle take
// their keep/reject decisions on bit-identical numbers.
#include "gen/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "moepilot/error.h"

namespace moepilot::gen {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Row preparation: weights and the normaliser

struct Prepared {
  int argmax;    // lowest index of the largest logit
  double zmax;   // logits[argmax] / T
  double total;  // sum of the fp32 weights, index order
};

// w [V] <- fp32(exp(logits / T - zmax)), 0 below the floor (sampling.h, step 1). Rejects NaN, +inf and rows with
// no finite logit.
Prepared prepare(const float* logits, int V, float T, float* w) {
  int argmax = -1;
  float best = -INFINITY;
  for (int i = 0; i < V; i++) {
    float x = logits[i];
    MP_CHECK_ARG(!std::isnan(x), "logits contain NaN at index " + std::to_string(i));
    MP_CHECK_ARG(x != INFINITY, "logits contain +inf at index " + std::to_string(i));
    if (x > best) best = x, argmax = i;
  }
  MP_CHECK_ARG(argmax >= 0, "logits row is all -inf: no token can be sampled");
  Prepared pr{argmax, (double)best / (double)T, 0.0};
  for (int i = 0; i < V; i++) {
    const double d = (double)logits[i] / (double)T - pr.zmax;
    const float wi = (float)d < kWeightFloor ? 0.0f : (float)std::exp(d);
    w[i] = wi;
    pr.total += wi;
  }
  return pr;
}

double logprob_of(const float* logits, int t, float T, const Prepared& pr) {
  return ((double)logits[t] / (double)T - pr.zmax) - std::log(pr.total);
}

// ---------------------------------------------------------------------------------------------------------
// Passes over the weights

uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

int count_at_least(const float* w, int V, float x) {
  int c = 0;
  for (int i = 0; i < V; i++) c += w[i] >= x;
  return c;
}
double mass_at_least(const float* w, int V, float x) {
  double m = 0;
  for (int i = 0; i < V; i++)
    if (w[i] >= x) m += w[i];
  return m;
}
double mass_above(const float* w, int V, float x) {
  double m = 0;
  for (int i = 0; i < V; i++)
    if (w[i] > x) m += w[i];
  return m;
}

// The k-th largest weight (with multiplicity), without sorting: the largest fp32 x with #{w >= x} >= k.
// Non-negative floats order like their bit patterns, so bisect on the bits: at most 31 counting passes.
// Requires 1 <= k <= V and max w == 1.
float kth_largest_by_bisection(const float* w, int V, int k) {
  uint32_t lo = 0;                      // #{w >= 0} = V >= k
  uint32_t hi = float_bits(1.0f) + 1;   // #{w >= next float after 1} = 0 < k
  while (hi - lo > 1) {
    uint32_t mid = lo + (hi - lo) / 2;
    if (count_at_least(w, V, bits_float(mid)) >= k) lo = mid;
    else hi = mid;
  }
  return bits_float(lo);
}

// ---------------------------------------------------------------------------------------------------------
// The keep rule of sampling.h (2), for the largest token at or below a pivot x, given
// count = #{w > x} and mass = sum{w > x}. Z_k comes from `top_k_mass` only when needed.

struct KeepRule {
  int k;          // 0 = top-k off (also when k >= V: nothing to cut)
  double top_p;   // >= 1 = off
  double total;   // mass of the whole row
  double zk = -1; // mass of the top-k set, once known
  std::function<double()> top_k_mass;

  bool keep(int count, double mass) {
    if (k > 0 && count >= k) return false;
    if (top_p >= 1.0) return true;
    double bound = top_p * total;
    if (k == 0 || mass >= bound) return mass < bound;  // Z_k <= total decides without Z_k
    if (zk < 0) zk = top_k_mass();
    return mass < top_p * zk;
  }
};

int effective_top_k(const SamplingParams& p, int V) { return p.top_k > 0 && p.top_k < V ? p.top_k : 0; }

// Index of the token where the running sum of {w > low} first exceeds target (index order).
int inverse_cdf(const float* w, int V, float low, double target) {
  double cum = 0;
  int last = -1;
  for (int i = 0; i < V; i++) {
    if (w[i] > low) {
      cum += w[i];
      last = i;
      if (cum > target) return i;
    }
  }
  // target < total by construction (u <= 1 - 2^-24), so only an empty set gets here.
  MP_CHECK_INTERNAL(last >= 0, "inverse CDF over an empty set");
  return last;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Public API

void validate_sampling_params(const SamplingParams& p, int V) {
  MP_CHECK_ARG(V >= 1, "vocabulary size must be >= 1, got " + std::to_string(V));
  MP_CHECK_ARG(std::isfinite(p.temperature) && p.temperature >= 0,
               "temperature must be a finite number >= 0 (0 = greedy), got " + std::to_string(p.temperature));
  MP_CHECK_ARG(p.top_p > 0 && p.top_p <= 1, "top_p must be in (0, 1] (1 = off), got " + std::to_string(p.top_p));
  MP_CHECK_ARG(p.min_p >= 0 && p.min_p < 1, "min_p must be in [0, 1) (0 = off), got " + std::to_string(p.min_p));
  MP_CHECK_ARG(p.top_k >= 0, "top_k must be >= 0 (0 = off), got " + std::to_string(p.top_k));
  MP_CHECK_ARG(p.sample_index < kMaxSampleIndex,
               "sample_index must be < " + std::to_string(kMaxSampleIndex) + ", got " + std::to_string(p.sample_index));
}

float sampling_uniform(const SamplingParams& p, uint32_t draw) {
  Philox4 c{{(p.sample_index << 16) | (draw >> 2), p.step, (uint32_t)p.request_id, (uint32_t)(p.request_id >> 32)}};
  Philox4 r = philox4x32_10(c, (uint32_t)p.seed, (uint32_t)(p.seed >> 32));
  return uniform_from_u32(r.v[draw & 3]);
}

SampleResult sample_row(const float* logits, int V, const SamplingParams& p, float* w, int32_t* rounds) {
  validate_sampling_params(p, V);
  if (p.temperature == 0) {
    Prepared pr = prepare(logits, V, 1.0f, w);
    if (rounds) *rounds = 0;
    return {pr.argmax, (float)logprob_of(logits, pr.argmax, 1.0f, pr)};
  }
  const float T = p.temperature;
  Prepared pr = prepare(logits, V, T, w);
  auto result = [&](int t, uint32_t draws) {
    if (rounds) *rounds = (int32_t)draws;
    return SampleResult{t, (float)logprob_of(logits, t, T, pr)};
  };

  KeepRule rule{effective_top_k(p, V), (double)p.top_p, pr.total, -1.0,
                [&] { return mass_at_least(w, V, kth_largest_by_bisection(w, V, effective_top_k(p, V))); }};
  const bool filtering = rule.k > 0 || rule.top_p < 1.0;

  // Low pivot: every kept token has w > low. min-p is exactly {w >= min_p} = {w > prev float of min_p}.
  float low = -1.0f;
  double mass_low = pr.total;
  if (p.min_p > 0) {
    low = std::nextafter(p.min_p, 0.0f);
    mass_low = mass_above(w, V, low);
  }
  // High pivot: some token at or below high is kept. {w > 1} is empty, and the top token is always kept.
  float high = 1.0f;
  // A drawn token of at least this weight is kept without the counting pass, as the pass would find: the largest
  // weight 1, and with top-p alone a weight above (1 - top_p) of the mass (the mass above it is then below top_p of
  // it; 1e-6 of the mass added, far above the sums' rounding). The GPU sampler takes the same shortcut.
  float keep_alone = 1.0f;
  if (rule.k == 0) {
    const double bound = (1.0 - rule.top_p + 1e-6) * pr.total;
    float b = (float)bound;
    if ((double)b < bound) b = std::nextafter(b, 2.0f);  // rounded up
    keep_alone = std::min(1.0f, b);
  }

  for (uint32_t draw = 0;; draw++) {
    MP_CHECK_INTERNAL(draw < kMaxDraws, "rejection sampling ran out of random numbers");
    double target = (double)sampling_uniform(p, draw) * mass_low;
    int t = inverse_cdf(w, V, low, target);
    float v = w[t];
    if (!filtering || v > high || v >= keep_alone) return result(t, draw + 1);

    // One pass: counts and masses above the drawn weight and above the midpoint pivot.
    float pivot = std::min(high, std::max(v, 0.5f * (v + high)));
    int c0 = 0, c1 = 0;
    double m0 = 0, m1 = 0;
    for (int i = 0; i < V; i++) {
      float wi = w[i];
      if (wi > v) c0++, m0 += wi;
      if (wi > pivot) c1++, m1 += wi;
    }
    if (rule.keep(c0, m0)) return result(t, draw + 1);
    low = v, mass_low = m0;  // t and everything at or below it is rejected
    if (!rule.keep(c1, m1)) low = pivot, mass_low = m1;
    else high = pivot;
  }
}

void sample_rows(const float* logits, int R, int V, const SamplingParams* params, SampleResult* out,
                 int32_t* rounds) {
  MP_CHECK_ARG(R >= 0, "row count must be >= 0, got " + std::to_string(R));
  MP_CHECK_ARG(V >= 1, "vocabulary size must be >= 1, got " + std::to_string(V));
  for (int r = 0; r < R; r++) {
    try {
      validate_sampling_params(params[r], V);
    } catch (const Error& e) {
      throw Error(e.code(), "sampling params of row " + std::to_string(r) + ": " + e.what());
    }
  }
  std::exception_ptr failure;
  int failed_row = -1;
#pragma omp parallel
  {
    std::vector<float> scratch;
    try {
      scratch.resize((size_t)V);
    } catch (...) {
#pragma omp critical(moepilot_sample_rows)
      if (!failure) failure = std::current_exception();
    }
#pragma omp for schedule(dynamic, 4)
    for (int r = 0; r < R; r++) {
      if (scratch.empty()) continue;
      try {
        out[r] = sample_row(logits + (size_t)r * V, V, params[r], scratch.data(), rounds ? rounds + r : nullptr);
      } catch (...) {
#pragma omp critical(moepilot_sample_rows)
        if (!failure || r < failed_row) failure = std::current_exception(), failed_row = r;
      }
    }
  }
  if (!failure) return;
  try {
    std::rethrow_exception(failure);
  } catch (const Error& e) {
    if (failed_row < 0) throw;
    throw Error(e.code(), "row " + std::to_string(failed_row) + ": " + e.what());
  }
}

void exact_filtered_probs(const float* logits, int V, const SamplingParams& p, double* out) {
  validate_sampling_params(p, V);
  std::vector<float> w((size_t)V);
  if (p.temperature == 0) {
    Prepared pr = prepare(logits, V, 1.0f, w.data());
    for (int i = 0; i < V; i++) out[i] = i == pr.argmax ? 1.0 : 0.0;
    return;
  }
  Prepared pr = prepare(logits, V, p.temperature, w.data());
  std::vector<float> desc(w);
  std::sort(desc.begin(), desc.end(), std::greater<float>());
  const int k = effective_top_k(p, V);
  KeepRule rule{k, (double)p.top_p, pr.total, -1.0, [&] { return mass_at_least(w.data(), V, desc[(size_t)k - 1]); }};

  // keep(x) for a weight x, by the definition (not by the sampler's pivots).
  auto keep = [&](float x) {
    if (x < p.min_p) return false;
    int count = 0;
    double mass = 0;
    for (int i = 0; i < V; i++)
      if (w[i] > x) count++, mass += w[i];
    return rule.keep(count, mass);
  };
  // The kept set is an upper set: binary search for the smallest kept weight among the distinct values.
  std::vector<float> values(desc);
  values.erase(std::unique(values.begin(), values.end()), values.end());
  size_t lo = 0, hi = values.size();  // values[lo] kept (the max always is); values[hi] (if any) not
  MP_CHECK_INTERNAL(keep(values[0]), "the top token must always be kept");
  while (hi - lo > 1) {
    size_t mid = (lo + hi) / 2;
    if (keep(values[mid])) lo = mid;
    else hi = mid;
  }
  const float threshold = values[lo];
  double kept_mass = mass_at_least(w.data(), V, threshold);
  for (int i = 0; i < V; i++) out[i] = w[i] >= threshold ? (double)w[i] / kept_mass : 0.0;
}

}  // namespace moepilot::gen
