// Kernels behind ep_kernels.h. Row moves are memory-bound: one warp per row, 16-byte accesses,
// several loads in flight before the first store.
#include <cuda_bf16.h>

#include <algorithm>

#include <string>

#include "cuda/ep_kernels.h"

namespace moepilot::gpu {
namespace {

constexpr int kRowWarps = 8;  // warps (rows) per block in the row kernels
constexpr int kMaxBins = 12288;  // experts * chunks: the count bins fit 48 KB of shared memory

__global__ void fill_kernel(int* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = 3 * i + 1;
}

template <class T>
__global__ void sum_blocks_kernel(const T* in, T* out, int64_t n, int blocks) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    T acc = in[i];
    for (int b = 1; b < blocks; b++) acc += in[(int64_t)b * n + i];
    out[i] = acc;
  }
}

// Per-block histogram in shared memory, then one global add per non-empty bin: tens of thousands of
// entries fall on a few dozen bins, and global atomics on so few addresses serialize.
__global__ void count_kernel(const int32_t* topk, int64_t entries, int k, int experts, int epr, int64_t chunk_tokens,
                             int chunks, int32_t* counts, int32_t* bad) {
  extern __shared__ int32_t hist[];  // [experts * chunks] in the counts layout
  const int bins = experts * chunks;
  for (int i = threadIdx.x; i < bins; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  for (int64_t f = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; f < entries; f += (int64_t)gridDim.x * blockDim.x) {
    int e = topk[f];
    if (e < 0 || e >= experts) {
      *bad = 1;
      continue;
    }
    int c = (int)((f / k) / chunk_tokens);
    int d = e / epr;
    atomicAdd(&hist[(d * chunks + c) * epr + e % epr], 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += blockDim.x)
    if (hist[i]) atomicAdd(&counts[i], hist[i]);
}

// Send-buffer bases from the local counts ([d][c][le]): adj[c][e] = start of (chunk c, expert e) minus
// e's rows in chunks before c. A few hundred values: one thread, in order.
// Send-buffer bases from the local counts ([d][c][le]): adj[c][e] = start of (chunk c, expert e) minus
// e's rows in chunks before c. The block stages the counts in shared memory, then one thread walks
// them in order (a walk over global memory would wait on every load).
__global__ void adj_kernel(const int32_t* counts, int experts, int epr, int chunks, int64_t* adj) {
  extern __shared__ int32_t cnt[];
  const int bins = experts * chunks;
  for (int i = threadIdx.x; i < bins; i += blockDim.x) cnt[i] = counts[i];
  __syncthreads();
  if (threadIdx.x != 0) return;
  const int ranks = experts / epr;
  int64_t off = 0;
  for (int c = 0; c < chunks; c++)
    for (int d = 0; d < ranks; d++)
      for (int le = 0; le < epr; le++) {
        int64_t before = 0;
        for (int q = 0; q < c; q++) before += cnt[(d * chunks + q) * epr + le];
        adj[(int64_t)c * experts + d * epr + le] = off - before;
        off += cnt[(d * chunks + c) * epr + le];
      }
}

constexpr int kTile = 1024;  // entries per tile (one per thread) in the position kernels

// Pass 1: entries of each expert per tile.
__global__ void tile_count_kernel(const int32_t* topk, int64_t entries, int experts, int32_t* tile_counts) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  int64_t f = (int64_t)blockIdx.x * kTile + threadIdx.x;
  if (f < entries) {
    int e = topk[f];
    if (e >= 0 && e < experts) atomicAdd(&hist[e], 1);  // bad ids are reported by ep_count
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) tile_counts[(int64_t)blockIdx.x * experts + e] = hist[e];
}

// Pass 2: per expert, entries in earlier tiles (one thread per expert walks the tiles in order).
__global__ void tile_scan_kernel(const int32_t* tile_counts, int tiles, int experts, int32_t* tile_base) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  int32_t run = 0;
  for (int t = 0; t < tiles; t++) {
    int32_t v = tile_counts[(int64_t)t * experts + e];
    tile_base[(int64_t)t * experts + e] = run;
    run += v;
  }
}

// Pass 3: each entry's rank among the entries of its expert before it in the tile (lanes with the
// same expert in the warp, then earlier warps), plus the tile's base: the order stays (token, k).
__global__ void tile_rank_kernel(const int32_t* topk, int64_t entries, int k, int experts, int64_t chunk_tokens,
                                 const int64_t* adj, const int32_t* tile_base, int32_t* pos_of_flat,
                                 int32_t* flat_of_pos) {
  extern __shared__ int32_t warp_cnt[];  // [32 warps][experts]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < 32 * experts; i += blockDim.x) warp_cnt[i] = 0;
  __syncthreads();
  const int64_t f = (int64_t)blockIdx.x * kTile + threadIdx.x;
  int e = f < entries ? topk[f] : -1;
  const bool valid = e >= 0 && e < experts;
  if (!valid) e = -1 - lane;  // distinct sentinels: invalid lanes match nobody
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const int in_warp = __popc(peers & ((1u << lane) - 1u));
  if (valid && in_warp == 0) warp_cnt[warp * experts + e] = __popc(peers);
  __syncthreads();
  for (int x = threadIdx.x; x < experts; x += blockDim.x) {
    int32_t run = 0;
    for (int w = 0; w < 32; w++) {
      int32_t v = warp_cnt[w * experts + x];
      warp_cnt[w * experts + x] = run;
      run += v;
    }
  }
  __syncthreads();
  if (!valid) return;
  const int c = (int)((f / k) / chunk_tokens);
  const int64_t p = adj[(int64_t)c * experts + e] + tile_base[(int64_t)blockIdx.x * experts + e] +
                    warp_cnt[warp * experts + e] + in_warp;
  pos_of_flat[f] = (int32_t)p;
  flat_of_pos[p] = (int32_t)f;
}

// Copies one row of `vecs` 16-byte vectors with a warp, 4 loads in flight per lane.
__device__ __forceinline__ void copy_row(const uint4* __restrict__ src, uint4* __restrict__ dst, int vecs, int lane) {
  int j = lane;
  for (; j + 96 < vecs; j += 128) {
    uint4 a = src[j], b = src[j + 32], c = src[j + 64], d = src[j + 96];
    dst[j] = a;
    dst[j + 32] = b;
    dst[j + 64] = c;
    dst[j + 96] = d;
  }
  for (; j < vecs; j += 32) dst[j] = src[j];
}

// Row kernels run on a capped grid and stride over their rows: they leave room on every SM for
// the NCCL kernels that run beside them (chunked dispatch), which otherwise wait for a free SM.
__global__ void gather_kernel(const uint4* x, int vecs, const int32_t* flat_of_pos, int k, int64_t entries,
                              int64_t p_begin, int64_t p_end, uint4* send) {
  const int64_t stride = (int64_t)gridDim.x * kRowWarps;
  for (int64_t p = p_begin + blockIdx.x * (int64_t)kRowWarps + (threadIdx.x >> 5); p < p_end; p += stride) {
    int64_t f = flat_of_pos[p];
    if (f < 0 || f >= entries) continue;  // only with bad expert ids, which dispatch reports
    copy_row(x + (f / k) * vecs, send + p * vecs, vecs, threadIdx.x & 31);
  }
}

__global__ void copy_segments_kernel(const uint4* src, uint4* dst, int vecs, const int64_t* src_row,
                                     const int64_t* dst_row, const int64_t* first, int nseg, int64_t total) {
  const int64_t stride = (int64_t)gridDim.x * kRowWarps;
  for (int64_t r = blockIdx.x * (int64_t)kRowWarps + (threadIdx.x >> 5); r < total; r += stride) {
    // Last segment whose first row is <= r (segments may be empty).
    int lo = 0, hi = nseg - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (first[mid] <= r) lo = mid;
      else hi = mid - 1;
    }
    int64_t off = r - first[lo];
    copy_row(src + (src_row[lo] + off) * vecs, dst + (dst_row[lo] + off) * vecs, vecs, threadIdx.x & 31);
  }
}

__device__ __forceinline__ void add_bf16x8(float* acc, uint4 v, float w) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += w * f.x;
    acc[2 * i + 1] += w * f.y;
  }
}

constexpr int kMaxK = 8;  // top-k handled by the combine kernel

// One warp per token: the k row addresses and weights are read once, then each lane sums its 16-byte
// slices of the k rows (all k loads issued before the sums).
__global__ void combine_kernel(const uint4* ret, const int32_t* pos_of_flat, const float* weights, int k, int vecs,
                               int64_t t_begin, int64_t t_end, uint4* out) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = (int64_t)gridDim.x * kRowWarps;
  for (int64_t t = t_begin + blockIdx.x * (int64_t)kRowWarps + (threadIdx.x >> 5); t < t_end; t += stride) {
    const uint4* rows[kMaxK];
    float w[kMaxK];
#pragma unroll
    for (int q = 0; q < kMaxK; q++) {
      if (q < k) {
        rows[q] = ret + (int64_t)pos_of_flat[t * k + q] * vecs;
        w[q] = weights[t * k + q];
      }
    }
    for (int j = lane; j < vecs; j += 32) {
      uint4 v[kMaxK];
#pragma unroll
      for (int q = 0; q < kMaxK; q++)
        if (q < k) v[q] = rows[q][j];
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
      for (int q = 0; q < kMaxK; q++)
        if (q < k) add_bf16x8(acc, v[q], w[q]);
      uint4 o;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
      for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
      out[t * vecs + j] = o;
    }
  }
}

// ---- peer transport ----

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// End of a push kernel, reached by every thread of every block. Each thread fences its own stores
// (they go to several GPUs) at system scope before its block arrives; the last block to arrive fences
// again (ordering what it observed through the counter) and publishes the epoch to every rank.
__device__ void signal_peers(const PeerSignal& sig) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x != 0) return;
  const unsigned before = atomicAdd(sig.arrived, 1u);
  if (before != gridDim.x - 1) return;
  __threadfence_system();
  *sig.arrived = 0;  // every block has arrived: the next launch counts from zero
  for (int r = 0; r < sig.ranks; r++) store_release_sys(sig.flag[r], sig.epoch);
}

constexpr int kPushVecs = 8;  // 16-byte vectors per lane held in registers: 4 KiB rows in one pass

// One warp per token: a slice of the row in registers, then one store per routed expert, so each row
// is read from HBM once however many ranks it goes to.
__global__ void push_dispatch_kernel(const uint4* x, int vecs, const int32_t* topk, const int32_t* pos_of_flat,
                                     const int64_t* delta, int64_t tokens, int k, int epr, PeerRows dst,
                                     PeerSignal sig) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = (int64_t)gridDim.x * kRowWarps;
  for (int64_t t = blockIdx.x * (int64_t)kRowWarps + (threadIdx.x >> 5); t < tokens; t += stride) {
    uint4* out[kMaxK];
#pragma unroll
    for (int q = 0; q < kMaxK; q++) {
      if (q < k) {
        const int e = topk[t * k + q];
        const int64_t row = pos_of_flat[t * k + q] + delta[e];
        out[q] = reinterpret_cast<uint4*>(dst.base[e / epr]) + row * vecs;
      }
    }
    const uint4* in = x + t * vecs;
    for (int j0 = 0; j0 < vecs; j0 += 32 * kPushVecs) {
      uint4 v[kPushVecs];
#pragma unroll
      for (int i = 0; i < kPushVecs; i++) {
        const int j = j0 + i * 32 + lane;
        if (j < vecs) v[i] = in[j];
      }
#pragma unroll
      for (int q = 0; q < kMaxK; q++) {
        if (q >= k) break;
#pragma unroll
        for (int i = 0; i < kPushVecs; i++) {
          const int j = j0 + i * 32 + lane;
          if (j < vecs) out[q][j] = v[i];
        }
      }
    }
  }
  signal_peers(sig);
}

__global__ void push_segments_kernel(const uint4* src, int vecs, const int64_t* first, const int64_t* dst_rank,
                                     const int64_t* dst_row, int nseg, int64_t total, PeerRows dst, PeerSignal sig) {
  const int64_t stride = (int64_t)gridDim.x * kRowWarps;
  for (int64_t r = blockIdx.x * (int64_t)kRowWarps + (threadIdx.x >> 5); r < total; r += stride) {
    int lo = 0, hi = nseg - 1;  // last segment whose first row is <= r (segments may be empty)
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (first[mid] <= r) lo = mid;
      else hi = mid - 1;
    }
    uint4* out = reinterpret_cast<uint4*>(dst.base[dst_rank[lo]]) + (dst_row[lo] + r - first[lo]) * vecs;
    copy_row(src + r * vecs, out, vecs, threadIdx.x & 31);
  }
  signal_peers(sig);
}

__global__ void wait_peers_kernel(const uint64_t* flags, int ranks, uint64_t epoch, int64_t timeout_ns,
                                  int32_t* timed_out) {
  const int r = threadIdx.x;
  if (r >= ranks) return;
  const uint64_t start = global_ns();
  while (load_acquire_sys(flags + r) < epoch) {
    if ((int64_t)(global_ns() - start) > timeout_ns) {
      // A plain store: atomics on host memory need PCIe atomics, which not every host has.
      *reinterpret_cast<volatile int32_t*>(timed_out) = r + 1;
      __threadfence_system();
      return;
    }
    __nanosleep(64);
  }
}

int row_vecs(int64_t hidden) {
  MP_CHECK_ARG(hidden > 0 && hidden % 8 == 0,
               "hidden must be a positive multiple of 8 (16-byte bf16 rows), got " + std::to_string(hidden));
  return (int)(hidden / 8);
}

// At most kBlocksPerSm blocks of 256 threads per SM: half an SM's threads, enough loads in flight to
// keep memory busy.
constexpr int kBlocksPerSm = 4;
unsigned row_blocks(int64_t rows) {
  int dev = 0, sms = 0;
  MP_GPU_CHECK(get_device(&dev));
  MP_GPU_CHECK(sm_count(dev, &sms));
  int64_t need = (rows + kRowWarps - 1) / kRowWarps;
  return (unsigned)std::min<int64_t>(need, (int64_t)sms * kBlocksPerSm);
}

unsigned push_blocks(int64_t rows) {
  // At least one block: the signal must go out even with nothing to send.
  return std::max(1u, row_blocks(rows));
}

void check_peers(const PeerRows& dst, const PeerSignal& sig) {
  MP_CHECK_ARG(sig.ranks >= 1 && sig.ranks <= kMaxPeers, "peer push: 1.." + std::to_string(kMaxPeers) + " ranks");
  for (int r = 0; r < sig.ranks; r++)
    MP_CHECK_ARG(dst.base[r] != nullptr && sig.flag[r] != nullptr, "peer push: rank " + std::to_string(r) + " is not mapped");
  MP_CHECK_ARG(sig.arrived != nullptr, "peer push: no block counter");
}

}  // namespace

void self_test(int device) {
  const std::string where = "GPU self-test on device " + std::to_string(device);
  MP_GPU_CHECK(set_device(device));
  const int n = 4096;
  int* d = nullptr;
  MP_GPU_CHECK(malloc_device(reinterpret_cast<void**>(&d), n * sizeof(int)));
  fill_kernel<<<n / 256, 256>>>(d, n);
  Status launch = last_error();
  int h[n];
  Status copy = memcpy_sync(h, d, sizeof(h));
  free_device(d);
  if (launch != kSuccess) throw Error(ErrorCode::Internal, where + ": kernel launch failed: " + status_string(launch));
  if (copy != kSuccess) throw Error(ErrorCode::Internal, where + ": kernel did not complete: " + status_string(copy));
  for (int i = 0; i < n; i++) {
    if (h[i] != 3 * i + 1) {
      throw Error(ErrorCode::Internal, where + ": wrong value at " + std::to_string(i) + " (" + std::to_string(h[i]) +
                                           ", expected " + std::to_string(3 * i + 1) + ")");
    }
  }
}

void sum_blocks(const void* in, void* out, int64_t n, int blocks, DType t, Stream s) {
  if (n == 0) return;
  unsigned grid = (unsigned)std::min<int64_t>((n + 255) / 256, 4096);
  switch (t) {
    case DType::F32: sum_blocks_kernel<<<grid, 256, 0, s>>>(static_cast<const float*>(in), static_cast<float*>(out), n, blocks); break;
    case DType::F64: sum_blocks_kernel<<<grid, 256, 0, s>>>(static_cast<const double*>(in), static_cast<double*>(out), n, blocks); break;
    case DType::I32: sum_blocks_kernel<<<grid, 256, 0, s>>>(static_cast<const int32_t*>(in), static_cast<int32_t*>(out), n, blocks); break;
    case DType::U8: throw Error(ErrorCode::InvalidArgument, "sum_blocks: u8 cannot be summed");
  }
  MP_GPU_CHECK_LAUNCH("sum_blocks_kernel");
}

void ep_count(const int32_t* topk, int64_t tokens, int k, int experts, int experts_per_rank, int64_t chunk_tokens,
              int chunks, int32_t* counts, int32_t* bad, Stream s) {
  MP_CHECK_ARG(experts > 0 && experts_per_rank > 0 && experts % experts_per_rank == 0,
               "experts must be a positive multiple of experts_per_rank");
  MP_CHECK_ARG(chunk_tokens > 0 && chunks > 0, "chunks must be positive");
  MP_CHECK_ARG((int64_t)experts * chunks <= kMaxBins, "experts * chunks must be <= " + std::to_string(kMaxBins));
  MP_GPU_CHECK(memset_async(counts, 0, sizeof(int32_t) * (size_t)experts * chunks, s));
  MP_GPU_CHECK(memset_async(bad, 0, sizeof(int32_t), s));
  int64_t entries = tokens * k;
  if (entries == 0) return;
  unsigned grid = (unsigned)std::min<int64_t>((entries + 255) / 256, 1024);
  count_kernel<<<grid, 256, (size_t)experts * chunks * sizeof(int32_t), s>>>(topk, entries, k, experts, experts_per_rank, chunk_tokens, chunks, counts, bad);
  MP_GPU_CHECK_LAUNCH("count_kernel");
}

void ep_adj(const int32_t* counts, int experts, int experts_per_rank, int chunks, int64_t* adj, Stream s) {
  MP_CHECK_ARG((int64_t)experts * chunks <= kMaxBins, "experts * chunks must be <= " + std::to_string(kMaxBins));
  adj_kernel<<<1, 256, (size_t)experts * chunks * sizeof(int32_t), s>>>(counts, experts, experts_per_rank, chunks, adj);
  MP_GPU_CHECK_LAUNCH("adj_kernel");
}

size_t ep_positions_scratch(int64_t tokens, int k, int experts) {
  int64_t tiles = (tokens * k + kTile - 1) / kTile;
  return (size_t)(2 * tiles * experts) * sizeof(int32_t);
}

void ep_positions(const int32_t* topk, int64_t tokens, int k, int experts, int64_t chunk_tokens, const int64_t* adj,
                  int32_t* scratch, int32_t* pos_of_flat, int32_t* flat_of_pos, Stream s) {
  int64_t entries = tokens * k;
  MP_CHECK_ARG(entries < (int64_t)1 << 31, "too many routed entries for int32 positions");
  MP_CHECK_ARG(experts <= 1024, "at most 1024 experts, got " + std::to_string(experts));
  if (entries == 0) return;
  const int tiles = (int)((entries + kTile - 1) / kTile);
  int32_t* tile_counts = scratch;
  int32_t* tile_base = scratch + (int64_t)tiles * experts;
  tile_count_kernel<<<tiles, kTile, experts * sizeof(int32_t), s>>>(topk, entries, experts, tile_counts);
  MP_GPU_CHECK_LAUNCH("tile_count_kernel");
  tile_scan_kernel<<<(experts + 127) / 128, 128, 0, s>>>(tile_counts, tiles, experts, tile_base);
  MP_GPU_CHECK_LAUNCH("tile_scan_kernel");
  const size_t smem = (size_t)32 * experts * sizeof(int32_t);
  if (smem > 48 * 1024) {
    MP_GPU_CHECK(set_max_dynamic_smem(tile_rank_kernel, (int)smem));
  }
  tile_rank_kernel<<<tiles, kTile, smem, s>>>(topk, entries, k, experts, chunk_tokens, adj, tile_base, pos_of_flat,
                                              flat_of_pos);
  MP_GPU_CHECK_LAUNCH("tile_rank_kernel");
}

void ep_gather(const bf16_bits* x, int64_t hidden, const int32_t* flat_of_pos, int k, int64_t entries, int64_t p_begin,
               int64_t p_end, bf16_bits* send, Stream s) {
  int vecs = row_vecs(hidden);
  if (p_end <= p_begin) return;
  gather_kernel<<<row_blocks(p_end - p_begin), 32 * kRowWarps, 0, s>>>(
      reinterpret_cast<const uint4*>(x), vecs, flat_of_pos, k, entries, p_begin, p_end, reinterpret_cast<uint4*>(send));
  MP_GPU_CHECK_LAUNCH("gather_kernel");
}

void ep_copy_segments(const bf16_bits* src, bf16_bits* dst, int64_t hidden, const RowSegments& g, Stream s) {
  int vecs = row_vecs(hidden);
  if (g.total == 0 || g.nseg == 0) return;
  copy_segments_kernel<<<row_blocks(g.total), 32 * kRowWarps, 0, s>>>(
      reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), vecs, g.src_row, g.dst_row, g.first, g.nseg,
      g.total);
  MP_GPU_CHECK_LAUNCH("copy_segments_kernel");
}

void ep_combine(const bf16_bits* ret, const int32_t* pos_of_flat, const float* weights, int k, int64_t hidden,
                int64_t t_begin, int64_t t_end, bf16_bits* out, Stream s) {
  int vecs = row_vecs(hidden);
  MP_CHECK_ARG(k >= 1 && k <= kMaxK, "combine: k must be in [1, " + std::to_string(kMaxK) + "], got " + std::to_string(k));
  if (t_end <= t_begin) return;
  combine_kernel<<<row_blocks(t_end - t_begin), 32 * kRowWarps, 0, s>>>(
      reinterpret_cast<const uint4*>(ret), pos_of_flat, weights, k, vecs, t_begin, t_end, reinterpret_cast<uint4*>(out));
  MP_GPU_CHECK_LAUNCH("combine_kernel");
}

void ep_push_dispatch(const bf16_bits* x, const int32_t* topk, const int32_t* pos_of_flat, const int64_t* delta,
                      int64_t tokens, int k, int64_t hidden, int experts_per_rank, const PeerRows& dst,
                      const PeerSignal& sig, Stream s) {
  int vecs = row_vecs(hidden);
  MP_CHECK_ARG(k >= 1 && k <= kMaxK, "push: k must be in [1, " + std::to_string(kMaxK) + "], got " + std::to_string(k));
  MP_CHECK_ARG(experts_per_rank > 0, "push: experts_per_rank must be positive");
  check_peers(dst, sig);
  push_dispatch_kernel<<<push_blocks(tokens), 32 * kRowWarps, 0, s>>>(reinterpret_cast<const uint4*>(x), vecs, topk,
                                                                       pos_of_flat, delta, tokens, k, experts_per_rank,
                                                                       dst, sig);
  MP_GPU_CHECK_LAUNCH("push_dispatch_kernel");
}

void ep_push_segments(const bf16_bits* src, int64_t hidden, const int64_t* first, const int64_t* dst_rank,
                      const int64_t* dst_row, int nseg, int64_t total, const PeerRows& dst, const PeerSignal& sig,
                      Stream s) {
  int vecs = row_vecs(hidden);
  MP_CHECK_ARG(nseg >= 1 || total == 0, "push: rows but no segments");
  check_peers(dst, sig);
  push_segments_kernel<<<push_blocks(total), 32 * kRowWarps, 0, s>>>(reinterpret_cast<const uint4*>(src), vecs, first,
                                                                     dst_rank, dst_row, nseg, total, dst, sig);
  MP_GPU_CHECK_LAUNCH("push_segments_kernel");
}

void ep_wait_peers(const uint64_t* flags, int ranks, uint64_t epoch, int64_t timeout_ns, int32_t* timed_out, Stream s) {
  MP_CHECK_ARG(ranks >= 1 && ranks <= kMaxPeers, "wait: 1.." + std::to_string(kMaxPeers) + " ranks");
  wait_peers_kernel<<<1, 32, 0, s>>>(flags, ranks, epoch, timeout_ns, timed_out);
  MP_GPU_CHECK_LAUNCH("wait_peers_kernel");
}

}  // namespace moepilot::gpu
