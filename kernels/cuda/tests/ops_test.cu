// Every op of cuda/ops.h against its CPU reference (kernels/cpu/ops.h, or a plain loop where the CPU backend
// has no separate op) on random inputs. Inputs that the GPU op reads as bf16 are rounded to bf16 before the CPU
// op sees them, so the tolerances measure the op, not the input rounding. Exit status 1 on any failure.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "cuda/gemm.h"
#include "cuda/ops.h"
#include "moepilot/model.h"
#include "model/loss.h"

using namespace moepilot;
using namespace moepilot::gpu;

namespace {

int failures = 0;
std::mt19937 rng(1234);
Stream stream;

std::vector<float> randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}
std::vector<float> rounded(std::vector<float> v) {
  for (auto& x : v) x = round_bf16(x);
  return v;
}
uint16_t bits_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)(((u + 0x7fffu + ((u >> 16) & 1u))) >> 16);
}
float from_bits(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Device buffers that free themselves.
template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t n_) : n(n_) { MP_GPU_CHECK(malloc_device((void**)&p, std::max<size_t>(n, 1) * sizeof(T))); }
  Dev(const std::vector<T>& h) : Dev(h.size()) { up(h); }
  ~Dev() { free_device(p); }
  void up(const std::vector<T>& h) {
    MP_GPU_CHECK(memcpy_async(p, h.data(), h.size() * sizeof(T), stream));
    MP_GPU_CHECK(stream_sync(stream));
  }
  std::vector<T> down() const {
    std::vector<T> h(n);
    MP_GPU_CHECK(memcpy_async(h.data(), p, n * sizeof(T), stream));
    MP_GPU_CHECK(stream_sync(stream));
    return h;
  }
  void zero() { MP_GPU_CHECK(memset_async(p, 0, n * sizeof(T), stream)); }
};
Dev<uint16_t> dev_bf16(const std::vector<float>& h) {
  std::vector<uint16_t> b(h.size());
  for (size_t i = 0; i < h.size(); i++) b[i] = bits_bf16(h[i]);
  return Dev<uint16_t>(b);
}
std::vector<float> down_bf16(const Dev<uint16_t>& d) {
  std::vector<uint16_t> b = d.down();
  std::vector<float> f(b.size());
  for (size_t i = 0; i < b.size(); i++) f[i] = from_bits(b[i]);
  return f;
}

// Relative L2 error ||a - e|| / ||e|| (absolute when e is 0); prints the worst element on failure.
void check(const std::string& name, const std::vector<float>& got, const std::vector<float>& want, double tol) {
  if (got.size() != want.size()) {
    std::printf("FAIL %-40s size %zu != %zu\n", name.c_str(), got.size(), want.size());
    failures++;
    return;
  }
  double num = 0, den = 0, worst = -1;
  size_t wi = 0;
  bool finite = true;
  for (size_t i = 0; i < got.size(); i++) {
    const double d = (double)got[i] - want[i];
    finite &= std::isfinite(got[i]);
    num += d * d;
    den += (double)want[i] * want[i];
    if (std::fabs(d) > worst) worst = std::fabs(d), wi = i;
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  const bool ok = finite && err <= tol;
  if (!ok) failures++;
  std::printf("%s %-40s rel_l2 %.3e (tol %.1e) max|d| %.3e at %zu: got %.7g want %.7g\n", ok ? "ok  " : "FAIL",
              name.c_str(), err, tol, worst, wi, got.empty() ? 0.f : got[wi], want.empty() ? 0.f : want[wi]);
}
template <class T>
void check_exact(const std::string& name, const std::vector<T>& got, const std::vector<T>& want) {
  size_t bad = got.size() == want.size() ? got.size() : 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); i++)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      bad = i;
      break;
    }
  const bool ok = got.size() == want.size() && bad == got.size();
  if (!ok) {
    failures++;
    std::printf("FAIL %-40s first difference at %zu: got %g want %g (sizes %zu/%zu)\n", name.c_str(), bad,
                bad < got.size() ? (double)got[bad] : 0.0, bad < want.size() ? (double)want[bad] : 0.0, got.size(),
                want.size());
  } else {
    std::printf("ok   %-40s exact (%zu values)\n", name.c_str(), got.size());
  }
}

void test_casts() {
  auto x = randn(1000, 3.f);
  x[0] = 1.00390625f;  // a tie: rounds to even
  Dev<float> d(x);
  Dev<uint16_t> b(x.size());
  cast_f32_to_bf16(b.p, d.p, x.size(), stream);
  check_exact("cast_f32_to_bf16", down_bf16(b), rounded(x));
  Dev<float> back(x.size());
  cast_bf16_to_f32(back.p, b.p, x.size(), stream);
  check_exact("cast_bf16_to_f32", back.down(), rounded(x));
  // An odd length takes the one-element path (1000 above: four elements a thread).
  Dev<uint16_t> b_odd(x.size() - 1);
  cast_f32_to_bf16(b_odd.p, d.p, x.size() - 1, stream);
  check_exact("cast_f32_to_bf16 (odd length)", down_bf16(b_odd), rounded(std::vector<float>(x.begin(), x.end() - 1)));
  const int rows = 5, rp = 8, cols = 16;
  auto w = randn(rows * cols);
  Dev<float> dw(w);
  Dev<uint16_t> pad(rp * cols);
  pad_rows_to_bf16(pad.p, dw.p, rows, rp, cols, stream);
  std::vector<float> want = rounded(w);
  want.resize(rp * cols, 0.f);
  check_exact("pad_rows_to_bf16", down_bf16(pad), want);
}

void test_embedding() {
  const int V = 50, C = 72, N = 40;
  auto wte = randn((size_t)V * C);
  std::vector<int32_t> tok(N);
  for (auto& t : tok) t = rng() % 7;  // many repeats
  Dev<float> dwte_in(wte);
  Dev<int32_t> dtok(tok);
  Dev<float> out((size_t)N * C);
  embedding_forward(out.p, dtok.p, dwte_in.p, N, C, stream);
  std::vector<float> want((size_t)N * C);
  for (int i = 0; i < N; i++) std::memcpy(&want[(size_t)i * C], &wte[(size_t)tok[i] * C], C * 4);
  check_exact("embedding_forward", out.down(), want);
  auto dout = randn((size_t)N * C);
  auto g0 = randn((size_t)V * C);
  std::vector<float> gw = g0;
  for (int i = 0; i < N; i++)
    for (int c = 0; c < C; c++) gw[(size_t)tok[i] * C + c] += dout[(size_t)i * C + c];
  std::vector<int32_t> order(N), starts, uniq;
  for (int i = 0; i < N; i++) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return tok[a] < tok[b]; });
  for (int j = 0; j < N; j++)
    if (j == 0 || tok[order[j]] != tok[order[j - 1]]) starts.push_back(j), uniq.push_back(tok[order[j]]);
  starts.push_back(N);
  Dev<float> dg(g0), ddout(dout);
  Dev<int32_t> dorder(order), dstarts(starts), duniq(uniq);
  embedding_backward(dg.p, ddout.p, dorder.p, dstarts.p, duniq.p, (int)uniq.size(), C, stream);
  check("embedding_backward", dg.down(), gw, 1e-6);
}

void test_rmsnorm() {
  for (int C : {16, 256, 2048}) {
    const int N = C == 256 ? 300 : 37;  // 300 rows: the dweight column sums' eight-row loop
    auto x = randn((size_t)N * C, 2.f), w = randn(C, 1.f);
    std::vector<float> out((size_t)N * C), rstd(N);
    cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6f);
    Dev<float> dx(x), dw(w), o32((size_t)N * C), dr(N);
    Dev<uint16_t> o16((size_t)N * C);
    rmsnorm_forward(o32.p, o16.p, dr.p, dx.p, dw.p, N, C, 1e-6f, stream);
    const std::string tag = " C=" + std::to_string(C);
    check("rmsnorm_forward out32" + tag, o32.down(), out, 1e-5);
    check("rmsnorm_forward out16" + tag, down_bf16(o16), out, 8e-3);
    check("rmsnorm_forward rstd" + tag, dr.down(), rstd, 1e-5);
    auto dy = randn((size_t)N * C);
    auto dx0 = randn((size_t)N * C), dw0 = randn(C);
    std::vector<float> dxw = dx0, dww = dw0;
    cpu::rmsnorm_backward(dxw.data(), dww.data(), dy.data(), x.data(), w.data(), rstd.data(), N, C);
    Dev<float> ddx(dx0), ddw(dw0), ddy(dy);
    rmsnorm_backward(ddx.p, ddw.p, ddy.p, dx.p, dw.p, dr.p, N, C, true, stream);
    check("rmsnorm_backward dinp (+=)" + tag, ddx.down(), dxw, 1e-5);
    check("rmsnorm_backward dweight" + tag, ddw.down(), dww, 1e-5);
    // With the bf16 copy: dinp's bits, and the copy those bits rounded (as a cast after it).
    Dev<float> ddx2(dx0), ddw2(dw0);
    Dev<uint16_t> d16((size_t)N * C), dref((size_t)N * C);
    rmsnorm_backward(ddx2.p, ddw2.p, ddy.p, dx.p, dw.p, dr.p, N, C, true, stream, d16.p);
    cast_f32_to_bf16(dref.p, ddx.p, (size_t)N * C, stream);
    check_exact("rmsnorm_backward with bf16 copy: dinp" + tag, ddx2.down(), ddx.down());
    check_exact("rmsnorm_backward with bf16 copy: copy = cast" + tag, down_bf16(d16), down_bf16(dref));
  }
}

void test_rope() {
  for (int HD : {6, 16, 128}) {  // 6: HD % 4 != 0, the one-pair-a-thread rotation
    ModelConfig cfg;
    cfg.head_dim = HD;
    cfg.rope_theta = 1e6f;
    const std::vector<double> inv = cfg.rope_inv_freq();
    const int N = 50, heads = 3, P = 64;
    std::vector<int32_t> pos(N);
    for (auto& p : pos) p = rng() % P;
    std::vector<float> cs, sn;
    rope_tables(cs, sn, P, inv);
    auto x = randn((size_t)N * heads * HD);
    std::vector<float> want = x;
    cpu::rope_forward(want.data(), pos.data(), N, heads, HD, inv.data());
    Dev<float> dx(x), dcs(cs), dsn(sn);
    Dev<int32_t> dpos(pos);
    rope_forward(dx.p, dpos.p, dcs.p, dsn.p, N, heads, HD, stream);
    check("rope_forward HD=" + std::to_string(HD), dx.down(), want, 1e-6);
    // The bf16-writing rotation: the same bits as rotating in place and casting.
    Dev<float> dx0(x);
    Dev<uint16_t> d16(x.size()), dref(x.size());
    rope_forward_bf16(d16.p, dx0.p, dpos.p, dcs.p, dsn.p, N, heads, HD, stream);
    cast_f32_to_bf16(dref.p, dx.p, x.size(), stream);
    check_exact("rope_forward_bf16 HD=" + std::to_string(HD) + " against rope_forward + cast", down_bf16(d16),
                down_bf16(dref));
    check_exact("rope_forward_bf16 leaves x", dx0.down(), x);
    std::vector<float> wantb = x;
    cpu::rope_backward(wantb.data(), pos.data(), N, heads, HD, inv.data());
    dx.up(x);
    rope_backward(dx.p, dpos.p, dcs.p, dsn.p, N, heads, HD, stream);
    check("rope_backward HD=" + std::to_string(HD), dx.down(), wantb, 1e-6);
    rope_backward_bf16(d16.p, dx0.p, dpos.p, dcs.p, dsn.p, N, heads, HD, stream);
    cast_f32_to_bf16(dref.p, dx.p, x.size(), stream);
    check_exact("rope_backward_bf16 HD=" + std::to_string(HD) + " against rope_backward + cast", down_bf16(d16),
                down_bf16(dref));
  }
}

void test_swiglu() {
  const size_t n = 10007;
  auto g = randn(n, 3.f), u = randn(n);
  std::vector<float> act(n);
  cpu::swiglu_forward(act.data(), g.data(), u.data(), n);
  Dev<float> dg(g), du(u);
  Dev<uint16_t> dact(n);
  swiglu_forward(dact.p, dg.p, du.p, n, stream);
  check("swiglu_forward", down_bf16(dact), act, 8e-3);
  // n % 4 == 0 takes the four-elements-a-thread path (10007 above: one element): the same bits as the other path.
  Dev<uint16_t> dact4(n - 3);
  swiglu_forward(dact4.p, dg.p, du.p, n - 3, stream);
  const auto one = down_bf16(dact), four = down_bf16(dact4);
  check_exact("swiglu_forward (n % 4 == 0) against n odd", four, std::vector<float>(one.begin(), one.end() - 3));
  auto da = randn(n);
  std::vector<float> wg(n), wu(n);
  cpu::swiglu_backward(wg.data(), wu.data(), da.data(), g.data(), u.data(), n);
  Dev<float> dda(da);
  Dev<uint16_t> og(n), ou(n);
  swiglu_backward(og.p, ou.p, dda.p, dg.p, du.p, n, stream);
  check("swiglu_backward dgate", down_bf16(og), wg, 8e-3);
  check("swiglu_backward dup", down_bf16(ou), wu, 8e-3);
  Dev<uint16_t> og4(n - 3), ou4(n - 3);  // the four-wide path, as for the forward
  swiglu_backward(og4.p, ou4.p, dda.p, dg.p, du.p, n - 3, stream);
  const auto g1 = down_bf16(og), u1 = down_bf16(ou);
  check_exact("swiglu_backward dgate (n % 4 == 0) against n odd", down_bf16(og4),
              std::vector<float>(g1.begin(), g1.end() - 3));
  check_exact("swiglu_backward dup (n % 4 == 0) against n odd", down_bf16(ou4),
              std::vector<float>(u1.begin(), u1.end() - 3));
  // Rows of `width` into one [rows, 2 width] buffer, d gate | d up (the four-wide path at width 164, the one-wide at
  // 41): each element's bits where the flat call put them.
  for (int width : {164, 41}) {
    const int rows = 61, m = width * rows;
    Dev<uint16_t> pair((size_t)2 * m);
    swiglu_backward(pair.p, pair.p + width, dda.p, dg.p, du.p, (size_t)m, stream, width, 2 * width);
    const auto got = down_bf16(pair);
    std::vector<float> want((size_t)2 * m);
    for (int r = 0; r < rows; r++)
      for (int j = 0; j < width; j++) {
        want[(size_t)r * 2 * width + j] = g1[(size_t)r * width + j];
        want[(size_t)r * 2 * width + width + j] = u1[(size_t)r * width + j];
      }
    check_exact("swiglu_backward rows of " + std::to_string(width) + " into d gate | d up", got, want);
  }
}

void test_router() {
  for (int variant = 0; variant < 4; variant++) {
    const bool renorm = variant & 1, small = variant >= 2;
    const int N = 300, E = small ? 8 : 60, K = small ? 2 : 4, ld = small ? 8 : 64;
    const std::string tag = std::string(renorm ? " renorm" : " plain") + " E=" + std::to_string(E);
    auto logits = randn((size_t)N * ld, 2.f);
    std::vector<float> dense((size_t)N * E);
    for (int i = 0; i < N; i++) std::memcpy(&dense[(size_t)i * E], &logits[(size_t)i * ld], E * 4);
    std::vector<float> probs((size_t)N * E), w((size_t)N * K);
    std::vector<int32_t> ex((size_t)N * K);
    cpu::router_forward(probs.data(), w.data(), ex.data(), dense.data(), N, E, K, renorm);
    Dev<float> dl(logits), dp((size_t)N * E), dw((size_t)N * K);
    Dev<int32_t> dex((size_t)N * K);
    router_forward(dp.p, dw.p, dex.p, dl.p, ld, N, E, K, renorm, stream);
    check("router_forward probs" + tag, dp.down(), probs, 1e-6);
    check("router_forward weights" + tag, dw.down(), w, 1e-6);
    check_exact("router_forward experts" + tag, dex.down(), ex);
    // backward with a load-balancing gradient
    auto dweights = randn((size_t)N * K), aux = randn(E, 0.1f);
    std::vector<float> extra((size_t)N * E);
    for (int i = 0; i < N; i++) std::memcpy(&extra[(size_t)i * E], aux.data(), E * 4);
    std::vector<float> dz((size_t)N * E);
    cpu::router_backward(dz.data(), dweights.data(), extra.data(), probs.data(), w.data(), ex.data(), N, E, K, renorm);
    std::vector<float> want((size_t)N * ld, 0.f);
    for (int i = 0; i < N; i++) std::memcpy(&want[(size_t)i * ld], &dz[(size_t)i * E], E * 4);
    Dev<float> ddw(dweights), daux(aux);
    Dev<uint16_t> ddl((size_t)N * ld);
    router_backward(ddl.p, ld, ddw.p, daux.p, dp.p, dw.p, dex.p, N, E, K, renorm, stream);
    check("router_backward dlogits" + tag, down_bf16(ddl), want, 8e-3);
    // replay: the reversed top-k
    std::vector<int32_t> rep((size_t)N * K);
    std::vector<float> rw((size_t)N * K);
    for (int i = 0; i < N; i++) {
      float s = 0;
      for (int k = 0; k < K; k++) {
        rep[(size_t)i * K + k] = (i + 7 * k) % E;
        rw[(size_t)i * K + k] = probs[(size_t)i * E + rep[(size_t)i * K + k]];
        s += rw[(size_t)i * K + k];
      }
      if (renorm)
        for (int k = 0; k < K; k++) rw[(size_t)i * K + k] /= s;
    }
    Dev<int32_t> drep(rep);
    router_replay(dw.p, dex.p, dp.p, drep.p, N, E, K, renorm, stream);
    check("router_replay weights" + tag, dw.down(), rw, 1e-6);
    check_exact("router_replay experts" + tag, dex.down(), rep);
    std::vector<float> cs(E, 0.f);
    for (int i = 0; i < N; i++)
      for (int e = 0; e < E; e++) cs[e] += probs[(size_t)i * E + e];
    Dev<float> dcs(E);
    column_sums(dcs.p, dp.p, E, N, E, stream);
    check("column_sums" + tag, dcs.down(), cs, 1e-5);
  }
}

void test_moe() {
  const int N = 97, E = 12, K = 3, C = 64;
  const int NK = N * K;
  std::vector<int32_t> ex(NK);
  for (int i = 0; i < N; i++) {
    // distinct experts per token, skewed
    std::vector<int> pool(E);
    for (int e = 0; e < E; e++) pool[e] = e;
    std::shuffle(pool.begin(), pool.begin() + 8, rng);
    for (int k = 0; k < K; k++) ex[i * K + k] = pool[k];
  }
  std::vector<int32_t> counts(E, 0), offsets(E + 1, 0), order(NK), pos_of(NK);
  for (int a = 0; a < NK; a++) counts[ex[a]]++;
  for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
  {
    std::vector<int32_t> fill(offsets.begin(), offsets.end() - 1);
    for (int a = 0; a < NK; a++) order[fill[ex[a]]] = a, pos_of[a] = fill[ex[a]]++;
  }
  Dev<int32_t> dex(ex), dorder(NK), dpos(NK), doff(E + 1), dcnt(E);
  moe_permute(dorder.p, dpos.p, doff.p, dcnt.p, dex.p, NK, E, stream);
  check_exact("moe_permute order", dorder.down(), order);
  check_exact("moe_permute pos_of", dpos.down(), pos_of);
  check_exact("moe_permute offsets", doff.down(), offsets);
  check_exact("moe_permute counts", dcnt.down(), counts);
  // Larger sorts (a decode step of 1024 rows x top-4 over 60 experts; 8192 x 128 skewed; experts outside [0, E)
  // skipped) against the same host counting sort.
  for (const auto& cfg : std::vector<std::array<int, 3>>{{4096, 60, 0}, {8192 * 4, 128, 1}, {1000, 300, 2}, {0, 8, 0}}) {
    const int nk = cfg[0], ne = cfg[1], mode = cfg[2];
    std::vector<int32_t> ex2(nk);
    for (int a = 0; a < nk; a++) {
      const int r = (int)(rng() % 1000);
      ex2[a] = mode == 1 ? (r < 500 ? r % 4 : r % ne) : (int)(rng() % ne);
      if (mode == 2 && r < 50) ex2[a] = r < 25 ? -1 : ne;  // not an expert: skipped
    }
    std::vector<int32_t> c2(ne, 0), o2(ne + 1, 0), ord2(nk, -7), pos2(nk, -7);
    for (int a = 0; a < nk; a++)
      if (ex2[a] >= 0 && ex2[a] < ne) c2[ex2[a]]++;
    for (int e = 0; e < ne; e++) o2[e + 1] = o2[e] + c2[e];
    std::vector<int32_t> fill(o2.begin(), o2.end() - 1);
    for (int a = 0; a < nk; a++)
      if (ex2[a] >= 0 && ex2[a] < ne) ord2[fill[ex2[a]]] = a, pos2[a] = fill[ex2[a]]++;
    Dev<int32_t> de(ex2), dord(ord2), dp(pos2), dof(ne + 1), dc(ne);  // order / pos_of preset: untouched stay
    moe_permute(dord.p, dp.p, dof.p, dc.p, de.p, nk, ne, stream);
    const std::string tag = " NK=" + std::to_string(nk) + " E=" + std::to_string(ne);
    check_exact("moe_permute order" + tag, dord.down(), ord2);
    check_exact("moe_permute pos_of" + tag, dp.down(), pos2);
    check_exact("moe_permute offsets" + tag, dof.down(), o2);
    check_exact("moe_permute counts" + tag, dc.down(), c2);
  }
  auto x = rounded(randn((size_t)N * C));
  Dev<uint16_t> dx = dev_bf16(x), dxg((size_t)NK * C);
  moe_gather(dxg.p, dx.p, dorder.p, NK, K, C, stream);
  std::vector<float> xg((size_t)NK * C);
  for (int m = 0; m < NK; m++) std::memcpy(&xg[(size_t)m * C], &x[(size_t)(order[m] / K) * C], C * 4);
  check_exact("moe_gather", down_bf16(dxg), xg);
  // combine forward with a shared expert (gate logit in column 0 of a row of 8)
  const int sld = 8;
  auto y = randn((size_t)NK * C), w = randn((size_t)NK, 0.5f), sout = randn((size_t)N * C), slog = randn((size_t)N * sld);
  auto h = randn((size_t)N * C);
  std::vector<float> want = h;
  for (int i = 0; i < N; i++) {
    const float sg = 1.f / (1.f + std::exp(-slog[(size_t)i * sld]));
    for (int c = 0; c < C; c++) {
      float o = 0;
      for (int k = 0; k < K; k++) o += w[i * K + k] * y[(size_t)pos_of[i * K + k] * C + c];
      o += sg * sout[(size_t)i * C + c];
      want[(size_t)i * C + c] += o;
    }
  }
  Dev<float> dh(h), dy(y), dw(w), dso(sout), dsl(slog);
  moe_combine_forward(dh.p, dy.p, dpos.p, dw.p, dso.p, dsl.p, sld, N, C, K, stream);
  check("moe_combine_forward", dh.down(), want, 1e-6);
  // combine backward
  auto g = randn((size_t)N * C);
  std::vector<float> wdy((size_t)NK * C), wdw(NK), wdso((size_t)N * C), wdsl((size_t)N * sld, 0.f);
  for (int i = 0; i < N; i++) {
    for (int k = 0; k < K; k++) {
      double dot = 0;
      const int p = pos_of[i * K + k];
      for (int c = 0; c < C; c++) {
        dot += (double)g[(size_t)i * C + c] * y[(size_t)p * C + c];
        wdy[(size_t)p * C + c] = w[i * K + k] * g[(size_t)i * C + c];
      }
      wdw[i * K + k] = (float)dot;
    }
    const float sg = 1.f / (1.f + std::exp(-slog[(size_t)i * sld]));
    double dot = 0;
    for (int c = 0; c < C; c++) {
      dot += (double)g[(size_t)i * C + c] * sout[(size_t)i * C + c];
      wdso[(size_t)i * C + c] = sg * g[(size_t)i * C + c];
    }
    wdsl[(size_t)i * sld] = (float)dot * sg * (1.f - sg);
  }
  Dev<float> dg(g), ddw(NK);
  Dev<uint16_t> ddy((size_t)NK * C), ddso((size_t)N * C), ddsl((size_t)N * sld);
  moe_combine_backward(ddy.p, ddw.p, ddso.p, ddsl.p, dg.p, dy.p, dpos.p, dw.p, dso.p, dsl.p, sld, N, C, K, stream);
  check("moe_combine_backward dy", down_bf16(ddy), wdy, 8e-3);
  check("moe_combine_backward dweights", ddw.down(), wdw, 1e-5);
  check("moe_combine_backward ds_out", down_bf16(ddso), wdso, 8e-3);
  check("moe_combine_backward ds_logit", down_bf16(ddsl), wdsl, 8e-3);
  // scatter-add
  auto a = randn((size_t)NK * C), b = randn((size_t)NK * C), dx0 = randn((size_t)N * C);
  std::vector<float> wdx = dx0;
  for (int i = 0; i < N; i++)
    for (int k = 0; k < K; k++)
      for (int c = 0; c < C; c++) {
        const size_t p = (size_t)pos_of[i * K + k] * C + c;
        wdx[(size_t)i * C + c] += a[p] + b[p];
      }
  Dev<float> da(a), db(b), ddx(dx0);
  moe_scatter_add(ddx.p, da.p, db.p, dpos.p, N, C, K, stream);
  check("moe_scatter_add", ddx.down(), wdx, 1e-6);
}

void test_lm_head() {
  const int N = 33, C = 64, V = 20000;  // three chunks, the last one partial
  const float T = 0.7f;
  auto x = rounded(randn((size_t)N * C)), W = rounded(randn((size_t)V * C, 0.3f));
  std::vector<int32_t> target(N);
  for (int i = 0; i < N; i++) target[i] = i % 5 == 4 ? -1 : (int32_t)(rng() % V);
  std::vector<float> lp(N), lse(N), ent(N), logits((size_t)N * V);
  cpu::lm_head_forward(lp.data(), lse.data(), ent.data(), logits.data(), x.data(), W.data(), target.data(), N, C, V, T);
  Dev<uint16_t> dx = dev_bf16(x), dW = dev_bf16(W);
  Dev<int32_t> dt(target);
  Dev<float> dlp(N), dlse(N), dent(N), dlog((size_t)N * V), scratch(lm_head_scratch_floats(N, V));
  lm_head_forward(dlp.p, dlse.p, dent.p, dlog.p, dx.p, dW.p, dt.p, N, C, V, T, scratch.p, stream);
  check("lm_head_forward logprob", dlp.down(), lp, 1e-5);
  check("lm_head_forward lse", dlse.down(), lse, 1e-5);
  check("lm_head_forward entropy", dent.down(), ent, 1e-4);
  check("lm_head_forward logits", dlog.down(), logits, 1e-5);
  {  // The log-sum-exp passes on a second stream beside the GEMMs: the same bits.
    LmHeadSide side;
    MP_GPU_CHECK(stream_create(&side.stream));
    MP_GPU_CHECK(event_create(&side.fork));
    MP_GPU_CHECK(event_create(&side.join));
    Dev<float> olp(N), olse(N), oent(N), olog((size_t)N * V), oscr(lm_head_scratch_floats(N, V));
    lm_head_forward(olp.p, olse.p, oent.p, olog.p, dx.p, dW.p, dt.p, N, C, V, T, oscr.p, stream, &side);
    check_exact("lm_head_forward beside a second stream: logprob", olp.down(), dlp.down());
    check_exact("lm_head_forward beside a second stream: lse", olse.down(), dlse.down());
    check_exact("lm_head_forward beside a second stream: entropy", oent.down(), dent.down());
    MP_GPU_CHECK(stream_sync(stream));
    event_destroy(side.fork);
    event_destroy(side.join);
    stream_destroy(side.stream);
  }
  // Batch invariance: rows 3..9 alone give the same bits, and logprob == fp32(logit / T) - lse.
  const int r0 = 3, rn = 7;
  Dev<float> slp(rn), slse(rn), sscr(lm_head_scratch_floats(rn, V));
  lm_head_forward(slp.p, slse.p, nullptr, nullptr, dx.p + (size_t)r0 * C, dW.p, dt.p + r0, rn, C, V, T, sscr.p, stream);
  auto full_lp = dlp.down(), full_lse = dlse.down(), full_logits = dlog.down();
  check_exact("lm_head_forward row-invariant logprob", slp.down(),
              std::vector<float>(full_lp.begin() + r0, full_lp.begin() + r0 + rn));
  check_exact("lm_head_forward row-invariant lse", slse.down(),
              std::vector<float>(full_lse.begin() + r0, full_lse.begin() + r0 + rn));
  std::vector<float> from_logits(N);
  for (int i = 0; i < N; i++)
    from_logits[i] = target[i] >= 0 ? full_logits[(size_t)i * V + target[i]] / T - full_lse[i] : 0.f;
  check_exact("lm_head logprob == logit/T - lse", full_lp, from_logits);
  // backward
  auto g = randn(N, 0.1f);
  g[5] = 0.f;
  std::vector<float> dxw((size_t)N * C), dWw((size_t)V * C, 0.f);
  cpu::lm_head_backward(dxw.data(), dWw.data(), g.data(), lse.data(), x.data(), W.data(), target.data(), N, C, V, T);
  Dev<float> dg(g), ddx((size_t)N * C), ddW((size_t)V * C);
  ddW.zero();
  lm_head_backward(ddx.p, ddW.p, dg.p, dlse.p, nullptr, dx.p, dW.p, dt.p, N, C, V, T, scratch.p, stream);
  check("lm_head_backward dx", ddx.down(), dxw, 1e-2);
  check("lm_head_backward dW", ddW.down(), dWw, 1e-2);
  // From the forward's kept logits: the same bits as recomputing them.
  Dev<float> ddx2((size_t)N * C), ddW2((size_t)V * C);
  ddW2.zero();
  lm_head_backward(ddx2.p, ddW2.p, dg.p, dlse.p, dlog.p, dx.p, dW.p, dt.p, N, C, V, T, scratch.p, stream);
  check_exact("lm_head_backward kept logits dx", ddx2.down(), ddx.down());
  check_exact("lm_head_backward kept logits dW", ddW2.down(), ddW.down());
  // Overwriting dW (the first backward after zeroing): old values ignored, the product equal to adding it to zeros.
  ddW2.up(randn((size_t)V * C, 3.f));
  lm_head_backward(ddx2.p, ddW2.p, dg.p, dlse.p, dlog.p, dx.p, dW.p, dt.p, N, C, V, T, scratch.p, stream,
                   /*accumulate_dW=*/false);
  check("lm_head_backward overwritten dW", ddW2.down(), dWw, 1e-2);
  // The whole vocabulary's dlogits at once (one pass, two GEMMs over V): the same gradients, summed in another order.
  Dev<uint16_t> ddl((size_t)N * V);
  lm_head_backward(ddx2.p, ddW2.p, dg.p, dlse.p, dlog.p, dx.p, dW.p, dt.p, N, C, V, T, scratch.p, stream, false, ddl.p);
  check("lm_head_backward whole-vocabulary dx", ddx2.down(), dxw, 1e-2);
  check("lm_head_backward whole-vocabulary dW", ddW2.down(), dWw, 1e-2);
}

void test_optimizer() {
  const size_t n = 1000003;
  auto g = randn(n, 0.01f);
  Dev<float> dg(g);
  Dev<double> out(1), scr(kSumSquaresBlocks);
  sum_squares(out.p, dg.p, n, scr.p, stream);
  const double want = cpu::sum_squares(g.data(), n);
  const double got = out.down()[0];
  const bool ok = std::fabs(got - want) <= 1e-12 * want;
  if (!ok) failures++;
  std::printf("%s %-40s got %.15g want %.15g\n", ok ? "ok  " : "FAIL", "sum_squares", got, want);
  auto p = randn(n), m = randn(n, 0.01f), v = randn(n, 0.01f);
  for (auto& x : v) x = x * x;
  std::vector<float> pw = p, mw = m, vw = v;
  cpu::adamw_update(pw.data(), g.data(), mw.data(), vw.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 3);
  const float bc1 = 1.f - std::pow(0.9f, 3.f), bc2 = 1.f - std::pow(0.95f, 3.f);
  Dev<float> dp(p), dm(m), dv(v);
  Dev<uint16_t> p16(n);
  adamw_update(dp.p, p16.p, dg.p, dm.p, dv.p, n, 1e-3f, 0.9f, 0.95f, bc1, bc2, 1e-8f, 0.1f, 0.5f, stream);
  check("adamw_update param", dp.down(), pw, 1e-6);
  check("adamw_update m", dm.down(), mw, 1e-6);
  check("adamw_update v", dv.down(), vw, 1e-6);
  check_exact("adamw_update bf16 copy", down_bf16(p16), rounded(dp.down()));
  // bf16 gradients (expert_grads_bf16): the same arithmetic as fp32 gradients holding the widened values, bit for bit.
  std::vector<uint16_t> g16(n);
  for (size_t i = 0; i < n; i++) g16[i] = bits_bf16(g[i]);
  const std::vector<float> gw = rounded(g);
  Dev<uint16_t> dg16(g16);
  Dev<float> dgw(gw);
  sum_squares(out.p, dg16.p, n, scr.p, stream);
  const double got16 = out.down()[0];
  sum_squares(out.p, dgw.p, n, scr.p, stream);
  const double want16 = out.down()[0];
  const bool ok16 = got16 == want16;
  if (!ok16) failures++;
  std::printf("%s %-40s got %.17g want %.17g\n", ok16 ? "ok  " : "FAIL", "sum_squares bf16 = of widened", got16, want16);
  Dev<float> ap(p), am(m), av(v), bp(p), bm(m), bv(v);
  adamw_update(ap.p, nullptr, dg16.p, am.p, av.p, n, 1e-3f, 0.9f, 0.95f, bc1, bc2, 1e-8f, 0.1f, 0.5f, stream);
  adamw_update(bp.p, nullptr, dgw.p, bm.p, bv.p, n, 1e-3f, 0.9f, 0.95f, bc1, bc2, 1e-8f, 0.1f, 0.5f, stream);
  check_exact("adamw_update bf16 grads param", ap.down(), bp.down());
  check_exact("adamw_update bf16 grads m", am.down(), bm.down());
  check_exact("adamw_update bf16 grads v", av.down(), bv.down());
}

// The on-device loss gradient against policy_loss's (the host path it replaces on one rank): SFT and GRPO under
// each aggregation, with k1 / k3 KL and without a reference, old logprobs spread so that rows fall on both sides of
// the clip range; and the load-balancing gradient against forward_backward's host formula.
void test_loss_grad() {
  const int N = 1000;
  const int seq_off[] = {0, 300, 301, 1000};  // three sequences (one of a single row)
  const int B = 3;
  std::vector<int32_t> target(N);
  for (int b = 0; b < B; b++)
    for (int i = seq_off[b]; i < seq_off[b + 1]; i++) target[i] = i + 1 < seq_off[b + 1] ? (i * 37) % 1000 : -1;
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> logprob(N), entropy(N), mask(N), adv(N), old_lp(N), ref(N);
  for (int i = 0; i < N; i++) {
    logprob[i] = -8.f * u(rng);
    entropy[i] = 3.f * u(rng);
    mask[i] = target[i] < 0 ? 0.f : (u(rng) < 0.8f ? 1.f : 0.f);
    adv[i] = 2.f * u(rng) - 1.f;
    old_lp[i] = logprob[i] + 0.6f * (u(rng) - 0.5f);
    ref[i] = logprob[i] + 0.4f * (u(rng) - 0.5f);
  }
  Dev<float> dlp(logprob), dg(N), dadv(adv), dold(old_lp), dref(ref);
  struct Case {
    const char* name;
    LossType type;
    Aggregation agg;
    bool with_ref;
    KlEstimator kl;
  };
  const Case cases[] = {
      {"sft token-mean", LossType::Sft, Aggregation::TokenMean, false, KlEstimator::K3},
      {"sft seq-mean-token-mean", LossType::Sft, Aggregation::SeqMeanTokenMean, false, KlEstimator::K3},
      {"grpo token-mean k3", LossType::Grpo, Aggregation::TokenMean, true, KlEstimator::K3},
      {"grpo seq-mean-token-mean k1", LossType::Grpo, Aggregation::SeqMeanTokenMean, true, KlEstimator::K1},
      {"grpo seq-mean-token-sum-norm", LossType::Grpo, Aggregation::SeqMeanTokenSumNorm, false, KlEstimator::K3},
  };
  for (const Case& c : cases) {
    LossSpec spec;
    spec.type = c.type;
    spec.aggregation = c.agg;
    spec.mask = mask;
    if (c.type == LossType::Grpo) {
      spec.advantages = adv;
      spec.old_logprobs = old_lp;
      spec.beta = c.with_ref ? 0.04f : 0.f;
      spec.kl = c.kl;
      if (c.with_ref) spec.ref_logprobs = ref;
    }
    LossResult r;
    std::vector<float> want;
    policy_loss(spec, seq_off, B, target.data(), logprob.data(), entropy.data(), N, r, want);
    std::vector<double> w;
    double tokens = 0;
    loss_row_weights(spec, seq_off, B, target.data(), N, w, tokens);
    Dev<double> dw(w);
    PolicyGradArgs a;
    a.grpo = c.type == LossType::Grpo;
    a.eps_low = spec.eps_low;
    a.eps_high = spec.eps_high;
    a.beta = spec.beta;
    a.k3 = spec.kl == KlEstimator::K3;
    if (a.grpo) a.advantages = dadv.p, a.old_logprobs = dold.p, a.ref_logprobs = c.with_ref ? dref.p : nullptr;
    policy_grad(dg.p, dlp.p, dw.p, a, N, stream);
    const std::vector<float> got = dg.down();
    int exact = 0;
    for (int i = 0; i < N; i++) exact += std::memcmp(&got[i], &want[i], 4) == 0;
    check(std::string("policy_grad ") + c.name, got, want, 1e-6);
    std::printf("     (%d of %d rows bit-equal to the host's)\n", exact, N);
    if (c.type == LossType::Grpo && r.clip_low_count + r.clip_high_count == 0) {
      failures++;
      std::printf("FAIL policy_grad %s: no row was clipped (the case covers nothing)\n", c.name);
    }
  }
  // Load balancing: aux_dp[e] = coef * E * F_e / (ML * N), F_e = sum of counts / (ML * N).
  const int ML = 3, E = 60, rows = 777;
  const float coef = 0.001f * 0.5f;
  std::vector<int32_t> counts((size_t)ML * E);
  for (auto& x : counts) x = (int32_t)(u(rng) * 200);
  std::vector<float> want(E);
  const double denom = (double)ML * std::max((double)rows, 1.0);
  for (int e = 0; e < E; e++) {
    double F = 0;
    for (int l = 0; l < ML; l++) F += counts[(size_t)l * E + e];
    F /= denom;
    want[e] = (float)(coef * E * F / ((double)ML * std::max((double)rows, 1.0)));
  }
  Dev<int32_t> dcounts(counts);
  Dev<float> daux(E);
  aux_load_grad(daux.p, dcounts.p, ML, E, rows, coef, stream);
  check_exact("aux_load_grad", daux.down(), want);
}

}  // namespace

int main() {
  try {
    MP_GPU_CHECK(stream_create(&stream));
    const std::pair<const char*, std::function<void()>> tests[] = {
        {"casts", test_casts},   {"embedding", test_embedding}, {"rmsnorm", test_rmsnorm},
        {"rope", test_rope},     {"swiglu", test_swiglu},       {"router", test_router},
        {"moe", test_moe},       {"lm_head", test_lm_head},     {"optimizer", test_optimizer},
        {"loss_grad", test_loss_grad},
    };
    for (auto& [name, fn] : tests) {
      try {
        fn();
      } catch (const std::exception& e) {
        failures++;
        std::printf("FAIL %s threw: %s\n", name, e.what());
      }
    }
    MP_GPU_CHECK(stream_sync(stream));
    gemm_release();
  } catch (const std::exception& e) {
    std::printf("FAIL setup: %s\n", e.what());
    return 1;
  }
  std::printf("ops_test: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
