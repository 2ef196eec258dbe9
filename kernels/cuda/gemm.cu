// GEMMs behind gemm.h. Two tensor-core kernel templates share one cp.async multi-stage pipeline, one shared-memory
// layout and the tile schedules below:
//   - gemm_kernel: bf16 mma.sync m16n8k16 + ldmatrix (sm_80 and later). Every operand layout; serves the grouped
//     dW (+=) everywhere and every other GEMM where wgmma is unavailable.
//   - gemm_wgmma_kernel: sm_90a wgmma from shared memory; K-major operands as loaded, [k][m] / [k][n] operands in
//     wgmma's MN-major layout with the instruction's transpose flags. Serves every forward GEMM (dense and
//     grouped), the grouped dA and the overwriting grouped dW on Hopper.
// cuBLASLt serves the dense backward, and the dense forward calls of many rows where it gives these kernels' bits
// (lt_forward). The grouped dW is bound by its fp32 read-modify-write, not by the math: see DwEpi for its epilogues
// and backward_tile for what was measured.
//
// Batch invariance. Each output element is one fp32 accumulator that starts at 0 and receives one 16-wide K-slice
// product per step, slices in increasing order. Which tile shape, which row of a tile, how many rows or groups the
// call has: none of it changes that chain, so the bits depend on K alone. K tails (K % 16 == 8) and rows or columns
// outside the problem are zero-filled by cp.async, and a zero product adds nothing. No split-K anywhere. One device
// runs every forward call through one instruction family (wgmma on Hopper). On H100 the two families were also
// measured to give identical bits (gemm_test's INFO lines), so rollouts on other GPUs are expected to agree too.
//
// First use: the first call of each kernel on a device sets its shared-memory attribute, the first cuBLASLt call
// creates the device's cuBLASLt handle and the first on each stream that stream's workspace. Make one call of each
// kind (on each stream) before capturing a CUDA graph; after that every call only enqueues work.
//
// Operand layouts (the kernel computes C[M,N] = opA[M,K] @ opB[K,N], K the reduced dimension):
//   A "mk": A[m][k] (activations)              A "km": A[k][m] (dOut^T in dW = dOut^T @ A)
//   B "nk": B[n][k] (weights [out,in], forward) B "kn": B[k][n] (weights in dA = dOut @ W; activations in dW)
// Shared-memory tiles keep rows of 16-byte chunks with the chunk index XORed by (row & 7), so the eight row
// addresses of every ldmatrix fall in eight different bank groups.
//
// Tile schedules:
//   dense:   one 1D grid; tiles ordered in bands of kBand row tiles (columns outer within a band), so a band's
//            activations stay in L2 while the weights stream once per band (the LM head reads its 600 MB of
//            weights once per 16 x 128 rows).
//   rows:    grouped rows (grouped forward, grouped dA): the grid covers ceil(max_rows / BM) + G row-tile slots
//            times the column tiles; each block scans the device offsets to find its group and row range
//            (empty groups own no slots; slots past the last tile exit). No host synchronisation.
//   kgroup:  grouped dW: blockIdx.z is the group, whose rows are the reduced dimension.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda/bf16_math.cuh"
#include "cuda/gemm.h"
#include "cuda/gemm_bench.cuh"
#include "cuda/mbarrier.cuh"

#ifdef MOEPILOT_WITH_CUBLASLT
#include <cublasLt.h>
#endif

namespace moepilot::gpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------------------------

constexpr int kBK = 64;     // reduced-dimension tile (4 mma k-steps)
constexpr int kBand = 16;   // dense schedule: row tiles per band

enum Sched { kDense = 0, kRows = 1, kKGroup = 2 };

// Grouped dW epilogues (kgroup schedule). Each computes dW = old + acc, acc = the group's product summed from 0 in
// the fixed K-slice order, so every epilogue and tile gives the same bits (one fp32 add per element and launch: no
// ordering to vary); only how the fp32 read-modify-write of dW reaches memory differs, and that is what bounds this
// kernel (60 x 1408 x 2048 fp32 = 692 MB read and written per expert weight, against ~50 GFLOP of math):
//   kEpiLoad: dW's tile loaded into registers while the first operand stages are in flight, added, stored.
//   kEpiRed:  red.global.add from the accumulators: fire-and-forget, the add happens in L2.
//   kEpiBulk: accumulators staged in shared memory, then one bulk asynchronous reduce-add per tile row
//             (cp.reduce.async.bulk, sm_90): the copy engine streams whole rows into L2, the block retires early.
//   kEpiSmem: dW's tile copied into shared memory (cp.async, issued before the operands), the product added there,
//             then one bulk copy per row back (sm_90; plain coalesced stores before): both directions of the
//             read-modify-write are asynchronous whole-row transfers, and no register holds dW.
// Overwrite mode (accumulate false: dW = acc) stores instead (bulk copy for kEpiBulk, kEpiSmem) and skips the reads.
enum DwEpi { kEpiLoad = 0, kEpiRed = 1, kEpiBulk = 2, kEpiSmem = 3, kEpiGlu = 4 };
// kEpiGlu (forward, wgmma, one warpgroup column): the gate and up products of an MLP in one GEMM. Each block's B
// tile is BN/2 rows of W_gate (B) over the same BN/2 rows of W_up (B2), so a thread's accumulators hold gate and up
// of the same elements (register j and j + BNI/16), and the epilogue writes act = bf16(swiglu(gate, up)) to
// `act` ([rows, N/2], row stride ldc) instead of two fp32 products; N is twice the MLP's width. Each product is
// the same fp32 chain as in a plain forward GEMM, so act has the bits of two forward GEMMs and swiglu_forward.
// With C (and C2) set, the products themselves go there too (fp32 [rows, N/2], stride ldc): a training forward
// keeps them for the backward.

struct GemmArgs {
  const __nv_bfloat16* A;
  const __nv_bfloat16* B;
  const __nv_bfloat16* B2;  // kEpiGlu: W_up (B is W_gate)
  float* C;                 // (kEpiGlu: the gate product, optional)
  float* C2;                // kEpiGlu: the up product (with C)
  uint16_t* act;            // kEpiGlu: the bf16 output
  const float* bias;       // [N] or null
  const int32_t* offsets;  // [G+1] (rows / kgroup schedules)
  int64_t M;               // rows of C (dense, kgroup); unused by rows (offsets say)
  int N;                   // columns of C
  int64_t K;               // reduced dimension (dense, rows); kgroup: the group's row count
  int64_t lda, ldb, ldc;   // leading dimensions in elements
  int64_t b_group_stride;  // rows schedule: elements between groups' B matrices
  int64_t c_group_stride;  // kgroup schedule: elements between groups' C matrices
  int64_t k_split;         // B stored [k][n] (BKN): rows k >= k_split come from B2's row k - k_split (0: none)
  int G;
  int tiles_m;             // dense / kgroup: row tiles; rows: row-tile slots
  int tiles_n;
  bool accumulate;
  bool c_bf16;  // kgroup dW: C holds bf16 (stride and ldc in bf16 elements); tile 16, or 22 overwriting only
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes 0 writes zeros without reading (outside the problem).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile with `cpr` chunks per row (cpr % 8 == 0).
__device__ __forceinline__ uint32_t swz(int row, int chunk, int cpr) {
  return static_cast<uint32_t>((row * cpr + (chunk ^ (row & 7))) * 16);
}

// Loads a tile of R rows x (CPR*8) bf16 columns from src (row stride ld elements) into the swizzled tile at dst.
// Row r is valid when r < rows_valid, chunk c when c*8 < cols_valid (cols_valid % 8 == 0 by contract).
template <int R, int CPR, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t dst, const __nv_bfloat16* src, int64_t ld, int64_t rows_valid,
                                          int64_t cols_valid, int tid) {
  constexpr int kChunks = R * CPR;
#pragma unroll
  for (int i = 0; i < (kChunks + THREADS - 1) / THREADS; i++) {
    const int idx = tid + i * THREADS;
    if (kChunks % THREADS != 0 && idx >= kChunks) break;  // (3-warpgroup tiles: 384 threads)
    const int r = idx / CPR, c = idx % CPR;
    const bool ok = r < rows_valid && (int64_t)c * 8 < cols_valid;
    const __nv_bfloat16* p = ok ? src + r * ld + c * 8 : src;
    cp_async16(dst + swz(r, c, CPR), p, ok ? 16 : 0);
  }
}

// As load_tile, into wgmma's MN-major layout: CPR / 8 atoms of R rows x 128 bytes (64 bf16 columns) one after the
// other, each swizzled like load_tile's rows (chunk ^= row & 7).
template <int R, int CPR, int THREADS>
__device__ __forceinline__ void load_tile_mn(uint32_t dst, const __nv_bfloat16* src, int64_t ld, int64_t rows_valid,
                                             int64_t cols_valid, int tid) {
  constexpr int kChunks = R * CPR;
  static_assert(CPR % 8 == 0, "MN-major tiles are whole 64-column atoms");
#pragma unroll
  for (int i = 0; i < (kChunks + THREADS - 1) / THREADS; i++) {
    const int idx = tid + i * THREADS;
    if (kChunks % THREADS != 0 && idx >= kChunks) break;
    const int r = idx / CPR, c = idx % CPR;
    const bool ok = r < rows_valid && (int64_t)c * 8 < cols_valid;
    const __nv_bfloat16* p = ok ? src + r * ld + c * 8 : src;
    cp_async16(dst + (uint32_t)((c >> 3) * (R * 128) + r * 128 + (((c & 7) ^ (r & 7)) * 16)), p, ok ? 16 : 0);
  }
}

// Where a block works: its C tile (rows [m0, min(m0 + BM, m_end)), columns from n0), the reduced range
// [k_begin, k_begin + K) and its group's B and C. False: nothing to do (a slot past the last tile, an empty group).
struct TileLoc {
  int64_t m0, m_end, k_begin, K;
  int n0;
  const __nv_bfloat16* B;
  const __nv_bfloat16* B2;
  float* C;
};

template <int BM, int BN, int kThreads, int SCHED>
__device__ __forceinline__ bool locate_tile(const GemmArgs& p, TileLoc& t) {
  const int tid = threadIdx.x;
  t.k_begin = 0;
  t.K = p.K;
  t.B = p.B;
  t.B2 = p.B2;
  t.C = p.C;
  if constexpr (SCHED == kDense || SCHED == kKGroup) {
    const int pid = blockIdx.x;
    const int per_band = kBand * p.tiles_n;
    const int band = pid / per_band, first = band * kBand;
    const int band_rows = min(p.tiles_m - first, kBand);
    const int in_band = pid - band * per_band;
    t.m0 = (int64_t)(first + in_band % band_rows) * BM;
    t.n0 = (in_band / band_rows) * BN;
    t.m_end = p.M;
    if constexpr (SCHED == kKGroup) {
      const int g = blockIdx.z;
      t.k_begin = p.offsets[g];
      t.K = p.offsets[g + 1] - t.k_begin;
      if (t.K <= 0 && p.accumulate) return false;  // an empty group adds nothing to its dW (overwrite: zeros)
      if (p.c_bf16)
        t.C = reinterpret_cast<float*>(reinterpret_cast<__nv_bfloat16*>(p.C) + (int64_t)g * p.c_group_stride);
      else
        t.C += (int64_t)g * p.c_group_stride;
    }
    return true;
  } else {
    // Rows schedule: slot = blockIdx.x / tiles_n. Group g owns ceil(rows_g / BM) consecutive slots; a block-wide
    // scan over the offsets (in chunks of kThreads groups) finds the group of this block's slot.
    const int slot = blockIdx.x / p.tiles_n;
    t.n0 = (blockIdx.x % p.tiles_n) * BN;
    __shared__ int s_scan[kThreads];
    __shared__ int s_group, s_first;
    if (tid == 0) s_group = -1;
    int base = 0;
    for (int g0 = 0; g0 < p.G; g0 += kThreads) {
      const int g = g0 + tid;
      const int cnt = g < p.G ? (p.offsets[g + 1] - p.offsets[g] + BM - 1) / BM : 0;
      s_scan[tid] = cnt;
      __syncthreads();
      for (int d = 1; d < kThreads; d <<= 1) {  // inclusive Hillis-Steele scan
        const int v = tid >= d ? s_scan[tid - d] : 0;
        __syncthreads();
        s_scan[tid] += v;
        __syncthreads();
      }
      const int start = base + s_scan[tid] - cnt;
      if (cnt > 0 && slot >= start && slot < start + cnt) {
        s_group = g;
        s_first = slot - start;
      }
      base += s_scan[kThreads - 1];
      __syncthreads();
      if (s_group >= 0 || base > slot) break;
    }
    if (s_group < 0) return false;  // slot past the last tile (the launch is sized by an upper bound)
    const int g = s_group;
    t.m0 = p.offsets[g] + (int64_t)s_first * BM;
    t.m_end = p.offsets[g + 1];
    t.B += (int64_t)g * p.b_group_stride;
    if (t.B2) t.B2 += (int64_t)g * p.b_group_stride;
    return true;
  }
}

// Whether this compilation pass has the sm_90 bulk copies (the kEpiBulk dW epilogue).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kBulkArch = true;
#else
constexpr bool kBulkArch = false;
#endif

// dW[i], dW[i+1] += v.x, v.y in L2 (no value returned; the address is 8-byte aligned).
__device__ __forceinline__ void red_add2(float* dst, float2 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(v.x), "f"(v.y) : "memory");
#else
  atomicAdd(dst, v.x);
  atomicAdd(dst + 1, v.y);
#endif
}

// C tile BM x BN per block; WARPS_M x WARPS_N warps; STAGES-deep cp.async pipeline.
// AKM: A stored [k][m] (else [m][k]); BKN: B stored [k][n] (else [n][k]).
// EPI: the grouped dW epilogue (kgroup schedule only; see DwEpi). MINB: blocks per SM the registers must allow.
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool AKM, bool BKN, int SCHED, int EPI, int MINB>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32, MINB)
    gemm_kernel(GemmArgs p) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  constexpr int MI = WTM / 16, NI = WTN / 8;             // mma tiles per warp
  static_assert(NI % 2 == 0, "B fragments load two n8 tiles at a time");
  constexpr int kABytes = BM * kBK * 2, kBBytes = BN * kBK * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  TileLoc t;
  if (!locate_tile<BM, BN, kThreads, SCHED>(p, t)) return;
  const int64_t m0 = t.m0, m_end = t.m_end, k_begin = t.k_begin, K = t.K;
  const int n0 = t.n0;
  const __nv_bfloat16* A = p.A;
  const __nv_bfloat16* B = t.B;
  float* C = t.C;

  const uint32_t sbase = smem_u32(smem);
  auto sA = [&](int s) { return sbase + s * (kABytes + kBBytes); };
  auto sB = [&](int s) { return sbase + s * (kABytes + kBBytes) + kABytes; };
  const int64_t rows_left = m_end - m0;
  const int64_t cols_left = (int64_t)p.N - n0;

  auto load_stage = [&](int s, int64_t kt) {
    const int64_t k0 = kt * kBK;
    const int64_t k_left = K - k0;
    if constexpr (AKM)  // [k][m]: kBK rows of BM columns
      load_tile<kBK, BM / 8, kThreads>(sA(s), A + (k_begin + k0) * p.lda + m0, p.lda, k_left, rows_left, tid);
    else  // [m][k]: BM rows of kBK columns
      load_tile<BM, kBK / 8, kThreads>(sA(s), A + m0 * p.lda + k0, p.lda, rows_left, k_left, tid);
    if constexpr (BKN) {
      const int64_t kr = k_begin + k0;  // (a k-tile never straddles k_split: a multiple of kBK)
      const __nv_bfloat16* src = p.k_split && kr >= p.k_split ? t.B2 + (kr - p.k_split) * p.ldb : B + kr * p.ldb;
      load_tile<kBK, BN / 8, kThreads>(sB(s), src + n0, p.ldb, k_left, cols_left, tid);
    } else
      load_tile<BN, kBK / 8, kThreads>(sB(s), B + (int64_t)n0 * p.ldb + k0, p.ldb, cols_left, k_left, tid);
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; i++)
#pragma unroll
    for (int j = 0; j < NI; j++)
#pragma unroll
      for (int r = 0; r < 4; r++) acc[i][j][r] = 0.f;

  const int64_t KT = (K + kBK - 1) / kBK;
  constexpr int kPitch = BN + 8;  // fp32 tiles in shared memory: rows padded by 8 floats (see the epilogue)
  if constexpr (SCHED == kKGroup && EPI == kEpiSmem) {
    // dW's tile, first in line: its DRAM reads overlap the operand loads and the math.
    if (p.accumulate) {
      const uint32_t old_s = sbase + STAGES * (kABytes + kBBytes);
      constexpr int kC4 = BN / 4;  // 16-byte chunks a row
      for (int idx = tid; idx < BM * kC4; idx += kThreads) {
        const int r = idx / kC4, c = idx % kC4;
        const bool ok = r < rows_left && (int64_t)c * 4 < cols_left;
        cp_async16(old_s + (uint32_t)(r * kPitch + c * 4) * 4, ok ? C + (m0 + r) * p.ldc + n0 + c * 4 : C, ok ? 16 : 0);
      }
    }
    cp_async_commit();
  }
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  // kEpiLoad: dW's current values, loaded here so that their latency hides behind the first stages (the kernel
  // is bound by dW's fp32 read-modify-write); the epilogue adds the product to them.
  constexpr bool kOld = SCHED == kKGroup && EPI == kEpiLoad;
  float old[kOld ? MI : 1][kOld ? NI : 1][4];
  if constexpr (kOld) {
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int64_t row = m0 + wm * WTM + i * 16 + h * 8 + (lane >> 2);
#pragma unroll
        for (int j = 0; j < NI; j++) {
          const int col = n0 + wn * WTN + j * 8 + (lane & 3) * 2;
          float2 o = make_float2(0.f, 0.f);
          if (p.accumulate && row < m_end && col < p.N)
            o = p.c_bf16 ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
                               reinterpret_cast<const __nv_bfloat16*>(C) + row * p.ldc + col))
                         : *reinterpret_cast<const float2*>(C + row * p.ldc + col);
          old[i][j][2 * h] = o.x;
          old[i][j][2 * h + 1] = o.y;
        }
      }
  }

  for (int64_t kt = 0; kt < KT; kt++) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt-1's slot is free to refill
    {
      const int64_t nk = kt + STAGES - 1;
      if (nk < KT) load_stage((int)(nk % STAGES), nk);
      cp_async_commit();
    }
    const int s = (int)(kt % STAGES);
    const uint32_t a_s = sA(s), b_s = sB(s);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; kk++) {
      uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
      for (int i = 0; i < MI; i++) {
        const int mrow = wm * WTM + i * 16;
        if constexpr (AKM) {
          const int mat = lane >> 3;
          const int krow = kk * 16 + (mat >> 1) * 8 + (lane & 7);
          ldmatrix_x4_trans(af[i], a_s + swz(krow, (mrow >> 3) + (mat & 1), BM / 8));
        } else {
          ldmatrix_x4(af[i], a_s + swz(mrow + (lane & 15), kk * 2 + (lane >> 4), kBK / 8));
        }
      }
#pragma unroll
      for (int j = 0; j < NI / 2; j++) {
        const int ncol = wn * WTN + j * 16;
        uint32_t r[4];
        const int mat = lane >> 3;
        if constexpr (BKN) {
          const int krow = kk * 16 + (mat & 1) * 8 + (lane & 7);
          ldmatrix_x4_trans(r, b_s + swz(krow, (ncol >> 3) + (mat >> 1), BN / 8));
        } else {
          ldmatrix_x4(r, b_s + swz(ncol + (mat >> 1) * 8 + (lane & 7), kk * 2 + (mat & 1), kBK / 8));
        }
        bfr[2 * j][0] = r[0];
        bfr[2 * j][1] = r[1];
        bfr[2 * j + 1][0] = r[2];
        bfr[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NI; j++) mma_bf16(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
    }
  }
  cp_async_wait<0>();

  if constexpr (SCHED == kKGroup && (EPI == kEpiSmem || (EPI == kEpiBulk && kBulkArch))) {
    // ---- grouped dW through shared memory: kEpiBulk stages the product in the (now free) stages and reduce-adds
    // each row into dW; kEpiSmem adds it to dW's tile loaded at the start and copies each row back. Rows padded by
    // 8 floats: a warp's fragment accesses take two wavefronts.
    __syncthreads();  // every warp is done reading the operand stages; dW's tile (kEpiSmem) landed for all
    float* sc = reinterpret_cast<float*>(smem) + (EPI == kEpiSmem ? STAGES * (kABytes + kBBytes) / 4 : 0);
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int r = wm * WTM + i * 16 + h * 8 + (lane >> 2);
#pragma unroll
        for (int j = 0; j < NI; j++) {
          const int c = wn * WTN + j * 8 + (lane & 3) * 2;
          float2* q = reinterpret_cast<float2*>(sc + r * kPitch + c);
          float2 v = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
          if (EPI == kEpiSmem && p.accumulate) {
            const float2 o = *q;
            v = make_float2(o.x + v.x, o.y + v.y);
          }
          *q = v;
        }
      }
    const int64_t rows_here = min((int64_t)BM, m_end - m0);
    const uint32_t bytes = (uint32_t)min(BN, p.N - n0) * 4u;
    if constexpr (!kBulkArch) {  // (kEpiSmem before sm_90: coalesced 16-byte stores)
      __syncthreads();
      constexpr int kC4 = BN / 4;
      for (int idx = tid; idx < BM * kC4; idx += kThreads) {
        const int r = idx / kC4, c = idx % kC4;
        if (r < rows_here && (uint32_t)c * 16 < bytes)
          *reinterpret_cast<float4*>(C + (m0 + r) * p.ldc + n0 + c * 4) =
              *reinterpret_cast<const float4*>(sc + r * kPitch + c * 4);
      }
      return;
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic stores, visible to the bulk copies
    __syncthreads();
    for (int r = tid; r < rows_here; r += kThreads) {
      float* dst = C + (m0 + r) * p.ldc + n0;
      const uint32_t src = smem_u32(sc + r * kPitch);
      if (EPI == kEpiBulk && p.accumulate)
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                     "r"(src), "r"(bytes)
                     : "memory");
      else
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes)
                     : "memory");
    }
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // shared memory must outlive the reads
  } else {
  // ---- epilogue: out (= or +=) acc (+ bias); grouped dW: see DwEpi (kEpiBulk below sm_90: as kEpiRed) ----
#pragma unroll
  for (int i = 0; i < MI; i++) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int64_t row = m0 + wm * WTM + i * 16 + h * 8 + (lane >> 2);
      if (row >= m_end) continue;
      float* crow = C + row * p.ldc;
#pragma unroll
      for (int j = 0; j < NI; j++) {
        const int col = n0 + wn * WTN + j * 8 + (lane & 3) * 2;
        if (col >= p.N) continue;
        float2 v = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        float2* dst = reinterpret_cast<float2*>(crow + col);
        if constexpr (SCHED == kKGroup) {
          if constexpr (kOld) {
            if (p.accumulate) v = make_float2(old[i][j][2 * h] + v.x, old[i][j][2 * h + 1] + v.y);
            if (p.c_bf16)  // (one rounding of the fp32 sum)
              *reinterpret_cast<__nv_bfloat162*>(reinterpret_cast<__nv_bfloat16*>(C) + row * p.ldc + col) =
                  __float22bfloat162_rn(v);
            else
              *dst = v;
          } else {
            if (p.accumulate)
              red_add2(crow + col, v);
            else
              *dst = v;
          }
        } else {
          if (p.bias) {
            v.x += p.bias[col];
            v.y += p.bias[col + 1];
          }
          if (p.accumulate) {
            const float2 o = *dst;
            v.x = o.x + v.x;
            v.y = o.y + v.y;
          }
          *dst = v;
        }
      }
    }
  }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Hopper kernel (sm_90a): wgmma from shared memory, same cp.async pipeline and tile schedules
// ---------------------------------------------------------------------------------------------------------------
// Forward layouts only (A [m][k], B [n][k]). The swizzled [rows][64] bf16 tiles above are exactly wgmma's K-major
// 128-byte-swizzle layout (8-row groups of 1024 bytes, chunk ^= row & 7) once each tile starts on a 1024-byte
// boundary. Each warpgroup owns 64 rows of the block tile and issues m64nBNk16 per 16-wide K slice, slices in
// increasing order into accumulators that start at 0 (scale-d = 1 throughout), the same chain as the mma.sync
// kernel. The body exists only where the compiler targets sm_90a; the host uses this kernel only when the loaded
// binary is sm_90 code (wgmma_ready).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int TA, int TB>  // 1: that operand MN-major (transposed)
__device__ __forceinline__ void wgmma_m64n256(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
}

template <int TA, int TB>  // 1: that operand MN-major (transposed)
__device__ __forceinline__ void wgmma_m64n192(float (&d)[96], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95}, %96, %97, p, 1, 1, %99, %100;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
      : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
}

template <int TA, int TB>  // 1: that operand MN-major (transposed)
__device__ __forceinline__ void wgmma_m64n128(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
}

template <int TA, int TB>  // 1: that operand MN-major (transposed)
__device__ __forceinline__ void wgmma_m64n64(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
}

__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_addr) {
  // start address >> 4 (bits 0-13), leading byte offset 1 (unused for swizzled K-major), stride byte offset
  // 1024 >> 4 = 64 (bits 32-45: the distance between 8-row groups), layout 1 = 128-byte swizzle (bits 62-63).
  return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)64 << 32) | ((uint64_t)1 << 62);
}
// MN-major B (the grouped dA's W_g, stored [k][n]) in 128-byte-swizzle atoms of 64 columns x the stage's 64 k-rows
// (see load_tile_mn): leading byte offset = the distance between column atoms (64 rows x 128 bytes), stride byte
// offset = between 8-row groups of k (1024 bytes).
__device__ __forceinline__ uint64_t wgmma_desc_mn(uint32_t smem_addr) {
  return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | ((uint64_t)((kBK * 128) >> 4) << 16) | ((uint64_t)64 << 32) |
         ((uint64_t)1 << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
template <int R>
__device__ __forceinline__ void pin(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; i++) asm volatile("" : "+f"(d[i])::"memory");
}
#endif

// The two rows of a warp's m64nNk16 accumulators a lane holds: f(row, h) for h = 0 (row0 + lane / 4) and 1 (8
// further), rows at or past m_end skipped. row0: the warp's first row in C.
template <class F>
__device__ __forceinline__ void for_lane_rows(int64_t row0, int64_t m_end, int lane, F f) {
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int64_t row = row0 + h * 8 + (lane >> 2);
    if (row < m_end) f(row, h);
  }
}

// The gate/up epilogue of one accumulator row (h) a lane holds: J column groups of the gate product, the up
// product's J further; p.act[row, nh0 + ...] = bf16(swiglu(gate, up)) for columns below NH, and the two fp32
// products kept in p.C and p.C2 when p.C is set (p: the kernel's arguments, GemmArgs or WsArgs).
template <int J, int R, class Args>
__device__ __forceinline__ void glu_store_row(const float (&acc)[R], int64_t row, int h, int lane, int nh0, int NH,
                                              const Args& p) {
  uint16_t* arow = p.act + row * p.ldc;
#pragma unroll
  for (int j = 0; j < J; j++) {
    const int col = nh0 + j * 8 + (lane & 3) * 2;
    if (col >= NH) continue;
    const float2 g = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    const float2 u = make_float2(acc[4 * (j + J) + 2 * h], acc[4 * (j + J) + 2 * h + 1]);
    const uint32_t lo = f32_to_bf16(swiglu(g.x, u.x));
    const uint32_t hi = f32_to_bf16(swiglu(g.y, u.y));
    *reinterpret_cast<uint32_t*>(arow + col) = lo | (hi << 16);
    if (p.C) {
      *reinterpret_cast<float2*>(p.C + row * p.ldc + col) = g;
      *reinterpret_cast<float2*>(p.C2 + row * p.ldc + col) = u;
    }
  }
}

// WGM x WGN warpgroups; each owns a 64 x BNI sub-tile of the BM x BN block tile.
// BKN: B stored [k][n] (the weights of the grouped dA = dOut @ W_g; the activations of the grouped dW): each stage's
// [64][BN] tile is loaded into wgmma's MN-major layout (load_tile_mn) and read with the instruction's transpose-B
// flag. AKM: A stored [k][m] (dOut of the grouped dW), likewise with transpose-A. EPI: the grouped dW epilogue
// (kgroup schedule: kEpiRed or kEpiBulk).
template <int WGM, int WGN, int BNI, int STAGES, bool AKM, bool BKN, int SCHED, int EPI>
__global__ void __launch_bounds__(WGM* WGN * 128) gemm_wgmma_kernel(GemmArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BM = WGM * 64, BN = WGN * BNI, kThreads = WGM * WGN * 128;
  constexpr int kABytes = BM * kBK * 2, kBBytes = BN * kBK * 2, kStage = kABytes + kBBytes;
  constexpr int R = BNI / 2;  // accumulators per thread
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  const int wgm = wg / WGN, wgn = wg % WGN;
  TileLoc t;
  if (!locate_tile<BM, BN, kThreads, SCHED>(p, t)) return;
  const int64_t m0 = t.m0, K = t.K;
  const int n0 = t.n0;
  // 1024-byte aligned base (the swizzle is a function of the address bits).
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int64_t rows_left = t.m_end - m0, cols_left = (int64_t)p.N - n0;
  auto load_stage = [&](int s, int64_t kt) {
    const int64_t k0 = kt * kBK, kr = t.k_begin + k0;  // (k_begin: the kgroup schedule's first row)
    if constexpr (AKM)
      load_tile_mn<kBK, BM / 8, kThreads>(sbase + s * kStage, p.A + kr * p.lda + m0, p.lda, K - k0, rows_left, tid);
    else
      load_tile<BM, kBK / 8, kThreads>(sbase + s * kStage, p.A + m0 * p.lda + k0, p.lda, rows_left, K - k0, tid);
    if constexpr (BKN) {
      const __nv_bfloat16* src = p.k_split && kr >= p.k_split ? t.B2 + (kr - p.k_split) * p.ldb : t.B + kr * p.ldb;
      load_tile_mn<kBK, BN / 8, kThreads>(sbase + s * kStage + kABytes, src + n0, p.ldb, K - k0, cols_left, tid);
    } else if constexpr (EPI == kEpiGlu) {  // W_gate's rows over W_up's (rows 8-aligned: the swizzle is the same)
      const int64_t nh0 = n0 / 2, half_left = p.N / 2 - nh0;
      load_tile<BN / 2, kBK / 8, kThreads>(sbase + s * kStage + kABytes, t.B + nh0 * p.ldb + k0, p.ldb, half_left,
                                           K - k0, tid);
      load_tile<BN / 2, kBK / 8, kThreads>(sbase + s * kStage + kABytes + (BN / 2) * kBK * 2,
                                           t.B2 + nh0 * p.ldb + k0, p.ldb, half_left, K - k0, tid);
    } else {
      load_tile<BN, kBK / 8, kThreads>(sbase + s * kStage + kABytes, t.B + (int64_t)n0 * p.ldb + k0, p.ldb,
                                       cols_left, K - k0, tid);
    }
  };
  float acc[R];
#pragma unroll
  for (int i = 0; i < R; i++) acc[i] = 0.f;
  // Grouped rows: a warpgroup whose 64 rows all lie past its group's last row (a ~136-row expert's second 128-row
  // tile holds ~8 rows) skips its products: every row it would compute is dropped by the epilogue, and the tensor
  // cores go to the warpgroups with rows. Uniform per warpgroup, as wgmma requires.
  const bool wg_rows = m0 + wgm * 64 < t.m_end;

  const int64_t KT = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  // The main loop, with or without this warpgroup's products (two copies of the loop: a wgmma under a branch inside
  // it makes ptxas serialize them all, C7518).
  auto main_loop = [&](auto with_products) {
    for (int64_t kt = 0; kt < KT; kt++) {
      cp_async_wait<STAGES - 2>();
      fence_proxy_async();  // this thread's cp.async writes, visible to the async proxy (wgmma's operand reads)
      __syncthreads();
      const int s = (int)(kt % STAGES);
      if constexpr (decltype(with_products)::value) {
        // K-major: 64 (A) or BNI (B) rows of 128 bytes per warpgroup, a 16-wide k-slice 32 bytes further. MN-major:
        // 1 (A) or BNI / 64 (B) atoms of 64 k-rows x 128 bytes per warpgroup, a k-slice 16 rows (2048 bytes) further.
        const uint32_t a_s = sbase + s * kStage + wgm * 64 * (kBK * 2);
        const uint32_t b_s = sbase + s * kStage + kABytes + wgn * BNI * (kBK * 2);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 16; kk++) {
          const uint64_t da = AKM ? wgmma_desc_mn(a_s + kk * 2048) : wgmma_desc(a_s + kk * 32);
          const uint64_t db = BKN ? wgmma_desc_mn(b_s + kk * 2048) : wgmma_desc(b_s + kk * 32);
          if constexpr (BNI == 256)
            wgmma_m64n256<AKM ? 1 : 0, BKN ? 1 : 0>(acc, da, db);
          else if constexpr (BNI == 128)
            wgmma_m64n128<AKM ? 1 : 0, BKN ? 1 : 0>(acc, da, db);
          else
            wgmma_m64n64<AKM ? 1 : 0, BKN ? 1 : 0>(acc, da, db);
        }
        wgmma_commit();
        wgmma_wait<1>();  // k-tile kt-1's products are done: its slot may be refilled
        pin(acc);
      }
      __syncthreads();  // ... by every warpgroup
      const int64_t nk = kt + STAGES - 1;
      if (nk < KT) load_stage((int)(nk % STAGES), nk);
      cp_async_commit();
    }
    if constexpr (decltype(with_products)::value) {
      wgmma_wait<0>();
      pin(acc);
    }
  };
  if constexpr (SCHED == kRows && WGM > 1) {  // (other schedules' tiles are full but for a problem's last row tile)
    if (wg_rows)
      main_loop(std::true_type{});
    else
      main_loop(std::false_type{});
  } else {
    main_loop(std::true_type{});
  }
  cp_async_wait<0>();

  // Accumulator layout of m64nNk16: warp w of the warpgroup holds rows 16w + lane/4 (+8); register 4j + {0,1} are
  // columns 8j + 2*(lane%4) + {0,1} of the first row, 4j + {2,3} the same columns of the second.
  const int wi = warp & 3;
  if constexpr (SCHED == kKGroup && EPI == kEpiBulk) {
    // Grouped dW, bulk (see the mma.sync kernel): the tile through shared memory, one bulk reduce-add (or copy) a row.
    // bf16 dW (overwrite only): the tile rounded to bf16 in shared memory, rows of half the bytes. Rows padded by 8
    // elements either way (272 or 544 bytes: 16-byte aligned for the bulk copies, a warp's fragment stores spread
    // over the banks).
    constexpr int kPitch = BN + 8;
    __syncthreads();  // every warpgroup is done with the operand stages
    float* sc = reinterpret_cast<float*>(smem_raw + (sbase - smem_u32(smem_raw)));
    __nv_bfloat16* sh = reinterpret_cast<__nv_bfloat16*>(sc);
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = wgm * 64 + wi * 16 + h * 8 + (lane >> 2);
#pragma unroll
      for (int j = 0; j < BNI / 8; j++) {
        const int c = wgn * BNI + j * 8 + (lane & 3) * 2;
        const float2 v = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
        if (p.c_bf16)
          *reinterpret_cast<__nv_bfloat162*>(sh + r * kPitch + c) = __float22bfloat162_rn(v);
        else
          *reinterpret_cast<float2*>(sc + r * kPitch + c) = v;
      }
    }
    fence_proxy_async();
    __syncthreads();
    const int64_t rows_here = min((int64_t)BM, t.m_end - m0);
    const uint32_t esize = p.c_bf16 ? 2u : 4u;
    const uint32_t bytes = (uint32_t)min(BN, p.N - n0) * esize;
    for (int r = tid; r < rows_here; r += kThreads) {
      void* dst = reinterpret_cast<char*>(t.C) + ((m0 + r) * p.ldc + n0) * esize;
      const uint32_t src = smem_u32(sc) + (uint32_t)(r * kPitch) * esize;
      if (p.accumulate)
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                     "r"(src), "r"(bytes)
                     : "memory");
      else
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes)
                     : "memory");
    }
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  } else if constexpr (EPI == kEpiGlu) {
    static_assert(WGN == 1 && !AKM && !BKN && SCHED != kKGroup, "the gate/up epilogue is a forward one-column tile's");
    constexpr int J = BNI / 16;  // accumulator column groups of the gate half; the up half's are J further
    const int nh0 = n0 / 2, NH = p.N / 2;
    for_lane_rows(m0 + wgm * 64 + wi * 16, t.m_end, lane, [&](int64_t row, int h) {
      glu_store_row<J>(acc, row, h, lane, nh0, NH, p);
    });
  } else {
  for_lane_rows(m0 + wgm * 64 + wi * 16, t.m_end, lane, [&](int64_t row, int h) {
    float* crow = t.C + row * p.ldc;
#pragma unroll
    for (int j = 0; j < BNI / 8; j++) {
      const int col = n0 + wgn * BNI + j * 8 + (lane & 3) * 2;
      if (col >= p.N) continue;
      float2 v = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
      if (p.bias) {
        v.x += p.bias[col];
        v.y += p.bias[col + 1];
      }
      float2* dst = reinterpret_cast<float2*>(crow + col);
      if (SCHED == kKGroup && p.accumulate) {  // grouped dW, kEpiRed
        red_add2(crow + col, v);
        continue;
      }
      if (p.accumulate) {
        const float2 o = *dst;
        v.x = o.x + v.x;
        v.y = o.y + v.y;
      }
      *dst = v;
    }
  });
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Hopper grouped forward and dA, warp-specialized (sm_90a, TMA)
// ---------------------------------------------------------------------------------------------------------------
// The rows schedule's products for groups of training size: the forward (plain, or the gate/up products with SwiGLU
// in the epilogue) and the input gradient dA = dOut @ W_g. A persistent CTA per SM walks the row-tile x column-tile
// list; warpgroup 0's first thread issues TMA loads (A in 64-row boxes, only for the 64-row slices that hold rows of
// the group; W_g in one box, W_gate's and W_up's halves, or dA's three [k][n] boxes) into a ring of kWsStages stages
// guarded by mbarriers (full: the stage's bytes landed; empty: every consumer warpgroup is done reading it), and
// runs ahead into the next tile while the consumers store. Three consumer warpgroups own 64 rows each of a
// 192 x 192 tile, so that an expert of up to 192 rows is one row tile and its weights are read once (the same
// design at 128 x 256 was not faster). TMA writes the 128-byte-swizzled layout wgmma reads, and zeros past the
// matrix; rows of the next group inside a tile are computed and dropped, a warpgroup with no rows of its group skips
// its products. Each element is the same chain of 16-wide K slices as gemm_wgmma_kernel: the same bits.
// Measured on H100 against the cp.async wgmma tiles at the A2.7B expert shapes (bench/results/gemm-grouped-ws-gpu.json,
// uniform routing): forward gate+up 0.294 against 0.347 ms (192-row tile, 25) and 0.360 (128x256, 5), down 0.163
// against 0.205 / 0.216; SwiGLU form 0.318 against 0.396 (5); dA 0.290 against 0.380 (25). Skewed routing gains less
// (gate+up 0.338 against 0.366).
constexpr int kWsWgs = 3, kWsBM = 64 * kWsWgs, kWsBN = 192, kWsStages = 4, kWsARows = 64, kWsMaxGroups = 1024;
constexpr int kWsStage = (kWsBM + kWsBN) * kBK * 2, kWsSmem = kWsStages * kWsStage + 1024;

// kWsForward: C = A @ W_g^T; kWsGlu: act = swiglu(A @ W_gate_g^T, A @ W_up_g^T) (+ the two products); kWsDA: C (+)=
// dOut @ W_g with W_g read [k][n] (MN-major: three 64-column boxes a stage), W2 from reduction index k_split on.
enum WsMode { kWsForward = 0, kWsGlu = 1, kWsDA = 2 };
struct WsArgs {
  int32_t const* offsets;
  float* C;        // forward, dA: out [rows, ldc]; glu: the gate product (optional)
  float* C2;       // glu: the up product (with C)
  uint16_t* act;   // glu: bf16 swiglu(gate, up)
  int G, N, K;     // N: output columns (glu: of act, gate and up), K: the reduced length
  int64_t ldc;
  int b_rows;      // rows of one group's matrix in the B maps (forward, glu: N; dA: k_split or K)
  int k_split;     // dA: reduction indices >= k_split come from the second map (0: none)
  bool accumulate; // forward, dA: C += the product
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The operand ring's wait: the spin loop inside one asm statement (mbarrier.cuh's mbar_wait is a C++ loop around
// one try_wait). The kernel was measured with this form; with the C++ loop nvcc no longer unrolls the k-tile loops
// around it (9 waits in the PTX instead of 33), a different schedule not yet timed.
__device__ __forceinline__ void ring_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int col, int row, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(bar)
      : "memory");
}
#endif

struct WsTile {
  int g, n0;  // n0: the tile's first column (glu: of the gate | up pairs' 2N)
  int64_t m0, m_end;
};
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Tiles are slot-major (a slot: one kWsBM-row tile of one group), column tiles inner; a CTA's tiles come in
// increasing order, so its running group g only moves forward.
__device__ __forceinline__ WsTile ws_tile(int t, int tiles_n, const int* first_slot, const int32_t* offsets, int G,
                                          int& g) {
  const int slot = t / tiles_n;
  WsTile x;
  x.n0 = (t % tiles_n) * kWsBN;
  while (g + 1 < G && first_slot[g + 1] <= slot) g++;  // (empty groups own no slot)
  x.g = g;
  x.m0 = offsets[g] + (int64_t)(slot - first_slot[g]) * kWsBM;
  x.m_end = offsets[g + 1];
  return x;
}
#endif

template <int MODE>
__global__ void __launch_bounds__(128 * (kWsWgs + 1), 1)
    grouped_ws_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                      const __grid_constant__ CUtensorMap tm_b2, WsArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kABytes = kWsBM * kBK * 2, kBBytes = kWsBN * kBK * 2, kR = kWsBN / 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kWsStages], empty_bar[kWsStages];
  __shared__ int first_slot[kWsMaxGroups + 1];
  const int tid = threadIdx.x, wg = tid / 128;
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  if (tid == 0) {
    int slots = 0;
    for (int g = 0; g < p.G; g++) {
      first_slot[g] = slots;
      slots += (p.offsets[g + 1] - p.offsets[g] + kWsBM - 1) / kWsBM;
    }
    first_slot[p.G] = slots;
    for (int s = 0; s < kWsStages; s++) {
      mbar_init<1>(smem_u32(&full_bar[s]));
      mbar_init<kWsWgs>(smem_u32(&empty_bar[s]));
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  constexpr bool GLU = MODE == kWsGlu;
  const int width = GLU ? 2 * p.N : p.N;  // the tile's column space
  const int tiles_n = (width + kWsBN - 1) / kWsBN;
  const int total = first_slot[p.G] * tiles_n;
  const int KT = (p.K + kBK - 1) / kBK;

  if (wg == 0) {  // producer: one thread issues every load
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (tid != 0) return;
    int stage = 0, g = 0;
    uint32_t phase = 0;
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
      const WsTile x = ws_tile(t, tiles_n, first_slot, p.offsets, p.G, g);
      const int na = (int)min((int64_t)kWsWgs, (x.m_end - x.m0 + kWsARows - 1) / kWsARows);
      for (int kt = 0; kt < KT; kt++) {
        ring_wait(smem_u32(&empty_bar[stage]), phase ^ 1);
        const uint32_t full = smem_u32(&full_bar[stage]), dst = sbase + stage * kWsStage;
        mbar_arrive_expect_tx(full, na * kWsARows * kBK * 2 + kBBytes);
        for (int i = 0; i < na; i++)
          tma_load(dst + i * kWsARows * kBK * 2, &tm_a, kt * kBK, (int)x.m0 + i * kWsARows, full);
        if constexpr (GLU) {  // W_gate's rows over W_up's, kWsBN / 2 each
          const int row = x.g * p.b_rows + x.n0 / 2;
          tma_load(dst + kABytes, &tm_b, kt * kBK, row, full);
          tma_load(dst + kABytes + kBBytes / 2, &tm_b2, kt * kBK, row, full);
        } else if constexpr (MODE == kWsDA) {  // [64 k-rows][64 columns] atoms, side by side (wgmma_desc_mn)
          const int kr = kt * kBK;
          const bool second = p.k_split && kr >= p.k_split;
          const int row = x.g * p.b_rows + (second ? kr - p.k_split : kr);
#pragma unroll
          for (int i = 0; i < kWsBN / 64; i++)
            tma_load(dst + kABytes + i * kBK * 128, second ? &tm_b2 : &tm_b, x.n0 + i * 64, row, full);
        } else {
          tma_load(dst + kABytes, &tm_b, kt * kBK, x.g * p.b_rows + x.n0, full);
        }
        if (++stage == kWsStages) stage = 0, phase ^= 1;
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n");
  const int wgm = wg - 1, lane = tid & 31, wi = (tid / 32) & 3;
  const bool leader = (tid & 127) == 0;
  int stage = 0, g = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const WsTile x = ws_tile(t, tiles_n, first_slot, p.offsets, p.G, g);
    if (x.m0 + wgm * 64 >= x.m_end) {  // no rows of the group here: release each stage as it lands
      for (int kt = 0; kt < KT; kt++) {
        ring_wait(smem_u32(&full_bar[stage]), phase);
        if (leader) mbar_arrive(smem_u32(&empty_bar[stage]));
        if (++stage == kWsStages) stage = 0, phase ^= 1;
      }
      continue;
    }
    float acc[kR];
#pragma unroll
    for (int i = 0; i < kR; i++) acc[i] = 0.f;
    int prev = -1;
    for (int kt = 0; kt < KT; kt++) {
      ring_wait(smem_u32(&full_bar[stage]), phase);
      const uint32_t a_s = sbase + stage * kWsStage + wgm * 64 * (kBK * 2), b_s = sbase + stage * kWsStage + kABytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; kk++) {
        if constexpr (MODE == kWsDA)
          wgmma_m64n192<0, 1>(acc, wgmma_desc(a_s + kk * 32), wgmma_desc_mn(b_s + kk * 2048));
        else
          wgmma_m64n192<0, 0>(acc, wgmma_desc(a_s + kk * 32), wgmma_desc(b_s + kk * 32));
      }
      wgmma_commit();
      wgmma_wait<1>();  // k-tile kt-1's products are done: its stage may be refilled
      pin(acc);
      if (prev >= 0 && leader) mbar_arrive(smem_u32(&empty_bar[prev]));
      prev = stage;
      if (++stage == kWsStages) stage = 0, phase ^= 1;
    }
    wgmma_wait<0>();
    pin(acc);
    if (prev >= 0 && leader) mbar_arrive(smem_u32(&empty_bar[prev]));  // (none when K is 0)
    // Accumulators as gemm_wgmma_kernel's: warp wi holds rows 16 wi + lane / 4 (+ 8); register 4j + {0, 1} are
    // columns 8j + 2 (lane % 4) + {0, 1} of the first row, 4j + {2, 3} of the second.
    for_lane_rows(x.m0 + wgm * 64 + wi * 16, x.m_end, lane, [&](int64_t row, int h) {
      if constexpr (GLU) {
        glu_store_row<kWsBN / 16>(acc, row, h, lane, x.n0 / 2, p.N, p);
      } else {
        float* crow = p.C + row * p.ldc;
#pragma unroll
        for (int j = 0; j < kWsBN / 8; j++) {
          const int col = x.n0 + j * 8 + (lane & 3) * 2;
          if (col >= p.N) continue;
          float2 v = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
          float2* dst = reinterpret_cast<float2*>(crow + col);
          if (p.accumulate) {
            const float2 o = *dst;
            v.x = o.x + v.x;
            v.y = o.y + v.y;
          }
          *dst = v;
        }
      }
    });
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------

// A launch configuration: kernel, block tile, threads, dynamic shared memory.
template <int BM_, int BN_, int WARPS_M, int WARPS_N, int STAGES, int MINB = 1>
struct MmaTile {
  static constexpr int BM = BM_, BN = BN_, kThreads = WARPS_M * WARPS_N * 32;
  // (kEpiBulk stages the fp32 tile in the same memory afterwards; kEpiSmem keeps dW's tile after the stages)
  template <bool BKN, int EPI = kEpiLoad>
  static constexpr int smem() {
    constexpr int stages = STAGES * (BM + BN) * kBK * 2, tile = BM * (BN + 8) * 4;
    if constexpr (EPI == kEpiSmem) return stages + tile;
    return EPI == kEpiBulk && tile > stages ? tile : stages;
  }
  template <bool AKM, bool BKN, int SCHED, int EPI = kEpiLoad>
  static auto kernel() {
    // (kEpiLoad keeps dW's old values in registers too: it gets all the registers it wants)
    return gemm_kernel<BM, BN, WARPS_M, WARPS_N, STAGES, AKM, BKN, SCHED, EPI, EPI == kEpiLoad ? 1 : MINB>;
  }
};
template <int WGM, int WGN, int BNI, int STAGES>
struct WgmmaTile {
  static constexpr int BM = WGM * 64, BN = WGN * BNI, kThreads = WGM * WGN * 128;
  template <bool BKN, int EPI = kEpiLoad>  // stages (or the staged fp32 tile), room to align the base to 1024 bytes
  static constexpr int smem() {
    constexpr int stages = STAGES * (BM + BN) * kBK * 2, staged = EPI == kEpiBulk ? BM * (BN + 8) * 4 : 0;
    return (stages > staged ? stages : staged) + 1024;
  }
  template <bool AKM, bool BKN, int SCHED, int EPI = kEpiLoad>
  static auto kernel() {
    static_assert(SCHED != kKGroup || EPI != kEpiLoad, "the wgmma dW has the red and bulk epilogues");
    return gemm_wgmma_kernel<WGM, WGN, BNI, STAGES, AKM, BKN, SCHED, EPI>;
  }
};
// Tile ids (the benchmark hook names them): mma.sync 1-4 and 10, wgmma forward 5-9, 11, 25, 26, 30, 31, wgmma
// grouped dA 12-13.
using TileLarge = MmaTile<128, 256, 2, 4, 3>;  // 1: 64x64 warp tiles, the big dense GEMMs
using TileMid = MmaTile<128, 128, 2, 4, 4>;    // 2: 64x32 warp tiles
using TileSmall = MmaTile<64, 64, 2, 2, 4>;    // 3: tiny problems (fixtures, decode at small N)
using TileRows64 = MmaTile<64, 128, 1, 4, 4>;  // 4: 64-row tiles: less padding where groups hold ~100-200 rows
using WgLarge = WgmmaTile<2, 1, 256, 4>;       // 5: 128x256, 2 warpgroups of 64x256
using WgRows64 = WgmmaTile<1, 1, 256, 4>;      // 6: 64x256, 1 warpgroup
using WgMid = WgmmaTile<2, 1, 128, 3>;         // 7: 128x128, 3 stages (2 blocks per SM)
using WgRows64x2 = WgmmaTile<1, 2, 128, 4>;    // 8: 64x256, 2 warpgroups of 64x128 (grouped rows)
using WgLarge4 = WgmmaTile<2, 2, 128, 4>;      // 9: 128x256, 4 warpgroups of 64x128
using TileKGroup = MmaTile<64, 128, 2, 2, 2>;  // 10: 2-stage 64x128 (grouped dW: short K, several blocks per SM)
using WgSmall = WgmmaTile<1, 1, 64, 4>;        // 11: 64x64 (decode: few rows, many column tiles)
using WgDA = WgmmaTile<2, 1, 256, 4>;          // 12: 128x256, grouped dA (B MN-major)
using WgDA64 = WgmmaTile<1, 2, 128, 4>;        // 13: 64x256, grouped dA
using TileDW = MmaTile<128, 128, 2, 4, 3, 2>;  // grouped dW: 3 stages hold a ~190-row group, 2 blocks per SM
// Grouped dW ids 14-21 (mma.sync tile, epilogue): 14 64x64 red, 15 64x64 bulk, 16 128x128 load, 17 128x128 red,
// 18 128x128 bulk, 19 64x128 (4 stages) bulk, 20 128x256 bulk, 21 64x128 (2 stages) bulk; 22-24 (wgmma, sm_90a):
// 22 128x128 bulk, 23 128x256 bulk, 24 128x128 red.
using WgDW = WgmmaTile<2, 1, 128, 3>;          // 22, 24: 128x128, 2 warpgroups of 64x128
// 25, 26 (wgmma; forward and grouped dA): 192-row tiles, 3 warpgroups of 64 rows. A routed expert of ~136 rows is one
// row tile (71% of the tile's rows used, against 53% in two 128-row tiles) and reads its weights once.
using WgRows192 = WgmmaTile<3, 1, 128, 4>;     // 25: 192x128
using WgRows192W = WgmmaTile<3, 1, 256, 3>;    // 26: 192x256
using WgDWLarge = WgmmaTile<2, 1, 256, 3>;     // 23: 128x256, 2 warpgroups of 64x256
// 30, 31 (wgmma forward; the benchmark hook only: measured on H100 at the 1024-sequence decode shapes they lose to
// the automatic choice, e.g. the router 15.9 against 14.5 us, the shared gate 64.4 against 51.1 us, the routed
// gate+up 0.286 against 0.284 ms): deep pipelines for the decode step's products, where a CTA streams its operands
// with few CTAs per SM. 30: 128x128, 6 stages (one CTA per SM; a 1024-sequence
// step's routed experts make 60 x 11 = 660 tiles, 5 full waves on 132 SMs, against 2.7 waves of 128x256 tiles).
// 31: 64x64, 12 stages (the router's and the shared-expert gate's N <= 64 products: 16 CTAs at 1024 rows, each
// streaming 256 KB of activations through 4 stages before).
using WgMidDeep = WgmmaTile<2, 1, 128, 6>;     // 30
using WgSmallDeep = WgmmaTile<1, 1, 64, 12>;   // 31
// 27-29 (mma.sync, kEpiSmem): 27 128x128 (1 block per SM), 28 64x128 2x2 warps, 29 64x128 1x4 warps (2 per SM).
using TileDWSmem = MmaTile<128, 128, 2, 4, 3>;
using TileDWSmem64 = MmaTile<64, 128, 2, 2, 3, 2>;
using TileDWSmem64w = MmaTile<64, 128, 1, 4, 3, 2>;

std::atomic<int> g_tile_override{0};

// cudaFuncSetAttribute once per kernel and device (the attribute is per device; up to 64 devices tracked).
template <class Kern>
void ensure_smem(Kern k, int bytes, std::atomic<uint64_t>& done) {
  int dev = 0;
  MP_GPU_CHECK(get_device(&dev));
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if (done.load(std::memory_order_acquire) & bit) return;
  MP_GPU_CHECK(set_max_dynamic_smem(k, bytes));
  done.fetch_or(bit, std::memory_order_release);
}

// Whether the current device runs the wgmma kernel: an sm_90 device whose loaded binary for it is sm_90 code (a
// build for sm_80 alone runs its mma.sync kernels on Hopper, where the wgmma body would be empty). Cached per device.
std::atomic<bool> g_wgmma_enabled{true};
// SMs of the current device (cached per device).
int64_t device_sms() {
  static std::atomic<int> cached[64];
  int dev = 0;
  MP_GPU_CHECK(get_device(&dev));
  int n = cached[dev & 63].load(std::memory_order_relaxed);
  if (n == 0) {
    MP_GPU_CHECK(sm_count(dev, &n));
    cached[dev & 63].store(n, std::memory_order_relaxed);
  }
  return n;
}

bool wgmma_ready() {
  if (!g_wgmma_enabled.load(std::memory_order_relaxed)) return false;
  static std::atomic<uint64_t> known{0}, ready{0};
  int dev = 0;
  MP_GPU_CHECK(get_device(&dev));
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if (known.load(std::memory_order_acquire) & bit) return ready.load(std::memory_order_relaxed) & bit;
  int major = 0;
  MP_GPU_CHECK(compute_capability_major(dev, &major));
  FuncAttributes fa{};
  MP_GPU_CHECK(func_attributes(&fa, gemm_wgmma_kernel<2, 1, 256, 4, false, false, kDense, kEpiLoad>));
  // ptxVersion too: a PTX-only sm_80 build JIT-compiled on a Hopper GPU (the GPU tests' way to run the sm_80
  // paths there) reports binaryVersion 90 but holds no wgmma code.
  const bool ok = major == 9 && fa.binaryVersion >= 90 && fa.ptxVersion >= 90;
  if (ok) ready.fetch_or(bit, std::memory_order_relaxed);
  known.fetch_or(bit, std::memory_order_release);
  return ok;
}

// Whether the warp-specialized grouped kernel runs here: wgmma, and the driver's TMA descriptor encoder.
bool ws_ready() {
  if (!wgmma_ready()) return false;
  static const bool tma = [] {
    TensorMap m;
    alignas(128) static const uint16_t probe[64 * 64] = {};
    return tensor_map_bf16(&m, probe, 64, 64, 64, 64) == kSuccess;
  }();
  return tma;
}

// The warp-specialized grouped kernel (grouped_ws_kernel): one persistent CTA per SM. A [max_rows, p.K] (rows lda
// apart); forward and glu: W (and W2: W_up) [G * p.b_rows, p.K]; dA: W (and W2) [G * p.b_rows, p.N].
template <int MODE>
bool launch_ws(const WsArgs& p, const bf16_bits* A, int64_t lda, const bf16_bits* W, const bf16_bits* W2,
               int64_t max_rows, Stream s, const char* name) {
  // The encoder refuses operands TMA cannot read (a base not 16-byte aligned, a row stride not a multiple of 16
  // bytes): the caller then runs the cp.async tiles instead.
  TensorMap ma, mb, mb2;
  const uint64_t b_total = (uint64_t)p.G * p.b_rows;
  const bool da = MODE == kWsDA;
  const uint64_t b_cols = da ? (uint64_t)p.N : (uint64_t)p.K;
  const uint32_t b_box = da ? kBK : MODE == kWsGlu ? kWsBN / 2 : kWsBN;
  if (tensor_map_bf16(&ma, A, (uint64_t)max_rows, (uint64_t)p.K, (uint64_t)lda, kWsARows) != kSuccess ||
      tensor_map_bf16(&mb, W, b_total, b_cols, b_cols, b_box) != kSuccess)
    return false;
  mb2 = mb;
  if (W2 && tensor_map_bf16(&mb2, W2, b_total, b_cols, b_cols, b_box) != kSuccess) return false;
  auto kern = grouped_ws_kernel<MODE>;
  static std::atomic<uint64_t> done{0};
  ensure_smem(kern, kWsSmem, done);
  kern<<<(unsigned)device_sms(), 128 * (kWsWgs + 1), kWsSmem, s>>>(ma, mb, mb2, p);
  MP_GPU_CHECK_LAUNCH(name);
  return true;
}

template <class T, bool AKM, bool BKN, int SCHED, int EPI = kEpiLoad>
void launch(const GemmArgs& a0, int64_t rows_for_grid, int groups_z, Stream s, const char* name) {
  GemmArgs a = a0;
  auto kern = T::template kernel<AKM, BKN, SCHED, EPI>();
  static std::atomic<uint64_t> done{0};
  constexpr int smem = T::template smem<BKN, EPI>();
  static_assert(smem <= 227 * 1024, "tile exceeds the shared memory of a block");
  ensure_smem(kern, smem, done);
  a.tiles_n = (a.N + T::BN - 1) / T::BN;
  int64_t tiles_m = (rows_for_grid + T::BM - 1) / T::BM;
  if (SCHED == kRows) tiles_m += a.G;  // each group may end in a partial tile
  const int64_t blocks = tiles_m * a.tiles_n;
  MP_CHECK_ARG(blocks < (int64_t{1} << 31), std::string(name) + ": problem too large for one launch");
  if (blocks == 0) return;
  a.tiles_m = (int)tiles_m;
  dim3 grid((unsigned)blocks, 1, (unsigned)groups_z);
  kern<<<grid, T::kThreads, smem, s>>>(a);
  MP_GPU_CHECK_LAUNCH(name);
}

bool aligned(const void* p, size_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

void check_operand(const void* p, const char* fn, const char* what) {
  MP_CHECK_ARG(p != nullptr, std::string(fn) + ": " + what + " is null");
  MP_CHECK_ARG(aligned(p, 16), std::string(fn) + ": " + what + " must be 16-byte aligned");
}

void check_dims(const char* fn, int64_t M, int N, int K) {
  MP_CHECK_ARG(M >= 0, std::string(fn) + ": M must be >= 0 (got " + std::to_string(M) + ")");
  MP_CHECK_ARG(N > 0 && N % 8 == 0, std::string(fn) + ": N must be a positive multiple of 8 (got " + std::to_string(N) + ")");
  MP_CHECK_ARG(K > 0 && K % 8 == 0, std::string(fn) + ": K must be a positive multiple of 8 (got " + std::to_string(K) + ")");
}

void check_groups(const char* fn, const int32_t* offsets, int G, int64_t max_rows) {
  MP_CHECK_ARG(offsets != nullptr, std::string(fn) + ": offsets is null");
  MP_CHECK_ARG(aligned(offsets, 4), std::string(fn) + ": offsets must be 4-byte aligned");
  MP_CHECK_ARG(G > 0 && G < 65536, std::string(fn) + ": G must be in [1, 65535] (got " + std::to_string(G) + ")");
  MP_CHECK_ARG(max_rows >= 0 && max_rows < (int64_t{1} << 31),
               std::string(fn) + ": max_rows must be in [0, 2^31) (got " + std::to_string(max_rows) + ")");
}

// Forward tile (dense and grouped). The instruction family fixes the bits of each 16-wide slice product, so every
// forward call on a device uses one family: wgmma where wgmma_ready(), else mma.sync. Within a family any tile gives
// the same bits (see the top of the file); the choice only sets speed. A forced tile (benchmark hook) of the wgmma
// family falls back to the automatic choice where wgmma is not available.
int forward_tile(int64_t M, int N, bool grouped, int groups = 1) {
  const int o = g_tile_override.load(std::memory_order_relaxed);
  const bool wg = wgmma_ready();
  const bool wg_id = (o >= 5 && o <= 9) || o == 11 || o == 25 || o == 26 || o == 30 || o == 31;
  if (o == 40 && grouped && groups <= kWsMaxGroups && ws_ready()) return o;
  if (o && (o <= 11 || wg_id) && (!wg_id || wg)) return o;  // (others: grouped backward ids)
  if (wg) {
    // Measured on H100 (bench/results/gemm-gpu.json): 128x256 leads for every training shape, grouped included
    // (its half-empty last tile per expert costs less than 64-row tiles' extra operand traffic); 64x64 for decode.
    // Groups of more than 64 rows on average: the warp-specialized 192 x 192 kernel (40) where TMA is available.
    if (grouped) return M <= (int64_t)64 * groups ? 8 : groups <= kWsMaxGroups && ws_ready() ? 40 : 5;
    // Smaller tiles where 128x256 ones would leave SMs idle: 64x64 for the router (N <= 64) and the decode steps'
    // skinny products (128 rows x N 2048 is 8 large tiles on 132 SMs), 128x128 between (1024 rows x N 2048).
    // Measured on H100 with test/gpu/decode-profile.gpu.ts (forced tiles) and bench/train-gpu.sh: 128 rows x 4
    // layers 4.37 -> 3.51 ms (the 24-layer rollout at 128 sequences 6.8k -> 8.8k tok/s); 1024 rows 7.60 -> 7.35 ms,
    // where 64x64 tiles would lose it in the LM head; the training shapes (4x512 rows) keep 128x256, which 64x64
    // tiles made 3% slower.
    const int64_t large_tiles = ((M + 127) / 128) * ((N + 255) / 256);
    if (M <= 64 || N <= 64 || large_tiles < 64) return 11;
    // 128x256 unless 128x128 tiles fill the SMs' waves better by more than what they lose per tile (~13%: 451
    // against 512 TFLOP/s at 2048 x 2048 x 2048, one full wave either way). At 1024 rows x N 5632 (the rollout's
    // shared expert at 1024 sequences) 128x256 tiles make 1.33 waves (67% filled), 128x128 ones 2.67 (89%): 398 ->
    // 451 TFLOP/s (bench/gemm-gpu.sh --tiles, H100).
    const int64_t small_tiles = ((M + 127) / 128) * ((N + 127) / 128);
    const int64_t sms = device_sms();
    auto filled = [&](int64_t t) { return (double)t / (double)(((t + sms - 1) / sms) * sms); };
    return 0.87 * filled(small_tiles) > filled(large_tiles) ? 7 : 5;
  }
  if (M <= 64 || N <= 64) return 3;
  if (grouped) return 2;
  const int64_t big_tiles = ((M + 127) / 128) * ((N + 255) / 256);
  return big_tiles >= 132 ? 1 : 2;
}

// Grouped backward tiles, measured on H100 at the A2.7B expert shapes (bench/results/gemm-gpu.json; 60 experts,
// 8192 rows, uniform ~136 rows per expert or skewed 29-1777):
//   dA: the 192-row wgmma tile (25) when groups average <= 256 rows (a ~136-row expert is one row tile): 244-277
//       TFLOP/s uniform, against 194-218 for the mma.sync 64x128 tile (4) that served before; skewed 198-222
//       (128x256, 12: 212-249), so groups averaging more rows take 12. Where TMA is available and groups average
//       more than 64 rows, the warp-specialized 192 x 192 kernel (41) instead: 282-326 uniform, 255-291 skewed,
//       against 225-273 / 209-232 for 25 in the same run (bench/results/gemm-grouped-ws-gpu.json).
//   dW (+=): every variant is bound by dW's fp32 read-modify-write (692 MB read and written per projection; a plain
//       device copy of those bytes runs at 3.0 TB/s = 103 TFLOP/s-equivalent). The register-prefetch 128x128 tile
//       (16): 79-82 uniform, 77-78 skewed; the previous 64x64 tile (3): 77-79 / 74-75; dW's tile in shared memory
//       (28, 29): 79-83 / 84-86. L2 reductions (red, bulk reduce-add: 58-75) lose: the read-modify-write then
//       happens at the L2 slices, which do not keep up with DRAM.
//   dW (overwrite): the wgmma 128x128 tile with bulk row copies (22): 149-169, against a 221 memset floor. (A dW
//       form of the warp-specialized kernel, C_g tiles with both operands read MN-major, hung on H100 at 60 experts
//       x 2816 x 2048 with +=, so it is not in the tree.)
// Ids of other kernels fall back to the automatic choice.
int backward_tile(int64_t N, bool kgroup, bool accumulate = true, int64_t rows_per_group = 0) {
  const int o = g_tile_override.load(std::memory_order_relaxed);
  const bool wg = wgmma_ready();
  if ((o >= 1 && o <= 4) || o == 10) return o;
  if (!kgroup && (o == 12 || o == 13 || o == 25 || o == 26) && wg) return o;
  if (!kgroup && o == 41 && ws_ready()) return o;
  if (kgroup && ((o >= 14 && o <= 21) || (o >= 27 && o <= 29))) return o;
  if (kgroup && o >= 22 && o <= 24 && wg) return o;
  if (kgroup) return accumulate ? 16 : (wg ? 22 : 18);
  if (N <= 64) return 3;
  if (wg) return rows_per_group <= 256 ? (rows_per_group > 64 && ws_ready() ? 41 : 25) : 12;
  return 4;
}

// The bulk dW epilogue needs 16-byte aligned rows (K % 8 == 0 gives 32-byte row pitches; dW itself must be 16-byte
// aligned): otherwise the red.global epilogue of the same tile, which gives the same bits.
int dw_fallback(int tile, const float* dW) {
  if (reinterpret_cast<uintptr_t>(dW) % 16 == 0) return tile;
  if (tile == 15) return 14;
  if (tile >= 18 && tile <= 21) return 17;
  if (tile == 22 || tile == 23) return 24;
  if (tile >= 27 && tile <= 29) return 16;
  return tile;
}

template <bool AKM, bool BKN, int SCHED>
void launch_any(int tile, const GemmArgs& a, int64_t rows_for_grid, int groups_z, Stream s, const char* name) {
  switch (tile) {
    case 1: launch<TileLarge, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
    case 2: launch<TileMid, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
    case 4: launch<TileRows64, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
    case 10: launch<TileKGroup, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
    case 14:
    case 15:
    case 16:
    case 17:
    case 18:
    case 19:
    case 20:
    case 21:
    case 22:
    case 23:
    case 24:
    case 27:
    case 28:
    case 29:
      if constexpr (SCHED == kKGroup) {
        if (tile == 14) launch<TileSmall, AKM, BKN, SCHED, kEpiRed>(a, rows_for_grid, groups_z, s, name);
        if (tile == 15) launch<TileSmall, AKM, BKN, SCHED, kEpiBulk>(a, rows_for_grid, groups_z, s, name);
        if (tile == 16) launch<TileDW, AKM, BKN, SCHED, kEpiLoad>(a, rows_for_grid, groups_z, s, name);
        if (tile == 17) launch<TileDW, AKM, BKN, SCHED, kEpiRed>(a, rows_for_grid, groups_z, s, name);
        if (tile == 18) launch<TileDW, AKM, BKN, SCHED, kEpiBulk>(a, rows_for_grid, groups_z, s, name);
        if (tile == 19) launch<TileRows64, AKM, BKN, SCHED, kEpiBulk>(a, rows_for_grid, groups_z, s, name);
        if (tile == 20) launch<TileLarge, AKM, BKN, SCHED, kEpiBulk>(a, rows_for_grid, groups_z, s, name);
        if (tile == 21) launch<TileKGroup, AKM, BKN, SCHED, kEpiBulk>(a, rows_for_grid, groups_z, s, name);
        if (tile == 22) launch<WgDW, AKM, BKN, SCHED, kEpiBulk>(a, rows_for_grid, groups_z, s, name);
        if (tile == 23) launch<WgDWLarge, AKM, BKN, SCHED, kEpiBulk>(a, rows_for_grid, groups_z, s, name);
        if (tile == 24) launch<WgDW, AKM, BKN, SCHED, kEpiRed>(a, rows_for_grid, groups_z, s, name);
        if (tile == 27) launch<TileDWSmem, AKM, BKN, SCHED, kEpiSmem>(a, rows_for_grid, groups_z, s, name);
        if (tile == 28) launch<TileDWSmem64, AKM, BKN, SCHED, kEpiSmem>(a, rows_for_grid, groups_z, s, name);
        if (tile == 29) launch<TileDWSmem64w, AKM, BKN, SCHED, kEpiSmem>(a, rows_for_grid, groups_z, s, name);
      } else {
        MP_CHECK_INTERNAL(false, "grouped dW tile asked for another GEMM");
      }
      break;
    case 5:
    case 6:
    case 7:
    case 8:
    case 9:
    case 11:
    case 30:
    case 31:
      if constexpr (!AKM && !BKN && SCHED != kKGroup) {
        if (tile == 11) launch<WgSmall, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 30) launch<WgMidDeep, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 31) launch<WgSmallDeep, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 5) launch<WgLarge, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 6) launch<WgRows64, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 7) launch<WgMid, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 8) launch<WgRows64x2, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 9) launch<WgLarge4, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
      } else {
        MP_CHECK_INTERNAL(false, "wgmma tile asked for a transposed-operand GEMM");
      }
      break;
    case 25:
    case 26:
      if constexpr (!AKM && SCHED != kKGroup && (!BKN || SCHED == kRows)) {
        if (tile == 25) launch<WgRows192, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 26) launch<WgRows192W, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
      } else {
        MP_CHECK_INTERNAL(false, "192-row wgmma tile asked for another GEMM");
      }
      break;
    case 12:
    case 13:
      if constexpr (!AKM && BKN && SCHED == kRows) {
        if (tile == 12) launch<WgDA, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
        if (tile == 13) launch<WgDA64, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name);
      } else {
        MP_CHECK_INTERNAL(false, "wgmma dA tile asked for another GEMM");
      }
      break;
    default: launch<TileSmall, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
  }
}

// The gate/up GEMM's launch: the forward tile chosen for its 2N columns, among the wgmma tiles of one warpgroup
// column (the others map to the one-column tile of their rows).
template <int SCHED>
void launch_glu(int tile, const GemmArgs& a, int64_t rows_for_grid, Stream s, const char* name) {
  switch (tile) {
    case 6:
    case 8: launch<WgRows64, false, false, SCHED, kEpiGlu>(a, rows_for_grid, 1, s, name); break;
    case 7:
    case 25:
    case 30:  // (its 6-stage form with this epilogue: ptxas serializes the wgmma, C7515)
      launch<WgMid, false, false, SCHED, kEpiGlu>(a, rows_for_grid, 1, s, name);
      break;
    case 11:
    case 31: launch<WgSmall, false, false, SCHED, kEpiGlu>(a, rows_for_grid, 1, s, name); break;
    default: launch<WgLarge, false, false, SCHED, kEpiGlu>(a, rows_for_grid, 1, s, name); break;
  }
}

const __nv_bfloat16* bf(const bf16_bits* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

// dbias[N] (+= when accumulate, else =) column sums of dOut[M,N] (N % 8 == 0, rows 16-byte aligned). A block owns
// 16 columns, one 32-byte sector of each row: 256 threads = 128 row lanes x 2 halves of 8 columns, one 16-byte load
// per row, eight rows' loads in flight. The lanes' sums are then added in a fixed order (run to run identical).
// (It had 32 columns x 8 lanes a block: 64 blocks for N = 2048 left half the SMs idle, ~21 us a call on H100.)
__global__ void __launch_bounds__(256) bias_grad_kernel(float* dbias, const uint4* dout, int64_t M, int N,
                                                        bool accumulate) {
  __shared__ float part[128][17];
  const int lane = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int col = blockIdx.x * 16 + half * 8;  // this thread's first column
  const int64_t ld = N / 8;                    // row stride in 16-byte chunks
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  auto add_row = [&](const uint4& v) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      s[2 * i] += __uint_as_float(w[i] << 16);
      s[2 * i + 1] += __uint_as_float(w[i] & 0xffff0000u);
    }
  };
  if (col < N) {
    const uint4* p = dout + col / 8;
    int64_t r = lane;
    for (; r + 7 * 128 < M; r += 8 * 128) {
      uint4 v[8];
#pragma unroll
      for (int u = 0; u < 8; u++) v[u] = p[(r + 128 * u) * ld];
#pragma unroll
      for (int u = 0; u < 8; u++) add_row(v[u]);
    }
    for (; r < M; r += 128) add_row(p[r * ld]);
  }
#pragma unroll
  for (int i = 0; i < 8; i++) part[lane][half * 8 + i] = s[i];
  __syncthreads();
  // 16 threads a column: each adds 8 lanes in order, then one adds the 16 results in order.
  const int c = threadIdx.x & 15, g = threadIdx.x >> 4;
  float t = 0.f;
#pragma unroll
  for (int i = 0; i < 8; i++) t += part[g * 8 + i][c];
  __syncthreads();
  part[g][c] = t;
  __syncthreads();
  if (threadIdx.x < 16 && blockIdx.x * 16 + threadIdx.x < N) {
    float u = 0.f;
#pragma unroll
    for (int i = 0; i < 16; i++) u += part[i][threadIdx.x];
    float* d = dbias + blockIdx.x * 16 + threadIdx.x;
    *d = accumulate ? *d + u : u;
  }
}

#ifdef MOEPILOT_WITH_CUBLASLT
// ---------------------------------------------------------------------------------------------------------------
// cuBLASLt (dense backward)
// ---------------------------------------------------------------------------------------------------------------

void lt_check(cublasStatus_t st, const char* what, const char* file, int line) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  throw Error(st == CUBLAS_STATUS_ALLOC_FAILED ? ErrorCode::OutOfMemory : ErrorCode::Internal,
              std::string(what) + " failed: cublas status " + std::to_string((int)st) + " (" + file + ":" +
                  std::to_string(line) + ")");
}
#define MP_LT_CHECK(call) lt_check((call), #call, __FILE__, __LINE__)

constexpr size_t kWorkspace = 32u << 20;

// m, n, k, ldd, transa, transb, beta != 0, bias, split-K masked off, bf16 D
using LtKey = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, bool, bool, bool, bool>;

struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  void destroy() {
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  // One workspace per stream: some algorithms keep state there (a few bytes that a memset queued before the kernel
  // resets, e.g. a tile counter), so two products in flight on different streams (the training forward's q, k
  // and v) must not share one.
  std::map<Stream, void*> workspaces;
  void* workspace(Stream s) {
    void*& w = workspaces[s];
    if (!w) MP_GPU_CHECK(malloc_device(&w, kWorkspace));
    return w;
  }
  // Descriptors and the heuristic's algorithm per call shape (LtKey), made once: a call is then one cublasLtMatmul.
  // (Made per call they held the host up enough that, at the start of a training pass, before the host is ahead of
  // the device, the GPU sat idle 0.15 ms before layer 0's q, k and v products: CUPTI trace on H100.)
  std::map<LtKey, LtPlan> plans;
};
std::mutex g_lt_mu;
std::map<int, LtDevice> g_lt;

LtDevice& lt_device() {
  int dev = 0;
  MP_GPU_CHECK(get_device(&dev));
  LtDevice& d = g_lt[dev];
  if (!d.handle) MP_LT_CHECK(cublasLtCreate(&d.handle));
  return d;
}

// One cuBLASLt product, column-major: D[m,n] (=, or += when beta is 1) op(A)[m,k] @ op(B)[k,n] (+ bias[m] per
// column). op(A) is A [m,k] (lda = m) or, transposed, A stored [k,m] (lda = k); op(B) is B [k,n] (ldb = k) or,
// transposed, B stored [n,k] (ldb = n). bf16 operands, fp32 C/D and compute. `invariant` masks every split-K
// reduction scheme off (see lt_forward). Returns false when the heuristic has no algorithm (only asked with
// `optional`; otherwise that throws).
struct LtCall {
  void* D;
  int64_t ldd;
  const bf16_bits* A;
  bool transa;
  const bf16_bits* B;
  bool transb;
  int64_t m, n, k;
  float beta;
  const float* bias;
  bool invariant;
  const float* C = nullptr;  // beta's source when not D (same layout)
  bool d_bf16 = false;       // D (and C) bf16: the fp32 result rounded once (beta 0 only)
};

bool lt_run(const LtCall& c, Stream s, bool optional = false) {
  std::lock_guard<std::mutex> lock(g_lt_mu);
  LtDevice& d = lt_device();
  const LtKey key{c.m, c.n, c.k, c.ldd, c.transa, c.transb, c.beta != 0.f, c.bias != nullptr, c.invariant, c.d_bf16};
  auto it = d.plans.find(key);
  if (it == d.plans.end()) {
    LtPlan p;
    cublasLtMatmulPreference_t pref = nullptr;
    try {
      MP_LT_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t ta = c.transa ? CUBLAS_OP_T : CUBLAS_OP_N, tb = c.transb ? CUBLAS_OP_T : CUBLAS_OP_N;
      MP_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
      MP_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
      if (c.bias) {
        const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
        MP_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
        MP_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c.bias, sizeof(c.bias)));
      }
      if (c.transa)
        MP_LT_CHECK(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_16BF, c.k, c.m, c.k));
      else
        MP_LT_CHECK(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_16BF, c.m, c.k, c.m));
      if (c.transb)
        MP_LT_CHECK(cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_16BF, c.n, c.k, c.n));
      else
        MP_LT_CHECK(cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_16BF, c.k, c.n, c.k));
      MP_LT_CHECK(cublasLtMatrixLayoutCreate(&p.lc, c.d_bf16 ? CUDA_R_16BF : CUDA_R_32F, c.m, c.n, c.ldd));
      MP_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      const size_t ws = kWorkspace;
      MP_LT_CHECK(
          cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
      if (c.invariant) {
        const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
        MP_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &none,
                                                         sizeof(none)));
      }
      cublasLtMatmulHeuristicResult_t res{};
      int found = 0;
      const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(d.handle, p.op, p.la, p.lb, p.lc, p.lc, pref, 1, &res,
                                                               &found);
      cublasLtMatmulPreferenceDestroy(pref);
      pref = nullptr;
      if (optional && (st != CUBLAS_STATUS_SUCCESS || found == 0)) {
        p.destroy();
        return false;
      }
      MP_LT_CHECK(st);
      MP_CHECK_INTERNAL(found > 0, "cuBLASLt has no algorithm for this bf16 -> fp32 GEMM");
      p.algo = res.algo;
    } catch (...) {
      if (pref) cublasLtMatmulPreferenceDestroy(pref);
      p.destroy();
      throw;
    }
    it = d.plans.emplace(key, p).first;
  }
  LtPlan& p = it->second;
  if (c.bias)  // (the plan is this shape's; the bias is this call's)
    MP_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c.bias, sizeof(c.bias)));
  const float alpha = 1.f;
  const void* Cp = c.C ? static_cast<const void*>(c.C) : c.D;
  MP_LT_CHECK(cublasLtMatmul(d.handle, p.op, &alpha, c.A, p.la, c.B, p.lb, &c.beta, Cp, p.lc, c.D, p.lc,
                             &p.algo, d.workspace(s), kWorkspace, s));
  return true;
}

// Column-major D[m,n] (= or +=) A[m,k] @ op(B)[k,n]; B is [n,k] with ldb = n when transb, else [k,n] with ldb = k.
void lt_matmul(float* D, const bf16_bits* A, const bf16_bits* B, int64_t m, int64_t n, int64_t k, bool transb,
               float beta, Stream s) {
  lt_run(LtCall{D, m, A, false, B, transb, m, n, k, beta, nullptr, false}, s);
}

// Forward GEMMs on cuBLASLt. Row-major out[M,N] = A[M,K] @ W[N,K]^T is column-major out^T[N,M] = op(W) @ A^T, W
// stored [N][K] and transposed, A^T stored [M][K]. With every split-K reduction scheme masked off, each output
// element is one fp32 chain of 16-wide K-slice products in increasing order, started at 0: the chain of this file's
// kernels. Measured on H100 (cuBLASLt 13.0): the heuristic's eight best algorithms at each of ten shapes (M 5 to
// 2048, N 2048 to 151936, K 2048 and 5632) gave the own kernel's bits at every element, and ran at 620-770 TFLOP/s
// where the own kernel ran at 500-580 (the LM head's 2048 x 151936 x 2048: 1.66-1.83 against 2.20 ms). Unmasked,
// the heuristic picked split-K at 37 x 2048 x 5632 and 99% of the elements differed. Bias: alpha * acc + bias, one
// rounding, as the own epilogue's acc + bias; += (beta 1): acc + old, as the own one's. With both, the own kernel
// adds old + (acc + bias) and cuBLASLt (acc + old) + bias: such calls stay on the own kernel.
// lt_forward_checked() repeats the comparison on each device before its first use.
// resid (with accumulate): the old values come from resid instead of out (the same epilogue arithmetic).
bool lt_forward(float* out, const bf16_bits* A, const bf16_bits* W, const float* bias, int64_t M, int N, int K,
                bool accumulate, int64_t ldc, Stream s, const float* resid = nullptr) {
  return lt_run(LtCall{out, ldc, W, true, A, false, N, M, K, accumulate ? 1.f : 0.f, bias, true, resid}, s, true);
}
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------------------------

namespace {
// The forward's own kernel with gemm_forward's arguments (checked by the caller).
void own_forward(float* out, const bf16_bits* A, const bf16_bits* W, const float* bias, int64_t M, int N, int K,
                 bool accumulate, Stream s, int64_t ldc) {
  GemmArgs a{};
  a.A = bf(A);
  a.B = bf(W);
  a.C = out;
  a.bias = bias;
  a.M = M;
  a.N = N;
  a.K = K;
  a.lda = K;
  a.ldb = K;
  a.ldc = ldc;
  a.G = 1;
  a.accumulate = accumulate;
  launch_any<false, false, kDense>(forward_tile(M, N, false), a, M, 1, s, "gemm_forward kernel");
}

}  // namespace

#ifdef MOEPILOT_WITH_CUBLASLT
namespace {
__global__ void probe_fill_kernel(uint16_t* bf, float* f32, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = ((uint32_t)i ^ seed) * 2654435761u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    // A sign, an exponent from 2^-4 to 2^2 and 7 mantissa bits: bf16 values of mixed magnitudes.
    const uint16_t v = (uint16_t)((h & 0x8000u) | ((123u + (h >> 8) % 7u) << 7) | (h & 0x7fu));
    if (bf) bf[i] = v;
    if (f32) f32[i] = __uint_as_float((uint32_t)v << 16);
  }
}

__global__ void probe_count_kernel(unsigned* differ, const float* a, const float* b, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    if (__float_as_uint(a[i]) != __float_as_uint(b[i])) atomicAdd(differ, 1u);
}

// Rows from which a forward call goes to cuBLASLt: the training passes and prefills. Decode steps (fewer rows,
// captured into graphs, where the own kernels are tuned) keep the own kernel.
constexpr int64_t kLtForwardMinRows = 1024;
std::atomic<bool> g_lt_forward_enabled{true};

// Whether cuBLASLt's forward gives the own kernel's bits on the current device: checked once per device on two
// products (bias and +=; K = 2056 has a partial last K tile), as measured across shapes in lt_forward's note.
// A device where any element differs keeps the own kernel (and says so once on stderr).
bool lt_forward_checked(Stream s) {
  static std::atomic<uint64_t> known{0}, good{0};
  int dev = 0;
  MP_GPU_CHECK(get_device(&dev));
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if (known.load(std::memory_order_acquire) & bit) return good.load(std::memory_order_relaxed) & bit;
  constexpr int64_t M = kLtForwardMinRows;
  constexpr int N = 392, K = 2056;
  const size_t nA = (size_t)M * K, nW = (size_t)N * K, nC = (size_t)M * N;
  void* mem = nullptr;
  const size_t bytes = (nA + nW) * 2 + (2 * nC + N) * 4 + 16;
  MP_GPU_CHECK(malloc_device(&mem, bytes));
  bool ok = false;
  try {
    auto* A = static_cast<uint16_t*>(mem);
    uint16_t* W = A + nA;
    auto* own = reinterpret_cast<float*>(W + nW);
    float* lt = own + nC;
    float* bias = lt + nC;
    auto* differ = reinterpret_cast<unsigned*>(bias + N);
    probe_fill_kernel<<<264, 256, 0, s>>>(A, nullptr, nA, 1u);
    probe_fill_kernel<<<264, 256, 0, s>>>(W, nullptr, nW, 2u);
    probe_fill_kernel<<<8, 256, 0, s>>>(nullptr, bias, N, 3u);
    MP_GPU_CHECK(memset_async(differ, 0, sizeof(unsigned), s));
    own_forward(own, A, W, bias, M, N, K, false, s, N);
    ok = lt_forward(lt, A, W, bias, M, N, K, false, N, s);
    probe_count_kernel<<<264, 256, 0, s>>>(differ, own, lt, nC);
    probe_fill_kernel<<<264, 256, 0, s>>>(nullptr, own, nC, 4u);
    probe_fill_kernel<<<264, 256, 0, s>>>(nullptr, lt, nC, 4u);
    own_forward(own, A, W, nullptr, M, N, K, true, s, N);
    ok = lt_forward(lt, A, W, nullptr, M, N, K, true, N, s) && ok;
    probe_count_kernel<<<264, 256, 0, s>>>(differ, own, lt, nC);
    // The residual form (gemm_forward_residual): out = resid + product, resid the += probe's starting values.
    probe_fill_kernel<<<264, 256, 0, s>>>(nullptr, own, nC, 4u);
    ok = lt_forward(lt, A, W, nullptr, M, N, K, true, N, s, own) && ok;
    own_forward(own, A, W, nullptr, M, N, K, true, s, N);
    probe_count_kernel<<<264, 256, 0, s>>>(differ, own, lt, nC);
    MP_GPU_CHECK_LAUNCH("gemm_forward (cuBLASLt check)");
    unsigned n = 0;
    MP_GPU_CHECK(memcpy_async(&n, differ, sizeof(n), s));
    MP_GPU_CHECK(stream_sync(s));
    if (ok && n != 0)
      std::fprintf(stderr, "moepilot: cuBLASLt's forward GEMM differs from the own kernel in %u elements on device %d; "
                   "the own kernel serves every forward GEMM there\n", n, dev);
    ok = ok && n == 0;
  } catch (...) {
    free_device(mem);
    throw;
  }
  MP_GPU_CHECK(free_device(mem));
  if (ok) good.fetch_or(bit, std::memory_order_relaxed);
  known.fetch_or(bit, std::memory_order_release);
  return ok;
}

bool lt_forward_read_env() {
  const char* v = std::getenv("MOEPILOT_GEMM_LT_FORWARD");
  return !(v && std::string(v) == "0");
}
}  // namespace
#endif

namespace {
void forward_any(float* out, const float* resid, const bf16_bits* A, const bf16_bits* W, const float* bias, int64_t M,
                 int N, int K, bool accumulate, Stream s, int64_t ldc) {
  const char* fn = resid ? "gemm_forward_residual" : "gemm_forward";
  check_dims(fn, M, N, K);
  if (ldc == 0) ldc = N;
  MP_CHECK_ARG(ldc == N || (ldc > N && ldc % 4 == 0),
               "gemm_forward: ldc must be N or a multiple of 4 above N, got " + std::to_string(ldc));
  if (M == 0) return;
  check_operand(A, fn, "A");
  check_operand(W, fn, "W");
  MP_CHECK_ARG(out != nullptr && aligned(out, ldc == N ? 8 : 16),
               "gemm_forward: out must be non-null and 8-byte aligned (16 with a row stride)");
  MP_CHECK_ARG(bias == nullptr || aligned(bias, 4), "gemm_forward: bias must be 4-byte aligned");
#ifdef MOEPILOT_WITH_CUBLASLT
  // Many rows, outside graph capture, with no benchmark hook forcing a kernel: cuBLASLt, whose bits are the own
  // kernel's (lt_forward). MOEPILOT_GEMM_LT_FORWARD=0 keeps the own kernel everywhere.
  static const bool env_on = lt_forward_read_env();
  const bool free_choice = g_lt_forward_enabled.load(std::memory_order_relaxed) &&
                           g_tile_override.load(std::memory_order_relaxed) == 0 &&
                           g_wgmma_enabled.load(std::memory_order_relaxed);
  if (env_on && free_choice && M >= kLtForwardMinRows && !(accumulate && bias)) {
    bool capturing = false;
    MP_GPU_CHECK(stream_is_capturing(s, &capturing));
    if (!capturing && lt_forward_checked(s) && lt_forward(out, A, W, bias, M, N, K, accumulate, ldc, s, resid))
      return;
  }
#endif
  if (resid && resid != out) MP_GPU_CHECK(memcpy_async(out, resid, (size_t)M * N * sizeof(float), s));
  own_forward(out, A, W, bias, M, N, K, accumulate, s, ldc);
}
}  // namespace

void gemm_forward(float* out, const bf16_bits* A, const bf16_bits* W, const float* bias, int64_t M, int N, int K,
                  bool accumulate, Stream s, int64_t ldc) {
  forward_any(out, nullptr, A, W, bias, M, N, K, accumulate, s, ldc);
}

void gemm_forward_residual(float* out, const float* resid, const bf16_bits* A, const bf16_bits* W, int64_t M, int N,
                           int K, Stream s) {
  MP_CHECK_ARG(resid != nullptr && aligned(resid, 8),
               "gemm_forward_residual: resid must be non-null and 8-byte aligned");
  forward_any(out, resid, A, W, nullptr, M, N, K, true, s, N);
}

void grouped_gemm_forward(float* out, const bf16_bits* A, const bf16_bits* W, const int32_t* offsets, int G,
                          int64_t max_rows, int N, int K, Stream s) {
  const char* fn = "grouped_gemm_forward";
  check_dims(fn, max_rows, N, K);
  check_groups(fn, offsets, G, max_rows);
  if (max_rows == 0) return;
  check_operand(A, fn, "A");
  check_operand(W, fn, "W");
  MP_CHECK_ARG(out != nullptr && aligned(out, 8), "grouped_gemm_forward: out must be non-null and 8-byte aligned");
  GemmArgs a{};
  a.A = bf(A);
  a.B = bf(W);
  a.C = out;
  a.offsets = offsets;
  a.N = N;
  a.K = K;
  a.lda = K;
  a.ldb = K;
  a.ldc = N;
  a.b_group_stride = (int64_t)N * K;
  a.G = G;
  const int tile = forward_tile(max_rows, N, true, G);
  if (tile == 40 && launch_ws<kWsForward>(WsArgs{offsets, out, nullptr, nullptr, G, N, K, N, N, 0, false}, A, K, W,
                                           nullptr, max_rows, s, "grouped_gemm_forward kernel (warp-specialized)"))
    return;
  launch_any<false, false, kRows>(tile == 40 ? 5 : tile, a, max_rows, 1, s, "grouped_gemm_forward kernel");
}

bool gemm_swiglu_available() { return wgmma_ready(); }

namespace {
GemmArgs swiglu_args(const char* fn, bf16_bits* act, const bf16_bits* A, const bf16_bits* Wg, const bf16_bits* Wu,
                     int N, int K, float* gate, float* up) {
  MP_CHECK_ARG(wgmma_ready(), std::string(fn) + ": needs the sm_90a build on a Hopper GPU (gemm_swiglu_available)");
  check_operand(A, fn, "A");
  check_operand(Wg, fn, "W_gate");
  check_operand(Wu, fn, "W_up");
  MP_CHECK_ARG(act != nullptr && aligned(act, 4), std::string(fn) + ": act must be non-null and 4-byte aligned");
  MP_CHECK_ARG((gate == nullptr) == (up == nullptr), std::string(fn) + ": gate and up go together (both or neither)");
  MP_CHECK_ARG(gate == nullptr || (aligned(gate, 8) && aligned(up, 8)),
               std::string(fn) + ": gate and up must be 8-byte aligned");
  GemmArgs a{};
  a.A = bf(A);
  a.B = bf(Wg);
  a.B2 = bf(Wu);
  a.act = act;
  a.C = gate;
  a.C2 = up;
  a.N = 2 * N;  // the gate and up columns side by side (see kEpiGlu)
  a.K = K;
  a.lda = K;
  a.ldb = K;
  a.ldc = N;
  return a;
}
}  // namespace

void gemm_swiglu_forward(bf16_bits* act, const bf16_bits* A, const bf16_bits* Wg, const bf16_bits* Wu, int64_t M,
                         int N, int K, Stream s, float* gate, float* up) {
  const char* fn = "gemm_swiglu_forward";
  check_dims(fn, M, N, K);
  if (M == 0) return;
  GemmArgs a = swiglu_args(fn, act, A, Wg, Wu, N, K, gate, up);
  a.M = M;
  a.G = 1;
  launch_glu<kDense>(forward_tile(M, 2 * N, false), a, M, s, "gemm_swiglu_forward kernel");
}

void grouped_gemm_swiglu_forward(bf16_bits* act, const bf16_bits* A, const bf16_bits* Wg, const bf16_bits* Wu,
                                 const int32_t* offsets, int G, int64_t max_rows, int N, int K, Stream s, float* gate,
                                 float* up) {
  const char* fn = "grouped_gemm_swiglu_forward";
  check_dims(fn, max_rows, N, K);
  check_groups(fn, offsets, G, max_rows);
  if (max_rows == 0) return;
  GemmArgs a = swiglu_args(fn, act, A, Wg, Wu, N, K, gate, up);
  a.offsets = offsets;
  a.b_group_stride = (int64_t)N * K;
  a.G = G;
  const int tile = forward_tile(max_rows, 2 * N, true, G);
  if (tile == 40 && launch_ws<kWsGlu>(WsArgs{offsets, gate, up, act, G, N, K, N, N, 0, false}, A, K, Wg, Wu, max_rows,
                                       s, "grouped_gemm_swiglu_forward kernel (warp-specialized)"))
    return;
  launch_glu<kRows>(tile == 40 ? 5 : tile, a, max_rows, s, "grouped_gemm_swiglu_forward kernel");
}

#ifndef MOEPILOT_WITH_CUBLASLT
namespace {
[[noreturn]] void no_cublaslt(const char* fn) {
  throw Error(ErrorCode::InvalidArgument,
              std::string(fn) + ": this build has no cuBLASLt (MOEPILOT_WITH_CUBLASLT unset: cublasLt.h not found at "
              "build time); the dense backward GEMMs are unavailable");
}
}  // namespace
#endif

void gemm_backward(float* dA, float* dW, float* dbias, const bf16_bits* dOut, const bf16_bits* A,
                   const bf16_bits* W, int64_t M, int N, int K, bool accumulate_dA, Stream s) {
  gemm_backward(dA, dW, dbias, dOut, A, W, M, N, K, accumulate_dA, /*accumulate_dW=*/true, s);
}

void gemm_backward(float* dA, float* dW, float* dbias, const bf16_bits* dOut, const bf16_bits* A,
                   const bf16_bits* W, int64_t M, int N, int K, bool accumulate_dA, bool accumulate_dW, Stream s) {
  const char* fn = "gemm_backward";
  check_dims(fn, M, N, K);
  if (M == 0 && accumulate_dW) return;  // nothing to add
  check_operand(dOut, fn, "dOut");
  if (dA) check_operand(W, fn, "W");
  if (dW) check_operand(A, fn, "A");
  MP_CHECK_ARG(!dA || aligned(dA, 16), "gemm_backward: dA must be 16-byte aligned");
  MP_CHECK_ARG(!dW || aligned(dW, 16), "gemm_backward: dW must be 16-byte aligned");
  MP_CHECK_ARG(!dbias || aligned(dbias, 4), "gemm_backward: dbias must be 4-byte aligned");
  if (M == 0) {  // overwrite: the product over no rows is zero
    if (dW) MP_GPU_CHECK(memset_async(dW, 0, (size_t)N * K * sizeof(float), s));
    if (dbias) MP_GPU_CHECK(memset_async(dbias, 0, (size_t)N * sizeof(float), s));
    return;
  }
  if (dbias) {
    bias_grad_kernel<<<(N + 15) / 16, 256, 0, s>>>(dbias, reinterpret_cast<const uint4*>(dOut), M, N, accumulate_dW);
    MP_GPU_CHECK_LAUNCH("gemm_backward bias_grad_kernel");
  }
  if (!dA && !dW) return;
#ifdef MOEPILOT_WITH_CUBLASLT
  // Row-major X[r][c] is column-major X^T. dA^T[K,M] = W^T[K,N] @ dOut^T[N,M]; dW^T[K,N] (+)= A^T[K,M] @ dOut[M,N].
  // Overwriting dW (beta 0) spares cuBLASLt's epilogue the read of dW's old values.
  if (dA) lt_matmul(dA, W, dOut, K, M, N, /*transb=*/false, accumulate_dA ? 1.f : 0.f, s);
  if (dW) lt_matmul(dW, A, dOut, K, N, M, /*transb=*/true, accumulate_dW ? 1.f : 0.f, s);
#else
  no_cublaslt(fn);
#endif
}

void gemm_backward_dA_bf16(bf16_bits* dA, const bf16_bits* dOut, const bf16_bits* W, int64_t M, int N, int K,
                           Stream s) {
  const char* fn = "gemm_backward_dA_bf16";
  check_dims(fn, M, N, K);
  if (M == 0) return;
  check_operand(dOut, fn, "dOut");
  check_operand(W, fn, "W");
  MP_CHECK_ARG(dA != nullptr && aligned(dA, 16), "gemm_backward_dA_bf16: dA must be non-null and 16-byte aligned");
#ifdef MOEPILOT_WITH_CUBLASLT
  lt_run(LtCall{dA, K, W, false, dOut, false, K, M, N, 0.f, nullptr, false, nullptr, /*d_bf16=*/true}, s);
#else
  no_cublaslt(fn);
#endif
}

void grouped_gemm_backward(float* dA, float* dW, const bf16_bits* dOut, const bf16_bits* A, const bf16_bits* W,
                           const int32_t* offsets, int G, int64_t max_rows, int N, int K, Stream s) {
  grouped_gemm_backward(dA, dW, dOut, A, W, offsets, G, max_rows, N, K, /*accumulate_dW=*/true, s);
}

namespace {
float* fp32_or_null(float* p) { return p; }
float* fp32_or_null(bf16_bits*) { return nullptr; }
bf16_bits* bf16_or_null(float*) { return nullptr; }
bf16_bits* bf16_or_null(bf16_bits* p) { return p; }

// Grouped dA[r,K] (=, or += when accumulate) = dOut[r, 0:N] @ W_g[N,K], dOut's rows ld_out apart. With W2 (N even,
// N / 2 a multiple of kBK): rows [N/2, N) of the reduced dimension come from W2_g, so that dA = dOut[:, :N/2] @ W_g +
// dOut[:, N/2:] @ W2_g in one fp32 chain. b_stride: elements between groups' W (and W2) matrices.
void grouped_dA(float* dA, const bf16_bits* dOut, int64_t ld_out, const bf16_bits* W, const bf16_bits* W2,
                int64_t b_stride, const int32_t* offsets, int G, int64_t max_rows, int N, int K, bool accumulate,
                Stream s) {
  GemmArgs a{};
  a.A = bf(dOut);
  a.B = bf(W);
  a.B2 = W2 ? bf(W2) : nullptr;
  a.k_split = W2 ? N / 2 : 0;
  a.C = dA;
  a.offsets = offsets;
  a.N = K;
  a.K = N;
  a.lda = ld_out;
  a.ldb = K;
  a.ldc = K;
  a.b_group_stride = b_stride;
  a.G = G;
  a.accumulate = accumulate;
  const int tile = backward_tile(K, false, true, (max_rows + G - 1) / G);
  if (tile == 41 && G <= kWsMaxGroups && (!W2 || (N / 2) % kBK == 0)) {
    const int b_rows = (int)(b_stride / K);  // one group's rows in W (and W2)
    if (launch_ws<kWsDA>(WsArgs{offsets, dA, nullptr, nullptr, G, K, N, K, b_rows, W2 ? N / 2 : 0, accumulate}, dOut,
                         ld_out, W, W2, max_rows, s, "grouped_gemm_backward dA kernel (warp-specialized)"))
      return;
  }
  launch_any<false, true, kRows>(tile == 41 ? 25 : tile, a, max_rows, 1, s, "grouped_gemm_backward dA kernel");
}
// Grouped dW_g[N,K] (+)= dOut_g^T @ A_g, dOut's rows ld_out apart (see grouped_gemm_backward); dW fp32, or bf16
// (dW16: one rounding of the fp32 sum, on the register-prefetch tile 16 or, overwriting where wgmma and 16-byte
// alignment allow, the bulk-copy tile 22).
void grouped_dW(float* dW, bf16_bits* dW16, const bf16_bits* dOut, int64_t ld_out, const bf16_bits* A,
                const int32_t* offsets, int G, int N, int K, bool accumulate_dW, Stream s) {
  void* out = dW16 ? static_cast<void*>(dW16) : static_cast<void*>(dW);
  MP_CHECK_ARG(aligned(out, dW16 ? 4 : 8), std::string("grouped_gemm_backward: dW must be ") +
                                               (dW16 ? "4" : "8") + "-byte aligned");
  GemmArgs a{};
  a.A = bf(dOut);
  a.B = bf(A);
  a.C = static_cast<float*>(out);
  a.c_bf16 = dW16 != nullptr;
  a.offsets = offsets;
  a.M = N;
  a.N = K;
  a.lda = ld_out;
  a.ldb = K;
  a.ldc = K;
  a.c_group_stride = (int64_t)N * K;
  a.G = G;
  a.accumulate = accumulate_dW;
  const int tile = dW16 ? (!accumulate_dW && wgmma_ready() && aligned(out, 16) ? 22 : 16)
                        : dw_fallback(backward_tile(std::min(N, K), true, accumulate_dW), dW);
  launch_any<true, true, kKGroup>(tile, a, N, G, s, "grouped_gemm_backward dW kernel");
}

template <class DW>
void grouped_backward(float* dA, DW* dW, const bf16_bits* dOut, const bf16_bits* A, const bf16_bits* W,
                      const int32_t* offsets, int G, int64_t max_rows, int N, int K, bool accumulate_dW, Stream s,
                      int64_t ld_out) {
  const char* fn = "grouped_gemm_backward";
  check_dims(fn, max_rows, N, K);
  if (ld_out == 0) ld_out = N;
  MP_CHECK_ARG(ld_out >= N && ld_out % 8 == 0, "grouped_gemm_backward: ld_out must be 0 or a multiple of 8 >= N");
  check_groups(fn, offsets, G, max_rows);
  if (!dA && !dW) return;
  if (max_rows == 0 && (accumulate_dW || !dW)) return;  // (overwrite with no rows: every dW_g becomes 0, below)
  if (max_rows > 0) check_operand(dOut, fn, "dOut");
  if (dA && max_rows > 0) {  // dA[r,K] = dOut[r,N] @ W_g[N,K]: reduce over N, W read [k][n]
    check_operand(W, fn, "W");
    MP_CHECK_ARG(aligned(dA, 8), "grouped_gemm_backward: dA must be 8-byte aligned");
    grouped_dA(dA, dOut, ld_out, W, nullptr, (int64_t)N * K, offsets, G, max_rows, N, K, false, s);
  }
  if (dW) {  // dW_g[N,K] (+)= dOut_g^T[N,r] @ A_g[r,K]: reduce over the group's rows, both operands read [k][.]
    if (max_rows > 0) check_operand(A, fn, "A");
    grouped_dW(fp32_or_null(dW), bf16_or_null(dW), dOut, ld_out, A, offsets, G, N, K, accumulate_dW, s);
  }
}

template <class DW>
void grouped_backward_pair(float* dA, DW* dW_gate, DW* dW_up, const bf16_bits* dGU, const bf16_bits* A,
                           const bf16_bits* W_gate, const bf16_bits* W_up, const int32_t* offsets, int G,
                           int64_t max_rows, int N, int K, bool accumulate_dW, Stream s) {
  const char* fn = "grouped_gemm_backward_pair";
  check_dims(fn, max_rows, N, K);
  check_groups(fn, offsets, G, max_rows);
  MP_CHECK_ARG((dW_gate == nullptr) == (dW_up == nullptr), "grouped_gemm_backward_pair: dW_gate and dW_up go together");
  if (!dA && !dW_gate) return;
  if (max_rows == 0 && (accumulate_dW || !dW_gate)) return;
  if (max_rows > 0) check_operand(dGU, fn, "dGU");
  if (dA && max_rows > 0) {
    check_operand(W_gate, fn, "W_gate");
    check_operand(W_up, fn, "W_up");
    MP_CHECK_ARG(aligned(dA, 8), "grouped_gemm_backward_pair: dA must be 8-byte aligned");
    const int64_t stride = (int64_t)N * K;
    if (N % kBK == 0) {  // one product over both halves
      grouped_dA(dA, dGU, 2 * N, W_gate, W_up, stride, offsets, G, max_rows, 2 * N, K, false, s);
    } else {  // a k-tile would straddle the halves: two products, the second added
      grouped_dA(dA, dGU, 2 * N, W_gate, nullptr, stride, offsets, G, max_rows, N, K, false, s);
      grouped_dA(dA, dGU + N, 2 * N, W_up, nullptr, stride, offsets, G, max_rows, N, K, true, s);
    }
  }
  if (dW_gate) {
    if (max_rows > 0) check_operand(A, fn, "A");
    // (One launch over both matrices, each tile writing to its side's, measured 0.654 against 2 x 0.317 ms with
    // uniform routing on H100, 0.566 against 2 x 0.294 skewed: not kept.)
    grouped_dW(fp32_or_null(dW_gate), bf16_or_null(dW_gate), dGU, 2 * N, A, offsets, G, N, K, accumulate_dW, s);
    grouped_dW(fp32_or_null(dW_up), bf16_or_null(dW_up), dGU + N, 2 * N, A, offsets, G, N, K, accumulate_dW, s);
  }
}
}  // namespace

void grouped_gemm_backward(float* dA, float* dW, const bf16_bits* dOut, const bf16_bits* A, const bf16_bits* W,
                           const int32_t* offsets, int G, int64_t max_rows, int N, int K, bool accumulate_dW,
                           Stream s, int64_t ld_out) {
  grouped_backward(dA, dW, dOut, A, W, offsets, G, max_rows, N, K, accumulate_dW, s, ld_out);
}
void grouped_gemm_backward(float* dA, bf16_bits* dW, const bf16_bits* dOut, const bf16_bits* A, const bf16_bits* W,
                           const int32_t* offsets, int G, int64_t max_rows, int N, int K, bool accumulate_dW,
                           Stream s, int64_t ld_out) {
  grouped_backward(dA, dW, dOut, A, W, offsets, G, max_rows, N, K, accumulate_dW, s, ld_out);
}

void grouped_gemm_backward_pair(float* dA, float* dW_gate, float* dW_up, const bf16_bits* dGU, const bf16_bits* A,
                                const bf16_bits* W_gate, const bf16_bits* W_up, const int32_t* offsets, int G,
                                int64_t max_rows, int N, int K, bool accumulate_dW, Stream s) {
  grouped_backward_pair(dA, dW_gate, dW_up, dGU, A, W_gate, W_up, offsets, G, max_rows, N, K, accumulate_dW, s);
}
void grouped_gemm_backward_pair(float* dA, bf16_bits* dW_gate, bf16_bits* dW_up, const bf16_bits* dGU,
                                const bf16_bits* A, const bf16_bits* W_gate, const bf16_bits* W_up,
                                const int32_t* offsets, int G, int64_t max_rows, int N, int K, bool accumulate_dW,
                                Stream s) {
  grouped_backward_pair(dA, dW_gate, dW_up, dGU, A, W_gate, W_up, offsets, G, max_rows, N, K, accumulate_dW, s);
}

void gemm_release() {
#ifdef MOEPILOT_WITH_CUBLASLT
  std::lock_guard<std::mutex> lock(g_lt_mu);
  int cur = 0;
  MP_GPU_CHECK(get_device(&cur));
  for (auto& [dev, d] : g_lt) {
    set_device(dev);
    for (auto& [stream, w] : d.workspaces) free_device(w);
    for (auto& [key, plan] : d.plans) plan.destroy();
    if (d.handle) cublasLtDestroy(d.handle);
  }
  g_lt.clear();
  set_device(cur);
#endif
}

// Benchmark and test hooks (gemm_bench.cuh).
void gemm_set_tile_override(int tile) { g_tile_override.store(tile, std::memory_order_relaxed); }
bool gemm_wgmma_available() { return wgmma_ready(); }
void gemm_set_wgmma_enabled(bool on) { g_wgmma_enabled.store(on, std::memory_order_relaxed); }
bool gemm_set_lt_forward_enabled(bool on) {
#ifdef MOEPILOT_WITH_CUBLASLT
  g_lt_forward_enabled.store(on, std::memory_order_relaxed);
  return true;
#else
  return false;
#endif
}
bool gemm_lt_forward_ready(Stream s) {
#ifdef MOEPILOT_WITH_CUBLASLT
  return lt_forward_read_env() && lt_forward_checked(s);
#else
  return false;
#endif
}

}  // namespace moepilot::gpu
