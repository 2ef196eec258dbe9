// GPU attention vs the CPU reference (kernels/cpu/ops.cpp), plus the properties the rollout relies on:
//  - forward: packed varlen causal GQA for every HD and several NH/KVH ratios and packings, against
//    cpu::attention_forward on the same bf16-rounded inputs (fp32 reference); lse against a double-precision sum;
//  - backward: dq/dk/dv against cpu::attention_backward; two runs give the same bits;
//  - paged: kv_cache_write + paged_attention give, bit for bit, attention_forward's rows for decode steps (one row
//    per sequence per position, written step by step into a cache whose unwritten memory holds NaN bits), for
//    prefill rows, and for whole sequences, with groups sharing prompt blocks and uneven lengths;
//  - bad arguments throw moepilot::Error(InvalidArgument).
// Exit status 0 only when every check passes. Usage: attention_test [--quick]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "cuda/attention.h"

using namespace moepilot;
using gpu::bf16_bits;

namespace {

int g_failures = 0;
#define EXPECT(cond, ...)                           \
  do {                                              \
    if (!(cond)) {                                  \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                     \
      std::printf("\n");                            \
      g_failures++;                                 \
    }                                               \
  } while (0)

uint16_t f2bf(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
float bf2f(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint32_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return (uint32_t)(s >> 11);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * (next() & 0xffffff) / 16777216.f; }
};

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { MP_GPU_CHECK(gpu::malloc_device((void**)&p, std::max<size_t>(1, n) * sizeof(T))); }
  Dev(const std::vector<T>& h) : Dev(h.size()) { upload(h); }
  ~Dev() { gpu::free_device(p); }
  Dev(const Dev&) = delete;
  void upload(const std::vector<T>& h) {
    MP_GPU_CHECK(gpu::memcpy_async(p, h.data(), h.size() * sizeof(T), nullptr));
    MP_GPU_CHECK(gpu::stream_sync(nullptr));
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    MP_GPU_CHECK(gpu::memcpy_async(h.data(), p, n * sizeof(T), nullptr));
    MP_GPU_CHECK(gpu::stream_sync(nullptr));
    return h;
  }
};

// Max |a - b| over max |b|, with the first index of the largest error for the report.
struct Err {
  double rel = 0, maxref = 0, maxerr = 0;
  size_t at = 0;
  float got = 0, want = 0;
};
Err compare(const std::vector<float>& got, const std::vector<float>& want) {
  Err e;
  for (size_t i = 0; i < want.size(); i++) e.maxref = std::max(e.maxref, (double)std::fabs(want[i]));
  for (size_t i = 0; i < want.size(); i++) {
    const double d = std::fabs((double)got[i] - want[i]);
    if (!(d <= e.maxerr)) {  // NaN counts as the largest
      e.maxerr = std::isnan(d) ? INFINITY : d;
      e.at = i;
      e.got = got[i];
      e.want = want[i];
    }
  }
  // Exact zeros in the reference (e.g. dq, dk of a one-token sequence, where the softmax has one entry) are met
  // only to rounding: relative to a floor of 1e-3 of the inputs' unit scale.
  e.rel = e.maxerr / std::max(e.maxref, 1e-3);
  return e;
}

// ------------------------------------------------------------------ forward + backward vs the CPU
struct Packing {
  std::vector<int> lens;
  int N() const { return std::accumulate(lens.begin(), lens.end(), 0); }
};

void test_train(int HD, int NH, int KVH, const Packing& pk, bool fused_qkv, uint64_t seed) {
  const int N = pk.N(), B = (int)pk.lens.size();
  const int max_len = *std::max_element(pk.lens.begin(), pk.lens.end());
  // q, k, v rows: either separate dense buffers or one fused [N, (NH + 2 KVH) * HD] buffer (the engine's qkv).
  const int qkv_w = (NH + 2 * KVH) * HD;
  const int q_stride = fused_qkv ? qkv_w : NH * HD;
  const int kv_stride = fused_qkv ? qkv_w : KVH * HD;
  Rng rng(seed);
  std::vector<uint16_t> hq((size_t)N * q_stride, 0), hk((size_t)N * kv_stride, 0), hv((size_t)N * kv_stride, 0);
  std::vector<uint16_t> hdo((size_t)N * NH * HD);
  auto fill = [&](std::vector<uint16_t>& x, int stride, int width, float amp) {
    for (int i = 0; i < N; i++)
      for (int c = 0; c < width; c++) x[(size_t)i * stride + c] = f2bf(rng.uniform(-amp, amp));
  };
  std::vector<uint16_t> fused;
  fill(hq, q_stride, NH * HD, 2.f);
  fill(hk, kv_stride, KVH * HD, 2.f);
  fill(hv, kv_stride, KVH * HD, 1.f);
  for (auto& x : hdo) x = f2bf(rng.uniform(-1.f, 1.f));
  if (fused_qkv) {  // one buffer: q at column 0, k at NH*HD, v at (NH+KVH)*HD
    fused.assign((size_t)N * qkv_w, 0);
    for (int i = 0; i < N; i++) {
      std::memcpy(&fused[(size_t)i * qkv_w], &hq[(size_t)i * q_stride], NH * HD * 2);
      std::memcpy(&fused[(size_t)i * qkv_w + NH * HD], &hk[(size_t)i * kv_stride], KVH * HD * 2);
      std::memcpy(&fused[(size_t)i * qkv_w + (NH + KVH) * HD], &hv[(size_t)i * kv_stride], KVH * HD * 2);
    }
  }
  std::vector<int32_t> cu(B + 1, 0);
  for (int b = 0; b < B; b++) cu[b + 1] = cu[b] + pk.lens[b];

  Dev<uint16_t> dq_in(fused_qkv ? fused : hq), dk_in(fused_qkv ? std::vector<uint16_t>(1) : hk),
      dv_in(fused_qkv ? std::vector<uint16_t>(1) : hv), ddo(hdo);
  const bf16_bits* q = dq_in.p;
  const bf16_bits* k = fused_qkv ? dq_in.p + NH * HD : dk_in.p;
  const bf16_bits* v = fused_qkv ? dq_in.p + (NH + KVH) * HD : dv_in.p;
  Dev<int32_t> dcu(cu);
  Dev<uint16_t> dout((size_t)N * NH * HD);
  Dev<float> dlse((size_t)N * NH);
  Dev<float> gdq((size_t)N * NH * HD), gdk((size_t)N * KVH * HD), gdv((size_t)N * KVH * HD);
  gpu::AttentionShape sh;
  sh.N = N, sh.B = B, sh.max_seqlen = max_len, sh.NH = NH, sh.KVH = KVH, sh.HD = HD, sh.q_stride = q_stride,
  sh.kv_stride = kv_stride;
  gpu::attention_forward(dout.p, dlse.p, q, k, v, dcu.p, sh, nullptr);
  gpu::attention_backward(gdq.p, gdk.p, gdv.p, ddo.p, dout.p, dlse.p, q, k, v, dcu.p, sh, nullptr);
  MP_GPU_CHECK(gpu::stream_sync(nullptr));
  const auto out_b = dout.download();
  const auto lse_g = dlse.download();
  const auto dq1 = gdq.download(), dk1 = gdk.download(), dv1 = gdv.download();
  // Determinism: a second backward (after scribbling over the outputs) gives the same bits.
  MP_GPU_CHECK(gpu::memset_async(gdq.p, 0x7f, gdq.n * 4, nullptr));
  MP_GPU_CHECK(gpu::memset_async(gdk.p, 0x7f, gdk.n * 4, nullptr));
  MP_GPU_CHECK(gpu::memset_async(gdv.p, 0x7f, gdv.n * 4, nullptr));
  gpu::attention_backward(gdq.p, gdk.p, gdv.p, ddo.p, dout.p, dlse.p, q, k, v, dcu.p, sh, nullptr);
  const auto dq2 = gdq.download(), dk2 = gdk.download(), dv2 = gdv.download();
  const bool same = std::memcmp(dq1.data(), dq2.data(), dq1.size() * 4) == 0 &&
                    std::memcmp(dk1.data(), dk2.data(), dk1.size() * 4) == 0 &&
                    std::memcmp(dv1.data(), dv2.data(), dv1.size() * 4) == 0;

  // CPU reference per sequence on the bf16-rounded inputs (dense float copies).
  std::vector<float> out_ref((size_t)N * NH * HD), out_got((size_t)N * NH * HD);
  std::vector<float> dq_ref((size_t)N * NH * HD, 0.f), dk_ref((size_t)N * KVH * HD, 0.f), dv_ref((size_t)N * KVH * HD, 0.f);
  std::vector<float> lse_ref((size_t)N * NH);
  const float scale = 1.f / std::sqrt((float)HD);
  for (int b = 0; b < B; b++) {
    const int T = pk.lens[b], s0 = cu[b];
    std::vector<float> fq((size_t)T * NH * HD), fk((size_t)T * KVH * HD), fv((size_t)T * KVH * HD),
        fdo((size_t)T * NH * HD), probs((size_t)NH * T * T);
    for (int t = 0; t < T; t++) {
      for (int c = 0; c < NH * HD; c++) {
        fq[(size_t)t * NH * HD + c] = bf2f(hq[(size_t)(s0 + t) * q_stride + c]);
        fdo[(size_t)t * NH * HD + c] = bf2f(hdo[(size_t)(s0 + t) * NH * HD + c]);
      }
      for (int c = 0; c < KVH * HD; c++) {
        fk[(size_t)t * KVH * HD + c] = bf2f(hk[(size_t)(s0 + t) * kv_stride + c]);
        fv[(size_t)t * KVH * HD + c] = bf2f(hv[(size_t)(s0 + t) * kv_stride + c]);
      }
    }
    cpu::attention_forward(&out_ref[(size_t)s0 * NH * HD], probs.data(), fq.data(), fk.data(), fv.data(), T, NH, KVH,
                           HD, NH * HD, KVH * HD);
    cpu::attention_backward(&dq_ref[(size_t)s0 * NH * HD], &dk_ref[(size_t)s0 * KVH * HD],
                            &dv_ref[(size_t)s0 * KVH * HD], fdo.data(), probs.data(), fq.data(), fk.data(), fv.data(),
                            T, NH, KVH, HD, NH * HD, KVH * HD);
    for (int h = 0; h < NH; h++) {
      const int kvh = h / (NH / KVH);
      for (int t = 0; t < T; t++) {
        std::vector<double> sc(t + 1);
        double mx = -INFINITY;
        for (int j = 0; j <= t; j++) {
          double d = 0;
          for (int c = 0; c < HD; c++)
            d += (double)fq[(size_t)t * NH * HD + h * HD + c] * fk[(size_t)j * KVH * HD + kvh * HD + c];
          sc[j] = d * scale;
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (int j = 0; j <= t; j++) sum += std::exp(sc[j] - mx);
        lse_ref[(size_t)(s0 + t) * NH + h] = (float)(mx + std::log(sum));
      }
    }
  }
  for (size_t i = 0; i < out_got.size(); i++) out_got[i] = bf2f(out_b[i]);
  const Err eo = compare(out_got, out_ref), el = compare(lse_g, lse_ref);
  const Err eq = compare(dq1, dq_ref), ek = compare(dk1, dk_ref), ev = compare(dv1, dv_ref);
  std::string lens;
  for (int l : pk.lens) lens += std::to_string(l) + ",";
  char tag[256];
  std::snprintf(tag, sizeof tag, "HD=%d NH=%d KVH=%d lens=%s%s", HD, NH, KVH, lens.c_str(), fused_qkv ? " fused" : "");
  std::printf("train %-52s out %.2e lse %.2e dq %.2e dk %.2e dv %.2e det %s\n", tag, eo.rel, el.maxerr, eq.rel,
              ek.rel, ev.rel, same ? "ok" : "DIFF");
  auto report = [&](const char* what, const Err& e, double tol, int width) {
    EXPECT(e.rel <= tol, "%s %s: max err %.3e (rel %.3e > %.1e) at row %zu col %zu: got %.6f want %.6f", tag, what,
           e.maxerr, e.rel, tol, e.at / width, e.at % width, e.got, e.want);
  };
  report("out", eo, 1e-2, NH * HD);
  EXPECT(el.maxerr <= 2e-3 * std::max(1.0, el.maxref), "%s lse: max abs err %.3e at %zu (got %.6f want %.6f)", tag,
         el.maxerr, el.at, el.got, el.want);
  report("dq", eq, 2e-2, NH * HD);
  report("dk", ek, 2e-2, KVH * HD);
  report("dv", ev, 2e-2, KVH * HD);
  EXPECT(same, "%s backward not bitwise reproducible", tag);
}

// ------------------------------------------------------------------ paged vs forward, bitwise
// Groups of samples share a prompt (same blocks); every sample then decodes its own completion. The forward
// over the packed full sequences is the reference row by row.
void test_paged(int HD, int NH, int KVH, int block_size, const std::vector<int>& prompts,
                const std::vector<std::vector<int>>& completions, uint64_t seed) {
  const int G = (int)prompts.size();
  std::vector<int> seq_group, seq_len;
  for (int g = 0; g < G; g++)
    for (int c : completions[g]) {
      seq_group.push_back(g);
      seq_len.push_back(prompts[g] + c);
    }
  const int NS = (int)seq_len.size();
  const int max_len = *std::max_element(seq_len.begin(), seq_len.end());
  const int max_blocks = (max_len + block_size - 1) / block_size;
  Rng rng(seed);
  const int QW = NH * HD, KW = KVH * HD;
  // Per group: prompt k/v; per sequence: q of all positions and k/v of its completion.
  std::vector<std::vector<uint16_t>> pk(G), pv(G);
  for (int g = 0; g < G; g++) {
    pk[g].resize((size_t)prompts[g] * KW);
    pv[g].resize((size_t)prompts[g] * KW);
    for (auto& x : pk[g]) x = f2bf(rng.uniform(-2.f, 2.f));
    for (auto& x : pv[g]) x = f2bf(rng.uniform(-1.f, 1.f));
  }
  std::vector<int32_t> cu(NS + 1, 0);
  for (int s = 0; s < NS; s++) cu[s + 1] = cu[s] + seq_len[s];
  const int N = cu[NS];
  std::vector<uint16_t> hq((size_t)N * QW), hk((size_t)N * KW), hv((size_t)N * KW);
  for (int s = 0; s < NS; s++) {
    const int g = seq_group[s], P = prompts[g];
    for (int p = 0; p < seq_len[s]; p++) {
      const size_t r = (size_t)cu[s] + p;
      for (int c = 0; c < QW; c++) hq[r * QW + c] = f2bf(rng.uniform(-2.f, 2.f));
      for (int c = 0; c < KW; c++) {
        hk[r * KW + c] = p < P ? pk[g][(size_t)p * KW + c] : f2bf(rng.uniform(-2.f, 2.f));
        hv[r * KW + c] = p < P ? pv[g][(size_t)p * KW + c] : f2bf(rng.uniform(-1.f, 1.f));
      }
    }
  }
  // Reference: the forward over all sequences packed.
  Dev<uint16_t> dq(hq), dk(hk), dv(hv);
  Dev<int32_t> dcu(cu);
  Dev<uint16_t> dref((size_t)N * QW);
  Dev<float> dlse((size_t)N * NH);
  gpu::AttentionShape sh;
  sh.N = N, sh.B = NS, sh.max_seqlen = max_len, sh.NH = NH, sh.KVH = KVH, sh.HD = HD, sh.q_stride = QW,
  sh.kv_stride = KW;
  gpu::attention_forward(dref.p, dlse.p, dq.p, dk.p, dv.p, dcu.p, sh, nullptr);
  const auto ref = dref.download();

  // Block tables: a group's prompt blocks are shared by its samples; blocks are handed out in a scrambled order.
  int nb = 0;
  std::vector<int32_t> tables((size_t)NS * max_blocks, -1);
  std::vector<int> order;
  int total_blocks = 0;
  for (int g = 0; g < G; g++) total_blocks += prompts[g] / block_size;
  for (int s = 0; s < NS; s++)
    total_blocks += (seq_len[s] + block_size - 1) / block_size - prompts[seq_group[s]] / block_size;
  total_blocks += 3;  // never used: the pool is larger than what is written
  order.resize(total_blocks);
  std::iota(order.begin(), order.end(), 0);
  for (int i = total_blocks - 1; i > 0; i--) std::swap(order[i], order[rng.next() % (i + 1)]);
  {
    int first = 0;
    for (int g = 0; g < G; g++) {
      const int nsg = (int)completions[g].size();
      const int pb = prompts[g] / block_size;
      for (int b = 0; b < pb; b++) {
        const int id = order[nb++];
        for (int s = first; s < first + nsg; s++) tables[(size_t)s * max_blocks + b] = id;
      }
      for (int s = first; s < first + nsg; s++)
        for (int b = pb; b < (seq_len[s] + block_size - 1) / block_size; b++)
          tables[(size_t)s * max_blocks + b] = order[nb++];
      first += nsg;
    }
  }
  const int layers = 3, layer = 1;
  gpu::PagedKv kv;
  kv.num_blocks = total_blocks, kv.block_size = block_size, kv.layers = layers, kv.KVH = KVH, kv.HD = HD;
  const size_t pool_elems = (size_t)total_blocks * layers * 2 * block_size * KW;
  Dev<uint16_t> pool(pool_elems);
  MP_GPU_CHECK(gpu::memset_async(pool.p, 0xff, pool_elems * 2, nullptr));  // NaN bits wherever nothing is written
  kv.pool = pool.p;
  Dev<int32_t> dtables(tables);

  // One paged call: rows (seq, pos) in group order; groups with their shared lengths. Writes the rows' k/v
  // first when `write`; then compares every row's output with the forward's row, bit for bit.
  int calls = 0, rows_checked = 0;
  auto run = [&](const char* what, const std::vector<std::pair<int, int>>& rws, const std::vector<int>& group_rows,
                 const std::vector<int>& shared, bool write) {
    const int R = (int)rws.size();
    if (R == 0) return;
    std::vector<int32_t> rs(R), rp(R);
    std::vector<uint16_t> q((size_t)R * QW), k((size_t)R * KW), v((size_t)R * KW);
    int max_pos = 0;
    for (int r = 0; r < R; r++) {
      rs[r] = rws[r].first;
      rp[r] = rws[r].second;
      max_pos = std::max(max_pos, rp[r]);
      const size_t src = (size_t)cu[rs[r]] + rp[r];
      std::memcpy(&q[(size_t)r * QW], &hq[src * QW], QW * 2);
      std::memcpy(&k[(size_t)r * KW], &hk[src * KW], KW * 2);
      std::memcpy(&v[(size_t)r * KW], &hv[src * KW], KW * 2);
    }
    Dev<int32_t> drs(rs), drp(rp), dgr(std::vector<int32_t>(group_rows.begin(), group_rows.end())),
        dsh(std::vector<int32_t>(shared.begin(), shared.end()));
    Dev<uint16_t> rq(q), rk(k), rv(v), rout((size_t)R * QW);
    gpu::PagedRows pr;
    pr.R = R, pr.row_seq = drs.p, pr.row_pos = drp.p, pr.block_tables = dtables.p, pr.max_blocks = max_blocks;
    pr.groups = (int)shared.size(), pr.group_rows = dgr.p, pr.shared_len = dsh.p, pr.max_pos = max_pos;
    if (write) gpu::kv_cache_write(kv, layer, rk.p, rv.p, KW, pr, nullptr);
    gpu::paged_attention(rout.p, rq.p, QW, NH, kv, layer, pr, nullptr);
    const auto got = rout.download();
    calls++;
    for (int r = 0; r < R; r++) {
      const size_t src = (size_t)cu[rs[r]] + rp[r];
      if (std::memcmp(&got[(size_t)r * QW], &ref[src * QW], QW * 2) != 0) {
        int c = 0;
        while (got[(size_t)r * QW + c] == ref[src * QW + c]) c++;
        EXPECT(false,
               "paged HD=%d NH=%d KVH=%d bs=%d %s: row %d (seq %d pos %d) head %d col %d: paged %04x (%.6f) forward "
               "%04x (%.6f)",
               HD, NH, KVH, block_size, what, r, rs[r], rp[r], c / HD, c % HD, got[(size_t)r * QW + c],
               bf2f(got[(size_t)r * QW + c]), ref[src * QW + c], bf2f(ref[src * QW + c]));
        return;  // one report per call
      }
      rows_checked++;
    }
  };

  const int fail0 = g_failures;
  // 1. Prefill: each group's prompt rows, written through its first sample (the blocks are shared), as one
  //    group whose rows also include the second sample's prompt rows (same blocks, distinct sequence ids).
  {
    std::vector<std::pair<int, int>> rws;
    std::vector<int> gr{0}, shl;
    int first = 0;
    for (int g = 0; g < G; g++) {
      for (int p = 0; p < prompts[g]; p++) rws.push_back({first, p});
      gr.push_back((int)rws.size());
      shl.push_back(prompts[g]);
      first += (int)completions[g].size();
    }
    run("prefill-write", rws, gr, shl, true);
    rws.clear();
    gr.assign(1, 0);
    shl.clear();
    first = 0;
    for (int g = 0; g < G; g++) {
      const int nsg = (int)completions[g].size();
      for (int s = first; s < first + std::min(nsg, 2); s++)
        for (int p = 0; p < prompts[g]; p++) rws.push_back({s, p});
      gr.push_back((int)rws.size());
      shl.push_back(prompts[g]);
      first += nsg;
    }
    run("prefill-2-samples", rws, gr, shl, false);
  }
  // 2. Decode: step t writes then attends position prompt + t of every sample still running.
  int max_c = 0;
  for (auto& cs : completions)
    for (int c : cs) max_c = std::max(max_c, c);
  for (int t = 0; t < max_c; t++) {
    std::vector<std::pair<int, int>> rws;
    std::vector<int> gr{0}, shl;
    for (int s = 0; s < NS; s++) {
      const int g = seq_group[s];
      if (prompts[g] + t < seq_len[s]) rws.push_back({s, prompts[g] + t});
      const bool last_of_group = s + 1 == NS || seq_group[s + 1] != g;
      if (last_of_group && (int)rws.size() > gr.back()) {
        gr.push_back((int)rws.size());
        shl.push_back(prompts[g]);
      }
    }
    run("decode", rws, gr, shl, true);
    // The same rows as a decode graph lays them out: as many groups as its bucket could need, the ones past the
    // batch's empty.
    std::vector<int> gr_padded(gr), shl_padded(shl);
    while (shl_padded.size() < rws.size() + 1) {
      gr_padded.push_back(gr.back());
      shl_padded.push_back(0);
    }
    run("decode-padded", rws, gr_padded, shl_padded, false);
  }
  // 3. Every row of every sequence, grouped by prompt (many sequences per 64-row chunk, long groups), and again
  //    as one group with nothing declared shared.
  {
    std::vector<std::pair<int, int>> rws;
    std::vector<int> gr{0}, shl;
    for (int s = 0; s < NS; s++) {
      for (int p = 0; p < seq_len[s]; p++) rws.push_back({s, p});
      const int g = seq_group[s];
      if (s + 1 == NS || seq_group[s + 1] != g) {
        gr.push_back((int)rws.size());
        shl.push_back(prompts[g]);
      }
    }
    run("all-rows", rws, gr, shl, false);
    run("all-rows-unshared", rws, {0, (int)rws.size()}, {0}, false);
  }
  std::printf("paged HD=%d NH=%d KVH=%d bs=%d groups=%d seqs=%d: %d calls, %d rows bit-identical to forward%s\n", HD,
              NH, KVH, block_size, G, NS, calls, rows_checked, g_failures == fail0 ? "" : " (FAILURES)");
}

// ------------------------------------------------------------------ argument checks
void expect_invalid(const char* what, const std::function<void()>& f) {
  try {
    f();
    EXPECT(false, "%s: no error thrown", what);
  } catch (const Error& e) {
    EXPECT(e.code() == ErrorCode::InvalidArgument, "%s: code %s (%s)", what, error_code_name(e.code()), e.what());
    std::printf("bad-arg %-28s -> %s\n", what, e.what());
  }
}

void test_bad_args() {
  Dev<uint16_t> buf(1 << 16);
  Dev<float> fbuf(1 << 16);
  Dev<int32_t> cu(std::vector<int32_t>{0, 8});
  gpu::AttentionShape ok;
  ok.N = 8, ok.B = 1, ok.max_seqlen = 8, ok.NH = 4, ok.KVH = 2, ok.HD = 32, ok.q_stride = 128, ok.kv_stride = 64;
  auto fwd = [&](gpu::AttentionShape sh) {
    return [&, sh] { gpu::attention_forward(buf.p, fbuf.p, buf.p, buf.p, buf.p, cu.p, sh, nullptr); };
  };
  gpu::AttentionShape sh = ok;
  sh.HD = 48;
  expect_invalid("HD 48", fwd(sh));
  sh = ok, sh.KVH = 3;
  expect_invalid("NH % KVH", fwd(sh));
  sh = ok, sh.q_stride = 100;
  expect_invalid("q_stride < NH*HD", fwd(sh));
  sh = ok, sh.kv_stride = 68;
  expect_invalid("kv_stride not multiple of 8", fwd(sh));
  sh = ok, sh.max_seqlen = 0;
  expect_invalid("max_seqlen 0", fwd(sh));
  expect_invalid("null q", [&] { gpu::attention_forward(buf.p, fbuf.p, nullptr, buf.p, buf.p, cu.p, ok, nullptr); });
  expect_invalid("misaligned k", [&] {
    gpu::attention_forward(buf.p, fbuf.p, buf.p, buf.p + 1, buf.p, cu.p, ok, nullptr);
  });
  expect_invalid("backward null dk", [&] {
    gpu::attention_backward(fbuf.p, nullptr, fbuf.p, buf.p, buf.p, fbuf.p, buf.p, buf.p, buf.p, cu.p, ok, nullptr);
  });
  gpu::PagedKv kv;
  kv.pool = buf.p, kv.num_blocks = 4, kv.block_size = 16, kv.layers = 2, kv.KVH = 2, kv.HD = 32;
  Dev<int32_t> ints(std::vector<int32_t>(64, 0));
  gpu::PagedRows pr;
  pr.R = 1, pr.row_seq = ints.p, pr.row_pos = ints.p, pr.block_tables = ints.p, pr.max_blocks = 4, pr.groups = 1,
  pr.group_rows = ints.p, pr.shared_len = ints.p, pr.max_pos = 0;
  expect_invalid("paged layer out of range", [&] { gpu::paged_attention(buf.p, buf.p, 128, 4, kv, 2, pr, nullptr); });
  expect_invalid("paged NH % KVH", [&] { gpu::paged_attention(buf.p, buf.p, 128, 3, kv, 0, pr, nullptr); });
  expect_invalid("paged max_pos past table", [&] {
    gpu::PagedRows p2 = pr;
    p2.max_pos = 64;
    gpu::paged_attention(buf.p, buf.p, 128, 4, kv, 0, p2, nullptr);
  });
  expect_invalid("cache write null pool", [&] {
    gpu::PagedKv k2 = kv;
    k2.pool = nullptr;
    gpu::kv_cache_write(k2, 0, buf.p, buf.p, 64, pr, nullptr);
  });
  expect_invalid("cache write HD 40", [&] {
    gpu::PagedKv k2 = kv;
    k2.HD = 40;
    gpu::kv_cache_write(k2, 0, buf.p, buf.p, 80, pr, nullptr);
  });
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  try {
    test_bad_args();
    // --quick (for compute-sanitizer): fewer packings and paged cases, every HD still.
    const std::vector<Packing> packings =
        quick ? std::vector<Packing>{{{7}}, {{1, 7, 64, 129, 3, 65}}}
              : std::vector<Packing>{{{1}}, {{7}}, {{64}}, {{129}}, {{512}}, {{1, 7, 64, 129, 3, 65}}, {{200, 512, 1, 63}}};
    const int hds[] = {16, 32, 64, 128};
    const int ratios[][2] = {{2, 2}, {4, 1}, {8, 8}, {16, 2}};  // (NH, KVH): ratios 1, 4, 1, 8
    uint64_t seed = 1;
    for (int HD : hds)
      for (size_t i = 0; i < packings.size(); i++) {
        const auto& r = ratios[(i + HD / 16) % 4];
        // Big heads x long sequences make the CPU reference slow: keep NH * len moderate.
        int NH = r[0], KVH = r[1];
        if (packings[i].N() > 600 && NH > 4) NH = 4, KVH = NH / std::min(4, r[0] / r[1]);
        test_train(HD, NH, KVH, packings[i], false, seed++);
      }
    test_train(128, 16, 16, {{130, 70}}, true, seed++);  // fused qkv rows (the engine's layout), Qwen heads
    test_train(64, 6, 2, {{100, 1, 64}}, true, seed++);  // ratio 3
    // Paged: groups with prompts of whole 64-tiles, of partial tiles (shared blocks ending mid-tile), tiny and empty.
    test_paged(128, 16, 16, 16, {64, 80}, {{1, 5, 70, 64}, {3, 1, 2}}, seed++);
    test_paged(32, 8, 1, 32, {96, 0}, {{9, 33, 1}, {70, 2}}, seed++);
    if (!quick) {
      test_paged(64, 8, 2, 16, {128, 16, 48}, {{10, 100}, {1, 2, 3, 4, 5}, {65}}, seed++);
      test_paged(16, 4, 4, 8, {24, 64}, {{3, 66, 7, 1, 1, 2, 40, 5}, {130}}, seed++);
      test_paged(128, 4, 1, 64, {192}, {{1, 2, 3, 64, 65, 128, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}}, seed++);
      // GRPO decode as in production: ratio 1, groups of 16 samples over a shared prompt, enough groups x heads
      // that each CTA takes a whole group (16 sequences, one row each, per 64-row chunk).
      std::vector<int> prompts;
      std::vector<std::vector<int>> comps;
      Rng lens(99);
      for (int g = 0; g < 10; g++) {
        prompts.push_back(g % 3 == 2 ? 80 : 64);
        comps.emplace_back();
        for (int i = 0; i < 16; i++) comps.back().push_back(1 + (int)(lens.next() % 40));
      }
      test_paged(64, 32, 32, 16, prompts, comps, seed++);
    }
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  if (g_failures) {
    std::printf("attention_test: %d FAILURES\n", g_failures);
    return 1;
  }
  std::printf("attention_test: all passed\n");
  return 0;
}
