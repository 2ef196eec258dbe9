// GPU sampler (cuda/sampling.h) against the CPU sampler (gen/sampling.h), which defines the distribution:
//   agreement    many random rows x parameter combinations, every launch shape: same token, logprob within 1e-6
//                relative, same number of rounds (a token may differ only where a uniform lands within rounding
//                of a CDF boundary: counted, and the check fails above 0.2% of rows)
//   chi-square   six filter combinations, 40000 draws each, against gen::exact_filtered_probs (alpha 1e-3), with a
//                power check against a neighbouring configuration; on two launch shapes
//   batch        a row alone and inside a batch of 256 gives the same token, logprob bits and rounds
//   pipeline     the pipelined launch gives bit-identical rows whatever the number of persistent clusters and
//                whether rows arrive by asynchronous copies (aligned) or plain loads (unaligned stride)
//   lse          with lse the logprob is fp32(logit / T) - lse and the token is unchanged
//   bad rows     NaN / +inf / all -inf logits and each bad parameter are flagged per row; other rows still right
//   arguments    bad host arguments throw InvalidArgument
// One line per check; exit code 1 on any failure.
//
// --quick: fewer rows (for compute-sanitizer memcheck); --race: a small set for racecheck.
// --bench [--out FILE] [--logits-file FILE] [--iters N]: times the kernel on 256 x 151936 (and 1024 rows) for
// top-p 0.9, top-k 50 + top-p 0.9, min-p 0.1 and greedy, and one read of the logits; writes JSON to FILE and the
// 256-row logits to --logits-file (read by bench/sampling-torch.py for the PyTorch baselines).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/sampling.h"
#include "cuda/vendor.h"
#include "gen/sampling.h"
#include "moepilot/error.h"

using namespace moepilot;
using gen::SamplingParams;

namespace {

// ---------------------------------------------------------------------------------------------------------
// Inputs

struct Rng {  // splitmix64: test inputs only (not the sampler's randomness)
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }
  double gauss() {
    double u = 1.0 - uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }
  int below(int n) { return (int)(next() % (uint64_t)n); }
};

// One row of logits of a kind chosen by `kind`: gaussian of several scales, one dominant token (logprob near 0),
// masked vocabulary (-inf), ties (quantised logits), a large offset.
void make_row(Rng& rng, int kind, float* x, int V) {
  const double scales[] = {0.5, 1.0, 2.0, 4.0};
  switch (kind % 6) {
    case 0:
    case 1:
      for (int i = 0; i < V; i++) x[i] = (float)(scales[rng.below(4)] * rng.gauss());
      break;
    case 2: {  // a dominant token: tests logprob near 0 (relative tolerance) and short rounds
      for (int i = 0; i < V; i++) x[i] = (float)rng.gauss();
      x[rng.below(V)] += 12.0f + (float)(4.0 * rng.uniform());
      break;
    }
    case 3: {  // masked vocabulary, one token always finite
      for (int i = 0; i < V; i++) x[i] = rng.uniform() < 0.4 ? -INFINITY : (float)(2.0 * rng.gauss());
      x[rng.below(V)] = (float)rng.gauss();
      break;
    }
    case 4:  // ties everywhere: top-k keeps all tokens tied at the k-th weight
      for (int i = 0; i < V; i++) x[i] = std::round((float)(3.0 * rng.gauss())) * 0.5f;
      break;
    default:  // large offset: the max subtraction matters
      for (int i = 0; i < V; i++) x[i] = 1000.0f + (float)(3.0 * rng.gauss());
      break;
  }
}

SamplingParams random_params(Rng& rng, int V) {
  const float temps[] = {0.0f, 0.5f, 0.8f, 1.0f, 1.0f, 1.3f};
  const float top_ps[] = {1.0f, 1.0f, 0.95f, 0.9f, 0.5f, 0.1f};
  const float min_ps[] = {0.0f, 0.0f, 0.0f, 0.01f, 0.1f, 0.5f};
  const int top_ks[] = {0, 0, 1, 3, 50, 1000, V, V + 5};
  SamplingParams p;
  p.temperature = temps[rng.below(6)];
  p.top_p = top_ps[rng.below(6)];
  p.min_p = min_ps[rng.below(6)];
  p.top_k = top_ks[rng.below(8)];
  p.seed = rng.next();
  p.request_id = rng.next();
  p.sample_index = (uint32_t)rng.below((int)gen::kMaxSampleIndex);
  p.step = (uint32_t)rng.next();
  return p;
}

std::string describe(const SamplingParams& p) {
  char b[200];
  snprintf(b, sizeof b, "T=%g top_k=%d top_p=%g min_p=%g seed=%llu req=%llu idx=%u step=%u", p.temperature, p.top_k,
           p.top_p, p.min_p, (unsigned long long)p.seed, (unsigned long long)p.request_id, p.sample_index, p.step);
  return b;
}

// ---------------------------------------------------------------------------------------------------------
// Running the GPU sampler

template <class T>
struct DeviceBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DeviceBuf(size_t count) : n(count) {
    if (count) MP_GPU_CHECK(gpu::malloc_device((void**)&p, count * sizeof(T)));
  }
  ~DeviceBuf() {
    if (p) gpu::free_device(p);
  }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
};

struct GpuOut {
  std::vector<int32_t> token, rounds, status;
  std::vector<float> logprob;
};

gpu::Stream g_stream;

// ld > V: the rows are stored with that stride (the padding holds NaN, which the sampler must never read).
GpuOut run_gpu(const std::vector<float>& logits, int R, int V, const std::vector<SamplingParams>& params,
               const std::vector<float>* lse, const gpu::SampleLaunch& shape, int64_t ld = 0) {
  if (ld < V) ld = V;
  std::vector<float> strided;
  const float* host = logits.data();
  if (ld > V) {
    strided.assign((size_t)R * ld, NAN);
    for (int r = 0; r < R; r++) std::copy_n(&logits[(size_t)r * V], V, &strided[(size_t)r * ld]);
    host = strided.data();
  }
  DeviceBuf<float> dl((size_t)R * ld);
  DeviceBuf<SamplingParams> dp(R);
  DeviceBuf<float> dlse(lse ? R : 0);
  DeviceBuf<int32_t> dt(R), dr(R), ds(R);
  DeviceBuf<float> dlp(R);
  DeviceBuf<char> scratch(gpu::sample_rows_scratch_bytes(R, V, shape));
  MP_GPU_CHECK(gpu::memcpy_async(dl.p, host, (size_t)R * ld * sizeof(float), g_stream));
  MP_GPU_CHECK(gpu::memcpy_async(dp.p, params.data(), R * sizeof(SamplingParams), g_stream));
  if (lse) MP_GPU_CHECK(gpu::memcpy_async(dlse.p, lse->data(), R * sizeof(float), g_stream));
  MP_GPU_CHECK(gpu::memset_async(dt.p, 0x7f, R * sizeof(int32_t), g_stream));  // poison: every row must be written
  gpu::sample_rows(dl.p, ld, R, V, dp.p, lse ? dlse.p : nullptr, dt.p, dlp.p, dr.p, ds.p, scratch.p, g_stream, shape);
  GpuOut o;
  o.token.resize(R), o.rounds.resize(R), o.status.resize(R), o.logprob.resize(R);
  MP_GPU_CHECK(gpu::memcpy_async(o.token.data(), dt.p, R * sizeof(int32_t), g_stream));
  MP_GPU_CHECK(gpu::memcpy_async(o.rounds.data(), dr.p, R * sizeof(int32_t), g_stream));
  MP_GPU_CHECK(gpu::memcpy_async(o.status.data(), ds.p, R * sizeof(int32_t), g_stream));
  MP_GPU_CHECK(gpu::memcpy_async(o.logprob.data(), dlp.p, R * sizeof(float), g_stream));
  MP_GPU_CHECK(gpu::stream_sync(g_stream));
  return o;
}

struct CpuOut {
  int32_t token = -1, rounds = 0;
  float logprob = NAN;
  bool ok = false;
  std::string error;
};

CpuOut run_cpu_row(const float* logits, int V, const SamplingParams& p) {
  std::vector<float> scratch((size_t)V);
  CpuOut o;
  try {
    gen::SampleResult r = gen::sample_row(logits, V, p, scratch.data(), &o.rounds);
    o.token = r.token, o.logprob = r.logprob, o.ok = true;
  } catch (const Error& e) {
    o.error = e.what();
  }
  return o;
}

int g_failures = 0;
void report(bool ok, const std::string& name, const std::string& detail) {
  printf("%s %s: %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  fflush(stdout);
  if (!ok) g_failures++;
}

// Within 1e-6 relative, or within the summation-order floor: the logprob is log(w_t) - log(total) with total a
// double sum of up to V weights, which the CPU adds in index order and the GPU in a tree; the two sums may differ
// by up to (V - 1) * 2^-53 * total each way, which bounds the logprob difference at 2 V 2^-53 absolute (it
// matters only for logprobs within ~1e-5 of 0, where the relative error of either side is that large).
bool logprob_close(float g, float c, int V) {
  if (g == c) return true;
  return std::fabs((double)g - (double)c) <= 1e-6 * std::fabs((double)c) + 2.0 * V * std::ldexp(1.0, -53);
}

// Without clusters (an sm_80 device, or a PTX-only sm_80 build JIT-compiled on Hopper) a cluster shape runs as one
// block per row in shared memory where the row fits, else over scratch: every check still runs, on the shapes
// that device has.
gpu::SampleLaunch shape_of(int cluster, int pipelined = -1, int threads = 0, int resident = 0) {
  static const bool clusters = gpu::sample_clusters_available();
  if ((cluster == 2 || cluster == 4 || cluster == 6 || cluster == 8) && !clusters) cluster = 0;  // (3, 5: errors)
  gpu::SampleLaunch l;
  l.cluster = cluster, l.pipelined = pipelined, l.threads = threads, l.resident = resident;
  return l;
}

std::string shape_name(const gpu::SampleLaunch& l) {
  std::string n = l.cluster == 0 ? "auto" : l.cluster == 1 ? "block+scratch" : l.cluster == -1 ? "block+smem"
                                                                            : "cluster" + std::to_string(l.cluster);
  if (l.pipelined == 0) n += "/one-row";
  if (l.pipelined == 1) n += "/pipelined";
  if (l.threads) n += "/" + std::to_string(l.threads) + "t";
  if (l.resident) n += "/G" + std::to_string(l.resident);
  return n;
}

// Without clusters, pipelined shapes need two copies of a row in one block's shared memory, which a large V does not
// fit: those checks are skipped there (and said so). With clusters every shape must plan.
bool plannable(int V, const gpu::SampleLaunch& l) {
  if (gpu::sample_clusters_available()) return true;
  try {
    (void)gpu::sample_rows_scratch_bytes(1, V, l);
    return true;
  } catch (const std::exception& e) {
    printf("SKIP %s at V=%d without clusters: %s\n", shape_name(l).c_str(), V, e.what());
    return false;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Checks

// GPU vs CPU on R random rows of width V, for each launch shape.
void check_agreement(int V, int R, const std::vector<gpu::SampleLaunch>& shapes, uint64_t seed) {
  Rng rng{seed};
  std::vector<float> logits((size_t)R * V);
  std::vector<SamplingParams> params(R);
  for (int r = 0; r < R; r++) {
    make_row(rng, r, &logits[(size_t)r * V], V);
    params[r] = random_params(rng, V);
  }
  std::vector<CpuOut> cpu(R);
  for (int r = 0; r < R; r++) cpu[r] = run_cpu_row(&logits[(size_t)r * V], V, params[r]);
  for (const gpu::SampleLaunch& shape : shapes) {
    if (!plannable(V, shape)) continue;
    GpuOut g = run_gpu(logits, R, V, params, nullptr, shape);
    int token_mismatch = 0, lp_bad = 0, rounds_mismatch = 0, status_bad = 0;
    std::string first;
    double max_rel = 0;
    long sum_rounds = 0;
    int max_rounds = 0;
    for (int r = 0; r < R; r++) {
      const CpuOut& c = cpu[r];
      if (!c.ok || g.status[r] != 0) {
        if (c.ok != (g.status[r] == 0)) {
          status_bad++;
          if (first.empty())
            first = "row " + std::to_string(r) + ": status " + std::to_string(g.status[r]) + " vs CPU " +
                    (c.ok ? "ok" : c.error);
        }
        continue;
      }
      sum_rounds += g.rounds[r];
      max_rounds = std::max(max_rounds, g.rounds[r]);
      if (g.token[r] != c.token) {
        token_mismatch++;
        if (first.empty()) {
          const float* x = &logits[(size_t)r * V];
          char b[400];
          snprintf(b, sizeof b, "row %d (%s): token %d (logit %.9g, rounds %d) vs CPU %d (logit %.9g, rounds %d)", r,
                   describe(params[r]).c_str(), g.token[r], g.token[r] >= 0 && g.token[r] < V ? x[g.token[r]] : NAN,
                   g.rounds[r], c.token, x[c.token], c.rounds);
          first = b;
        }
        continue;
      }
      if (g.rounds[r] != c.rounds) rounds_mismatch++;
      double rel = c.logprob != 0 ? std::fabs((double)g.logprob[r] - c.logprob) / std::fabs((double)c.logprob) : 0;
      max_rel = std::max(max_rel, std::isnan(rel) ? 1.0 : rel);
      if (!logprob_close(g.logprob[r], c.logprob, V)) {
        lp_bad++;
        if (first.empty()) {
          char b[300];
          snprintf(b, sizeof b, "row %d (%s): logprob %.9g vs CPU %.9g", r, describe(params[r]).c_str(), g.logprob[r],
                   c.logprob);
          first = b;
        }
      }
    }
    const int allowed = std::max(1, R / 500);
    char b[300];
    snprintf(b, sizeof b,
             "%d rows: token mismatches %d (allowed %d), logprob beyond 1e-6 rel + 2V 2^-53 abs %d (max rel %.2e), rounds differ %d, "
             "status differs %d, rounds mean %.2f max %d",
             R, token_mismatch, allowed, lp_bad, max_rel, rounds_mismatch, status_bad,
             (double)sum_rounds / std::max(1, R), max_rounds);
    bool ok = token_mismatch <= allowed && lp_bad == 0 && status_bad == 0;
    report(ok, "agreement V=" + std::to_string(V) + " " + shape_name(shape),
           std::string(b) + (first.empty() ? "" : "; first: " + first));
  }
}

// Chi-square statistic of counts against n * q, pooling bins of expectation < 5 (as src/engine/sampler.test.ts).
void chi_square(const std::vector<int>& counts, const std::vector<double>& q, int n, double& stat, int& df) {
  std::vector<std::pair<double, double>> bins;  // (expected, observed)
  for (size_t i = 0; i < q.size(); i++) {
    if (q[i] == 0) {
      if (counts[i] > 0) {
        stat = INFINITY, df = 1;
        return;
      }
      continue;
    }
    bins.push_back({n * q[i], (double)counts[i]});
  }
  std::sort(bins.begin(), bins.end());
  std::vector<std::pair<double, double>> pooled;
  double e = 0, o = 0;
  for (auto& b : bins) {
    e += b.first, o += b.second;
    if (e >= 5) pooled.push_back({e, o}), e = 0, o = 0;
  }
  if (e > 0) {
    if (!pooled.empty()) pooled.back().first += e, pooled.back().second += o;
    else pooled.push_back({e, o});
  }
  stat = 0;
  for (auto& b : pooled) stat += (b.second - b.first) * (b.second - b.first) / b.first;
  df = (int)pooled.size() - 1;
}

double chi_square_critical(int df) {  // upper 1e-3 quantile, Wilson-Hilferty
  const double z = 3.090232, a = 2.0 / (9.0 * df);
  return df * std::pow(1 - a + z * std::sqrt(a), 3);
}

void check_chi_square(const gpu::SampleLaunch& shape) {
  const int V = 120, N = 40000;
  Rng rng{1234};
  std::vector<float> row(V);
  for (int i = 0; i < V; i++) row[i] = (float)(2.0 * rng.gauss());
  SamplingParams s;
  s.seed = 20261127, s.request_id = 77, s.sample_index = 3;
  auto with = [&](float T, int k, float tp, float mp) {
    SamplingParams p = s;
    p.temperature = T, p.top_k = k, p.top_p = tp, p.min_p = mp;
    return p;
  };
  struct Case {
    const char* name;
    SamplingParams p, alt;
  };
  const Case cases[] = {
      {"top-k", with(1, 12, 1, 0), with(1, 13, 1, 0)},
      {"top-p", with(1, 0, 0.75f, 0), with(1, 0, 0.8f, 0)},
      {"min-p", with(1, 0, 1, 0.08f), with(1, 0, 1, 0.06f)},
      {"top-k+top-p", with(0.8f, 25, 0.85f, 0), with(0.8f, 0, 0.85f, 0)},
      {"top-p+min-p", with(1.1f, 0, 0.85f, 0.03f), with(1.1f, 0, 0.9f, 0.03f)},
      {"top-k+top-p+min-p", with(1.3f, 30, 0.9f, 0.03f), with(1.3f, 0, 0.9f, 0.03f)},
  };
  std::vector<float> logits((size_t)N * V);
  for (int r = 0; r < N; r++) std::copy(row.begin(), row.end(), logits.begin() + (size_t)r * V);
  for (const Case& c : cases) {
    std::vector<SamplingParams> params(N, c.p);
    for (int r = 0; r < N; r++) params[r].step = (uint32_t)r;  // each draw its own decode step
    GpuOut g = run_gpu(logits, N, V, params, nullptr, shape);
    std::vector<double> q(V), qa(V);
    gen::exact_filtered_probs(row.data(), V, c.p, q.data());
    gen::exact_filtered_probs(row.data(), V, c.alt, qa.data());
    std::vector<int> counts(V, 0);
    int bad = 0, outside = 0, cpu_mismatch = 0;
    long sum_rounds = 0;
    int max_rounds = 0;
    std::vector<float> scratch(V);
    for (int r = 0; r < N; r++) {
      int t = g.token[r];
      if (g.status[r] != 0 || t < 0 || t >= V) {
        bad++;
        continue;
      }
      counts[t]++;
      if (q[t] == 0) outside++;
      sum_rounds += g.rounds[r];
      max_rounds = std::max(max_rounds, g.rounds[r]);
      if (gen::sample_row(row.data(), V, params[r], scratch.data()).token != t) cpu_mismatch++;
    }
    int support = 0, alt_support = 0;
    for (int i = 0; i < V; i++) support += q[i] > 0, alt_support += qa[i] > 0;
    double stat, astat;
    int df, adf;
    chi_square(counts, q, N, stat, df);
    chi_square(counts, qa, N, astat, adf);
    const double crit = chi_square_critical(df), acrit = chi_square_critical(adf);
    const double mean_rounds = (double)sum_rounds / N;
    char b[400];
    snprintf(b, sizeof b,
             "support %d/%d (alt %d), chi2 %.1f (df %d, crit %.1f), alt chi2 %.0f (crit %.1f), bad rows %d, outside "
             "support %d, CPU token mismatches %d, rounds mean %.3f max %d",
             support, V, alt_support, stat, df, crit, astat, acrit, bad, outside, cpu_mismatch, mean_rounds,
             max_rounds);
    bool ok = bad == 0 && outside == 0 && support > 1 && support < V && support != alt_support && stat < crit &&
              astat > acrit && cpu_mismatch <= N / 1000 && mean_rounds < 4 && max_rounds <= 32;
    report(ok, std::string("chi-square ") + c.name + " " + shape_name(shape), b);
  }
}

// A row alone and at position 137 of a batch of 256 (other rows random) gives identical results.
void check_batch_invariance(int V, bool with_lse) {
  const int R = 256, pos = 137;
  Rng rng{99};
  std::vector<float> logits((size_t)R * V);
  std::vector<SamplingParams> params(R);
  for (int r = 0; r < R; r++) make_row(rng, r, &logits[(size_t)r * V], V), params[r] = random_params(rng, V);
  params[pos].temperature = 0.9f, params[pos].top_p = 0.9f, params[pos].top_k = 40, params[pos].min_p = 0.0f;
  std::vector<float> lse(R, 0.0f);
  for (int r = 0; r < R; r++) lse[r] = -1.0f - 0.01f * r;  // any value: only the arithmetic is checked here
  std::vector<float> one(logits.begin() + (size_t)pos * V, logits.begin() + (size_t)(pos + 1) * V);
  std::vector<SamplingParams> one_p{params[pos]};
  std::vector<float> one_lse{lse[pos]};
  int diffs = 0;
  std::string detail;
  for (int rep = 0; rep < 8; rep++) {  // several steps of the same request
    for (auto* p : {&params[pos], &one_p[0]}) p->step = 1000 + rep;
    GpuOut b = run_gpu(logits, R, V, params, with_lse ? &lse : nullptr, shape_of(0));
    GpuOut a = run_gpu(one, 1, V, one_p, with_lse ? &one_lse : nullptr, shape_of(0));
    bool same = a.token[0] == b.token[pos] && std::memcmp(&a.logprob[0], &b.logprob[pos], 4) == 0 &&
                a.rounds[0] == b.rounds[pos] && a.status[0] == b.status[pos];
    if (!same) diffs++;
    char s[200];
    snprintf(s, sizeof s, "%s%d/%d", rep ? "," : "", a.token[0], b.token[pos]);
    detail += s;
  }
  report(diffs == 0, std::string("batch invariance V=") + std::to_string(V) + (with_lse ? " lse" : ""),
         std::to_string(diffs) + " of 8 steps differ (alone/batched tokens " + detail + ")");
}

// The pipelined path: a row's result is bit-identical whichever persistent cluster takes it (G clusters, rows
// looping through two buffers) and whether its rows arrive by the asynchronous 16-byte copies (ld = V, aligned)
// or the plain copy of unaligned rows (ld = V + 3; the padding holds NaN, so reading it would flag the row).
void check_pipeline_invariance(int V, int R) {
  if (!plannable(V, shape_of(0, 1))) return;
  Rng rng{555};
  std::vector<float> logits((size_t)R * V);
  std::vector<SamplingParams> params(R);
  for (int r = 0; r < R; r++) make_row(rng, r, &logits[(size_t)r * V], V), params[r] = random_params(rng, V);
  const GpuOut ref = run_gpu(logits, R, V, params, nullptr, shape_of(0, 1));
  struct Variant {
    gpu::SampleLaunch shape;
    int64_t ld;
  };
  const Variant variants[] = {{shape_of(0, 1, 0, 1), V}, {shape_of(0, 1, 0, 3), V}, {shape_of(0, 1), V + 3},
                              {shape_of(0, 1, 0, 2), V + 3}};
  int diffs = 0;
  std::string first;
  for (const Variant& v : variants) {
    const GpuOut g = run_gpu(logits, R, V, params, nullptr, v.shape, v.ld);
    for (int r = 0; r < R; r++) {
      const bool same = g.token[r] == ref.token[r] && std::memcmp(&g.logprob[r], &ref.logprob[r], 4) == 0 &&
                        g.rounds[r] == ref.rounds[r] && g.status[r] == ref.status[r];
      if (!same) {
        diffs++;
        if (first.empty()) {
          char b[300];
          snprintf(b, sizeof b, "%s ld %lld row %d: token %d lp %.9g rounds %d status %d vs %d %.9g %d %d",
                   shape_name(v.shape).c_str(), (long long)v.ld, r, g.token[r], g.logprob[r], g.rounds[r],
                   g.status[r], ref.token[r], ref.logprob[r], ref.rounds[r], ref.status[r]);
          first = b;
        }
      }
    }
  }
  int bad = 0;
  for (int r = 0; r < R; r++) bad += ref.status[r] != 0;
  report(diffs == 0 && bad < R, "pipeline invariance V=" + std::to_string(V),
         std::to_string(R) + " rows x 4 variants (G 1, G 3, unaligned rows, unaligned G 2): " + std::to_string(diffs) +
             " differ, " + std::to_string(bad) + " flagged rows" + (first.empty() ? "" : "; first: " + first));
}

// With lse: logprob = fp32(logit / T) - lse exactly, token unchanged, and close to the kernel's own logprob.
void check_lse(int V) {
  const int R = 64;
  Rng rng{4242};
  std::vector<float> logits((size_t)R * V);
  std::vector<SamplingParams> params(R);
  for (int r = 0; r < R; r++) make_row(rng, r, &logits[(size_t)r * V], V), params[r] = random_params(rng, V);
  std::vector<float> lse(R);
  for (int r = 0; r < R; r++) {
    const float* x = &logits[(size_t)r * V];
    const float T = params[r].temperature == 0 ? 1.0f : params[r].temperature;
    double m = -INFINITY, s = 0;
    for (int i = 0; i < V; i++) m = std::max(m, (double)x[i] / T);
    for (int i = 0; i < V; i++) s += std::exp((double)x[i] / T - m);
    lse[r] = (float)(m + std::log(s));
  }
  GpuOut a = run_gpu(logits, R, V, params, nullptr, shape_of(0));
  GpuOut b = run_gpu(logits, R, V, params, &lse, shape_of(0));
  int token_diff = 0, exact_bad = 0, far = 0;
  std::string first;
  for (int r = 0; r < R; r++) {
    if (a.status[r] != 0 || b.status[r] != 0) {
      token_diff++;
      continue;
    }
    if (a.token[r] != b.token[r] || a.rounds[r] != b.rounds[r]) token_diff++;
    const float T = params[r].temperature == 0 ? 1.0f : params[r].temperature;
    volatile float q = logits[(size_t)r * V + b.token[r]] / T;  // fp32 division, as the contract states
    float want = q - lse[r];
    if (std::memcmp(&want, &b.logprob[r], 4) != 0) {
      exact_bad++;
      if (first.empty()) first = "row " + std::to_string(r) + ": " + std::to_string(b.logprob[r]) + " vs " +
                                 std::to_string(want);
    }
    // fp32 lse of a large logit carries absolute error ~ulp(lse): compare with that slack.
    if (std::fabs((double)b.logprob[r] - a.logprob[r]) > 1e-5 + 2e-7 * std::fabs((double)lse[r])) far++;
  }
  report(token_diff == 0 && exact_bad == 0 && far == 0, "lse path V=" + std::to_string(V),
         std::to_string(R) + " rows: token/rounds differ " + std::to_string(token_diff) + ", logprob != fp32(x/T)-lse " +
             std::to_string(exact_bad) + ", far from own logprob " + std::to_string(far) +
             (first.empty() ? "" : "; first: " + first));
}

// Bad rows are flagged; good rows around them are still the CPU's answers.
void check_bad_rows(int V, const gpu::SampleLaunch& shape) {
  if (!plannable(V, shape)) return;
  Rng rng{777};
  struct RowCase {
    const char* name;
    int want_status;
    std::function<void(float*, SamplingParams&)> make;
  };
  const std::vector<RowCase> cases = {
      {"good", 0, [](float*, SamplingParams&) {}},
      {"NaN logit", 1, [&](float* x, SamplingParams&) { x[V / 2] = NAN; }},
      {"+inf logit", 1, [&](float* x, SamplingParams&) { x[V - 1] = INFINITY; }},
      {"all -inf", 1, [&](float* x, SamplingParams&) { std::fill(x, x + V, -INFINITY); }},
      {"one finite", 0, [&](float* x, SamplingParams&) { std::fill(x, x + V, -INFINITY), x[V / 3] = 0.5f; }},
      {"temperature -1", 2, [](float*, SamplingParams& p) { p.temperature = -1; }},
      {"temperature NaN", 2, [](float*, SamplingParams& p) { p.temperature = NAN; }},
      {"temperature inf", 2, [](float*, SamplingParams& p) { p.temperature = INFINITY; }},
      {"top_p 0", 2, [](float*, SamplingParams& p) { p.top_p = 0; }},
      {"top_p 1.5", 2, [](float*, SamplingParams& p) { p.top_p = 1.5f; }},
      {"min_p 1", 2, [](float*, SamplingParams& p) { p.min_p = 1; }},
      {"min_p NaN", 2, [](float*, SamplingParams& p) { p.min_p = NAN; }},
      {"top_k -1", 2, [](float*, SamplingParams& p) { p.top_k = -1; }},
      {"sample_index 2^16", 2, [](float*, SamplingParams& p) { p.sample_index = gen::kMaxSampleIndex; }},
      {"good", 0, [](float*, SamplingParams&) {}},
  };
  const int R = (int)cases.size();
  std::vector<float> logits((size_t)R * V);
  std::vector<SamplingParams> params(R);
  for (int r = 0; r < R; r++) {
    make_row(rng, 0, &logits[(size_t)r * V], V);
    params[r] = random_params(rng, V);
    params[r].temperature = 1.0f;
    cases[r].make(&logits[(size_t)r * V], params[r]);
  }
  GpuOut g = run_gpu(logits, R, V, params, nullptr, shape);
  int wrong = 0;
  std::string first;
  for (int r = 0; r < R; r++) {
    bool ok = g.status[r] == cases[r].want_status;
    if (ok && cases[r].want_status != 0) ok = g.token[r] == -1 && std::isnan(g.logprob[r]);
    if (ok && cases[r].want_status == 0) {
      CpuOut c = run_cpu_row(&logits[(size_t)r * V], V, params[r]);
      ok = c.ok && c.token == g.token[r] && logprob_close(g.logprob[r], c.logprob, V);
    }
    if (!ok) {
      wrong++;
      if (first.empty())
        first = std::string(cases[r].name) + ": status " + std::to_string(g.status[r]) + " token " +
                std::to_string(g.token[r]);
    }
  }
  report(wrong == 0, "bad rows V=" + std::to_string(V) + " " + shape_name(shape),
         std::to_string(R) + " rows, wrong " + std::to_string(wrong) + (first.empty() ? "" : "; first: " + first));
}

void check_arguments() {
  DeviceBuf<float> l(16);
  DeviceBuf<SamplingParams> p(1);
  DeviceBuf<int32_t> t(1), s(1);
  DeviceBuf<float> lp(1);
  struct ArgCase {
    const char* name;
    std::function<void()> call;
  };
  const ArgCase cases[] = {
      {"ld < V", [&] { gpu::sample_rows(l.p, 4, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream); }},
      {"R < 0", [&] { gpu::sample_rows(l.p, 8, -1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream); }},
      {"V = 0", [&] { gpu::sample_rows(l.p, 8, 1, 0, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream); }},
      {"null tokens", [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, nullptr, lp.p, nullptr, s.p, nullptr, g_stream); }},
      {"null status", [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, nullptr, nullptr, g_stream); }},
      {"cluster 3", [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream, shape_of(3)); }},
      {"cluster 5", [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream, shape_of(5)); }},
      {"cluster 6 pipelined", [&] {
         gpu::SampleLaunch six;
         six.cluster = 6, six.pipelined = 1;
         gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream, six);
       }},
      {"scratch null on scratch path",
       [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream, shape_of(1)); }},
      {"pipelined 2", [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream, shape_of(0, 2)); }},
      {"pipelined scratch path",
       [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream, shape_of(1, 1)); }},
      {"threads 300", [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream, shape_of(0, 1, 300)); }},
      {"resident -1", [&] { gpu::sample_rows(l.p, 8, 1, 8, p.p, nullptr, t.p, lp.p, nullptr, s.p, nullptr, g_stream, shape_of(0, 1, 0, -1)); }},
  };
  int wrong = 0;
  std::string detail;
  for (const ArgCase& c : cases) {
    try {
      c.call();
      wrong++;
      detail += std::string(" [") + c.name + ": no error]";
    } catch (const Error& e) {
      if (e.code() != ErrorCode::InvalidArgument) wrong++, detail += std::string(" [") + c.name + ": " + e.what() + "]";
    }
  }
  MP_GPU_CHECK(gpu::stream_sync(g_stream));
  report(wrong == 0, "argument errors", std::to_string(sizeof(cases) / sizeof(cases[0])) + " cases" + detail);
}

// ---------------------------------------------------------------------------------------------------------
// Benchmark

__global__ void read_once_kernel(const float4* x, size_t n4, float* out) {
  float s = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
    float4 v = __ldcs(x + i);
    s += v.x + v.y + v.z + v.w;
  }
  if (s == 12345.678f) *out = s;  // keeps the loads alive
}

int bench(const std::string& out_path, const std::string& logits_file, int iters) {
  const int V = 151936, R_max = 1024;
  std::string gpu_name;
  MP_GPU_CHECK(gpu::device_name(0, &gpu_name));
  // Logits: per row gaussian with scale 1, 2, 3 or 4 (flat to peaked), the 256 rows repeated to make 1024.
  const int R0 = 256;
  std::vector<float> host((size_t)R0 * V);
  Rng rng{31337};
  for (int r = 0; r < R0; r++) {
    double scale = 1.0 + (r % 4);
    for (int i = 0; i < V; i++) host[(size_t)r * V + i] = (float)(scale * rng.gauss());
  }
  if (!logits_file.empty()) {
    FILE* f = fopen(logits_file.c_str(), "wb");
    if (!f || fwrite(host.data(), sizeof(float), host.size(), f) != host.size()) {
      printf("FAIL bench: cannot write %s\n", logits_file.c_str());
      return 1;
    }
    fclose(f);
  }
  DeviceBuf<float> dl((size_t)R_max * V);
  for (int k = 0; k < R_max / R0; k++)
    MP_GPU_CHECK(gpu::memcpy_async(dl.p + (size_t)k * R0 * V, host.data(), host.size() * sizeof(float), g_stream));
  // Peaked rows (the same logits doubled: s = 2, 4, 6, 8), where the drawn token often holds much of the mass, as
  // in a language model's rows, and the keep test can often skip the counting pass.
  std::vector<float> peaked(host.size());
  for (size_t i = 0; i < host.size(); i++) peaked[i] = 2.0f * host[i];
  DeviceBuf<float> dpeak(peaked.size());
  MP_GPU_CHECK(gpu::memcpy_async(dpeak.p, peaked.data(), peaked.size() * sizeof(float), g_stream));
  DeviceBuf<SamplingParams> dp(R_max);
  DeviceBuf<int32_t> dt(R_max), dr(R_max), ds(R_max);
  DeviceBuf<float> dlp(R_max), dsink(1), dlse(R_max);
  MP_GPU_CHECK(gpu::memset_async(dlse.p, 0, R_max * sizeof(float), g_stream));  // values do not matter for timing
  DeviceBuf<char> scratch(gpu::sample_rows_scratch_bytes(R_max, V, shape_of(1)));
  gpu::Event e0, e1;
  MP_GPU_CHECK(gpu::event_create(&e0));
  MP_GPU_CHECK(gpu::event_create(&e1));

  auto time_ms = [&](const std::function<void()>& f) {
    for (int i = 0; i < 3; i++) f();
    MP_GPU_CHECK(gpu::event_record(e0, g_stream));
    for (int i = 0; i < iters; i++) f();
    MP_GPU_CHECK(gpu::event_record(e1, g_stream));
    MP_GPU_CHECK(gpu::event_sync(e1));
    float ms = 0;
    MP_GPU_CHECK(gpu::event_elapsed_ms(&ms, e0, e1));
    return (double)ms / iters;
  };
  auto read_ms = [&](int R) {
    return time_ms([&] {
      read_once_kernel<<<132 * 8, 512, 0, g_stream>>>(reinterpret_cast<const float4*>(dl.p), (size_t)R * V / 4,
                                                       dsink.p);
    });
  };
  const double read256 = read_ms(256), read1024 = read_ms(1024);
  printf("read once: 256 x %d %.4f ms (%.0f GB/s), 1024 rows %.4f ms\n", V, read256,
         256.0 * V * 4 / read256 / 1e6, read1024);

  struct BenchCase {
    std::string name;
    int rows;
    SamplingParams p;
    gpu::SampleLaunch shape;
  };
  auto mk = [](float T, int k, float tp, float mp) {
    SamplingParams p;
    p.temperature = T, p.top_k = k, p.top_p = tp, p.min_p = mp;
    return p;
  };
  const SamplingParams top_p = mk(1, 0, 0.9f, 0), top_k_p = mk(1, 50, 0.9f, 0), min_p = mk(1, 0, 1, 0.1f),
                       greedy = mk(0, 0, 1, 0);
  // The default launch (one cluster of 6 per row, two blocks per SM, on sm_90 at this V), then the pipelined launch
  // (persistent clusters, the next row copied in while the current one is sampled) and other shapes.
  const int wave = gpu::sample_rows_in_flight(V, shape_of(0));
  const std::vector<BenchCase> cases = {
      {"top_p_0.9", 256, top_p, shape_of(0)},
      {"top_k_50+top_p_0.9", 256, top_k_p, shape_of(0)},
      {"min_p_0.1", 256, min_p, shape_of(0)},
      {"greedy", 256, greedy, shape_of(0)},
      {"greedy+lse", 256, greedy, shape_of(0)},
      {"top_p_0.9_1024rows", 1024, top_p, shape_of(0)},
      // Fewer rows than the GPU holds at once: 16 rows, and one full wave (as many rows as run at once). Their time
      // is one row's latency, which bounds the 256-row time at ~256 / (rows at once) times it.
      {"top_p_0.9_16rows", 16, top_p, shape_of(0)},
      {"top_p_0.9_one_wave", wave, top_p, shape_of(0)},
      {"top_p_0.9_peaked", 256, top_p, shape_of(0)},
      {"top_p_0.9_pipelined", 256, top_p, shape_of(0, 1)},
      {"top_p_0.9_pipelined_G14", 256, top_p, shape_of(0, 1, 0, 14)},
      {"top_p_0.9_pipelined_G16", 256, top_p, shape_of(0, 1, 0, 16)},
      {"top_p_0.9_pipelined_1024t", 256, top_p, shape_of(0, 1, 1024)},
      {"top_k_50+top_p_0.9_pipelined", 256, top_k_p, shape_of(0, 1)},
      {"min_p_0.1_pipelined", 256, min_p, shape_of(0, 1)},
      {"greedy+lse_pipelined", 256, greedy, shape_of(0, 1)},
      {"top_p_0.9_1024rows_pipelined", 1024, top_p, shape_of(0, 1)},
      // Clusters of 8 (the default until stop 20: fewer rows at once, each a little faster), of 4, one block.
      {"top_p_0.9_cluster8", 256, top_p, shape_of(8)},
      {"top_k_50+top_p_0.9_cluster8", 256, top_k_p, shape_of(8)},
      {"min_p_0.1_cluster8", 256, min_p, shape_of(8)},
      {"greedy+lse_cluster8", 256, greedy, shape_of(8)},
      {"top_p_0.9_1024rows_cluster8", 1024, top_p, shape_of(8)},
      {"top_p_0.9_16rows_cluster8", 16, top_p, shape_of(8)},
      {"top_p_0.9_cluster4", 256, top_p, shape_of(4)},
      {"top_p_0.9_block+scratch", 256, top_p, shape_of(1)},
  };

  std::string json = "{\n  \"gpu\": \"" + gpu_name + "\",\n  \"command\": \"bench/sampling-gpu.sh (sampling_test --bench)\"" +
                     ",\n  \"timing\": \"cudaEvent over the iterations after 3 warm-up launches, ms per launch\"" +
                     ",\n  \"vocab\": " + std::to_string(V) +
                     ",\n  \"logits\": \"per row N(0, s^2), s = 1, 2, 3, 4 cycling (peaked cases: the same doubled)\",\n  \"iters\": " +
                     std::to_string(iters) + ",\n  \"read_once_ms\": {\"256\": " + std::to_string(read256) +
                     ", \"1024\": " + std::to_string(read1024) + "},\n  \"cases\": [\n";
  for (size_t ci = 0; ci < cases.size(); ci++) {
    const BenchCase& c = cases[ci];
    std::vector<SamplingParams> params(c.rows, c.p);
    for (int r = 0; r < c.rows; r++) params[r].seed = 7, params[r].request_id = (uint64_t)r, params[r].step = 3;
    MP_GPU_CHECK(gpu::memcpy_async(dp.p, params.data(), c.rows * sizeof(SamplingParams), g_stream));
#if MP_SAMPLE_PROFILE
    unsigned long long prof[gpu::kProfPhases];
    gpu::sample_profile_take(prof, g_stream);  // drops what earlier cases left
#endif
    double ms = time_ms([&] {
      gpu::sample_rows(c.name.find("peaked") != std::string::npos ? dpeak.p : dl.p, V, c.rows, V, dp.p, c.name.find("+lse") != std::string::npos ? dlse.p : nullptr, dt.p,
                       dlp.p, dr.p, ds.p, scratch.p, g_stream, c.shape);
    });
    std::vector<int32_t> rounds(c.rows), status(c.rows);
    MP_GPU_CHECK(gpu::memcpy_async(rounds.data(), dr.p, c.rows * 4, g_stream));
    MP_GPU_CHECK(gpu::memcpy_async(status.data(), ds.p, c.rows * 4, g_stream));
    MP_GPU_CHECK(gpu::stream_sync(g_stream));
    long sum = 0;
    int mx = 0, bad = 0;
    for (int r = 0; r < c.rows; r++) sum += rounds[r], mx = std::max(mx, rounds[r]), bad += status[r] != 0;
#if MP_SAMPLE_PROFILE
    gpu::sample_profile_take(prof, g_stream);
    {
      const double n = prof[7] ? (double)prof[7] : 1.0;
      printf("  phases per row (us): wait %.2f max %.2f weights %.2f icdf %.2f count %.2f topk %.2f rest %.2f; sum %.2f "
             "(%llu rows)\n",
             prof[0] / n / 1e3, prof[1] / n / 1e3, prof[2] / n / 1e3, prof[3] / n / 1e3, prof[4] / n / 1e3,
             prof[5] / n / 1e3, prof[6] / n / 1e3,
             (prof[0] + prof[1] + prof[2] + prof[3] + prof[4] + prof[5] + prof[6]) / n / 1e3, prof[7]);
    }
#endif
    const double rd = c.rows == 1024 ? read1024 : c.rows == 256 ? read256 : read_ms(c.rows);
    const int at_once = gpu::sample_rows_in_flight(V, c.shape);
    printf("%-30s rows %4d: %.4f ms  (read-once bound %.4f ms: %.2fx), rounds mean %.2f max %d, bad %d, %d rows at once\n",
           c.name.c_str(), c.rows, ms, rd, ms / rd, (double)sum / c.rows, mx, bad, at_once);
    char b[400];
    snprintf(b, sizeof b,
             "    {\"name\": \"%s\", \"rows\": %d, \"ms\": %.5f, \"read_once_ms\": %.5f, \"fraction_of_read_bound\": "
             "%.4f, \"rounds_mean\": %.3f, \"rounds_max\": %d, \"rows_at_once\": %d}%s\n",
             c.name.c_str(), c.rows, ms, rd, rd / ms, (double)sum / c.rows, mx, at_once, ci + 1 < cases.size() ? "," : "");
    json += b;
  }
  json += "  ]\n}\n";
  if (!out_path.empty()) {
    FILE* f = fopen(out_path.c_str(), "w");
    if (!f) {
      printf("FAIL bench: cannot write %s\n", out_path.c_str());
      return 1;
    }
    fputs(json.c_str(), f);
    fclose(f);
    printf("wrote %s\n", out_path.c_str());
  }
  gpu::event_destroy(e0);
  gpu::event_destroy(e1);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool bench_mode = false, quick = false, race = false;
  std::string out, logits_file;
  int iters = 50;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--bench") bench_mode = true;
    else if (a == "--quick") quick = true;
    else if (a == "--race") race = true;
    else if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--logits-file" && i + 1 < argc) logits_file = argv[++i];
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: sampling_test [--quick | --race] | --bench [--out FILE] [--logits-file FILE] [--iters N]\n");
      return 2;
    }
  }
  try {
    MP_GPU_CHECK(gpu::set_device(0));
    MP_GPU_CHECK(gpu::stream_create(&g_stream));
    if (bench_mode) return bench(out, logits_file, iters);

    const int big = 151936;
    if (race) {  // a small set for compute-sanitizer racecheck: every shape, top-k lists, pipelined row loops
      check_agreement(1000, 32, {shape_of(0), shape_of(1), shape_of(4), shape_of(8, 1), shape_of(4, 1, 0, 3)}, 21);
      check_agreement(big, 4, {shape_of(0), shape_of(0, 1, 0, 2), shape_of(6)}, 22);
      printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "ALL PASSED", g_failures);
      return g_failures ? 1 : 0;
    }
    // quick (under compute-sanitizer): fewer rows, every path still taken. Shapes: auto, scratch, one block in
    // shared memory, clusters; one row per block (the default) and pipelined.
    using L = gpu::SampleLaunch;
    check_agreement(7, quick ? 64 : 512,
                    {shape_of(0), shape_of(1), shape_of(-1), shape_of(2), shape_of(8), shape_of(-1, 1), shape_of(8, 1),
                     shape_of(-1, 1, 0, 5)},
                    11);
    check_agreement(1, 32, {shape_of(0), shape_of(1), shape_of(4), shape_of(4, 1)}, 12);
    check_agreement(1000, quick ? 64 : 512,
                    {shape_of(0), shape_of(1), shape_of(-1), shape_of(4), shape_of(4, 1), shape_of(-1, 1, 1024),
                     shape_of(2, 1, 0, 7), shape_of(6)},
                    13);
    if (!quick) check_agreement(50000, 128, {shape_of(0), shape_of(1), shape_of(2), shape_of(2, 1), shape_of(0, 1)}, 14);
    check_agreement(big, quick ? 8 : 128,
                    quick ? std::vector<L>{shape_of(0), shape_of(0, 1, 0, 3)}
                          : std::vector<L>{shape_of(0), shape_of(1), shape_of(0, 1), shape_of(0, 1, 1024), shape_of(4),
                                           shape_of(6)},
                    15);
    if (!quick) {
      check_chi_square(shape_of(0));
      check_chi_square(shape_of(4));
      check_chi_square(shape_of(4, 1));
    }
    check_pipeline_invariance(quick ? 1000 : big, quick ? 16 : 40);
    check_batch_invariance(quick ? 1000 : big, false);
    if (!quick) check_batch_invariance(big, true);
    check_lse(quick ? 1000 : big);
    check_bad_rows(1000, shape_of(0));
    check_bad_rows(big, shape_of(0));
    if (!quick) check_bad_rows(big, shape_of(1));
    if (!quick) check_bad_rows(big, shape_of(0, 1));
    check_arguments();
  } catch (const std::exception& e) {
    printf("FAIL exception: %s\n", e.what());
    return 1;
  }
  printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "ALL PASSED", g_failures);
  return g_failures ? 1 : 0;
}
