// Kernels behind attention.h: flash-style causal GQA (forward, deterministic backward) and paged attention
// over the KV cache, on bf16 tensor-core MMAs (mma.sync m16n8k16, fp32 accumulation; sm_80 and sm_90).
//
// Legend: N packed rows, B sequences, NH query heads, KVH key/value heads, HD head dim, ratio = NH / KVH.
// Tiles: a key tile is kTile = 64 positions starting at a multiple of 64 of the sequence's positions, in every
// kernel. The forward's query tile is 128 rows (4 warps x 2 MMA row blocks of 16); the backward's 64 rows or keys
// (4 warps x 16); paged attention's 32 or 64 tile rows (row, query head) of one group, or up to 16 in decode.
//
// Exactness between attention_forward and paged_attention. A row's output is a function of the row's own
// arithmetic only: per key tile (ascending), S = q K^T as a chain of MMAs over HD (same order), the masked
// online-softmax update (tile_softmax), then O = O * alpha + P V as a chain of MMAs over the tile's keys
// (warp_mma_pb), all through the one tile_step, and the same epilogue (finish_rows). An MMA's result for one row depends only on
// that row's A operand and the B operand: the other 15 rows of the tile never change it. Masked keys give
// exact zeros in P (selected -inf, not computed) and the V rows they multiply are finite (real values or
// zero-filled: positions past what a row may see are never read from the cache, whose unwritten memory may
// hold NaN bits). A key tile in which every key of a row is masked leaves that row's state unchanged bit
// for bit (alpha = 1, P = 0), which lets paged_attention run a row through other rows' tiles.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "cuda/attention.h"

namespace moepilot::gpu {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kTile = 64;      // query rows per CTA tile and keys per key tile (positions 64t .. 64t+63)
constexpr int kWarps = 4;      // 16 query rows each
constexpr int kThreads = 32 * kWarps;
constexpr int kBwdM = 32;      // query rows per step of the dK/dV kernel
// Backward CTAs: 16 keys (dK/dV) or 16 query rows (dQ) per warp, 4 warps (64-key / 64-row tiles). On an H100,
// 8 warps (128-row tiles, fewer tile loads) measured 8% slower: 1.37 ms vs 1.27 ms at 4 x 2048 tokens, 16 heads,
// HD 128 (both pass the tests). MOEPILOT_ATTN_BWD_WARPS overrides it.
#ifndef MOEPILOT_ATTN_BWD_WARPS
#define MOEPILOT_ATTN_BWD_WARPS 4
#endif
constexpr int kBwdWarps = MOEPILOT_ATTN_BWD_WARPS;
constexpr int kBwdThreads = 32 * kBwdWarps;
constexpr int kBwdTile = 16 * kBwdWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory row stride of a [rows][HD] bf16 tile: 16 bytes of padding puts the 8 rows an ldmatrix
// reads at one column on distinct banks.
template <int HD>
constexpr int sstride() { return HD + 8; }

// ---------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16-byte global -> shared copy; when !valid the destination gets zeros and nothing is read.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// c[16x8] += a[16x16] * b[16x8], bf16 inputs, fp32 accumulation.
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x with one instruction (fixed, so every kernel computes the same bits); 2^-inf = 0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm volatile("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------- warp-level tile math
// Fragment layouts of m16n8k16 (lane = 4 * g + t): an accumulator c[0..1] is row g, columns 2t, 2t+1;
// c[2..3] is row g + 8. A row-major [16][16] A tile and the [k][n] B tile come from ldmatrix.

// acc[MB][NB][4] (MB blocks of 16 rows x NB*8 columns) = A[16 MB x HD] * Bt[NB*8 x HD]^T; A and Bt are
// row-major shared tiles (stride sstride<HD>). The row blocks share each B fragment; every element's chain over
// HD runs in ascending 16-column steps, whatever MB is (a row's result does not depend on MB).
template <int HD, int NB, int MB>
__device__ __forceinline__ void warp_mma_abt(float acc[MB][NB][4], const bf16* a, const bf16* bt, int lane) {
  constexpr int S = sstride<HD>();
  static_assert(NB % 2 == 0, "NB pairs");
#pragma unroll
  for (int rb = 0; rb < MB; rb++)
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[rb][nb][e] = 0.f;
  const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
  for (int kc = 0; kc < HD / 16; kc++) {
    uint32_t af[MB][4];
#pragma unroll
    for (int rb = 0; rb < MB; rb++) ldsm_x4(af[rb], a + (rb * 16 + (mi & 1) * 8 + r8) * S + kc * 16 + (mi >> 1) * 8);
#pragma unroll
    for (int np = 0; np < NB / 2; np++) {
      uint32_t bf[4];
      ldsm_x4(bf, bt + ((np * 2 + (mi >> 1)) * 8 + r8) * S + kc * 16 + (mi & 1) * 8);
#pragma unroll
      for (int rb = 0; rb < MB; rb++) {
        mma16816(acc[rb][2 * np], af[rb], bf[0], bf[1]);
        mma16816(acc[rb][2 * np + 1], af[rb], bf[2], bf[3]);
      }
    }
  }
}

// acc[MB][HD/8][4] (MB blocks of 16 rows x HD) += P[16 MB x KC*16] * Bm[KC*16 x HD]; P as A fragments
// (p[rb][kc]), Bm a row-major shared tile (stride sstride<HD>). For every element the chain runs over the key
// chunks kc = 0, 1, ... in order.
template <int HD, int KC, int MB>
__device__ __forceinline__ void warp_mma_pb(float acc[MB][HD / 8][4], const uint32_t p[MB][KC][4], const bf16* bm,
                                            int lane) {
  constexpr int S = sstride<HD>();
  const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
  for (int kc = 0; kc < KC; kc++) {
#pragma unroll
    for (int np = 0; np < HD / 16; np++) {
      uint32_t bf[4];
      ldsm_x4_t(bf, bm + (kc * 16 + (mi & 1) * 8 + r8) * S + (np * 2 + (mi >> 1)) * 8);
#pragma unroll
      for (int rb = 0; rb < MB; rb++) {
        mma16816(acc[rb][2 * np], p[rb][kc], bf[0], bf[1]);
        mma16816(acc[rb][2 * np + 1], p[rb][kc], bf[2], bf[3]);
      }
    }
  }
}

// Accumulator pairs (n-blocks 2kc, 2kc+1) as the bf16 A fragment of key chunk kc.
template <int NB>
__device__ __forceinline__ void acc_to_afrag(uint32_t p[NB / 2][4], const float s[NB][4]) {
#pragma unroll
  for (int kc = 0; kc < NB / 2; kc++) {
    p[kc][0] = pack_bf16(s[2 * kc][0], s[2 * kc][1]);
    p[kc][1] = pack_bf16(s[2 * kc][2], s[2 * kc][3]);
    p[kc][2] = pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]);
    p[kc][3] = pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3]);
  }
}

// Online-softmax state of the rows a lane holds (g and g + 8 of each of MB row blocks): running max m (scaled
// log2 units, -inf before any key), per-lane partial denominators l (summed over the quad in finish_rows), o.
template <int HD, int MB>
struct RowState {
  float m[MB][2], l[MB][2];
  float o[MB][HD / 8][4];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int rb = 0; rb < MB; rb++) {
      m[rb][0] = m[rb][1] = -INFINITY;
      l[rb][0] = l[rb][1] = 0.f;
#pragma unroll
      for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[rb][nb][e] = 0.f;
    }
  }
};

// One key tile of the online softmax for a warp's 16 rows: s holds the raw scores q.k of keys kbase .. kbase+63;
// key j is visible to a row iff j <= its limit (lim0 for row g, lim1 for row g + 8; -1 hides the whole tile).
// Rescales o, updates m and l, and leaves P (bf16 A fragments of the 4 key chunks) in p. The only code path
// of this update: forward and paged attention both call it, with fp32 operations spelled as intrinsics so the
// compiler cannot contract them differently in the two kernels.
template <int HD, int MB>
__device__ __forceinline__ void tile_softmax(RowState<HD, MB>& st, int rb, float s[8][4], uint32_t p[4][4], int kbase,
                                             int lim0, int lim1, float scale_log2, int lane) {
  // Masked scores become -inf (selected, never computed from the key). The running max is kept in scaled log2
  // units: the max of the raw scores times scale_log2 is the max of the scaled scores (rounding is monotonic),
  // and p = 2^(s * scale_log2 - max) is one FMA per score.
  float mx[2] = {-INFINITY, -INFINITY};
  const int kcol = kbase + (lane & 3) * 2;
#pragma unroll
  for (int nb = 0; nb < 8; nb++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int key = kcol + nb * 8 + (e & 1);
      const int lim = (e >> 1) ? lim1 : lim0;
      const float x = key <= lim ? s[nb][e] : -INFINITY;
      s[nb][e] = x;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  float base[2], alpha[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float mnew = fmaxf(st.m[rb][r], __fmul_rn(mx[r], scale_log2));
    base[r] = mnew == -INFINITY ? 0.f : mnew;  // a row with nothing visible yet: p = 0, alpha = 0
    alpha[r] = ex2(__fsub_rn(st.m[rb][r], base[r]));
    st.m[rb][r] = mnew;
  }
  float sum[2] = {0.f, 0.f};
#pragma unroll
  for (int nb = 0; nb < 8; nb++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const float pe = ex2(__fmaf_rn(s[nb][e], scale_log2, -base[e >> 1]));
      s[nb][e] = pe;
      sum[e >> 1] = __fadd_rn(sum[e >> 1], pe);
    }
#pragma unroll
  for (int r = 0; r < 2; r++) st.l[rb][r] = __fadd_rn(__fmul_rn(st.l[rb][r], alpha[r]), sum[r]);
#pragma unroll
  for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
    for (int e = 0; e < 4; e++) st.o[rb][nb][e] = __fmul_rn(st.o[rb][nb][e], alpha[e >> 1]);
  acc_to_afrag<8>(p, s);
}

// One key tile for a warp: scores from shared Q rows (16 MB x HD) and K/V tiles (64 x HD), softmax, P V.
// lim[rb][0..1]: the limits of the lane's rows g and g + 8 of row block rb.
template <int HD, int MB>
__device__ __forceinline__ void tile_step(RowState<HD, MB>& st, const bf16* qs, const bf16* ks, const bf16* vs,
                                          int kbase, const int lim[MB][2], float scale_log2, int lane) {
  float s[MB][8][4];
  uint32_t p[MB][4][4];
  warp_mma_abt<HD, 8, MB>(s, qs, ks, lane);
#pragma unroll
  for (int rb = 0; rb < MB; rb++) tile_softmax<HD, MB>(st, rb, s[rb], p[rb], kbase, lim[rb][0], lim[rb][1], scale_log2, lane);
  warp_mma_pb<HD, 4, MB>(st.o, p, vs, lane);
}

// Epilogue: quad sums of l, o / l, and lse = ln(sum_j exp(scale * q.k_j)) (natural log).
template <int HD, int MB>
__device__ __forceinline__ void finish_rows(RowState<HD, MB>& st, int rb, float lse[2]) {
#pragma unroll
  for (int r = 0; r < 2; r++) {
    float l = st.l[rb][r];
    l = __fadd_rn(l, __shfl_xor_sync(0xffffffffu, l, 1));
    l = __fadd_rn(l, __shfl_xor_sync(0xffffffffu, l, 2));
    const float inv = l > 0.f ? __frcp_rn(l) : 0.f;
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++) {
      st.o[rb][nb][2 * r] = __fmul_rn(st.o[rb][nb][2 * r], inv);
      st.o[rb][nb][2 * r + 1] = __fmul_rn(st.o[rb][nb][2 * r + 1], inv);
    }
    lse[r] = l > 0.f ? __fadd_rn(__fmul_rn(st.m[rb][r], kLn2), logf(l)) : -INFINITY;
  }
}

// Stores a lane's two rows of o as bf16 (row pointers to column 0 of the head; null = row not stored).
template <int HD, int MB>
__device__ __forceinline__ void store_rows(const RowState<HD, MB>& st, int rb, bf16* row0, bf16* row1, int lane) {
  const int c = (lane & 3) * 2;
#pragma unroll
  for (int nb = 0; nb < HD / 8; nb++) {
    if (row0) *reinterpret_cast<uint32_t*>(row0 + nb * 8 + c) = pack_bf16(st.o[rb][nb][0], st.o[rb][nb][1]);
    if (row1) *reinterpret_cast<uint32_t*>(row1 + nb * 8 + c) = pack_bf16(st.o[rb][nb][2], st.o[rb][nb][3]);
  }
}

// Copies `rows` rows of HD bf16 into a shared tile; src(r) gives row r's global address or null (zeros;
// `safe`, any valid global address, stands in as the unread source).
template <int HD, int ROWS, int NT = kThreads, class Src>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* safe, Src src) {
  constexpr int S = sstride<HD>(), CH = HD / 8;
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * CH; i += NT) {
    const int r = i / CH, c = i % CH;
    const bf16* g = src(r);
    cp_async16(dst + r * S + c * 8, g ? g + c * 8 : safe, g != nullptr);
  }
}

// A K tile and its V tile whose rows sit at a fixed distance (voff elements) from the K rows: one address
// lookup per row for both, all computed before the first copy is issued, so that lookups behind them (the
// paged cache's block tables) are in flight together rather than one per copy.
template <int HD, int ROWS, class Src>
__device__ __forceinline__ void load_kv_pair(bf16* kdst, bf16* vdst, int64_t voff, const bf16* safe, Src src) {
  constexpr int S = sstride<HD>(), CH = HD / 8, N = (ROWS * CH + kThreads - 1) / kThreads;
  const bf16* g[N];
#pragma unroll
  for (int j = 0; j < N; j++) {
    const int i = threadIdx.x + j * kThreads;
    g[j] = i < ROWS * CH ? src(i / CH) : nullptr;
  }
#pragma unroll
  for (int j = 0; j < N; j++) {
    const int i = threadIdx.x + j * kThreads;
    if (i < ROWS * CH) {
      const int r = i / CH, c = i % CH;
      cp_async16(kdst + r * S + c * 8, g[j] ? g[j] + c * 8 : safe, g[j] != nullptr);
      cp_async16(vdst + r * S + c * 8, g[j] ? g[j] + voff + c * 8 : safe, g[j] != nullptr);
    }
  }
}

// ---------------------------------------------------------------- forward
// grid (query tiles of 64 MB rows, NH, B), heaviest (last) tiles first; warp w owns rows 16 MB w .. + 16 MB - 1
// as MB row blocks sharing every K/V fragment. smem: Q [64 MB][S], K and V [2 stages][64][S]. A warp skips the
// key tiles that lie wholly after its last row (for those rows the update would change nothing).
// Row blocks per warp in the forward: 2 (B fragments reused twice); MOEPILOT_ATTN_FWD_MB128 overrides it for
// HD 128, where 2 blocks fill the register file (the benchmark builds both).
#ifndef MOEPILOT_ATTN_FWD_MB128
#define MOEPILOT_ATTN_FWD_MB128 2
#endif
template <int HD>
constexpr int fwd_mb() { return HD == 128 ? MOEPILOT_ATTN_FWD_MB128 : 2; }

template <int HD>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(bf16* out, float* lse, const bf16* q,
                                                                     const bf16* k, const bf16* v,
                                                                     const int32_t* cu_seqlens, int NH, int KVH,
                                                                     int q_stride, int kv_stride, float scale_log2) {
  constexpr int S = sstride<HD>(), MB = fwd_mb<HD>(), BM = kTile * MB;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* ks = qs + BM * S;
  bf16* vs = ks + 2 * kTile * S;
  const int mt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int start = cu_seqlens[b], len = cu_seqlens[b + 1] - start;
  const int m0 = mt * BM;
  if (m0 >= len) return;
  const int kvh = h / (NH / KVH);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  load_tile<HD, BM>(qs, q, [&](int r) -> const bf16* {
    return m0 + r < len ? q + (int64_t)(start + m0 + r) * q_stride + h * HD : nullptr;
  });
  auto load_kv = [&](int t, int stage) {
    auto row = [&](const bf16* base, int r) -> const bf16* {
      const int j = t * kTile + r;
      return j < len ? base + (int64_t)(start + j) * kv_stride + kvh * HD : nullptr;
    };
    load_tile<HD, kTile>(ks + stage * kTile * S, k, [&](int r) { return row(k, r); });
    load_tile<HD, kTile>(vs + stage * kTile * S, v, [&](int r) { return row(v, r); });
  };
  load_kv(0, 0);
  cp_async_commit();

  RowState<HD, MB> st;
  st.init();
  const int wrow = m0 + warp * 16 * MB;  // the warp's first row
  int lim[MB][2];
#pragma unroll
  for (int rb = 0; rb < MB; rb++) {
    lim[rb][0] = wrow + rb * 16 + (lane >> 2);
    lim[rb][1] = lim[rb][0] + 8;
  }
  const int ntiles = min(len - 1, m0 + BM - 1) / kTile + 1;  // key tiles up to the tile's last row
  const int wlast = (wrow + 16 * MB - 1) / kTile;             // the warp's last key tile
  for (int t = 0; t < ntiles; t++) {
    if (t + 1 < ntiles) {
      load_kv(t + 1, (t + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (t <= wlast)
      tile_step<HD, MB>(st, qs + warp * 16 * MB * S, ks + (t & 1) * kTile * S, vs + (t & 1) * kTile * S, t * kTile,
                        lim, scale_log2, lane);
    __syncthreads();  // the stage is refilled next iteration
  }
  const int64_t ld = (int64_t)NH * HD;
#pragma unroll
  for (int rb = 0; rb < MB; rb++) {
    float l2[2];
    finish_rows<HD, MB>(st, rb, l2);
    const int r0 = lim[rb][0], r1 = lim[rb][1];
    store_rows<HD, MB>(st, rb, r0 < len ? out + (int64_t)(start + r0) * ld + h * HD : nullptr,
                       r1 < len ? out + (int64_t)(start + r1) * ld + h * HD : nullptr, lane);
    if ((lane & 3) == 0) {
      if (r0 < len) lse[(int64_t)(start + r0) * NH + h] = l2[0];
      if (r1 < len) lse[(int64_t)(start + r1) * NH + h] = l2[1];
    }
  }
}

// ---------------------------------------------------------------- backward
// D[i, h] = sum_c dout[i, h, c] * out[i, h, c] (fp32, fixed order), stored in dq[i, h, 0]: the dq kernel
// overwrites it only after reading it, and only the CTA owning (i, h) reads or writes that slot.
template <int HD>
__global__ void attention_bwd_dot_kernel(float* dq, const bf16* dout, const bf16* out, int64_t N, int NH) {
  const int64_t idx = blockIdx.x * (int64_t)(blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (idx >= N * NH) return;
  const bf16* a = dout + idx * HD;
  const bf16* o = out + idx * HD;
  float acc = 0.f;
  for (int c = lane; c < HD; c += 32) acc = __fmaf_rn(__bfloat162float(a[c]), __bfloat162float(o[c]), acc);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
  if (lane == 0) dq[idx * HD] = acc;
}

// dK, dV of one key tile (kBwdTile keys of head kvh; warp w owns keys 16w..16w+15) over every query head of the
// group and every query row that sees the tile, in a fixed order: no atomics, same bits every run.
// smem: K, V [kBwdTile][S]; Q, dO [2 stages][kBwdM][S]; lse2 (lse * log2 e), D [2][kBwdM].
template <int HD>
__global__ void __launch_bounds__(kBwdThreads) attention_bwd_dkdv_kernel(float* dk, float* dv, const float* dq_dot,
                                                                      const bf16* dout, const float* lse,
                                                                      const bf16* q, const bf16* k, const bf16* v,
                                                                      const int32_t* cu_seqlens, int NH, int KVH,
                                                                      int q_stride, int kv_stride, float scale,
                                                                      float scale_log2) {
  constexpr int S = sstride<HD>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* vs = ks + kBwdTile * S;
  bf16* qs = vs + kBwdTile * S;         // [2][kBwdM][S]
  bf16* dos = qs + 2 * kBwdM * S;       // [2][kBwdM][S]
  float* lse2 = reinterpret_cast<float*>(dos + 2 * kBwdM * S);  // [2][kBwdM]
  float* dd = lse2 + 2 * kBwdM;                                 // [2][kBwdM]
  const int nt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int start = cu_seqlens[b], len = cu_seqlens[b + 1] - start;
  const int n0 = nt * kBwdTile;
  if (n0 >= len) return;
  const int ratio = NH / KVH;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t ldo = (int64_t)NH * HD;

  auto kvrow = [&](const bf16* base, int r) -> const bf16* {
    return n0 + r < len ? base + (int64_t)(start + n0 + r) * kv_stride + kvh * HD : nullptr;
  };
  load_tile<HD, kBwdTile, kBwdThreads>(ks, k, [&](int r) { return kvrow(k, r); });
  load_tile<HD, kBwdTile, kBwdThreads>(vs, v, [&](int r) { return kvrow(v, r); });
  // Steps: (head hh, query block m0 = n0, n0 + kBwdM, ... < len).
  const int mblocks = (len - n0 + kBwdM - 1) / kBwdM;
  const int steps = ratio * mblocks;
  auto load_step = [&](int i, int stage) {
    const int h = kvh * ratio + i / mblocks, m0 = n0 + (i % mblocks) * kBwdM;
    load_tile<HD, kBwdM, kBwdThreads>(qs + stage * kBwdM * S, q, [&](int r) -> const bf16* {
      return m0 + r < len ? q + (int64_t)(start + m0 + r) * q_stride + h * HD : nullptr;
    });
    load_tile<HD, kBwdM, kBwdThreads>(dos + stage * kBwdM * S, dout, [&](int r) -> const bf16* {
      return m0 + r < len ? dout + (int64_t)(start + m0 + r) * ldo + h * HD : nullptr;
    });
    if (threadIdx.x < kBwdM) {
      const int r = threadIdx.x, i_row = m0 + r;
      lse2[stage * kBwdM + r] = i_row < len ? lse[(int64_t)(start + i_row) * NH + h] * kLog2e : INFINITY;
      dd[stage * kBwdM + r] = i_row < len ? dq_dot[(int64_t)(start + i_row) * ldo + h * HD] : 0.f;
    }
  };
  load_step(0, 0);
  cp_async_commit();

  float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
  for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
    for (int e = 0; e < 4; e++) dka[nb][e] = dva[nb][e] = 0.f;
  const int key0 = n0 + warp * 16 + (lane >> 2), key1 = key0 + 8;  // this lane's key rows
  for (int i = 0; i < steps; i++) {
    const int stage = i & 1;
    __syncthreads();  // stage (i+1)&1 was read in step i-1
    if (i + 1 < steps) {
      load_step(i + 1, (i + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int m0 = n0 + (i % mblocks) * kBwdM;
    const bf16* qst = qs + stage * kBwdM * S;
    const bf16* dst = dos + stage * kBwdM * S;
    // Warp's keys entirely after the block's last query: nothing to add.
    if (n0 + warp * 16 > m0 + kBwdM - 1) continue;
    float sT[kBwdM / 8][4], dpT[kBwdM / 8][4];
    warp_mma_abt<HD, kBwdM / 8, 1>(&sT, ks + warp * 16 * S, qst, lane);   // S^T = K Q^T
    warp_mma_abt<HD, kBwdM / 8, 1>(&dpT, vs + warp * 16 * S, dst, lane);  // dP^T = V dO^T
#pragma unroll
    for (int nb = 0; nb < kBwdM / 8; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int qc = nb * 8 + (lane & 3) * 2 + (e & 1);  // query column within the block
        const int qi = m0 + qc;
        const int key = (e >> 1) ? key1 : key0;
        const float pe = (qi >= key && qi < len) ? ex2(__fsub_rn(__fmul_rn(sT[nb][e], scale_log2),
                                                                 lse2[stage * kBwdM + qc]))
                                                 : 0.f;
        sT[nb][e] = pe;
        dpT[nb][e] = __fmul_rn(pe, __fsub_rn(dpT[nb][e], dd[stage * kBwdM + qc]));
      }
    uint32_t pf[kBwdM / 16][4], dsf[kBwdM / 16][4];
    acc_to_afrag<kBwdM / 8>(pf, sT);
    acc_to_afrag<kBwdM / 8>(dsf, dpT);
    warp_mma_pb<HD, kBwdM / 16, 1>(&dva, &pf, dst, lane);   // dV += P^T dO
    warp_mma_pb<HD, kBwdM / 16, 1>(&dka, &dsf, qst, lane);  // dK += dS^T Q
  }
  const int64_t ldk = (int64_t)KVH * HD;
  const int c = (lane & 3) * 2;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int key = r ? key1 : key0;
    if (key >= len) continue;
    float* dkr = dk + (int64_t)(start + key) * ldk + kvh * HD;
    float* dvr = dv + (int64_t)(start + key) * ldk + kvh * HD;
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++) {
      *reinterpret_cast<float2*>(dkr + nb * 8 + c) =
          make_float2(__fmul_rn(dka[nb][2 * r], scale), __fmul_rn(dka[nb][2 * r + 1], scale));
      *reinterpret_cast<float2*>(dvr + nb * 8 + c) = make_float2(dva[nb][2 * r], dva[nb][2 * r + 1]);
    }
  }
}

// dQ of one query tile (kBwdTile rows of head h; warp w owns rows 16w..) over its key tiles in order; a warp
// skips the key tiles after its last row. Heaviest (last) query tiles first.
// smem: Q, dO [kBwdTile][S]; K, V [2 stages][64][S].
template <int HD>
__global__ void __launch_bounds__(kBwdThreads) attention_bwd_dq_kernel(float* dq, const bf16* dout, const float* lse,
                                                                    const bf16* q, const bf16* k, const bf16* v,
                                                                    const int32_t* cu_seqlens, int NH, int KVH,
                                                                    int q_stride, int kv_stride, float scale,
                                                                    float scale_log2) {
  constexpr int S = sstride<HD>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* dos = qs + kBwdTile * S;
  bf16* ks = dos + kBwdTile * S;
  bf16* vs = ks + 2 * kTile * S;
  const int mt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int start = cu_seqlens[b], len = cu_seqlens[b + 1] - start;
  const int m0 = mt * kBwdTile;
  if (m0 >= len) return;
  const int kvh = h / (NH / KVH);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t ldo = (int64_t)NH * HD;
  const int row0 = m0 + warp * 16 + (lane >> 2), row1 = row0 + 8;
  // This lane's rows' lse (log2 units) and D, read before this CTA overwrites D's slot in dq.
  float lrow[2], drow[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int i = r ? row1 : row0;
    lrow[r] = i < len ? lse[(int64_t)(start + i) * NH + h] * kLog2e : INFINITY;
    drow[r] = i < len ? dq[(int64_t)(start + i) * ldo + h * HD] : 0.f;
  }
  load_tile<HD, kBwdTile, kBwdThreads>(qs, q, [&](int r) -> const bf16* {
    return m0 + r < len ? q + (int64_t)(start + m0 + r) * q_stride + h * HD : nullptr;
  });
  load_tile<HD, kBwdTile, kBwdThreads>(dos, dout, [&](int r) -> const bf16* {
    return m0 + r < len ? dout + (int64_t)(start + m0 + r) * ldo + h * HD : nullptr;
  });
  auto load_kv = [&](int t, int stage) {
    auto row = [&](const bf16* base, int r) -> const bf16* {
      const int j = t * kTile + r;
      return j < len ? base + (int64_t)(start + j) * kv_stride + kvh * HD : nullptr;
    };
    load_tile<HD, kTile, kBwdThreads>(ks + stage * kTile * S, k, [&](int r) { return row(k, r); });
    load_tile<HD, kTile, kBwdThreads>(vs + stage * kTile * S, v, [&](int r) { return row(v, r); });
  };
  load_kv(0, 0);
  cp_async_commit();
  float dqa[HD / 8][4];
#pragma unroll
  for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
    for (int e = 0; e < 4; e++) dqa[nb][e] = 0.f;
  const int ntiles = min(len - 1, m0 + kBwdTile - 1) / kTile + 1;
  const int wlast = (m0 + warp * 16 + 15) / kTile;  // the warp's last key tile
  for (int t = 0; t < ntiles; t++) {
    if (t + 1 < ntiles) {
      load_kv(t + 1, (t + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (t > wlast) {
      __syncthreads();
      continue;
    }
    const bf16* kst = ks + (t & 1) * kTile * S;
    const bf16* vst = vs + (t & 1) * kTile * S;
    float s[8][4], dp[8][4];
    warp_mma_abt<HD, 8, 1>(&s, qs + warp * 16 * S, kst, lane);   // S = Q K^T
    warp_mma_abt<HD, 8, 1>(&dp, dos + warp * 16 * S, vst, lane); // dP = dO V^T
#pragma unroll
    for (int nb = 0; nb < 8; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = t * kTile + nb * 8 + (lane & 3) * 2 + (e & 1);
        const int r = e >> 1;
        const int i = r ? row1 : row0;
        const float pe = (key <= i && i < len) ? ex2(__fsub_rn(__fmul_rn(s[nb][e], scale_log2), lrow[r])) : 0.f;
        dp[nb][e] = __fmul_rn(pe, __fsub_rn(dp[nb][e], drow[r]));
      }
    uint32_t dsf[4][4];
    acc_to_afrag<8>(dsf, dp);
    warp_mma_pb<HD, 4, 1>(&dqa, &dsf, kst, lane);  // dQ += dS K
    __syncthreads();
  }
  const int c = (lane & 3) * 2;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int i = r ? row1 : row0;
    if (i >= len) continue;
    float* dqr = dq + (int64_t)(start + i) * ldo + h * HD;
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++)
      *reinterpret_cast<float2*>(dqr + nb * 8 + c) =
          make_float2(__fmul_rn(dqa[nb][2 * r], scale), __fmul_rn(dqa[nb][2 * r + 1], scale));
  }
}

// ---------------------------------------------------------------- paged KV cache
// Where position p's K row of one layer and KV head sits in the pool, set up once per CTA. The block/offset
// split of a position is a shift and a mask where block_size is a power of two (every configuration in use): a
// runtime integer division costs ~25 instructions, and a decode CTA needs two for every row it copies, which would make
// address arithmetic most of the instructions of its loading warps (on H100 the split alone took a 1024-sequence
// decode call from 212 to 181 us).
struct CacheAddr {
  const bf16* base;  // the layer's K rows of the head in block 0
  int64_t block_elems;        // elements from one block to the next
  int64_t row_elems;          // from one position to the next within a block (KVH * HD)
  int bs, shift;              // block_size; log2(block_size), or -1 where it is not a power of two
  __device__ __forceinline__ int block_of(int p) const { return shift >= 0 ? p >> shift : p / bs; }
  __device__ __forceinline__ int offset_of(int p) const { return shift >= 0 ? p & (bs - 1) : p % bs; }
  __device__ __forceinline__ const bf16* row(int block, int off) const {
    return base + block * block_elems + off * row_elems;
  }
};
__device__ __forceinline__ CacheAddr cache_addr(const PagedKv& kv, int layer, int kvh) {
  CacheAddr a;
  a.row_elems = (int64_t)kv.KVH * kv.HD;
  a.block_elems = (int64_t)kv.layers * 2 * kv.block_size * a.row_elems;
  a.base = reinterpret_cast<const bf16*>(kv.pool) + (int64_t)layer * 2 * kv.block_size * a.row_elems +
           (int64_t)kvh * kv.HD;
  a.bs = kv.block_size;
  a.shift = (kv.block_size & (kv.block_size - 1)) == 0 ? __ffs(kv.block_size) - 1 : -1;
  return a;
}

__global__ void kv_cache_write_kernel(PagedKv kv, int layer, const bf16* k, const bf16* v, int kv_stride,
                                      PagedRows rows) {
  const int per = kv.KVH * kv.HD / 8;  // 16-byte chunks per row
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= (int64_t)rows.R * per) return;
  const int r = (int)(idx / per), c = (int)(idx % per);
  const int s = rows.row_seq[r], p = rows.row_pos[r];
  const CacheAddr ca = cache_addr(kv, layer, 0);
  const int block = rows.block_tables[(int64_t)s * rows.max_blocks + ca.block_of(p)];
  bf16* krow = const_cast<bf16*>(ca.row(block, ca.offset_of(p))) + c * 8;
  bf16* vrow = krow + (int64_t)kv.block_size * kv.KVH * kv.HD;  // a block's V rows follow its K rows
  *reinterpret_cast<uint4*>(krow) = *reinterpret_cast<const uint4*>(k + (int64_t)r * kv_stride + c * 8);
  *reinterpret_cast<uint4*>(vrow) = *reinterpret_cast<const uint4*>(v + (int64_t)r * kv_stride + c * 8);
}

// The key-tile pipeline of both paged kernels: items 0 .. total - 1, made in order by next(i, item) and copied
// by load(item, slot) into STAGES shared-memory slots, STAGES - 1 items ahead of the one being worked on; sync()
// makes a slot's copies visible to every thread that reads it (the CTA's or the warp's barrier) and, after
// work(item, slot), frees the slot for the next copy. The ring rotates by copies (no dynamic indexing).
template <int STAGES, class Item, class Next, class Load, class Sync, class Work>
__device__ __forceinline__ void walk_items(int total, Next next, Load load, Sync sync, Work work) {
  Item ring[STAGES];
#pragma unroll
  for (int j = 0; j < STAGES - 1; j++) {
    if (j < total) {
      next(j, ring[j]);
      load(ring[j], j);
    }
    cp_async_commit();  // one group per item slot, empty or not, so the wait counts stay fixed
  }
  for (int i = 0; i < total; i++) {
    const int ahead = i + STAGES - 1;
    if (ahead < total) {
      next(ahead, ring[STAGES - 1]);
      load(ring[STAGES - 1], ahead % STAGES);
    }
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    sync();
    work(ring[0], i % STAGES);
    sync();
#pragma unroll
    for (int j = 0; j < STAGES - 1; j++) ring[j] = ring[j + 1];
  }
  cp_async_wait<0>();  // nothing left in flight into the slots
}

// Paged attention over a chunk's key tiles walked in order by the CTA (prefill chunks of 32 or 64 tile rows, and
// decode chunks of 4: paged_decode_kernel below takes those of 8 and 16). grid (groups, KVH, Z); a CTA takes chunks
// z, z + Z, ... of chunk_rows of its group's tile rows: tile row i of a group is (row group_rows[g] + i / ratio, query head kvh * ratio + i % ratio), so the
// query heads of one KV head and the rows of a group share every MMA. Per chunk the CTA walks a list of key
// tiles: first the group's shared tiles (64-position tiles wholly inside shared_len, read once for all the
// chunk's rows), then, for each run of consecutive tile rows of one sequence, that sequence's later tiles up to
// the run's last position. A row applies the tiles of its own sequence in ascending order; the other runs'
// tiles are fully masked for it (its state unchanged). Positions past the chunk's rows of a sequence are never
// read (zero-filled).
// QROWS: the most tile rows of a chunk (64, or 16 for decode, where the smaller Q tile leaves room for a deeper
// pipeline: STAGES key tiles in flight, two CTAs per SM at HD 128). smem: Q [QROWS][S], K and V [STAGES][64][S], per
// tile row seq/pos, the chunk's runs.
template <int HD, int QROWS, int STAGES>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(bf16* out, const bf16* q, int q_stride, int NH,
                                                                   PagedKv kv, int layer, PagedRows rows,
                                                                   int chunk_rows, float scale_log2) {
  constexpr int S = sstride<HD>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* ks = qs + QROWS * S;
  bf16* vs = ks + STAGES * kTile * S;
  int* tr_seq = reinterpret_cast<int*>(vs + STAGES * kTile * S);  // [64]
  int* tr_pos = tr_seq + kTile;                              // [64]
  int* dseq = tr_pos + kTile;                                // [64] runs of tile rows of one sequence: its id,
  int* dfirst = dseq + kTile;                                // [64]   first tile row,
  int* dend = dfirst + kTile;                                // [64]   end tile row,
  int* dlast = dend + kTile;                                 // [64]   and its rows' last position
  int* ndist = dlast + kTile;                                // [4]: runs of warp 0, of warp 1, max position
  const int g = blockIdx.x, kvh = blockIdx.y;
  const int KVH = kv.KVH, ratio = NH / KVH;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r_begin = rows.group_rows[g], r_end = rows.group_rows[g + 1];
  const int ntr = (r_end - r_begin) * ratio;
  const int nshared = rows.shared_len[g] / kTile;  // tiles wholly inside the shared prefix
  const int seq_g = r_end > r_begin ? rows.row_seq[r_begin] : 0;
  const bf16* pool = reinterpret_cast<const bf16*>(kv.pool);
  const int64_t ldo = (int64_t)NH * HD;

  for (int chunk = blockIdx.z; chunk * chunk_rows < ntr; chunk += gridDim.z) {
    const int tr0 = chunk * chunk_rows;
    const int tr_end = min(ntr, tr0 + chunk_rows);
    __syncthreads();  // the previous chunk's smem is no longer read
    if (threadIdx.x < kTile) {
      const int tr = tr0 + threadIdx.x;
      if (tr < tr_end) {
        const int row = r_begin + tr / ratio;
        tr_seq[threadIdx.x] = rows.row_seq[row];
        tr_pos[threadIdx.x] = rows.row_pos[row];
      } else {
        tr_seq[threadIdx.x] = -1;
        tr_pos[threadIdx.x] = -1;
      }
    }
    __syncthreads();
    // Runs of consecutive tile rows of one sequence (the rows of a run see its private tiles once; a sequence
    // that comes back later in the chunk makes a second run, which only costs a second read). Warps 0 and 1
    // (tile rows 0..63) find the run starts with a ballot.
    bool run_start = false;
    unsigned ballot = 0;
    if (threadIdx.x < kTile) {
      const int i = threadIdx.x, sq = tr_seq[i];
      run_start = sq >= 0 && (i == 0 || tr_seq[i - 1] != sq);
      ballot = __ballot_sync(0xffffffffu, run_start);
      if (lane == 0) ndist[warp] = __popc(ballot);
      if (i == 0) ndist[2] = -1;
    }
    __syncthreads();
    if (threadIdx.x < kTile) {
      const int i = threadIdx.x;
      if (tr_pos[i] >= 0) atomicMax(&ndist[2], tr_pos[i]);
      if (run_start) {
        const int d = __popc(ballot & ((1u << lane) - 1)) + (warp ? ndist[0] : 0);
        const int sq = tr_seq[i];
        int j = i, mp = tr_pos[i];
        while (j + 1 < kTile && tr_seq[j + 1] == sq) mp = max(mp, tr_pos[++j]);
        dseq[d] = sq;
        dfirst[d] = i;
        dend[d] = j + 1;
        dlast[d] = mp;
      }
    }
    load_tile<HD, QROWS>(qs, q, [&](int r) -> const bf16* {
      const int tr = tr0 + r;
      if (tr >= tr_end) return nullptr;
      const int row = r_begin + tr / ratio, h = kvh * ratio + tr % ratio;
      return q + (int64_t)row * q_stride + h * HD;
    });
    __syncthreads();
    const int n_dist = ndist[0] + ndist[1], maxpos = ndist[2];

    // Item i of the chunk's key-tile list -> (sequence, tile, last readable position, which run's rows see it:
    // -1 = all). Items: shared tiles, then each run's tiles nshared .. last / 64.
    struct Item {
      int seq, tile, last, filter;
    };
    int cur_d = 0, cur_t = 0;  // walker over the private part
    auto first_private = [&](int d, int& dd, int& tt) {
      dd = d;
      while (dd < n_dist && dlast[dd] / kTile < nshared) dd++;
      tt = nshared;
    };
    const int shared_items = min(nshared, maxpos / kTile + 1);
    first_private(0, cur_d, cur_t);
    auto next_item = [&](int i, Item& it) -> bool {
      if (i < shared_items) {
        it = Item{seq_g, i, maxpos, -1};
        return true;
      }
      if (cur_d >= n_dist) return false;
      it = Item{dseq[cur_d], cur_t, dlast[cur_d], cur_d};
      if (++cur_t > dlast[cur_d] / kTile) first_private(cur_d + 1, cur_d, cur_t);
      return true;
    };
    const int64_t voff = (int64_t)kv.block_size * KVH * HD;  // a block's V rows follow its K rows
    const CacheAddr ca = cache_addr(kv, layer, kvh);
    auto load_item = [&](const Item& it, int stage) {
      load_kv_pair<HD, kTile>(ks + stage * kTile * S, vs + stage * kTile * S, voff, pool, [&](int r) -> const bf16* {
        const int p = it.tile * kTile + r;
        if (p > it.last) return nullptr;
        const int block = rows.block_tables[(int64_t)it.seq * rows.max_blocks + ca.block_of(p)];
        return ca.row(block, ca.offset_of(p));
      });
    };

    int total = shared_items;  // items in the chunk's list
    for (int d = 0; d < n_dist; d++) total += max(0, dlast[d] / kTile - nshared + 1);

    RowState<HD, 1> st;
    st.init();
    const int lr0 = warp * 16 + (lane >> 2), lr1 = lr0 + 8;  // tile rows of this lane
    const bool rows_here = warp * 16 < QROWS;  // warps past the Q tile only load
    const int pos0 = rows_here ? tr_pos[lr0] : -1, pos1 = rows_here ? tr_pos[lr1] : -1;
    walk_items<STAGES, Item>(
        total, next_item, load_item, [] { __syncthreads(); },
        [&](const Item& it, int stage) {
          const int f0 = it.filter < 0 ? 0 : dfirst[it.filter], f1 = it.filter < 0 ? kTile : dend[it.filter];
          const int lim0 = (lr0 >= f0 && lr0 < f1) ? pos0 : -1;
          const int lim1 = (lr1 >= f0 && lr1 < f1) ? pos1 : -1;
          const int kbase = it.tile * kTile;
          // A warp none of whose rows sees a key of this tile skips it (the update would be a no-op).
          const int lim[1][2] = {{lim0, lim1}};
          if (rows_here && __any_sync(0xffffffffu, lim0 >= kbase || lim1 >= kbase))
            tile_step<HD, 1>(st, qs + warp * 16 * S, ks + stage * kTile * S, vs + stage * kTile * S, kbase, lim,
                             scale_log2, lane);
        });
    float l2[2];
    finish_rows<HD, 1>(st, 0, l2);
    auto orow = [&](int lr) -> bf16* {
      const int tr = tr0 + lr;
      if (tr >= tr_end) return nullptr;
      const int row = r_begin + tr / ratio, h = kvh * ratio + tr % ratio;
      return out + (int64_t)row * ldo + h * HD;
    };
    if (rows_here) store_rows<HD, 1>(st, 0, orow(lr0), orow(lr1), lane);
  }
}

// Paged attention for decode chunks of 8 or 16 tile rows. Walking such a chunk's key tiles as the kernel
// above does, one after another in the one warp that holds Q rows while the others only load, makes a group of
// 16 decoding samples wait through 16 private tiles, each with 1 of the MMA tile's 16 rows live. Here the
// CTA's WARPS warps share the chunk's Q tile and each walks its own list with its own STAGES K/V buffers and no
// block-wide barrier: the shared tiles (every row, the same arithmetic in every warp, so the group's prompt is
// still read from memory once per chunk), then the private tiles of the runs it owns (run d belongs to warp
// d % WARPS). A run's rows are stored by the warp that owns the run; every row sees its shared tiles and then its
// own sequence's tiles in ascending order through tile_step, so the exactness contract at the top holds as in
// the 64-row kernel. grid (T, KVH, Z): CTA x takes groups x, x + T, ... and of each its chunks z, z + Z, ...:
// decode graphs size `groups` for their bucket (groups past the batch's real ones are empty), and striding keeps
// those empty groups from being thousands of CTAs of their own.
// WARPS x STAGES: measured on H100 (bench/attention-gpu.sh DECODE_VARIANTS, 1024 sequences at context 96, groups
// laid out as a decode graph's): 3 x 1 (two CTAs per SM at HD 128) 171 us; 4 x 1 245, 6 x 1 225, 2 x 2 293,
// 3 x 2 233 (one CTA per SM); the one-warp walk 209 us with the same address arithmetic. At 128 sequences laid out
// by groups (chunks of 4 rows, at most 4 runs for 3 warps) the one-warp walk was faster: 39.4 against 52.9 us.
#ifndef MOEPILOT_PAGED_DECODE_WARPS
#define MOEPILOT_PAGED_DECODE_WARPS 3
#endif
#ifndef MOEPILOT_PAGED_DECODE_STAGES
#define MOEPILOT_PAGED_DECODE_STAGES 1
#endif
constexpr int kDecodeRows = 16;  // tile rows of a decode chunk (one MMA row block)

template <int HD, int WARPS, int STAGES>
__global__ void __launch_bounds__(WARPS * 32) paged_decode_kernel(bf16* out, const bf16* q, int q_stride, int NH,
                                                                  PagedKv kv, int layer, PagedRows rows,
                                                                  int chunk_rows, float scale_log2) {
  constexpr int S = sstride<HD>(), CH = HD / 8, RPI = 32 / CH;  // RPI: tile rows one warp-wide copy covers
  constexpr int kTileElems = kTile * S;
  static_assert(32 % CH == 0 && kTile % RPI == 0, "a warp copies whole rows");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* kvbuf = qs + kDecodeRows * S;                                          // [WARPS][STAGES][K, V][kTile][S]
  int* tr_seq = reinterpret_cast<int*>(kvbuf + WARPS * STAGES * 2 * kTileElems);  // [16] per tile row: sequence,
  int* tr_pos = tr_seq + kDecodeRows;                                           //      position,
  int* tr_run = tr_pos + kDecodeRows;                                           //      run (-1: no row)
  int* dseq = tr_run + kDecodeRows;  // [16] per run: its sequence
  int* dlast = dseq + kDecodeRows;   // [16]   and its rows' last position
  int* meta = dlast + kDecodeRows;   // [2]: runs, the chunk's largest position
  const int kvh = blockIdx.y, KVH = kv.KVH, ratio = NH / KVH;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bf16* pool = reinterpret_cast<const bf16*>(kv.pool);
  const int64_t ldo = (int64_t)NH * HD;
  const int64_t voff = (int64_t)kv.block_size * KVH * HD;  // a block's V rows follow its K rows
  bf16* mine = kvbuf + warp * STAGES * 2 * kTileElems;
  const CacheAddr ca = cache_addr(kv, layer, kvh);

  struct Item {
    int seq, tile, last, run;  // run -1: a shared tile, applied to every row
  };
  // The warp's K/V tile of item `it` into its buffer `slot`: lanes copy whole 16-byte-chunked rows (RPI rows per
  // instruction); positions past it.last are zero-filled, never read.
  auto load_item = [&](const Item& it, int slot) {
    bf16* kd = mine + slot * 2 * kTileElems;
    bf16* vd = kd + kTileElems;
    const int c = lane % CH;
    const bf16* src[kTile / RPI];
#pragma unroll
    for (int j = 0; j < kTile / RPI; j++) {
      const int p = it.tile * kTile + j * RPI + lane / CH;
      src[j] = nullptr;
      if (p <= it.last) {
        const int block = rows.block_tables[(int64_t)it.seq * rows.max_blocks + ca.block_of(p)];
        src[j] = ca.row(block, ca.offset_of(p)) + c * 8;
      }
    }
#pragma unroll
    for (int j = 0; j < kTile / RPI; j++) {
      const int r = j * RPI + lane / CH;
      cp_async16(kd + r * S + c * 8, src[j] ? src[j] : pool, src[j] != nullptr);
      cp_async16(vd + r * S + c * 8, src[j] ? src[j] + voff : pool, src[j] != nullptr);
    }
  };

  for (int g = blockIdx.x; g < rows.groups; g += gridDim.x) {
    const int r_begin = rows.group_rows[g], r_end = rows.group_rows[g + 1];
    const int ntr = (r_end - r_begin) * ratio;
    if (ntr <= 0) continue;  // the same for every thread of the CTA
    const int nshared = rows.shared_len[g] / kTile;  // tiles wholly inside the shared prefix
    const int seq_g = rows.row_seq[r_begin];
    for (int chunk = blockIdx.z; chunk * chunk_rows < ntr; chunk += gridDim.z) {
      const int tr0 = chunk * chunk_rows;
      const int tr_end = min(ntr, tr0 + chunk_rows);
      __syncthreads();  // every warp is done with the previous chunk's Q tile and runs
      if (warp == 0) {
        // Runs: consecutive tile rows of one sequence (a sequence that comes back later makes a second run).
        const int tr = tr0 + lane;
        int sq = -1, ps = -1;
        if (lane < kDecodeRows && tr < tr_end) {
          const int row = r_begin + tr / ratio;
          sq = rows.row_seq[row];
          ps = rows.row_pos[row];
        }
        const int prev = __shfl_up_sync(0xffffffffu, sq, 1);
        const bool start = sq >= 0 && (lane == 0 || prev != sq);
        const unsigned starts = __ballot_sync(0xffffffffu, start);
        const int run = sq >= 0 ? __popc(starts & (0xffffffffu >> (31 - lane))) - 1 : -1;
        int last = ps, most = ps;  // last: the max over the lane's run from here on (the run's start gets it all)
#pragma unroll
        for (int off = 1; off < kDecodeRows; off *= 2) {
          const int v = __shfl_down_sync(0xffffffffu, last, off);
          const int vrun = __shfl_down_sync(0xffffffffu, run, off);
          if (lane + off < 32 && vrun == run) last = max(last, v);
          most = max(most, __shfl_xor_sync(0xffffffffu, most, off));
        }
        if (lane < kDecodeRows) {
          tr_seq[lane] = sq;
          tr_pos[lane] = ps;
          tr_run[lane] = run;
        }
        if (start) {
          dseq[run] = sq;
          dlast[run] = last;
        }
        if (lane == 0) {
          meta[0] = __popc(starts);
          meta[1] = most;
        }
      }
      load_tile<HD, kDecodeRows, WARPS * 32>(qs, q, [&](int r) -> const bf16* {
        const int tr = tr0 + r;
        if (tr >= tr_end) return nullptr;
        const int row = r_begin + tr / ratio, h = kvh * ratio + tr % ratio;
        return q + (int64_t)row * q_stride + h * HD;
      });
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      const int nruns = meta[0], maxpos = meta[1];
      if (warp >= nruns) continue;  // no run of its own: nothing to store

      // The warp's items: the shared tiles, then tiles nshared .. last / 64 of each run it owns.
      const int shared_items = min(nshared, maxpos / kTile + 1);
      int total = shared_items;
      for (int d = warp; d < nruns; d += WARPS) total += max(0, dlast[d] / kTile - nshared + 1);
      int cur_d = warp, cur_t = nshared;
      auto next_item = [&](int i, Item& it) {
        if (i < shared_items) {
          it = Item{seq_g, i, maxpos, -1};
          return;
        }
        while (dlast[cur_d] / kTile < nshared) cur_d += WARPS;  // runs wholly inside the shared prefix
        it = Item{dseq[cur_d], cur_t, dlast[cur_d], cur_d};
        if (++cur_t > dlast[cur_d] / kTile) {
          cur_d += WARPS;
          cur_t = nshared;
        }
      };

      RowState<HD, 1> st;
      st.init();
      const int lr0 = lane >> 2, lr1 = lr0 + 8;  // the lane's tile rows
      const int pos0 = tr_pos[lr0], pos1 = tr_pos[lr1], run0 = tr_run[lr0], run1 = tr_run[lr1];
      walk_items<STAGES, Item>(
          total, next_item, load_item, [] { __syncwarp(); },  // the warp alone reads its slots
          [&](const Item& it, int slot) {
            const int lim0 = (it.run < 0 || run0 == it.run) ? pos0 : -1;
            const int lim1 = (it.run < 0 || run1 == it.run) ? pos1 : -1;
            const int kbase = it.tile * kTile;
            const bf16* kt = mine + slot * 2 * kTileElems;
            const int lim[1][2] = {{lim0, lim1}};
            if (__any_sync(0xffffffffu, lim0 >= kbase || lim1 >= kbase))
              tile_step<HD, 1>(st, qs, kt, kt + kTileElems, kbase, lim, scale_log2, lane);
          });
      float l2[2];
      finish_rows<HD, 1>(st, 0, l2);
      auto orow = [&](int lr, int run) -> bf16* {
        if (run < 0 || run % WARPS != warp) return nullptr;  // another warp's run, or no row
        const int tr = tr0 + lr;
        const int row = r_begin + tr / ratio, h = kvh * ratio + tr % ratio;
        return out + (int64_t)row * ldo + h * HD;
      };
      store_rows<HD, 1>(st, 0, orow(lr0, run0), orow(lr1, run1), lane);
    }
  }
}

// ---------------------------------------------------------------- launch helpers
template <int HD>
size_t forward_smem() { return (size_t)(4 + fwd_mb<HD>()) * kTile * sstride<HD>() * sizeof(bf16); }
template <int HD>
size_t dkdv_smem() {
  return (size_t)(2 * kBwdTile + 4 * kBwdM) * sstride<HD>() * sizeof(bf16) + 4 * kBwdM * sizeof(float);
}
template <int HD>
size_t dq_smem() { return (size_t)(2 * kBwdTile + 4 * kTile) * sstride<HD>() * sizeof(bf16); }
template <int HD, int QROWS, int STAGES>
size_t paged_smem() {
  return (size_t)(QROWS + 2 * STAGES * kTile) * sstride<HD>() * sizeof(bf16) + (6 * kTile + 4) * sizeof(int);
}

template <int HD, int WARPS, int STAGES>
size_t paged_decode_smem() {
  return (size_t)(kDecodeRows + WARPS * STAGES * 2 * kTile) * sstride<HD>() * sizeof(bf16) +
         (5 * kDecodeRows + 2) * sizeof(int);
}

template <class K>
void set_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    MP_GPU_CHECK(set_max_dynamic_smem(kernel, (int)bytes));
}

bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

void check_head_dim(int HD) {
  MP_CHECK_ARG(HD == 16 || HD == 32 || HD == 64 || HD == 128,
               "attention: head dim HD must be 16, 32, 64 or 128, got " + std::to_string(HD));
}

void check_shape(const AttentionShape& sh) {
  check_head_dim(sh.HD);
  MP_CHECK_ARG(sh.N >= 0, "attention: N must be >= 0");
  MP_CHECK_ARG(sh.B >= (sh.N > 0 ? 1 : 0) && sh.B <= 65535,
               "attention: B must be in 1..65535 (0 only when N is 0), got " + std::to_string(sh.B));
  MP_CHECK_ARG(sh.KVH >= 1 && sh.NH >= sh.KVH && sh.NH % sh.KVH == 0,
               "attention: NH must be a positive multiple of KVH (NH " + std::to_string(sh.NH) + ", KVH " +
                   std::to_string(sh.KVH) + ")");
  MP_CHECK_ARG(sh.NH <= 65535, "attention: NH too large");
  MP_CHECK_ARG(sh.N == 0 || sh.max_seqlen >= 1, "attention: max_seqlen must be >= 1");
  MP_CHECK_ARG(sh.N == 0 || sh.max_seqlen <= sh.N, "attention: max_seqlen exceeds N");
  MP_CHECK_ARG(sh.q_stride >= sh.NH * sh.HD && sh.q_stride % 8 == 0,
               "attention: q_stride must be >= NH*HD and a multiple of 8 (16-byte rows), got " +
                   std::to_string(sh.q_stride));
  MP_CHECK_ARG(sh.kv_stride >= sh.KVH * sh.HD && sh.kv_stride % 8 == 0,
               "attention: kv_stride must be >= KVH*HD and a multiple of 8 (16-byte rows), got " +
                   std::to_string(sh.kv_stride));
}

#define MP_ATTN_DISPATCH_HD(HD, ...)                 \
  switch (HD) {                                      \
    case 16: { constexpr int kHD = 16; __VA_ARGS__; } break; \
    case 32: { constexpr int kHD = 32; __VA_ARGS__; } break; \
    case 64: { constexpr int kHD = 64; __VA_ARGS__; } break; \
    default: { constexpr int kHD = 128; __VA_ARGS__; } break; \
  }

}  // namespace

// ---------------------------------------------------------------- launchers
void attention_forward(bf16_bits* out, float* lse, const bf16_bits* q, const bf16_bits* k, const bf16_bits* v,
                       const int32_t* cu_seqlens, const AttentionShape& shape, Stream s) {
  check_shape(shape);
  if (shape.N == 0) return;
  MP_CHECK_ARG(out && lse && q && k && v && cu_seqlens, "attention_forward: null pointer argument");
  MP_CHECK_ARG(aligned16(q) && aligned16(k) && aligned16(v) && aligned16(out),
               "attention_forward: q, k, v and out must be 16-byte aligned");
  const float scale_log2 = (float)(1.0 / std::sqrt((double)shape.HD) * 1.4426950408889634);
  MP_ATTN_DISPATCH_HD(shape.HD, {
    const int bm = kTile * fwd_mb<kHD>();
    dim3 grid((shape.max_seqlen + bm - 1) / bm, shape.NH, shape.B);
    const size_t smem = forward_smem<kHD>();
    set_smem(attention_forward_kernel<kHD>, smem);
    attention_forward_kernel<kHD><<<grid, kThreads, smem, s>>>(
        reinterpret_cast<bf16*>(out), lse, reinterpret_cast<const bf16*>(q), reinterpret_cast<const bf16*>(k),
        reinterpret_cast<const bf16*>(v), cu_seqlens, shape.NH, shape.KVH, shape.q_stride, shape.kv_stride,
        scale_log2);
    MP_GPU_CHECK_LAUNCH("attention_forward_kernel");
  });
}

void attention_backward(float* dq, float* dk, float* dv, const bf16_bits* dout, const bf16_bits* out,
                        const float* lse, const bf16_bits* q, const bf16_bits* k, const bf16_bits* v,
                        const int32_t* cu_seqlens, const AttentionShape& shape, Stream s) {
  check_shape(shape);
  if (shape.N == 0) return;
  MP_CHECK_ARG(dq && dk && dv && dout && out && lse && q && k && v && cu_seqlens,
               "attention_backward: null pointer argument");
  MP_CHECK_ARG(aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout) && aligned16(dq) && aligned16(dk) &&
                   aligned16(dv),
               "attention_backward: q, k, v, dout, dq, dk and dv must be 16-byte aligned");
  const double sc = 1.0 / std::sqrt((double)shape.HD);
  const float scale = (float)sc, scale_log2 = (float)(sc * 1.4426950408889634);
  const int64_t rows = shape.N * shape.NH;
  MP_ATTN_DISPATCH_HD(shape.HD, {
    attention_bwd_dot_kernel<kHD><<<(unsigned)((rows + 7) / 8), 256, 0, s>>>(
        dq, reinterpret_cast<const bf16*>(dout), reinterpret_cast<const bf16*>(out), shape.N, shape.NH);
    MP_GPU_CHECK_LAUNCH("attention_bwd_dot_kernel");
    dim3 gkv((shape.max_seqlen + kBwdTile - 1) / kBwdTile, shape.KVH, shape.B);
    const size_t smem_kv = dkdv_smem<kHD>();
    set_smem(attention_bwd_dkdv_kernel<kHD>, smem_kv);
    attention_bwd_dkdv_kernel<kHD><<<gkv, kBwdThreads, smem_kv, s>>>(
        dk, dv, dq, reinterpret_cast<const bf16*>(dout), lse, reinterpret_cast<const bf16*>(q),
        reinterpret_cast<const bf16*>(k), reinterpret_cast<const bf16*>(v), cu_seqlens, shape.NH, shape.KVH,
        shape.q_stride, shape.kv_stride, scale, scale_log2);
    MP_GPU_CHECK_LAUNCH("attention_bwd_dkdv_kernel");
    dim3 gq((shape.max_seqlen + kBwdTile - 1) / kBwdTile, shape.NH, shape.B);
    const size_t smem_q = dq_smem<kHD>();
    set_smem(attention_bwd_dq_kernel<kHD>, smem_q);
    attention_bwd_dq_kernel<kHD><<<gq, kBwdThreads, smem_q, s>>>(
        dq, reinterpret_cast<const bf16*>(dout), lse, reinterpret_cast<const bf16*>(q),
        reinterpret_cast<const bf16*>(k), reinterpret_cast<const bf16*>(v), cu_seqlens, shape.NH, shape.KVH,
        shape.q_stride, shape.kv_stride, scale, scale_log2);
    MP_GPU_CHECK_LAUNCH("attention_bwd_dq_kernel");
  });
}

namespace {
void check_paged(const PagedKv& kv, int layer, const PagedRows& rows, const char* who) {
  const std::string w = who;
  MP_CHECK_ARG(kv.pool != nullptr, w + ": kv.pool is null");
  MP_CHECK_ARG(aligned16(kv.pool), w + ": kv.pool must be 16-byte aligned");
  check_head_dim(kv.HD);
  MP_CHECK_ARG(kv.num_blocks > 0 && kv.block_size > 0 && kv.layers > 0 && kv.KVH > 0,
               w + ": kv num_blocks, block_size, layers and KVH must be > 0");
  MP_CHECK_ARG(kv.KVH <= 65535, w + ": kv.KVH too large");
  MP_CHECK_ARG(layer >= 0 && layer < kv.layers,
               w + ": layer " + std::to_string(layer) + " out of range [0, " + std::to_string(kv.layers) + ")");
  MP_CHECK_ARG(rows.R >= 0, w + ": rows.R must be >= 0");
  if (rows.R == 0) return;
  MP_CHECK_ARG(rows.row_seq && rows.row_pos && rows.block_tables, w + ": rows arrays must not be null");
  MP_CHECK_ARG(rows.max_blocks > 0, w + ": rows.max_blocks must be > 0");
  MP_CHECK_ARG(rows.max_pos >= 0 && rows.max_pos < (int64_t)rows.max_blocks * kv.block_size,
               w + ": rows.max_pos " + std::to_string(rows.max_pos) + " beyond max_blocks * block_size");
}
}  // namespace

void kv_cache_write(const PagedKv& kv, int layer, const bf16_bits* k, const bf16_bits* v, int kv_stride,
                    const PagedRows& rows, Stream s) {
  check_paged(kv, layer, rows, "kv_cache_write");
  if (rows.R == 0) return;
  MP_CHECK_ARG(k && v, "kv_cache_write: k and v must not be null");
  MP_CHECK_ARG(aligned16(k) && aligned16(v), "kv_cache_write: k and v must be 16-byte aligned");
  MP_CHECK_ARG(kv_stride >= kv.KVH * kv.HD && kv_stride % 8 == 0,
               "kv_cache_write: kv_stride must be >= KVH*HD and a multiple of 8, got " + std::to_string(kv_stride));
  const int64_t total = (int64_t)rows.R * (kv.KVH * kv.HD / 8);
  kv_cache_write_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(kv, layer, reinterpret_cast<const bf16*>(k),
                                                                       reinterpret_cast<const bf16*>(v), kv_stride,
                                                                       rows);
  MP_GPU_CHECK_LAUNCH("kv_cache_write_kernel");
}

void paged_attention(bf16_bits* out, const bf16_bits* q, int q_stride, int NH, const PagedKv& kv, int layer,
                     const PagedRows& rows, Stream s) {
  check_paged(kv, layer, rows, "paged_attention");
  if (rows.R == 0) return;
  MP_CHECK_ARG(out && q, "paged_attention: out and q must not be null");
  MP_CHECK_ARG(aligned16(out) && aligned16(q), "paged_attention: out and q must be 16-byte aligned");
  MP_CHECK_ARG(NH >= kv.KVH && NH % kv.KVH == 0,
               "paged_attention: NH must be a positive multiple of kv.KVH (NH " + std::to_string(NH) + ")");
  MP_CHECK_ARG(q_stride >= NH * kv.HD && q_stride % 8 == 0,
               "paged_attention: q_stride must be >= NH*HD and a multiple of 8, got " + std::to_string(q_stride));
  MP_CHECK_ARG(rows.groups >= 1 && rows.groups <= 2147483647, "paged_attention: rows.groups must be >= 1");
  MP_CHECK_ARG(rows.group_rows && rows.shared_len, "paged_attention: rows.group_rows and rows.shared_len must not be null");
  const int ratio = NH / kv.KVH;
  // A CTA takes chunks of up to 64 tile rows of one group (z, z + Z, ...). Decode is bound by latency: with few
  // groups the chunks shrink (down to 4 rows) until there are about two CTAs per SM, each with fewer sequences to
  // walk; a group's shared tiles are then read once per chunk instead of once per group.
  int dev = 0, sms = 0;
  MP_GPU_CHECK(get_device(&dev));
  MP_GPU_CHECK(sm_count(dev, &sms));
  const int64_t avg_tr = std::max<int64_t>(1, (int64_t)rows.R * ratio / rows.groups);
  int chunk_rows = kTile;
  while (chunk_rows > 16 && chunk_rows / 2 >= avg_tr) chunk_rows /= 2;  // no larger than the groups need
  auto ctas = [&](int cr) { return (int64_t)rows.groups * kv.KVH * ((avg_tr + cr - 1) / cr); };
  while (chunk_rows > 4 && ctas(chunk_rows) < 2 * sms) chunk_rows /= 2;
  const int Z = (int)std::min<int64_t>((avg_tr + chunk_rows - 1) / chunk_rows, 65535);
  dim3 grid(rows.groups, kv.KVH, Z);
  const float scale_log2 = (float)(1.0 / std::sqrt((double)kv.HD) * 1.4426950408889634);
  MP_ATTN_DISPATCH_HD(kv.HD, {
    if (chunk_rows <= 4) {  // a few sequences a chunk: one walk, three key tiles in flight
      const size_t smem = paged_smem<kHD, 16, 3>();
      set_smem(paged_attention_kernel<kHD, 16, 3>, smem);
      paged_attention_kernel<kHD, 16, 3><<<grid, kThreads, smem, s>>>(reinterpret_cast<bf16*>(out),
                                                                     reinterpret_cast<const bf16*>(q), q_stride, NH,
                                                                     kv, layer, rows, chunk_rows, scale_log2);
    } else if (chunk_rows <= kDecodeRows) {  // decode: the warps walk their runs' private tiles side by side
      constexpr int W = MOEPILOT_PAGED_DECODE_WARPS, ST = MOEPILOT_PAGED_DECODE_STAGES;
      const size_t smem = paged_decode_smem<kHD, W, ST>();
      set_smem(paged_decode_kernel<kHD, W, ST>, smem);
      // Groups strided over about 8 CTAs per SM: every group of a full batch still has a CTA of its own, and the
      // empty groups of a decode graph's bucket cost a read of group_rows each instead of a CTA each.
      const int64_t per_x = (int64_t)kv.KVH * Z;
      const int T = (int)std::max<int64_t>(1, std::min<int64_t>(rows.groups, (8 * (int64_t)sms + per_x - 1) / per_x));
      paged_decode_kernel<kHD, W, ST><<<dim3(T, kv.KVH, Z), W * 32, smem, s>>>(
          reinterpret_cast<bf16*>(out), reinterpret_cast<const bf16*>(q), q_stride, NH, kv, layer, rows, chunk_rows,
          scale_log2);
    } else {
      const size_t smem = paged_smem<kHD, kTile, 2>();
      set_smem(paged_attention_kernel<kHD, kTile, 2>, smem);
      paged_attention_kernel<kHD, kTile, 2><<<grid, kThreads, smem, s>>>(reinterpret_cast<bf16*>(out),
                                                                        reinterpret_cast<const bf16*>(q), q_stride,
                                                                        NH, kv, layer, rows, chunk_rows, scale_log2);
    }
    MP_GPU_CHECK_LAUNCH("paged_attention_kernel");
  });
}

}  // namespace moepilot::gpu
