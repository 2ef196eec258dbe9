// GPU GEMM test (cuda/gemm.h): every function against a CPU loop on the same bf16-rounded inputs (double
// accumulation), batch invariance bit for bit (a row alone, in a batch of 4096, at another position, under every
// tile configuration), grouped == per-group dense bit for bit, empty groups, bias / accumulate epilogues, and bad
// arguments. Exit status 1 on any failure.
//
// Usage: gemm_test [--quick] [--no-wgmma]   (--quick: small shapes only, for compute-sanitizer; --no-wgmma:
// the mma.sync kernels serve the forward calls on Hopper too)
//
// Tolerance: |gpu - ref| <= 5e-4 * S + 1e-6 per element, S = sum over k of |a_k w_k| (+ |bias| + |initial value|):
// fp32 accumulation of bf16 products errs far below that, while a lost or doubled 16-wide K slice or a wrong
// row/column shows up well above it.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/gemm.h"
#include "cuda/gemm_bench.cuh"
#include "cuda/ops.h"

using namespace moepilot;
using namespace moepilot::gpu;

namespace {

int g_failures = 0;
bool g_quick = false;

void report(bool ok, const std::string& name, const std::string& detail = "") {
  if (ok) {
    std::printf("PASS %s\n", name.c_str());
  } else {
    std::printf("FAIL %s: %s\n", name.c_str(), detail.c_str());
    g_failures++;
  }
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even (inputs are finite)
  return (uint16_t)(u >> 16);
}
float from_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::vector<uint16_t> rand_bf16(size_t n, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = to_bf16(d(rng));
  return v;
}
std::vector<float> rand_f32(size_t n, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
std::vector<float> to_f32(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); i++) f[i] = from_bf16(v[i]);
  return f;
}

// Device buffer with RAII.
template <class T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t count) : n(count) {
    void* q = nullptr;
    MP_GPU_CHECK(malloc_device(&q, std::max<size_t>(count, 1) * sizeof(T)));
    p = (T*)q;
  }
  Buf(const std::vector<T>& h) : Buf(h.size()) { up(h); }
  ~Buf() { free_device(p); }
  Buf(const Buf&) = delete;
  void up(const std::vector<T>& h) {
    if (!h.empty()) MP_GPU_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> down() const {
    std::vector<T> h(n);
    if (n) MP_GPU_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

void sync() { MP_GPU_CHECK(cudaDeviceSynchronize()); }

// Runs f(i) for i in [0, n) over the host's cores.
void parallel_for(int64_t n, const std::function<void(int64_t)>& f) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(n, (int64_t)std::thread::hardware_concurrency()));
  std::vector<std::thread> th;
  for (int64_t t = 0; t < T; t++)
    th.emplace_back([&, t] {
      for (int64_t i = t; i < n; i += T) f(i);
    });
  for (auto& x : th) x.join();
}

// C[m][n] = sum_k a(m,k) * b(k,n) in double (+ init), with S = sum |a b| (+ |init|).
struct Ref {
  std::vector<double> val, scale;
};
Ref ref_gemm(int64_t M, int64_t N, int64_t K, const std::function<float(int64_t, int64_t)>& a,
             const std::function<float(int64_t, int64_t)>& b, const float* bias, const float* init) {
  Ref r;
  r.val.assign(M * N, 0.0);
  r.scale.assign(M * N, 0.0);
  // Operands copied into row-major [M][K] and [N][K] so the inner loop streams.
  std::vector<float> Am(M * K), Bn(N * K);
  parallel_for(M, [&](int64_t m) {
    for (int64_t k = 0; k < K; k++) Am[m * K + k] = a(m, k);
  });
  parallel_for(N, [&](int64_t n) {
    for (int64_t k = 0; k < K; k++) Bn[n * K + k] = b(k, n);
  });
  parallel_for(M, [&](int64_t m) {
    const float* ar = &Am[m * K];
    for (int64_t n = 0; n < N; n++) {
      const float* br = &Bn[n * K];
      double s = 0, sa = 0;
      for (int64_t k = 0; k < K; k++) {
        const double p = (double)ar[k] * br[k];
        s += p;
        sa += std::fabs(p);
      }
      if (bias) s += bias[n], sa += std::fabs(bias[n]);
      if (init) s += init[m * N + n], sa += std::fabs(init[m * N + n]);
      r.val[m * N + n] = s;
      r.scale[m * N + n] = sa;
    }
  });
  return r;
}

bool check_close(const std::string& name, const std::vector<float>& got, const Ref& ref, int64_t N) {
  double worst = 0;
  for (size_t i = 0; i < ref.val.size(); i++) {
    const double tol = 5e-4 * ref.scale[i] + 1e-6;
    const double err = std::fabs((double)got[i] - ref.val[i]);
    if (!(err <= tol)) {  // also catches NaN
      char buf[256];
      std::snprintf(buf, sizeof buf, "first mismatch at [%lld,%lld]: got %.8g want %.8g (tol %.3g, scale %.4g)",
                    (long long)(i / N), (long long)(i % N), got[i], ref.val[i], tol, ref.scale[i]);
      report(false, name, buf);
      return false;
    }
    if (ref.scale[i] > 0) worst = std::max(worst, err / ref.scale[i]);
  }
  report(true, name + " (max err/scale " + std::to_string(worst) + ")");
  return true;
}

bool bits_equal(const float* a, const float* b, size_t n, std::string* where) {
  for (size_t i = 0; i < n; i++)
    if (std::memcmp(&a[i], &b[i], 4) != 0) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "first differing element %zu: %.9g vs %.9g", i, a[i], b[i]);
      *where = buf;
      return false;
    }
  return true;
}

// Tile ids by instruction family (gemm_bench.cuh): bits must agree within a family; the automatic choice (0)
// belongs to wgmma where available. Across families agreement is reported, not required (forward calls never mix
// families on one device).
int family_of(int tile) {
  const bool wg = tile == 0 || (tile >= 5 && tile <= 9) || tile == 11 || tile >= 25;  // (12-24: backward ids)
  return wg && gemm_wgmma_available() ? 1 : 0;
}
const char* family_name(int f) { return f ? "wgmma" : "mma.sync"; }
std::vector<std::vector<int>> families() {
  if (gemm_wgmma_available()) return {{0, 5, 6, 7, 8, 9, 11, 25, 26, 30, 31, 40}, {1, 2, 3, 4, 10}};
  return {{0, 1, 2, 3, 4, 10}};
}
std::vector<int> all_tiles() {
  if (gemm_wgmma_available()) return {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 25, 26, 30, 31, 40};
  return {0, 1, 2, 3, 4, 10};
}

// ---------------------------------------------------------------------------------------------------------------

void test_forward(int64_t M, int N, int K, bool with_bias, bool accumulate, const std::vector<int>& tiles) {
  const std::string name = "gemm_forward M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" +
                           std::to_string(K) + (with_bias ? " bias" : "") + (accumulate ? " accumulate" : "");
  auto A = rand_bf16(M * K, 1 + M + N, 1.f), W = rand_bf16((size_t)N * K, 2 + K, 0.5f);
  auto bias = rand_f32(N, 3, 1.f);
  auto init = rand_f32(M * N, 4, 2.f);
  auto Af = to_f32(A), Wf = to_f32(W);
  Ref ref = ref_gemm(
      M, N, K, [&](int64_t m, int64_t k) { return Af[m * K + k]; }, [&](int64_t k, int64_t n) { return Wf[n * K + k]; },
      with_bias ? bias.data() : nullptr, accumulate ? init.data() : nullptr);
  Buf<uint16_t> dA(A), dW(W);
  Buf<float> dbias(bias), dout(M * N);
  std::vector<float> first[2];
  int first_tile[2] = {-1, -1};
  for (int t : tiles) {
    gemm_set_tile_override(t);
    dout.up(init);
    gemm_forward(dout.p, dA.p, dW.p, with_bias ? dbias.p : nullptr, M, N, K, accumulate, nullptr);
    sync();
    auto got = dout.down();
    const std::string tn = name + " tile=" + std::to_string(t);
    if (!check_close(tn, got, ref, N)) continue;
    const int f = family_of(t);
    if (first[f].empty()) {
      first[f] = got;
      first_tile[f] = t;
    } else {
      std::string where;
      report(bits_equal(first[f].data(), got.data(), got.size(), &where),
             tn + " bits == tile " + std::to_string(first_tile[f]) + " (" + family_name(f) + ")", where);
    }
  }
  gemm_set_tile_override(0);
  if (!first[0].empty() && !first[1].empty()) {
    std::string where;
    const bool same = bits_equal(first[0].data(), first[1].data(), first[0].size(), &where);
    std::printf("INFO %s: wgmma and mma.sync bits %s %s\n", name.c_str(), same ? "equal" : "differ:", where.c_str());
  }
}

void test_forward_m0() {
  std::vector<float> sentinel(64, 7.f);
  Buf<float> out(sentinel);
  Buf<uint16_t> A(16 * 16), W(16 * 16);
  gemm_forward(out.p, A.p, W.p, nullptr, 0, 16, 16, false, nullptr);
  sync();
  auto got = out.down();
  std::string where;
  report(bits_equal(got.data(), sentinel.data(), got.size(), &where), "gemm_forward M=0 writes nothing", where);
}

// out with a row stride (the LM head writing a vocabulary chunk into the kept [rows, V] logits): the same bits as
// a contiguous out under every tile, for = and +=, and the columns outside [0, N) of each row untouched.
void test_forward_strided(int64_t M, int N, int K, int64_t ldc, const std::vector<int>& tiles) {
  const std::string name = "gemm_forward ldc=" + std::to_string(ldc) + " M=" + std::to_string(M) +
                           " N=" + std::to_string(N) + " K=" + std::to_string(K) + " (all tiles, = and +=)";
  auto A = rand_bf16(M * K, 21, 1.f), W = rand_bf16((size_t)N * K, 22, 0.05f);
  auto init = rand_f32(M * ldc, 23, 1.f);
  Buf<uint16_t> dA(A), dW(W);
  bool ok = true;
  std::string detail;
  for (int t : tiles) {
    gemm_set_tile_override(t);
    for (bool acc : {false, true}) {
      std::vector<float> packed_init((size_t)M * N);
      for (int64_t r = 0; r < M; r++) std::memcpy(&packed_init[r * N], &init[r * ldc], N * sizeof(float));
      Buf<float> packed(packed_init), strided(init);
      gemm_forward(packed.p, dA.p, dW.p, nullptr, M, N, K, acc, nullptr);
      gemm_forward(strided.p, dA.p, dW.p, nullptr, M, N, K, acc, nullptr, ldc);
      sync();
      auto want = packed.down(), got = strided.down();
      for (int64_t r = 0; r < M && ok; r++) {
        std::string where;
        if (!bits_equal(&got[r * ldc], &want[r * N], N, &where) ||
            !bits_equal(&got[r * ldc + N], &init[r * ldc + N], ldc - N, &where)) {
          ok = false;
          detail = "tile " + std::to_string(t) + (acc ? " +=" : " =") + ", row " + std::to_string(r) + ": " + where;
        }
      }
    }
  }
  gemm_set_tile_override(0);
  report(ok, name, detail);
}

// gemm_forward's cuBLASLt path (calls of >= 1024 rows) against the own kernel (the same call with the path off): the
// same bits at every element, with and without bias, = and +=, a strided out. On a Hopper GPU of a cuBLASLt build
// the path must be on (otherwise both runs would take the own kernel and prove nothing).
void test_forward_lt(int64_t M, int N, int K, bool with_bias, bool accumulate, int64_t ldc) {
  const std::string name = "gemm_forward cuBLASLt bits == own kernel M=" + std::to_string(M) + " N=" +
                           std::to_string(N) + " K=" + std::to_string(K) + (with_bias ? " bias" : "") +
                           (accumulate ? " accumulate" : "") + (ldc ? " ldc=" + std::to_string(ldc) : "");
  const bool ready = gemm_lt_forward_ready(nullptr);
  if (!ready) {
    report(!gemm_wgmma_available(), name + ": cuBLASLt path off", gemm_wgmma_available() ? "off on a Hopper GPU" : "");
    return;
  }
  const int64_t ld = ldc ? ldc : N;
  auto A = rand_bf16(M * K, 31 + N, 1.f), W = rand_bf16((size_t)N * K, 32 + K, 0.05f);
  auto bias = rand_f32(N, 33, 1.f);
  auto init = rand_f32(M * ld, 34, 2.f);
  Buf<uint16_t> dA(A), dW(W);
  Buf<float> dbias(bias), lt(init), own(init);
  gemm_forward(lt.p, dA.p, dW.p, with_bias ? dbias.p : nullptr, M, N, K, accumulate, nullptr, ldc);
  gemm_set_lt_forward_enabled(false);
  gemm_forward(own.p, dA.p, dW.p, with_bias ? dbias.p : nullptr, M, N, K, accumulate, nullptr, ldc);
  gemm_set_lt_forward_enabled(true);
  sync();
  auto a = lt.down(), b = own.down();
  std::string where;
  report(bits_equal(a.data(), b.data(), a.size(), &where), name, where);
}

// gemm_forward_residual (out = resid + A @ W^T) against copying resid into out and gemm_forward's +=, on whichever
// path each takes (cuBLASLt from 1024 rows, reading resid as its C operand; the own kernel below), and in place.
void test_forward_residual(int64_t M, int N, int K) {
  const std::string name = "gemm_forward_residual == copy + gemm_forward += M=" + std::to_string(M) + " N=" +
                           std::to_string(N) + " K=" + std::to_string(K);
  auto A = rand_bf16(M * K, 51 + N, 1.f), W = rand_bf16((size_t)N * K, 52 + K, 0.05f);
  auto resid = rand_f32(M * N, 53, 2.f);
  Buf<uint16_t> dA(A), dW(W);
  Buf<float> dres(resid), out(M * N), ref(resid), inplace(resid);
  gemm_forward_residual(out.p, dres.p, dA.p, dW.p, M, N, K, nullptr);
  gemm_forward(ref.p, dA.p, dW.p, nullptr, M, N, K, true, nullptr);
  gemm_forward_residual(inplace.p, inplace.p, dA.p, dW.p, M, N, K, nullptr);
  sync();
  auto a = out.down(), b = ref.down(), c = inplace.down(), r = dres.down();
  std::string where;
  report(bits_equal(a.data(), b.data(), a.size(), &where) && bits_equal(c.data(), b.data(), c.size(), &where) &&
             bits_equal(r.data(), resid.data(), r.size(), &where),
         name, where);
}

// Three cuBLASLt forward products in flight at once on three streams (the training forward's q, k and v), ten
// times over: each the own kernel's bits (cuBLASLt state in a shared workspace would let them disturb each other).
void test_forward_lt_streams() {
  const std::string name = "gemm_forward cuBLASLt on three streams at once == own kernel";
  if (!gemm_lt_forward_ready(nullptr)) {
    report(!gemm_wgmma_available(), name + ": cuBLASLt path off", gemm_wgmma_available() ? "off on a Hopper GPU" : "");
    return;
  }
  const int64_t M = 2048;
  const int N = 2048, K = 2048;
  auto A = rand_bf16(M * K, 41, 1.f);
  auto bias = rand_f32(N, 42, 1.f);
  Buf<uint16_t> dA(A);
  Buf<float> dbias(bias);
  std::vector<std::unique_ptr<Buf<uint16_t>>> W;
  std::vector<std::unique_ptr<Buf<float>>> lt, own;
  cudaStream_t st[3];
  for (int i = 0; i < 3; i++) {
    W.emplace_back(new Buf<uint16_t>(rand_bf16((size_t)N * K, 43 + i, 0.05f)));
    lt.emplace_back(new Buf<float>(M * N));
    own.emplace_back(new Buf<float>(M * N));
    MP_GPU_CHECK(cudaStreamCreateWithFlags(&st[i], cudaStreamNonBlocking));
  }
  gemm_set_lt_forward_enabled(false);
  for (int i = 0; i < 3; i++) gemm_forward(own[i]->p, dA.p, W[i]->p, dbias.p, M, N, K, false, nullptr);
  gemm_set_lt_forward_enabled(true);
  sync();
  bool ok = true;
  std::string where;
  for (int rep = 0; rep < 10 && ok; rep++) {
    for (int i = 0; i < 3; i++) gemm_forward(lt[i]->p, dA.p, W[i]->p, dbias.p, M, N, K, false, st[i]);
    sync();
    for (int i = 0; i < 3 && ok; i++) {
      auto a = lt[i]->down(), b = own[i]->down();
      if (!bits_equal(a.data(), b.data(), a.size(), &where)) {
        ok = false;
        where = "repeat " + std::to_string(rep) + ", stream " + std::to_string(i) + ": " + where;
      }
    }
  }
  for (cudaStream_t x : st) cudaStreamDestroy(x);
  report(ok, name, where);
}

// A row computed alone, inside a batch of 4096 and at another position in another batch: same bits.
void test_batch_invariance(int N, int K, int64_t big_m) {
  const std::string base = "batch invariance N=" + std::to_string(N) + " K=" + std::to_string(K);
  auto A = rand_bf16(big_m * K, 11, 1.f), W = rand_bf16((size_t)N * K, 12, 0.05f);
  auto bias = rand_f32(N, 13, 1.f);
  Buf<uint16_t> dA(A), dW(W);
  Buf<float> dbias(bias), big(big_m * N);
  bool ok = true;
  std::string detail;
  for (const auto& fam : families()) {
  gemm_set_tile_override(fam[0]);
  gemm_forward(big.p, dA.p, dW.p, dbias.p, big_m, N, K, false, nullptr);
  sync();
  auto full = big.down();
  const int64_t rows[] = {0, 1, 17, big_m / 2, big_m - 1};
  for (int64_t r : rows) {
    // Alone (M = 1), under every tile configuration of the family.
    for (int t : fam) {
      gemm_set_tile_override(t);
      Buf<float> one(N);
      gemm_forward(one.p, dA.p + r * K, dW.p, dbias.p, 1, N, K, false, nullptr);
      sync();
      auto got = one.down();
      std::string where;
      if (!bits_equal(got.data(), &full[r * N], N, &where)) {
        ok = false;
        detail = "row " + std::to_string(r) + " alone, tile " + std::to_string(t) + ": " + where;
      }
    }
    gemm_set_tile_override(fam[0]);
    // At position p of a batch of 1000 other rows (3 rows for the LM head).
    const int64_t other_m = N > 100000 ? 3 : 1000, p = other_m == 3 ? 2 : 517;
    auto B = rand_bf16(other_m * K, 100 + (uint32_t)r, 1.f);
    std::memcpy(&B[p * K], &A[r * K], K * sizeof(uint16_t));
    Buf<uint16_t> dB(B);
    Buf<float> out(other_m * N);
    gemm_forward(out.p, dB.p, dW.p, dbias.p, other_m, N, K, false, nullptr);
    sync();
    auto got = out.down();
    std::string where;
    if (!bits_equal(&got[p * N], &full[r * N], N, &where)) {
      ok = false;
      detail = "row " + std::to_string(r) + " at position " + std::to_string(p) + " of " + std::to_string(other_m) +
               ": " + where;
    }
  }
  }
  gemm_set_tile_override(0);
  report(ok, base + " (rows alone / in a batch of " + std::to_string(big_m) + " / at another position, all tiles)",
         detail);
}

std::vector<int32_t> offsets_of(const std::vector<int>& sizes) {
  std::vector<int32_t> off(sizes.size() + 1, 0);
  for (size_t g = 0; g < sizes.size(); g++) off[g + 1] = off[g] + sizes[g];
  return off;
}

// Grouped forward: vs the CPU loop, and bit for bit vs gemm_forward on each group's rows; rows past offsets[G]
// (the launch is sized by max_rows) stay untouched.
void test_grouped_forward(const std::vector<int>& sizes, int N, int K, int64_t extra_rows, bool cpu_ref) {
  const int G = (int)sizes.size();
  auto off = offsets_of(sizes);
  const int64_t rows = off[G], max_rows = rows + extra_rows;
  std::string name = "grouped_gemm_forward G=" + std::to_string(G) + " rows=" + std::to_string(rows) +
                     " max_rows=" + std::to_string(max_rows) + " N=" + std::to_string(N) + " K=" + std::to_string(K);
  auto A = rand_bf16(std::max<int64_t>(max_rows, 1) * K, 21, 1.f), W = rand_bf16((size_t)G * N * K, 22, 0.1f);
  Buf<uint16_t> dA(A), dW(W);
  Buf<int32_t> doff(off);
  std::vector<float> sentinel(max_rows * N, -12345.f);
  Buf<float> out(sentinel);
  std::vector<float> first, fam_first[2];
  for (int t : all_tiles()) {
    gemm_set_tile_override(t);
    out.up(sentinel);
    grouped_gemm_forward(out.p, dA.p, dW.p, doff.p, G, max_rows, N, K, nullptr);
    sync();
    auto got = out.down();
    if (first.empty()) first = got;
    const int f = family_of(t);
    if (fam_first[f].empty()) {
      fam_first[f] = got;
    } else {
      std::string where;
      report(bits_equal(fam_first[f].data(), got.data(), got.size(), &where),
             name + " tile=" + std::to_string(t) + " bits == first " + family_name(f) + " tile", where);
    }
  }
  gemm_set_tile_override(0);
  // Untouched tail.
  {
    std::string where;
    report(bits_equal(&first[rows * N], &sentinel[rows * N], (max_rows - rows) * N, &where),
           name + " rows past offsets[G] untouched", where);
  }
  // Per-group dense, bit for bit.
  bool ok = true;
  std::string detail;
  for (int g = 0; g < G; g++) {
    if (sizes[g] == 0) continue;
    Buf<float> o((size_t)sizes[g] * N);
    gemm_forward(o.p, dA.p + (int64_t)off[g] * K, dW.p + (int64_t)g * N * K, nullptr, sizes[g], N, K, false, nullptr);
    sync();
    auto got = o.down();
    std::string where;
    if (!bits_equal(got.data(), &first[(int64_t)off[g] * N], got.size(), &where)) {
      ok = false;
      detail = "group " + std::to_string(g) + ": " + where;
      break;
    }
  }
  report(ok, name + " == per-group gemm_forward bitwise", detail);
  if (cpu_ref && rows > 0) {
    auto Af = to_f32(A), Wf = to_f32(W);
    std::vector<int> group_of(rows);
    for (int g = 0; g < G; g++)
      for (int r = off[g]; r < off[g + 1]; r++) group_of[r] = g;
    // Row r's product with its own group's weights: a "virtual" [rows, K] x [K, N] where B depends on the row;
    // done per group to keep ref_gemm's shape.
    std::vector<float> got(first.begin(), first.begin() + rows * N);
    Ref all;
    all.val.resize(rows * N);
    all.scale.resize(rows * N);
    for (int g = 0; g < G; g++) {
      if (!sizes[g]) continue;
      Ref r = ref_gemm(
          sizes[g], N, K, [&](int64_t m, int64_t k) { return Af[(off[g] + m) * K + k]; },
          [&](int64_t k, int64_t n) { return Wf[((int64_t)g * N + n) * K + k]; }, nullptr, nullptr);
      std::copy(r.val.begin(), r.val.end(), all.val.begin() + (int64_t)off[g] * N);
      std::copy(r.scale.begin(), r.scale.end(), all.scale.begin() + (int64_t)off[g] * N);
    }
    check_close(name + " vs CPU", got, all, N);
  }
}

// Under a CUDA graph: one capture of grouped_gemm_forward and grouped_gemm_backward, replayed after the group
// sizes (the device offsets) change, gives the same bits as direct calls with those offsets.
void test_grouped_graph() {
  const int G = 6, N = 136, K = 264;
  const int64_t max_rows = 400;
  const std::string name = "grouped GEMMs under a CUDA graph (offsets changed between replays)";
  auto A = rand_bf16(max_rows * K, 51, 1.f), W = rand_bf16((size_t)G * N * K, 52, 0.2f);
  auto dOut = rand_bf16(max_rows * N, 53, 1.f);
  Buf<uint16_t> dA(A), dW(W), ddOut(dOut);
  Buf<int32_t> off((size_t)G + 1);
  Buf<float> out(max_rows * N), out2(max_rows * N), gA(max_rows * K), gA2(max_rows * K);
  Buf<float> gW((size_t)G * N * K), gW2((size_t)G * N * K);
  Stream s;
  MP_GPU_CHECK(stream_create(&s));
  auto sizes1 = offsets_of({0, 50, 120, 0, 7, 200}), sizes2 = offsets_of({130, 0, 1, 64, 0, 3});
  off.up(sizes1);
  // Warm-up outside the capture: first calls set kernel attributes.
  grouped_gemm_forward(out.p, dA.p, dW.p, off.p, G, max_rows, N, K, s);
  grouped_gemm_backward(gA.p, gW.p, ddOut.p, dA.p, dW.p, off.p, G, max_rows, N, K, s);
  MP_GPU_CHECK(stream_sync(s));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MP_GPU_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  MP_GPU_CHECK(memset_async(gW.p, 0, gW.n * sizeof(float), s));
  grouped_gemm_forward(out.p, dA.p, dW.p, off.p, G, max_rows, N, K, s);
  grouped_gemm_backward(gA.p, gW.p, ddOut.p, dA.p, dW.p, off.p, G, max_rows, N, K, s);
  MP_GPU_CHECK(cudaStreamEndCapture(s, &graph));
  MP_GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  bool ok = true;
  std::string detail;
  for (const auto* sz : {&sizes1, &sizes2}) {
    off.up(*sz);
    const int64_t rows = sz->back();
    MP_GPU_CHECK(cudaGraphLaunch(exec, s));
    MP_GPU_CHECK(stream_sync(s));
    auto g_out = out.down(), g_A = gA.down(), g_W = gW.down();
    MP_GPU_CHECK(cudaMemset(gW2.p, 0, gW2.n * sizeof(float)));
    grouped_gemm_forward(out2.p, dA.p, dW.p, off.p, G, max_rows, N, K, nullptr);
    grouped_gemm_backward(gA2.p, gW2.p, ddOut.p, dA.p, dW.p, off.p, G, max_rows, N, K, nullptr);
    sync();
    auto d_out = out2.down(), d_A = gA2.down(), d_W = gW2.down();
    std::string where;
    if (!bits_equal(g_out.data(), d_out.data(), rows * N, &where)) ok = false, detail = "forward: " + where;
    if (!bits_equal(g_A.data(), d_A.data(), rows * K, &where)) ok = false, detail = "dA: " + where;
    if (!bits_equal(g_W.data(), d_W.data(), g_W.size(), &where)) ok = false, detail = "dW: " + where;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  stream_destroy(s);
  report(ok, name, detail);
}

// accumulate_dW false: dW and dbias start as garbage the call must overwrite.
void test_backward(int64_t M, int N, int K, bool accumulate_dA, bool accumulate_dW = true) {
  const std::string name = "gemm_backward M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" +
                           std::to_string(K) + (accumulate_dA ? " accumulate_dA" : "") +
                           (accumulate_dW ? "" : " overwrite_dW");
  auto dOut = rand_bf16(M * N, 31, 1.f), A = rand_bf16(M * K, 32, 1.f), W = rand_bf16((size_t)N * K, 33, 0.5f);
  auto dA0 = rand_f32(M * K, 34, 1.f), dW0 = rand_f32((size_t)N * K, 35, 1.f), db0 = rand_f32(N, 36, 1.f);
  Buf<uint16_t> ddOut(dOut), dAin(A), dWin(W);
  Buf<float> gA(dA0), gW(dW0), gb(db0);
#ifndef MOEPILOT_WITH_CUBLASLT
  try {
    gemm_backward(gA.p, gW.p, nullptr, ddOut.p, dAin.p, dWin.p, std::max<int64_t>(M, 1), N, K, accumulate_dA, nullptr);
    report(false, name, "no error from a build without cuBLASLt");
  } catch (const Error& e) {
    report(e.code() == ErrorCode::InvalidArgument, name + " without cuBLASLt: " + e.what());
  }
  return;
#endif
  gemm_backward(gA.p, gW.p, gb.p, ddOut.p, dAin.p, dWin.p, M, N, K, accumulate_dA, accumulate_dW, nullptr);
  sync();
  if (!accumulate_dW) {  // the references below then add nothing to the old values
    std::fill(dW0.begin(), dW0.end(), 0.f);
    std::fill(db0.begin(), db0.end(), 0.f);
  }
  auto dOf = to_f32(dOut), Af = to_f32(A), Wf = to_f32(W);
  // dA[M,K] = dOut[M,N] @ W[N,K]
  Ref rA = ref_gemm(
      M, K, N, [&](int64_t m, int64_t n) { return dOf[m * N + n]; }, [&](int64_t n, int64_t k) { return Wf[n * K + k]; },
      nullptr, accumulate_dA ? dA0.data() : nullptr);
  check_close(name + " dA", gA.down(), rA, K);
  if (!accumulate_dA && M > 0) {  // the bf16 form: within one bf16 rounding of the reference
    Buf<uint16_t> gA16(M * K);
    gemm_backward_dA_bf16(gA16.p, ddOut.p, dWin.p, M, N, K, nullptr);
    sync();
    const auto got16 = to_f32(gA16.down());
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < got16.size(); i++) {
      const double err = std::fabs((double)got16[i] - rA.val[i]);
      if (!(err <= std::ldexp(std::fabs(rA.val[i]), -8) + 5e-4 * rA.scale[i] + 1e-6) && bad++ == 0) first = i;
    }
    report(bad == 0, name + " dA in bf16 (gemm_backward_dA_bf16)",
           bad ? std::to_string(bad) + " elements off, first " + std::to_string(first) + ": " +
                     std::to_string(got16[first]) + " vs " + std::to_string(rA.val[first])
               : "");
  }
  // dW[N,K] += dOut^T[N,M] @ A[M,K]
  Ref rW = ref_gemm(
      N, K, M, [&](int64_t n, int64_t m) { return dOf[m * N + n]; }, [&](int64_t m, int64_t k) { return Af[m * K + k]; },
      nullptr, dW0.data());
  check_close(name + " dW", gW.down(), rW, K);
  // dbias[N] += column sums
  Ref rb;
  rb.val.assign(N, 0);
  rb.scale.assign(N, 0);
  for (int n = 0; n < N; n++) {
    double s = db0[n], sa = std::fabs(db0[n]);
    for (int64_t m = 0; m < M; m++) s += dOf[m * N + n], sa += std::fabs(dOf[m * N + n]);
    rb.val[n] = s;
    rb.scale[n] = sa;
  }
  check_close(name + " dbias", gb.down(), rb, N);
}

void test_grouped_backward(const std::vector<int>& sizes, int N, int K, int64_t extra_rows) {
  const int G = (int)sizes.size();
  auto off = offsets_of(sizes);
  const int64_t rows = off[G], max_rows = rows + extra_rows;
  const std::string name = "grouped_gemm_backward G=" + std::to_string(G) + " rows=" + std::to_string(rows) +
                           " N=" + std::to_string(N) + " K=" + std::to_string(K);
  auto dOut = rand_bf16(std::max<int64_t>(max_rows, 1) * N, 41, 1.f);
  auto A = rand_bf16(std::max<int64_t>(max_rows, 1) * K, 42, 1.f), W = rand_bf16((size_t)G * N * K, 43, 0.5f);
  auto dW0 = rand_f32((size_t)G * N * K, 44, 1.f);
  std::vector<float> dA0(max_rows * K, -777.f);
  Buf<uint16_t> ddOut(dOut), dAin(A), dWin(W);
  Buf<int32_t> doff(off);
  Buf<float> gA(dA0), gW(dW0);
  grouped_gemm_backward(gA.p, gW.p, ddOut.p, dAin.p, dWin.p, doff.p, G, max_rows, N, K, nullptr);
  sync();
  auto gotA = gA.down(), gotW = gW.down();
  auto dOf = to_f32(dOut), Af = to_f32(A), Wf = to_f32(W);
  Ref rA, rW;
  rA.val.assign(rows * K, 0);
  rA.scale.assign(rows * K, 0);
  rW.val.assign((size_t)G * N * K, 0);
  rW.scale.assign((size_t)G * N * K, 0);
  for (int g = 0; g < G; g++) {
    const int64_t o = off[g], n_rows = sizes[g];
    if (n_rows) {
      Ref r = ref_gemm(
          n_rows, K, N, [&](int64_t m, int64_t n) { return dOf[(o + m) * N + n]; },
          [&](int64_t n, int64_t k) { return Wf[((int64_t)g * N + n) * K + k]; }, nullptr, nullptr);
      std::copy(r.val.begin(), r.val.end(), rA.val.begin() + o * K);
      std::copy(r.scale.begin(), r.scale.end(), rA.scale.begin() + o * K);
    }
    Ref w = ref_gemm(
        N, K, n_rows, [&](int64_t n, int64_t m) { return dOf[(o + m) * N + n]; },
        [&](int64_t m, int64_t k) { return Af[(o + m) * K + k]; }, nullptr, &dW0[(size_t)g * N * K]);
    std::copy(w.val.begin(), w.val.end(), rW.val.begin() + (int64_t)g * N * K);
    std::copy(w.scale.begin(), w.scale.end(), rW.scale.begin() + (int64_t)g * N * K);
  }
  check_close(name + " dA", std::vector<float>(gotA.begin(), gotA.begin() + rows * K), rA, K);
  {
    std::string where;
    report(bits_equal(&gotA[rows * K], &dA0[rows * K], (max_rows - rows) * K, &where),
           name + " dA rows past offsets[G] untouched", where);
  }
  check_close(name + " dW", gotW, rW, K);
  // Every tile against the CPU, then determinism and tile independence. Instruction families: dA mma.sync 1-4, 10,
  // wgmma 12, 13, 25, 26; dW mma.sync 1-4, 10, 14-21, 27-29, wgmma 22-24 (every dW epilogue computes old + the product
  // summed from 0, one fp32 add per element). Within a family the bits must agree; the automatic tile (and the ids
  // of the other product, which take the automatic tile) must equal the first call's bits and one family's;
  // agreement across families is reported. Without wgmma every id is mma.sync.
  bool ok = true;
  std::string detail;
  const bool wg = gemm_wgmma_available();
  std::vector<float> famA[2], famW[2];  // [0] mma.sync, [1] wgmma
  auto match = [&](std::vector<float>& ref, const std::vector<float>& got, const std::string& what) {
    std::string where;
    if (ref.empty()) ref = got;
    else if (!bits_equal(got.data(), ref.data(), got.size(), &where)) ok = false, detail = what + ": " + where;
  };
  for (int t : {0, 1, 2, 3, 4, 10, 12, 13, 25, 26, 41, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 27, 28, 29}) {
    gemm_set_tile_override(t);
    gA.up(dA0);
    gW.up(dW0);
    grouped_gemm_backward(gA.p, gW.p, ddOut.p, dAin.p, dWin.p, doff.p, G, max_rows, N, K, nullptr);
    sync();
    auto a2 = gA.down(), w2 = gW.down();
    const std::string tn = name + " tile=" + std::to_string(t);
    const bool a_id = (t >= 1 && t <= 4) || t == 10 || t == 12 || t == 13 || t == 25 || t == 26 || t == 41;
    const bool w_id = (t >= 1 && t <= 4) || t == 10 || (t >= 14 && t <= 24) || (t >= 27 && t <= 29);
    if (t != 0) {  // (the automatic tile was checked above)
      if (a_id) check_close(tn + " dA", std::vector<float>(a2.begin(), a2.begin() + rows * K), rA, K);
      if (w_id) check_close(tn + " dW", w2, rW, K);
    }
    if (a_id) match(famA[wg && (t == 12 || t == 13 || t >= 25)], a2, "dA tile " + std::to_string(t));
    else match(gotA, a2, "dA (automatic) under tile " + std::to_string(t));
    if (w_id) match(famW[wg && t >= 22 && t <= 24], w2, "dW tile " + std::to_string(t));
    else match(gotW, w2, "dW (automatic) under tile " + std::to_string(t));
  }
  gemm_set_tile_override(0);
  {
    std::string e0, e1;
    if (!bits_equal(gotA.data(), famA[0].data(), gotA.size(), &e0) &&
        !(wg && bits_equal(gotA.data(), famA[1].data(), gotA.size(), &e1)))
      ok = false, detail = "automatic dA matches no family: " + e0;
    if (!bits_equal(gotW.data(), famW[0].data(), gotW.size(), &e0) &&
        !(wg && bits_equal(gotW.data(), famW[1].data(), gotW.size(), &e1)))
      ok = false, detail = "automatic dW matches no family: " + e0;
  }
  report(ok, name + " deterministic across runs and tiles", detail);
  if (wg) {
    std::string where;
    bool same = bits_equal(famA[1].data(), famA[0].data(), gotA.size(), &where);
    std::printf("INFO %s: dA wgmma and mma.sync bits %s %s\n", name.c_str(), same ? "equal" : "differ:", where.c_str());
    same = bits_equal(famW[1].data(), famW[0].data(), gotW.size(), &where);
    std::printf("INFO %s: dW wgmma and mma.sync bits %s %s\n", name.c_str(), same ? "equal" : "differ:", where.c_str());
  }
  // Overwrite mode (accumulate_dW false): dW_g = the product alone (empty groups: zeros) over a dW full of garbage,
  // for the automatic tile and each epilogue; dA unchanged.
  {
    Ref rW0;
    rW0.val.assign((size_t)G * N * K, 0);
    rW0.scale.assign((size_t)G * N * K, 0);
    for (int g = 0; g < G; g++) {
      const int64_t o = off[g], n_rows = sizes[g];
      if (!n_rows) continue;
      Ref w = ref_gemm(
          N, K, n_rows, [&](int64_t n, int64_t m) { return dOf[(o + m) * N + n]; },
          [&](int64_t m, int64_t k) { return Af[(o + m) * K + k]; }, nullptr, nullptr);
      std::copy(w.val.begin(), w.val.end(), rW0.val.begin() + (int64_t)g * N * K);
      std::copy(w.scale.begin(), w.scale.end(), rW0.scale.begin() + (int64_t)g * N * K);
    }
    auto garbage = rand_f32((size_t)G * N * K, 45, 1000.f);
    std::vector<float> first, first_wg;
    bool same = true;
    std::string where;
    for (int t : {0, 3, 14, 16, 17, 18, 20, 22, 24, 27, 28}) {
      gemm_set_tile_override(t);
      gA.up(dA0);
      gW.up(garbage);
      grouped_gemm_backward(gA.p, gW.p, ddOut.p, dAin.p, dWin.p, doff.p, G, max_rows, N, K, false, nullptr);
      sync();
      auto w2 = gW.down(), a2 = gA.down();
      check_close(name + " overwrite dW tile=" + std::to_string(t), w2, rW0, K);
      std::vector<float>& f = gemm_wgmma_available() && t >= 22 && t <= 24 ? first_wg : first;
      if (t == 0) {  // (the automatic tile may be of either family)
      } else if (f.empty()) f = w2;
      else if (!bits_equal(w2.data(), f.data(), w2.size(), &where)) same = false, where = "tile " + std::to_string(t) + ": " + where;
      if (!bits_equal(a2.data(), gotA.data(), a2.size(), &where)) same = false, where = "dA tile " + std::to_string(t) + ": " + where;
    }
    gemm_set_tile_override(0);
    report(same, name + " overwrite dW identical across tiles, dA unchanged", where);
  }
  // A dW only 8-byte aligned (the bulk epilogue needs 16): the automatic tile falls back and gives the same bits.
  {
    Buf<float> gW8(gW.n + 2);
    std::vector<float> pad(dW0);
    pad.insert(pad.begin(), {0.f, 0.f});
    gW8.up(pad);
    grouped_gemm_backward(nullptr, gW8.p + 2, ddOut.p, dAin.p, dWin.p, doff.p, G, max_rows, N, K, nullptr);
    sync();
    auto w8 = gW8.down();
    std::string where;
    report(bits_equal(w8.data() + 2, gotW.data(), gotW.size(), &where), name + " dW at an 8-byte aligned address", where);
  }
  // Only-dA and only-dW calls (the other pointer null).
  gA.up(dA0);
  grouped_gemm_backward(gA.p, nullptr, ddOut.p, dAin.p, dWin.p, doff.p, G, max_rows, N, K, nullptr);
  gW.up(dW0);
  grouped_gemm_backward(nullptr, gW.p, ddOut.p, dAin.p, dWin.p, doff.p, G, max_rows, N, K, nullptr);
  sync();
  std::string w1, w2;
  const bool same = bits_equal(gA.down().data(), gotA.data(), gotA.size(), &w1) &&
                    bits_equal(gW.down().data(), gotW.data(), gotW.size(), &w2);
  report(same, name + " dA-only / dW-only calls match", w1 + w2);
}

// grouped_gemm_backward_pair: dA = dGate @ W_gate_g + dUp @ W_up_g against the reference for every dA tile (one
// product over 2N when N % 64 == 0, two added otherwise); dW_gate and dW_up bit for bit two grouped_gemm_backward
// calls on the halves, accumulating and overwriting.
void test_grouped_backward_pair(const std::vector<int>& sizes, int N, int K) {
  const int G = (int)sizes.size();
  auto off = offsets_of(sizes);
  const int64_t rows = off[G];
  const std::string name = "grouped_gemm_backward_pair G=" + std::to_string(G) + " rows=" + std::to_string(rows) +
                           " N=" + std::to_string(N) + " K=" + std::to_string(K);
  auto dGU = rand_bf16(std::max<int64_t>(rows, 1) * 2 * N, 71, 1.f);
  auto A = rand_bf16(std::max<int64_t>(rows, 1) * K, 72, 1.f);
  auto Wg = rand_bf16((size_t)G * N * K, 73, 0.5f), Wu = rand_bf16((size_t)G * N * K, 74, 0.5f);
  auto dW0 = rand_f32((size_t)G * N * K, 75, 1.f);
  std::vector<uint16_t> dG(std::max<int64_t>(rows, 1) * N), dU(dG.size());
  for (int64_t r = 0; r < rows; r++)
    for (int n = 0; n < N; n++) dG[r * N + n] = dGU[r * 2 * N + n], dU[r * N + n] = dGU[r * 2 * N + N + n];
  Buf<uint16_t> ddGU(dGU), ddG(dG), ddU(dU), dA_in(A), dWg(Wg), dWu(Wu);
  Buf<int32_t> doff(off);
  Buf<float> gA(std::max<int64_t>(rows, 1) * K), gWg(dW0), gWu(dW0), rWg(dW0), rWu(dW0);
  auto dGf = to_f32(dGU), Wgf = to_f32(Wg), Wuf = to_f32(Wu);
  Ref rA;
  rA.val.assign(rows * K, 0);
  rA.scale.assign(rows * K, 0);
  for (int g = 0; g < G; g++) {
    const int64_t o = off[g], n_rows = sizes[g];
    if (!n_rows) continue;
    Ref r = ref_gemm(
        n_rows, K, 2 * N, [&](int64_t m, int64_t n) { return dGf[(o + m) * 2 * N + n]; },
        [&](int64_t n, int64_t k) {
          return n < N ? Wgf[((int64_t)g * N + n) * K + k] : Wuf[((int64_t)g * N + n - N) * K + k];
        },
        nullptr, nullptr);
    std::copy(r.val.begin(), r.val.end(), rA.val.begin() + o * K);
    std::copy(r.scale.begin(), r.scale.end(), rA.scale.begin() + o * K);
  }
  bool same = true;
  std::string where;
  for (bool acc : {true, false}) {
    gWg.up(dW0);
    gWu.up(dW0);
    rWg.up(dW0);
    rWu.up(dW0);
    grouped_gemm_backward_pair(gA.p, gWg.p, gWu.p, ddGU.p, dA_in.p, dWg.p, dWu.p, doff.p, G, rows, N, K, acc, nullptr);
    grouped_gemm_backward(nullptr, rWg.p, ddG.p, dA_in.p, dWg.p, doff.p, G, rows, N, K, acc, nullptr);
    grouped_gemm_backward(nullptr, rWu.p, ddU.p, dA_in.p, dWu.p, doff.p, G, rows, N, K, acc, nullptr);
    sync();
    auto a = gA.down();
    check_close(name + (acc ? "" : " overwrite") + " dA", std::vector<float>(a.begin(), a.begin() + rows * K), rA, K);
    if (!bits_equal(gWg.down().data(), rWg.down().data(), dW0.size(), &where)) same = false, where = "dW_gate: " + where;
    if (!bits_equal(gWu.down().data(), rWu.down().data(), dW0.size(), &where)) same = false, where = "dW_up: " + where;
  }
  report(same, name + " dW_gate, dW_up equal to two grouped_gemm_backward calls", where);
  // The same under each dW tile and epilogue.
  for (int t : {3, 14, 16, 18, 22, 24, 27}) {
    gemm_set_tile_override(t);
    for (bool acc : {true, false}) {
      gWg.up(dW0);
      gWu.up(dW0);
      rWg.up(dW0);
      rWu.up(dW0);
      grouped_gemm_backward_pair(nullptr, gWg.p, gWu.p, ddGU.p, dA_in.p, dWg.p, dWu.p, doff.p, G, rows, N, K, acc,
                                 nullptr);
      grouped_gemm_backward(nullptr, rWg.p, ddG.p, dA_in.p, dWg.p, doff.p, G, rows, N, K, acc, nullptr);
      grouped_gemm_backward(nullptr, rWu.p, ddU.p, dA_in.p, dWu.p, doff.p, G, rows, N, K, acc, nullptr);
      sync();
      const std::string tn = " tile " + std::to_string(t) + (acc ? "" : " overwrite");
      if (!bits_equal(gWg.down().data(), rWg.down().data(), dW0.size(), &where)) same = false, where = "dW_gate" + tn + ": " + where;
      if (!bits_equal(gWu.down().data(), rWu.down().data(), dW0.size(), &where)) same = false, where = "dW_up" + tn + ": " + where;
    }
  }
  gemm_set_tile_override(0);
  report(same, name + " dW_gate, dW_up equal to two calls under every dW tile", where);
  for (int t : {4, 12, 13, 25, 26, 41}) {
    gemm_set_tile_override(t);
    grouped_gemm_backward_pair(gA.p, (float*)nullptr, (float*)nullptr, ddGU.p, dA_in.p, dWg.p, dWu.p, doff.p, G, rows,
                               N, K, true, nullptr);
    sync();
    auto a = gA.down();
    check_close(name + " dA tile=" + std::to_string(t), std::vector<float>(a.begin(), a.begin() + rows * K), rA, K);
  }
  gemm_set_tile_override(0);
}

// accumulate_dW false with max_rows 0 (or every group empty): every dW_g becomes zeros; dA untouched.
// bf16 dW (grouped_gemm_backward's and the pair's bf16 overloads): overwrite gives the fp32 overwrite's product
// rounded to bf16, bit for bit; accumulate gives bf16(old + product), the fp32 += from the widened old values
// rounded. Both at a 16-byte aligned dW (the sm_90a bulk-copy tile) and at a 4-byte aligned one (the mma.sync tile),
// the pair's halves as two calls; dA unchanged by the dW's form.
void test_grouped_backward_bf16(const std::vector<int>& sizes, int N, int K) {
  const int G = (int)sizes.size();
  auto off = offsets_of(sizes);
  const int64_t rows = off[G];
  const size_t nw = (size_t)G * N * K;
  const std::string name = "grouped_gemm_backward bf16 dW G=" + std::to_string(G) + " rows=" + std::to_string(rows) +
                           " N=" + std::to_string(N) + " K=" + std::to_string(K);
  auto dGU = rand_bf16(std::max<int64_t>(rows, 1) * 2 * N, 81, 1.f);
  auto A = rand_bf16(std::max<int64_t>(rows, 1) * K, 82, 1.f);
  auto Wg = rand_bf16(nw, 83, 0.5f), Wu = rand_bf16(nw, 84, 0.5f);
  auto old16 = rand_bf16(nw, 85, 4.f);
  auto garbage = rand_f32(nw, 86, 1000.f);
  Buf<uint16_t> ddGU(dGU), dA_in(A), dWg(Wg), dWu(Wu);
  Buf<int32_t> doff(off);
  Buf<float> gA(std::max<int64_t>(rows, 1) * K), rA(gA.n), f32g(nw), f32u(nw);
  // The fp32 references: overwrite, and += onto the widened old values; dA from the fp32 call.
  std::vector<uint16_t> want_over_g(nw), want_over_u(nw), want_acc_g(nw), want_acc_u(nw);
  for (bool acc : {false, true}) {
    const std::vector<float> start = acc ? to_f32(old16) : garbage;
    f32g.up(start);
    f32u.up(start);
    grouped_gemm_backward_pair(rA.p, f32g.p, f32u.p, ddGU.p, dA_in.p, dWg.p, dWu.p, doff.p, G, rows, N, K, acc, nullptr);
    sync();
    auto g = f32g.down(), u = f32u.down();
    for (size_t i = 0; i < nw; i++) {
      (acc ? want_acc_g : want_over_g)[i] = to_bf16(g[i]);
      (acc ? want_acc_u : want_over_u)[i] = to_bf16(u[i]);
    }
  }
  const auto wantA = rA.down();
  bool same = true;
  std::string where;
  auto equal16 = [&](const std::vector<uint16_t>& got, size_t at, const std::vector<uint16_t>& want,
                     const std::string& what) {
    for (size_t i = 0; i < want.size(); i++)
      if (got[at + i] != want[i]) {
        if (same) where = what + ": element " + std::to_string(i) + " " + std::to_string(from_bf16(got[at + i])) +
                          " against " + std::to_string(from_bf16(want[i]));
        same = false;
        return;
      }
  };
  for (size_t pad : {size_t{0}, size_t{2}}) {  // 16-byte aligned, 4-byte aligned
    for (bool acc : {false, true}) {
      const std::string tag = std::string(acc ? "accumulate" : "overwrite") + (pad ? ", 4-byte aligned" : "");
      std::vector<uint16_t> start(pad + nw, 0x7fc0);  // NaN before the matrices: a write there shows
      for (size_t i = 0; i < nw; i++) start[pad + i] = acc ? old16[i] : to_bf16(garbage[i]);
      Buf<uint16_t> g16(start), u16(start), d16(start);
      grouped_gemm_backward_pair(gA.p, g16.p + pad, u16.p + pad, ddGU.p, dA_in.p, dWg.p, dWu.p, doff.p, G, rows, N, K,
                                 acc, nullptr);
      sync();
      equal16(g16.down(), pad, acc ? want_acc_g : want_over_g, "pair dW_gate, " + tag);
      equal16(u16.down(), pad, acc ? want_acc_u : want_over_u, "pair dW_up, " + tag);
      if (!bits_equal(gA.down().data(), wantA.data(), wantA.size(), &where)) same = false, where = "dA, " + tag + ": " + where;
      // The single-projection call on the gate half of dGU (rows 2N apart: ld_out).
      grouped_gemm_backward(nullptr, d16.p + pad, ddGU.p, dA_in.p, dWg.p, doff.p, G, rows, N, K, acc, nullptr, 2 * N);
      sync();
      equal16(d16.down(), pad, acc ? want_acc_g : want_over_g, "single dW, " + tag);
      auto d = d16.down();
      for (size_t i = 0; i < pad; i++)
        if (d[i] != 0x7fc0) same = false, where = "single dW, " + tag + ": wrote before the matrix";
    }
  }
  report(same, name + " = fp32 dW rounded (overwrite, +=; aligned, unaligned; pair and single)", where);
}

void test_grouped_backward_overwrite_empty() {
  const int G = 3, N = 24, K = 40;
  Buf<int32_t> off(std::vector<int32_t>{0, 0, 0, 0});
  auto garbage = rand_f32((size_t)G * N * K, 61, 5.f);
  std::vector<float> zeros((size_t)G * N * K, 0.f), sentinel(8 * K, -3.f);
  Buf<float> gW(garbage), gA(sentinel);
  Buf<uint16_t> dOut(8 * N), A(8 * K), W((size_t)G * N * K);
  bool ok = true;
  std::string where;
  for (int64_t max_rows : {0, 8}) {
    gW.up(garbage);
    grouped_gemm_backward(gA.p, gW.p, dOut.p, A.p, W.p, off.p, G, max_rows, N, K, false, nullptr);
    sync();
    if (!bits_equal(gW.down().data(), zeros.data(), zeros.size(), &where)) ok = false, where = "dW: " + where;
    if (!bits_equal(gA.down().data(), sentinel.data(), sentinel.size(), &where)) ok = false, where = "dA: " + where;
  }
  report(ok, "grouped_gemm_backward overwrite with no rows: dW zeroed, dA untouched", where);
}

void expect_invalid(const std::string& what, const std::function<void()>& f) {
  try {
    f();
    sync();
    report(false, "bad argument: " + what, "no error");
  } catch (const Error& e) {
    report(e.code() == ErrorCode::InvalidArgument, "bad argument: " + what + " -> " + e.what(),
           std::string("wrong code: ") + e.what());
  }
}

void test_bad_args() {
  Buf<uint16_t> A(64 * 64), W(64 * 64);
  Buf<float> out(64 * 64);
  Buf<int32_t> off(std::vector<int32_t>{0, 8, 16});
  expect_invalid("K % 8", [&] { gemm_forward(out.p, A.p, W.p, nullptr, 4, 16, 12, false, nullptr); });
  expect_invalid("N % 8", [&] { gemm_forward(out.p, A.p, W.p, nullptr, 4, 20, 16, false, nullptr); });
  expect_invalid("N = 0", [&] { gemm_forward(out.p, A.p, W.p, nullptr, 4, 0, 16, false, nullptr); });
  expect_invalid("M < 0", [&] { gemm_forward(out.p, A.p, W.p, nullptr, -1, 16, 16, false, nullptr); });
  expect_invalid("A null", [&] { gemm_forward(out.p, nullptr, W.p, nullptr, 4, 16, 16, false, nullptr); });
  expect_invalid("out null", [&] { gemm_forward(nullptr, A.p, W.p, nullptr, 4, 16, 16, false, nullptr); });
  expect_invalid("A misaligned", [&] { gemm_forward(out.p, A.p + 1, W.p, nullptr, 4, 16, 16, false, nullptr); });
  if (gemm_swiglu_available()) {
    Buf<uint16_t> act(64);
    expect_invalid("swiglu gate without up", [&] {
      gemm_swiglu_forward(act.p, A.p, W.p, W.p, 4, 16, 16, nullptr, out.p, nullptr);
    });
  }
  expect_invalid("ldc below N", [&] { gemm_forward(out.p, A.p, W.p, nullptr, 4, 16, 16, false, nullptr, 8); });
  expect_invalid("ldc % 4", [&] { gemm_forward(out.p, A.p, W.p, nullptr, 4, 16, 16, false, nullptr, 18); });
  expect_invalid("grouped G = 0", [&] { grouped_gemm_forward(out.p, A.p, W.p, off.p, 0, 16, 16, 16, nullptr); });
  expect_invalid("grouped max_rows < 0", [&] { grouped_gemm_forward(out.p, A.p, W.p, off.p, 2, -1, 16, 16, nullptr); });
  expect_invalid("grouped offsets null", [&] { grouped_gemm_forward(out.p, A.p, W.p, nullptr, 2, 16, 16, 16, nullptr); });
  expect_invalid("grouped K % 8", [&] { grouped_gemm_forward(out.p, A.p, W.p, off.p, 2, 16, 16, 10, nullptr); });
  expect_invalid("grouped backward W null with dA",
                 [&] { grouped_gemm_backward(out.p, nullptr, A.p, A.p, nullptr, off.p, 2, 16, 16, 16, nullptr); });
  expect_invalid("backward N % 8", [&] { gemm_backward(out.p, nullptr, nullptr, A.p, A.p, W.p, 4, 12, 16, false, nullptr); });
  expect_invalid("backward dOut null", [&] { gemm_backward(out.p, nullptr, nullptr, nullptr, A.p, W.p, 4, 16, 16, false, nullptr); });
}

// Random group sizes: `empty` groups forced to 0 (first and last included when asked).
std::vector<int> random_sizes(int G, int max_size, uint32_t seed, bool empty_ends) {
  std::mt19937 rng(seed);
  std::vector<int> s(G);
  for (auto& x : s) x = (int)(rng() % (max_size + 1));
  for (int g = 0; g < G; g += 7) s[g] = 0;
  if (empty_ends) s[0] = 0, s[G - 1] = 0;
  return s;
}

}  // namespace

// The gate/up GEMM with SwiGLU in its epilogue against the three calls it stands for (two forward GEMMs, then
// swiglu_forward), bit for bit, under every forward tile (each maps to a one-column tile of its rows): dense when
// `sizes` is empty (M rows), else grouped over those group sizes with max_rows = rows + extra_rows. Rows past the
// groups' and columns past N keep their sentinel.
void test_swiglu_gemm(int64_t M, const std::vector<int>& sizes, int N, int K, int64_t extra_rows) {
  if (!gemm_swiglu_available()) {
    std::printf("SKIP swiglu GEMM (needs the sm_90a build on Hopper)\n");
    return;
  }
  const bool grouped = !sizes.empty();
  const int G = grouped ? (int)sizes.size() : 1;
  auto off = offsets_of(grouped ? sizes : std::vector<int>{(int)M});
  const int64_t rows = off[G], max_rows = rows + (grouped ? extra_rows : 0);
  const std::string name = std::string(grouped ? "grouped_gemm_swiglu_forward G=" + std::to_string(G) + " rows="
                                               : "gemm_swiglu_forward M=") +
                           std::to_string(rows) + " N=" + std::to_string(N) + " K=" + std::to_string(K);
  auto A = rand_bf16(std::max<int64_t>(max_rows, 1) * K, 31 + N, 1.f);
  auto Wg = rand_bf16((size_t)G * N * K, 32 + K, 0.5f), Wu = rand_bf16((size_t)G * N * K, 33 + K, 0.5f);
  Buf<uint16_t> dA(A), dWg(Wg), dWu(Wu);
  Buf<int32_t> doff(off);
  // The three calls, automatic tiles.
  Buf<float> gate(std::vector<float>(std::max<int64_t>(max_rows, 1) * N, 0.f)), up(gate.down());
  Buf<uint16_t> want(std::vector<uint16_t>(std::max<int64_t>(max_rows, 1) * N, 0xdeadu & 0xffffu));
  if (grouped) {
    grouped_gemm_forward(gate.p, dA.p, dWg.p, doff.p, G, max_rows, N, K, nullptr);
    grouped_gemm_forward(up.p, dA.p, dWu.p, doff.p, G, max_rows, N, K, nullptr);
  } else {
    gemm_forward(gate.p, dA.p, dWg.p, nullptr, M, N, K, false, nullptr);
    gemm_forward(up.p, dA.p, dWu.p, nullptr, M, N, K, false, nullptr);
  }
  swiglu_forward(want.p, gate.p, up.p, (size_t)rows * N, nullptr);
  sync();
  const auto expect = want.down();
  // The kept products: gemm_forward's bits in the rows the groups own, the sentinel past them.
  const float kSentinel = -7.25f;
  auto expect_gate = gate.down(), expect_up = up.down();
  for (size_t i = (size_t)rows * N; i < expect_gate.size(); i++) expect_gate[i] = expect_up[i] = kSentinel;
  const std::vector<float> fsentinel(expect_gate.size(), kSentinel);
  const std::vector<uint16_t> sentinel(std::max<int64_t>(max_rows, 1) * N, 0xdeadu & 0xffffu);
  for (int t : all_tiles()) {
    if (family_of(t) != 1) continue;  // (the fused kernel is wgmma's)
    gemm_set_tile_override(t);
    Buf<uint16_t> act(sentinel);
    if (grouped)
      grouped_gemm_swiglu_forward(act.p, dA.p, dWg.p, dWu.p, doff.p, G, max_rows, N, K, nullptr);
    else
      gemm_swiglu_forward(act.p, dA.p, dWg.p, dWu.p, M, N, K, nullptr);
    sync();
    const auto got = act.down();
    size_t bad = got.size();
    for (size_t i = 0; i < got.size() && bad == got.size(); i++)
      if (got[i] != expect[i]) bad = i;
    report(bad == got.size(), name + " tile=" + std::to_string(t) + " == gemm, gemm, swiglu_forward bit for bit",
           bad == got.size() ? ""
                              : "first difference at row " + std::to_string(bad / N) + " column " +
                                    std::to_string(bad % N) + ": " + std::to_string(got[bad]) + " vs " +
                                    std::to_string(expect[bad]));
    // Again keeping gate and up: the same act, and the products equal to the plain GEMMs'.
    Buf<uint16_t> act2(sentinel);
    Buf<float> kg(fsentinel), ku(fsentinel);
    if (grouped)
      grouped_gemm_swiglu_forward(act2.p, dA.p, dWg.p, dWu.p, doff.p, G, max_rows, N, K, nullptr, kg.p, ku.p);
    else
      gemm_swiglu_forward(act2.p, dA.p, dWg.p, dWu.p, M, N, K, nullptr, kg.p, ku.p);
    sync();
    std::string where;
    const auto got2 = act2.down();
    const auto gg = kg.down(), gu = ku.down();
    const bool same = got2 == expect && bits_equal(gg.data(), expect_gate.data(), gg.size(), &where) &&
                      bits_equal(gu.data(), expect_up.data(), gu.size(), &where);
    report(same, name + " tile=" + std::to_string(t) + " keeping gate and up: act, gate, up == the three calls",
           got2 == expect ? where : "act differs");
  }
  gemm_set_tile_override(0);
}

int main(int argc, char** argv) {
  for (int i = 1; i < argc; i++)
    if (std::string(argv[i]) == "--quick") g_quick = true;
    else if (std::string(argv[i]) == "--no-wgmma") gemm_set_wgmma_enabled(false);
  try {
    std::string dev;
    MP_GPU_CHECK(device_name(0, &dev));
    std::printf("device: %s%s\n", dev.c_str(), g_quick ? " (quick)" : "");
    std::printf("wgmma forward: %s\n", gemm_wgmma_available() ? "yes" : "no");
    const std::vector<int> all_tiles = ::all_tiles();
    test_forward_m0();
    test_forward(1, 16, 16, false, false, all_tiles);
    test_forward(1, 8, 8, true, false, all_tiles);
    test_forward(3, 24, 40, true, true, all_tiles);
    test_forward(17, 64, 64, false, true, all_tiles);
    test_forward(5, 48, 24, true, false, all_tiles);
    test_forward(1000, 136, 520, true, false, all_tiles);
    test_forward_strided(37, 136, 72, 148, all_tiles);
    test_forward_lt(1024, 136, 520, true, false, 0);
    test_forward_lt(1500, 264, 1032, false, true, 0);
    test_forward_lt(1024, 200, 72, false, false, 204);
    test_forward_residual(1024, 136, 520);
    test_forward_residual(40, 264, 1032);
    test_forward_lt_streams();
    if (!g_quick) {
      test_forward(17, 2048, 2048, false, false, all_tiles);
      test_forward(130, 2816, 2048, true, true, all_tiles);
      test_forward(3, 151936, 2048, false, false, {0, 1, 5, 6, 11});
      test_forward_lt(2048, 8192, 2048, false, false, 8200);   // an LM head chunk into wider rows (the kept logits)
      test_forward_lt(2048, 2048, 2048, true, false, 0);          // q / k / v
      test_forward_lt(2048, 2048, 5632, false, false, 0);         // the shared expert's down projection
      test_forward_lt(1024, 6144, 2048, true, true, 0);           // bias and += (stays on the own kernel)
      test_batch_invariance(2048, 2048, 4096);
      test_batch_invariance(6144, 2048, 4096);
      test_batch_invariance(151936, 2048, 64);
    } else {
      test_batch_invariance(136, 72, 300);
    }
    test_grouped_forward({0, 3, 0, 17, 1}, 24, 40, 5, true);
    test_grouped_forward({0, 0, 0}, 64, 64, 10, true);
    test_grouped_forward({200}, 64, 128, 0, true);
    test_grouped_forward(random_sizes(9, 150, 5, true), 72, 136, 40, true);
    if (!g_quick) {
      test_grouped_forward(random_sizes(60, 280, 6, false), 2816, 2048, 300, false);
      test_grouped_forward(random_sizes(60, 30, 7, true), 2048, 1408, 0, true);
    }
    for (bool acc : {false, true}) {
      test_backward(17, 64, 40, acc);
      test_backward(1, 16, 8, acc);
    }
    test_backward(0, 16, 16, false);
    test_backward(0, 16, 16, false, false);
    test_backward(17, 64, 40, true, false);
    test_backward(1000, 256, 520, true);
    test_backward(1000, 264, 520, false, false);
    if (!g_quick) test_backward(300, 2048, 1408, false);
    test_grouped_backward({0, 5, 130, 0, 64, 1, 200}, 136, 520, 30);
    test_grouped_backward({0, 0}, 16, 16, 8);
    test_grouped_backward({3, 1}, 16, 24, 0);
    if (!g_quick) test_grouped_backward(random_sizes(6, 150, 8, true), 1408, 2048, 0);
    test_grouped_backward_overwrite_empty();
    test_grouped_backward_pair({0, 5, 130, 0, 64, 1, 200}, 128, 520);  // one product over 2N
    test_grouped_backward_pair({3, 0, 17}, 40, 64);                     // N % 64 != 0: two products
    if (!g_quick) test_grouped_backward_pair(random_sizes(6, 150, 9, true), 1408, 2048);
    test_grouped_backward_bf16({0, 5, 130, 0, 64, 1, 200}, 136, 520);
    test_grouped_backward_bf16({3, 0}, 16, 24);
    if (!g_quick) test_grouped_backward_bf16(random_sizes(6, 150, 10, true), 1408, 2048);
    test_swiglu_gemm(1, {}, 8, 16, 0);
    test_swiglu_gemm(77, {}, 136, 72, 0);
    test_swiglu_gemm(0, {0, 3, 0, 17, 1, 130}, 72, 136, 9);
    if (!g_quick) {
      test_swiglu_gemm(1024, {}, 5632, 2048, 0);
      test_swiglu_gemm(0, random_sizes(60, 68, 11, true), 1408, 2048, 50);
    }
    test_grouped_graph();
    test_bad_args();
    gemm_release();
  } catch (const std::exception& e) {
    std::printf("FAIL exception: %s\n", e.what());
    g_failures++;
  }
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "ALL PASSED", g_failures);
  return g_failures ? 1 : 0;
}
