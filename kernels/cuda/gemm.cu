// GEMMs behind gemm.h: one tensor-core kernel template (bf16 mma.sync m16n8k16, ldmatrix, cp.async multi-stage
// pipeline, fp32 accumulators) serves the batch-invariant forward, the grouped forward and the grouped backward;
// cuBLASLt serves the dense backward.
//
// Batch invariance. Each output element is one accumulator register that starts at 0 and receives one
// m16n8k16 product per 16-wide slice of K, slices in increasing order. Which tile shape, which row of a tile,
// how many rows or groups the call has: none of it changes that chain, so the bits depend on K alone. K tails
// (K % 16 == 8) and rows or columns outside the problem are zero-filled by cp.async, and a zero product adds
// nothing. No split-K anywhere.
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
#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "cuda/gemm.h"
#include "cuda/gemm_bench.cuh"

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

struct GemmArgs {
  const __nv_bfloat16* A;
  const __nv_bfloat16* B;
  float* C;
  const float* bias;       // [N] or null
  const int32_t* offsets;  // [G+1] (rows / kgroup schedules)
  int64_t M;               // rows of C (dense, kgroup); unused by rows (offsets say)
  int N;                   // columns of C
  int64_t K;               // reduced dimension (dense, rows); kgroup: the group's row count
  int64_t lda, ldb, ldc;   // leading dimensions in elements
  int64_t b_group_stride;  // rows schedule: elements between groups' B matrices
  int64_t c_group_stride;  // kgroup schedule: elements between groups' C matrices
  int G;
  int tiles_m;             // dense / kgroup: row tiles; rows: row-tile slots
  int tiles_n;
  bool accumulate;
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
  static_assert(kChunks % THREADS == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / THREADS; i++) {
    const int idx = tid + i * THREADS;
    const int r = idx / CPR, c = idx % CPR;
    const bool ok = r < rows_valid && (int64_t)c * 8 < cols_valid;
    const __nv_bfloat16* p = ok ? src + r * ld + c * 8 : src;
    cp_async16(dst + swz(r, c, CPR), p, ok ? 16 : 0);
  }
}

// C tile BM x BN per block; WARPS_M x WARPS_N warps; STAGES-deep cp.async pipeline.
// AKM: A stored [k][m] (else [m][k]); BKN: B stored [k][n] (else [n][k]).
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool AKM, bool BKN, int SCHED>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    gemm_kernel(GemmArgs p) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  constexpr int MI = WTM / 16, NI = WTN / 8;             // mma tiles per warp
  static_assert(NI % 2 == 0, "B fragments load two n8 tiles at a time");
  constexpr int kABytes = BM * kBK * 2, kBBytes = BN * kBK * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;

  // ---- which tile, which group ----
  int64_t m0, m_end, k_begin = 0, K = p.K;
  int n0;
  const __nv_bfloat16* A = p.A;
  const __nv_bfloat16* B = p.B;
  float* C = p.C;
  if constexpr (SCHED == kDense || SCHED == kKGroup) {
    const int pid = blockIdx.x;
    const int per_band = kBand * p.tiles_n;
    const int band = pid / per_band, first = band * kBand;
    const int band_rows = min(p.tiles_m - first, kBand);
    const int in_band = pid - band * per_band;
    m0 = (int64_t)(first + in_band % band_rows) * BM;
    n0 = (in_band / band_rows) * BN;
    m_end = p.M;
    if constexpr (SCHED == kKGroup) {
      const int g = blockIdx.z;
      k_begin = p.offsets[g];
      K = p.offsets[g + 1] - k_begin;
      if (K <= 0) return;  // an empty group adds nothing to its dW
      C += (int64_t)g * p.c_group_stride;
    }
  } else {
    // Rows schedule: slot = blockIdx.x / tiles_n. Group g owns ceil(rows_g / BM) consecutive slots; a block-wide
    // scan over the offsets (in chunks of kThreads groups) finds the group of this block's slot.
    const int slot = blockIdx.x / p.tiles_n;
    n0 = (blockIdx.x % p.tiles_n) * BN;
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
    if (s_group < 0) return;  // slot past the last tile (the launch is sized by an upper bound)
    const int g = s_group;
    m0 = p.offsets[g] + (int64_t)s_first * BM;
    m_end = p.offsets[g + 1];
    B += (int64_t)g * p.b_group_stride;
  }

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
    if constexpr (BKN)
      load_tile<kBK, BN / 8, kThreads>(sB(s), B + (k_begin + k0) * p.ldb + n0, p.ldb, k_left, cols_left, tid);
    else
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
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
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

  // ---- epilogue: out (= or +=) acc (+ bias) ----
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
        if (p.bias) {
          v.x += p.bias[col];
          v.y += p.bias[col + 1];
        }
        float2* dst = reinterpret_cast<float2*>(crow + col);
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

// ---------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kSmem = STAGES * (BM + BN) * kBK * 2;
};
using TileLarge = Tile<128, 256, 2, 4, 3>;  // 64x64 warp tiles: the big dense GEMMs
using TileMid = Tile<128, 128, 2, 4, 4>;    // 64x32 warp tiles: grouped GEMMs, mid-size dense
using TileSmall = Tile<64, 64, 2, 2, 4>;    // tiny problems (fixtures, decode at small N)
using TileRows64 = Tile<64, 128, 1, 4, 4>;  // 64-row tiles: less padding where groups hold ~100-200 rows

std::atomic<int> g_tile_override{0};

// cudaFuncSetAttribute once per kernel and device (the attribute is per device; up to 64 devices tracked).
template <class Kern>
void ensure_smem(Kern k, int bytes, std::atomic<uint64_t>& done) {
  int dev = 0;
  MP_GPU_CHECK(get_device(&dev));
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if (done.load(std::memory_order_acquire) & bit) return;
  MP_GPU_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.fetch_or(bit, std::memory_order_release);
}

template <class T, bool AKM, bool BKN, int SCHED>
void launch(const GemmArgs& a0, int64_t rows_for_grid, int groups_z, Stream s, const char* name) {
  GemmArgs a = a0;
  auto kern = gemm_kernel<T::BM, T::BN, T::WARPS_M, T::WARPS_N, T::STAGES, AKM, BKN, SCHED>;
  static std::atomic<uint64_t> done{0};
  ensure_smem(kern, T::kSmem, done);
  a.tiles_n = (a.N + T::BN - 1) / T::BN;
  int64_t tiles_m = (rows_for_grid + T::BM - 1) / T::BM;
  if (SCHED == kRows) tiles_m += a.G;  // each group may end in a partial tile
  const int64_t blocks = tiles_m * a.tiles_n;
  MP_CHECK_ARG(blocks < (int64_t{1} << 31), std::string(name) + ": problem too large for one launch");
  if (blocks == 0) return;
  a.tiles_m = (int)tiles_m;
  dim3 grid((unsigned)blocks, 1, (unsigned)groups_z);
  kern<<<grid, T::kThreads, T::kSmem, s>>>(a);
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

// Tile for C[M,N] with reduction K. Any choice gives the same bits (see the top of the file); this only picks speed.
int pick_tile(int64_t M, int N) {
  const int o = g_tile_override.load(std::memory_order_relaxed);
  if (o) return o;
  if (M <= 64 || N <= 64) return 3;
  const int64_t big_tiles = ((M + 127) / 128) * ((N + 255) / 256);
  return big_tiles >= 132 ? 1 : 2;
}

template <bool AKM, bool BKN, int SCHED>
void launch_any(int tile, const GemmArgs& a, int64_t rows_for_grid, int groups_z, Stream s, const char* name) {
  switch (tile) {
    case 1: launch<TileLarge, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
    case 2: launch<TileMid, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
    case 4: launch<TileRows64, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
    default: launch<TileSmall, AKM, BKN, SCHED>(a, rows_for_grid, groups_z, s, name); break;
  }
}

const __nv_bfloat16* bf(const bf16_bits* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

// dbias[N] += column sums of dOut[M,N]: 32 columns x 8 row slices per block, slices combined in a fixed order.
__global__ void bias_grad_kernel(float* dbias, const __nv_bfloat16* dout, int64_t M, int N) {
  __shared__ float part[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < N)
    for (int64_t r = threadIdx.y; r < M; r += 8) s += __bfloat162float(dout[r * N + col]);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float t = part[0][threadIdx.x];
    for (int i = 1; i < 8; i++) t += part[i][threadIdx.x];
    dbias[col] += t;
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

struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  // Heuristic results per (m, n, k, transb, beta != 0): looked up once, so captured graphs and hot loops only
  // call cublasLtMatmul.
  std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool>, cublasLtMatmulAlgo_t> algos;
};
std::mutex g_lt_mu;
std::map<int, LtDevice> g_lt;

LtDevice& lt_device() {
  int dev = 0;
  MP_GPU_CHECK(get_device(&dev));
  LtDevice& d = g_lt[dev];
  if (!d.handle) {
    MP_LT_CHECK(cublasLtCreate(&d.handle));
    MP_GPU_CHECK(malloc_device(&d.workspace, kWorkspace));
  }
  return d;
}

// Column-major D[m,n] (= or +=) op(A)[m,k] @ op(B)[k,n]; A is never transposed here (lda = m), B is [n,k] with
// ldb = n when transb, else [k,n] with ldb = k. bf16 operands, fp32 C/D and compute.
void lt_matmul(float* D, const bf16_bits* A, const bf16_bits* B, int64_t m, int64_t n, int64_t k, bool transb,
               float beta, Stream s) {
  std::lock_guard<std::mutex> lock(g_lt_mu);
  LtDevice& d = lt_device();
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  auto cleanup = [&]() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
  };
  try {
    MP_LT_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t tn = CUBLAS_OP_N, tb = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    MP_LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tn, sizeof(tn)));
    MP_LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    MP_LT_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, m, k, m));
    if (transb)
      MP_LT_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, n, k, n));
    else
      MP_LT_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, n, k));
    MP_LT_CHECK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, m, n, m));
    const auto key = std::make_tuple(m, n, k, transb, beta != 0.f);
    auto it = d.algos.find(key);
    if (it == d.algos.end()) {
      MP_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      const size_t ws = kWorkspace;
      MP_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
      cublasLtMatmulHeuristicResult_t res{};
      int found = 0;
      MP_LT_CHECK(cublasLtMatmulAlgoGetHeuristic(d.handle, op, la, lb, lc, lc, pref, 1, &res, &found));
      MP_CHECK_INTERNAL(found > 0, "cuBLASLt has no algorithm for this bf16 -> fp32 GEMM");
      it = d.algos.emplace(key, res.algo).first;
    }
    const float alpha = 1.f;
    MP_LT_CHECK(cublasLtMatmul(d.handle, op, &alpha, A, la, B, lb, &beta, D, lc, D, lc, &it->second, d.workspace,
                               kWorkspace, s));
  } catch (...) {
    cleanup();
    throw;
  }
  cleanup();
}
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------------------------

void gemm_forward(float* out, const bf16_bits* A, const bf16_bits* W, const float* bias, int64_t M, int N, int K,
                  bool accumulate, Stream s) {
  const char* fn = "gemm_forward";
  check_dims(fn, M, N, K);
  if (M == 0) return;
  check_operand(A, fn, "A");
  check_operand(W, fn, "W");
  MP_CHECK_ARG(out != nullptr && aligned(out, 8), "gemm_forward: out must be non-null and 8-byte aligned");
  MP_CHECK_ARG(bias == nullptr || aligned(bias, 4), "gemm_forward: bias must be 4-byte aligned");
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
  a.ldc = N;
  a.G = 1;
  a.accumulate = accumulate;
  launch_any<false, false, kDense>(pick_tile(M, N), a, M, 1, s, "gemm_forward kernel");
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
  const int o = g_tile_override.load(std::memory_order_relaxed);
  launch_any<false, false, kRows>(o ? o : (N <= 64 ? 3 : 2), a, max_rows, 1, s, "grouped_gemm_forward kernel");
}

void gemm_backward(float* dA, float* dW, float* dbias, const bf16_bits* dOut, const bf16_bits* A,
                   const bf16_bits* W, int64_t M, int N, int K, bool accumulate_dA, Stream s) {
  const char* fn = "gemm_backward";
  check_dims(fn, M, N, K);
  if (M == 0) return;
  check_operand(dOut, fn, "dOut");
  if (dA) check_operand(W, fn, "W");
  if (dW) check_operand(A, fn, "A");
  MP_CHECK_ARG(!dA || aligned(dA, 16), "gemm_backward: dA must be 16-byte aligned");
  MP_CHECK_ARG(!dW || aligned(dW, 16), "gemm_backward: dW must be 16-byte aligned");
  MP_CHECK_ARG(!dbias || aligned(dbias, 4), "gemm_backward: dbias must be 4-byte aligned");
  if (dbias) {
    bias_grad_kernel<<<dim3((N + 31) / 32), dim3(32, 8), 0, s>>>(dbias, bf(dOut), M, N);
    MP_GPU_CHECK_LAUNCH("gemm_backward bias_grad_kernel");
  }
  if (!dA && !dW) return;
#ifdef MOEPILOT_WITH_CUBLASLT
  // Row-major X[r][c] is column-major X^T. dA^T[K,M] = W^T[K,N] @ dOut^T[N,M]; dW^T[K,N] += A^T[K,M] @ dOut[M,N].
  if (dA) lt_matmul(dA, W, dOut, K, M, N, /*transb=*/false, accumulate_dA ? 1.f : 0.f, s);
  if (dW) lt_matmul(dW, A, dOut, K, N, M, /*transb=*/true, 1.f, s);
#else
  throw Error(ErrorCode::InvalidArgument,
              "gemm_backward: this build has no cuBLASLt (MOEPILOT_WITH_CUBLASLT unset: cublasLt.h not found at build "
              "time); the dense backward GEMMs are unavailable");
#endif
}

void grouped_gemm_backward(float* dA, float* dW, const bf16_bits* dOut, const bf16_bits* A, const bf16_bits* W,
                           const int32_t* offsets, int G, int64_t max_rows, int N, int K, Stream s) {
  const char* fn = "grouped_gemm_backward";
  check_dims(fn, max_rows, N, K);
  check_groups(fn, offsets, G, max_rows);
  if (max_rows == 0 || (!dA && !dW)) return;
  check_operand(dOut, fn, "dOut");
  const int o = g_tile_override.load(std::memory_order_relaxed);
  if (dA) {  // dA[r,K] = dOut[r,N] @ W_g[N,K]: reduce over N, W read [k][n]
    check_operand(W, fn, "W");
    MP_CHECK_ARG(aligned(dA, 8), "grouped_gemm_backward: dA must be 8-byte aligned");
    GemmArgs a{};
    a.A = bf(dOut);
    a.B = bf(W);
    a.C = dA;
    a.offsets = offsets;
    a.N = K;
    a.K = N;
    a.lda = N;
    a.ldb = K;
    a.ldc = K;
    a.b_group_stride = (int64_t)N * K;
    a.G = G;
    launch_any<false, true, kRows>(o ? o : (K <= 64 ? 3 : 2), a, max_rows, 1, s, "grouped_gemm_backward dA kernel");
  }
  if (dW) {  // dW_g[N,K] += dOut_g^T[N,r] @ A_g[r,K]: reduce over the group's rows, both operands read [k][.]
    check_operand(A, fn, "A");
    MP_CHECK_ARG(aligned(dW, 8), "grouped_gemm_backward: dW must be 8-byte aligned");
    GemmArgs a{};
    a.A = bf(dOut);
    a.B = bf(A);
    a.C = dW;
    a.offsets = offsets;
    a.M = N;
    a.N = K;
    a.lda = N;
    a.ldb = K;
    a.ldc = K;
    a.c_group_stride = (int64_t)N * K;
    a.G = G;
    a.accumulate = true;
    launch_any<true, true, kKGroup>(o ? o : (N <= 64 || K <= 64 ? 3 : 2), a, N, G, s,
                                    "grouped_gemm_backward dW kernel");
  }
}

void gemm_release() {
#ifdef MOEPILOT_WITH_CUBLASLT
  std::lock_guard<std::mutex> lock(g_lt_mu);
  int cur = 0;
  MP_GPU_CHECK(get_device(&cur));
  for (auto& [dev, d] : g_lt) {
    set_device(dev);
    if (d.workspace) free_device(d.workspace);
    if (d.handle) cublasLtDestroy(d.handle);
  }
  g_lt.clear();
  set_device(cur);
#endif
}

// Benchmark hook (declared in gemm_bench.cuh): force one tile configuration (1 large, 2 mid, 3 small, 4 rows64;
// 0 = auto).
// Results are bitwise the same whichever tile runs; only speed changes.
void gemm_set_tile_override(int tile) { g_tile_override.store(tile, std::memory_order_relaxed); }

}  // namespace moepilot::gpu
