// Token sampling on the GPU: the definition and the algorithm of kernels/gen/sampling.h, sorting-free, one
// thread block or one thread-block cluster per row. See cuda/sampling.h for the contract.
//
// Dimension legend: R rows, V vocabulary, CL blocks per row (a cluster on sm_90, else 1), S = a block's slice of
// the row (ceil(V / CL), rounded up to 4), W warps per block.
//
// Layout of the work. Block `rank` of a row owns the slice [rank * S, rank * S + n) of the vocabulary; warp w owns
// a contiguous piece of that slice, its lanes striding through it. Every pass over the row (max, weights,
// counting rounds, top-k bisection) is a reduction: lanes -> warp (shuffles) -> block (shared memory, warps in
// order) -> cluster (each block pushes its partial into every block's shared memory with st.async, a transaction
// barrier in the receiving block counting the bytes in, and every block combines them in rank order, so all blocks
// of a row hold bit-identical results and take the same branch).
//
// Where the row's slice fits in shared memory (Hopper's clusters spread a 151936-wide row over 6 blocks, two
// rows' slices per SM), the first pass copies the logits on chip (on sm_90 by one bulk copy per warp, load_bulk)
// and the weights replace them in place: HBM is read once and every later pass (rounds, bisection) runs from shared
// memory.
// Otherwise (sm_80 with a large vocabulary) the weights go to the caller's scratch in global memory and the passes
// re-read them there. A pipelined launch (SampleLaunch::pipelined = 1) instead keeps persistent clusters with two
// slice buffers each and copies the next row in while sampling the current one; at V = 151936 on an H100 it is the
// slower of the two (see make_plan).
//
// Where the time goes (H100, 256 x 151936, top-p 0.9, one-row launch, from the MP_SAMPLE_PROFILE phase clock, whose
// marks slow the kernel ~10%): a row takes ~22.5 us from its first load to its result, in five steps (load + max
// ~6.7 us, weights ~5.7, inverse CDF ~3.3, counting pass ~5.1, the rest ~1.8), each ending in a cluster exchange;
// 39 rows are in flight (two 6-block clusters' slices per SM, as many as the GPCs hold), so 256 rows take ~6.6 such
// waves. The weights pass is the one step whose time is arithmetic (the exp, on the FP32 pipe); the counting pass
// is skipped where the drawn token alone settles the keep test. bench/sampling-gpu.notes.md has the measurements.
//
// Matching the CPU sampler. The weights are fp32(exp(z - zmax)) with z - zmax formed as exactly as the CPU's double
// (two floats) and exp in fp32 to under ~1 ulp, so a weight is the CPU's or its fp32 neighbour. That keeps the
// total mass within ~1e-7 relative of the CPU's, hence the logprob within ~1e-7 relative (the logprob itself is the
// CPU's double formula), while costing about a third of an exp in double (whose slow conversions and half-rate
// FMAs made the weights pass the bottleneck). Sums are taken in double, in a different order than the CPU's
// index order; keep/reject tests and the inverse CDF therefore agree with the CPU except within rounding of a
// boundary (the contract's exception). The uniforms are the same Philox words (gen/philox.h).
#include "cuda/sampling.h"
#include "cuda/mbarrier.cuh"

#include <atomic>
#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define MP_SAMPLE_CLUSTERS 1
#else
#define MP_SAMPLE_CLUSTERS 0
#endif

// Top-k mass with the last bisection passes on one gathered list per block (1) or on per-block lists with a
// cluster exchange per pass (0). A build switch so the GPU test can check both.
#ifndef MP_SAMPLE_TOPK_GATHER
#define MP_SAMPLE_TOPK_GATHER 1
#endif

// Cluster exchanges: one fence by the writing thread and relaxed arrivals (1), or cooperative_groups' cluster.sync(),
// which fences in every thread (0). A build switch so that the benchmark can compare them.
#ifndef MP_SAMPLE_RELAXED_ARRIVE
#define MP_SAMPLE_RELAXED_ARRIVE 1
#endif

// Cluster exchanges by pushing (1): each block stores its partial into every block's inbox with st.async, whose
// completion a transaction barrier (mbarrier) in the receiving block counts, so a block waits for the cluster's
// partials to arrive instead of a cluster barrier followed by one remote read per block. 0: the barrier exchange
// above.
// A build switch so that the benchmark can compare them.
#ifndef MP_SAMPLE_PUSH
#define MP_SAMPLE_PUSH 1
#endif

// Pass 1 of the one-row launch by bulk copies (1): each warp starts one TMA copy of its piece of the slice and scans
// the piece as soon as it lands, so the whole slice is in flight at once; 0: 16-byte loads, four a thread in flight.
// sm_90 only; a build switch for the benchmark's A/B.
#ifndef MP_SAMPLE_BULK
#define MP_SAMPLE_BULK 1
#endif

// Phase clock for the benchmark (build with -DMP_SAMPLE_PROFILE=1; off in the engine): thread 0 of each row's
// first block adds the time since its previous mark to one of kProfPhases slots; see sample_profile_take.
#ifndef MP_SAMPLE_PROFILE
#define MP_SAMPLE_PROFILE 0
#endif

namespace moepilot::gpu {
#if MP_SAMPLE_PROFILE
__device__ unsigned long long g_sample_prof[kProfPhases];
#endif
namespace {

#if MP_SAMPLE_PROFILE
struct ProfClock {
  unsigned long long last = 0, acc[kProfPhases] = {};
  __device__ void mark(int phase, bool on) {
    if (!on) return;
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (phase >= 0 && last) acc[phase] += t - last;
    last = t;
  }
  __device__ void flush(bool on) {
    if (on)
      for (int i = 0; i < kProfPhases; i++) atomicAdd(&g_sample_prof[i], acc[i]);
  }
};
#define MP_PROF(rs, phase) (rs).prof.mark((phase), (rs).rank == 0 && threadIdx.x == 0)
#else
#define MP_PROF(rs, phase) ((void)0)
#endif

constexpr int kMaxCluster = 8;
constexpr int kMaxWarps = 32;
constexpr int kPivots = 7;  // top-k bisection: pivots per counting pass (3 bits of the fp32 pattern per pass)
constexpr int kCandCap = 4096;  // top-k candidates a block lists in shared memory (16 KB)
// Clusters of 6 hold a 101 KB slice a block: two blocks fit an SM only with a shorter candidate list.
__host__ __device__ constexpr int cand_cap(int cl) { return cl == 6 ? 1536 : kCandCap; }

// ---------------------------------------------------------------------------------------------------------
// Small device helpers

__device__ __forceinline__ double warp_sum(double x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// Inclusive prefix sum over the lanes (lane i gets x_0 + ... + x_i) and the exclusive one (0 in lane 0).
__device__ __forceinline__ void warp_scan(double x, int lane, double& incl, double& excl) {
  incl = x;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.0;
}
__device__ __forceinline__ int warp_sum(int x) {
  return __reduce_add_sync(0xffffffffu, x);  // one warp-wide add (sm_80+); an integer sum needs no fixed order
}

// fp32(exp(d)) for d = d_hi + d_lo <= 0 (d_lo: the rounding error of d_hi, |d_lo| <= ulp(d_hi)), in fp32 only:
// d = n ln2 + f with n = rint(d / ln2) (ln2 in two parts, the first with trailing zeros so n * ln2_hi is exact),
// |f| <= ln2 / 2 + ulp, exp(f) - 1 by a polynomial of degree 6 (error ~4e-9, under 1/10 ulp), then 1 + p and the
// exact scaling by 2^n. Error under ~1.05 ulp; the result is the CPU's fp32(exp) or a neighbour.
// Below gen::kWeightFloor (d under -86) the weight is 0, as on the CPU, which also covers -inf: no
// subnormal path (a subnormal weight is also below what any mass, at least 1 in double, can register).
__device__ __forceinline__ float weight_of(float d_hi, float d_lo) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;         // 0x3f317200: 16 significant bits
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;  // ln 2 - kLn2Hi
  constexpr float kRound = 12582912.0f;                 // 1.5 * 2^23: adding it rounds to an integer
  const float t = fmaf(d_hi, kLog2e, kRound);
  const int n = __float_as_int(t) - __float_as_int(kRound);
  const float nf = t - kRound;
  float f = fmaf(-nf, kLn2Hi, d_hi);  // exact (Sterbenz: f is close to d_hi - n ln2_hi)
  f = fmaf(-nf, kLn2Lo, f) + d_lo;
  // (exp(f) - 1) / f = 1 + f / 2 + f^2 r(f), r of degree 3 fitted near-minimax on |f| <= ln2 / 2 with the two
  // leading coefficients exact: one FMA fewer than the Taylor polynomial of the same accuracy (degree 6 here), and
  // a weight's largest error over 4M random arguments 0.89 ulp against Taylor's 0.91 (1.04 against 1.05 with d_lo).
  float p = fmaf(f, 1.3863785e-03f, 8.367477e-03f);
  p = fmaf(p, f, 4.1667238e-02f);
  p = fmaf(p, f, 1.6666535e-01f);
  p = fmaf(p, f, 0.5f);
  p = fmaf(p, f, 1.0f);                 // (exp(f) - 1) / f
  const float e1 = fmaf(p, f, 1.0f);    // exp(f) in [0.70, 1.42], one rounding
  // d_hi >= -86 gives n >= -124: the scaled result stays normal, and the scaling is exact.
  return d_hi < gen::kWeightFloor ? 0.0f : __int_as_float(__float_as_int(e1) + (n << 23));
}

// a + b = s + e exactly (Knuth's TwoSum). (Dekker's Fast2Sum on magnitude-ordered operands, three additions
// instead of six, measured no faster: bench/sampling-gpu.notes.md.)
__device__ __forceinline__ void two_sum(float a, float b, float& s, float& e) {
  s = a + b;
  const float bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}

// Asynchronous 16-byte copies global -> shared (sm_80+): the next row's logits stream in while the block works on
// the current row. Each thread waits for its own copies; a block barrier then publishes them.
__device__ __forceinline__ void cp_async16(float* smem_dst, const float* gmem_src) {
  const unsigned dst = (unsigned)__cvta_generic_to_shared(smem_dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }


// The uniform of gen::sampling_uniform, on the device (same Philox counter and key layout).
__device__ __forceinline__ float draw_uniform(const gen::SamplingParams& p, uint32_t draw) {
  gen::Philox4 c{{(p.sample_index << 16) | (draw >> 2), p.step, (uint32_t)p.request_id,
                  (uint32_t)(p.request_id >> 32)}};
  gen::Philox4 r = gen::philox4x32_10(c, (uint32_t)p.seed, (uint32_t)(p.seed >> 32));
  return gen::uniform_from_u32(r.v[draw & 3]);
}

// (largest value, lowest index among equals, OR of flags) over the warp; every lane gets the result.
__device__ __forceinline__ void warp_argmax(float& best, int& best_idx, int& flags) {
  for (int o = 16; o > 0; o >>= 1) {
    float b = __shfl_xor_sync(0xffffffffu, best, o);
    int bi = __shfl_xor_sync(0xffffffffu, best_idx, o);
    flags |= __shfl_xor_sync(0xffffffffu, flags, o);
    if (bi >= 0 && (best_idx < 0 || b > best || (b == best && bi < best_idx))) best = b, best_idx = bi;
  }
}

__device__ __forceinline__ bool params_ok(const gen::SamplingParams& p) {
  // The rules of gen::validate_sampling_params (V >= 1 is checked by the launcher).
  return isfinite(p.temperature) && p.temperature >= 0.0f && p.top_p > 0.0f && p.top_p <= 1.0f &&
         p.min_p >= 0.0f && p.min_p < 1.0f && p.top_k >= 0 && p.sample_index < gen::kMaxSampleIndex;
}

// One block's partial result of a pass, exchanged across the cluster. Fields unused by a pass stay zero.
// 64 bytes, 16-byte aligned: a push sends it as four 16-byte stores.
struct alignas(16) Partial {
  double m[2];       // masses
  int c[kPivots];    // counts
  float best;        // largest logit
  int best_idx;      // its lowest index (-1: none finite)
  int flags;         // 1: NaN seen, 2: +inf seen
  int token;         // draw broadcast: the drawn token (global index) and its weight
  float value;
};
static_assert(sizeof(Partial) == 64, "a pushed partial is four 16-byte stores");

__device__ __forceinline__ void partial_clear(Partial& p) {
  p.m[0] = p.m[1] = 0.0;
  for (int i = 0; i < kPivots; i++) p.c[i] = 0;
  p.best = -INFINITY;
  p.best_idx = -1;
  p.flags = 0;
  p.token = -1;
  p.value = 0.0f;
}

// a <- a (+) b, b coming after a in index order (so ties of the max keep a's lower index); nc counts, and the max
// only if `best`.
__device__ __forceinline__ void partial_combine(Partial& a, const Partial& b, int nc, bool best) {
  a.m[0] += b.m[0];
  a.m[1] += b.m[1];
  for (int i = 0; i < nc; i++) a.c[i] += b.c[i];
  if (best) {
    if (b.best_idx >= 0 && (a.best_idx < 0 || b.best > a.best)) a.best = b.best, a.best_idx = b.best_idx;
    a.flags |= b.flags;
  }
}

// Shared state of one block. The weights (SMEM path) follow it in dynamic shared memory.
struct BlockState {
  // Each warp's partial for reduce(), double-buffered like the inboxes: a push exchange ends without a block
  // barrier, so warps may write the next exchange's partials while warp 0 still reads this one's.
  Partial warp_part[2][kMaxWarps];
  Partial mail[2];                // this block's contribution to the cluster exchange (double-buffered)
  Partial inbox[2][kMaxCluster];  // every block's contribution, by rank (double-buffered: exchanges alternate)
  unsigned long long inbox_full[2];  // push exchanges: the transaction barrier of each inbox
  unsigned long long piece_full[kMaxWarps];  // bulk pass 1: the transaction barrier of each warp's piece
  double warp_mass[2][kMaxWarps];  // per-warp masses of the last pass's two sets (weights: all and {w > low};
  double block_mass[2][kMaxCluster];  // counting: above each of the two pivots), and per block
  float u0;  // the row's first uniform (sample_one_row)
  int cand_count;
  int cnt_lo[kMaxCluster], cnt_hi[kMaxCluster];  // top-k bisection: per-block counts at the range ends
  double sub_mass[kMaxWarps];  // inverse CDF: each warp's mass of its sub-piece (search_piece)
  int sub_any[kMaxWarps];      // and whether it keeps any token
};

// ---------------------------------------------------------------------------------------------------------
// The per-row sampler: one object per block, all blocks of a row running the same steps.

template <int CL>
struct RowSampler {
  BlockState& st;
  float* w;        // the block's slice: logits, then weights ([n], shared or global memory)
  float* cand;     // [kCandCap] top-k candidates (shared memory)
  int n;           // slice length
  int S;           // slice stride (every block's slice but the last has S elements)
  int base;        // global index of w[0]
  int ws, we;      // this warp's piece [ws, we) of the slice
  int pw;          // piece stride: warp i's piece starts at min(n, i * pw)
  int V;
  int lane, warp, nwarps;
  int rank;
  bool w_shared = false;  // the slice lives in shared memory (pass 1 may copy it in by bulk copies)
  int exchange = 0;  // how many cluster exchanges so far (selects the inbox)
  const Partial* seen = nullptr;  // every block's partial of the last exchange, by rank
#if MP_SAMPLE_PROFILE
  ProfClock prof;
#endif

  // Cross-block exchange: thread 0 holds the block's partial in `mine`; afterwards seen[0..CL) holds every block's
  // partial and `total` their combination in rank order (identical in every block). The inbox a call fills is
  // not written again until two exchanges later, which no block starts before every block has sent the next one,
  // i.e. has passed the block barrier that follows its reads of this one (every exchange starts after one).
  // publish: the other blocks will also read this block's shared memory written before the call (the top-k
  // lists), so the exchange also releases those writes to them.
  __device__ void exchange_partials(const Partial& mine, Partial& total, int nc, bool best, bool publish = false) {
    const int buf = exchange & 1;
    const uint32_t use = (uint32_t)(exchange >> 1);  // how many times this inbox was filled before
    exchange++;
    Partial* in = st.inbox[buf];
#if MP_SAMPLE_CLUSTERS
    if constexpr (CL > 1) {
#if MP_SAMPLE_PUSH
      const uint32_t bar = (uint32_t)__cvta_generic_to_shared(&st.inbox_full[buf]);
      if (use == 0 && buf == 0) asm volatile("barrier.cluster.wait;" ::: "memory");  // every block's barriers are set up
      // publish: a cluster barrier around the push, whose arrival releases every thread's writes (the lists).
      if (publish) asm volatile("barrier.cluster.arrive.release;" ::: "memory");
      if (threadIdx.x == 0) {
        st.mail[0] = mine;
        mbar_arrive_expect_tx(bar, CL * 64);  // this block's own arrival; every block's 64 bytes (some may be in)
      }
      __syncwarp();
      if ((int)threadIdx.x < 4 * CL) {  // lane 4r + c sends 16-byte chunk c to block r
        const int r = threadIdx.x >> 2, c = threadIdx.x & 3;
        const uint4 v = reinterpret_cast<const uint4*>(&st.mail[0])[c];
        const uint32_t dst_local = (uint32_t)__cvta_generic_to_shared(reinterpret_cast<uint4*>(&in[rank]) + c);
        uint32_t dst, dst_bar;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(dst) : "r"(dst_local), "r"(r));
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(dst_bar) : "r"(bar), "r"(r));
        asm volatile(
            "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(dst),
            "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(dst_bar)
            : "memory");
      }
      mbar_wait(bar, use & 1u);  // every push has landed in this block's shared memory
      if (publish) asm volatile("barrier.cluster.wait.acquire;" ::: "memory");
#else
      namespace cg = cooperative_groups;
      cg::cluster_group cluster = cg::this_cluster();
      if (threadIdx.x == 0) st.mail[buf] = mine;
#if MP_SAMPLE_RELAXED_ARRIVE
      // What the other blocks read after this barrier was written by thread 0 (the mail) or, before the block
      // barrier that precedes every exchange, by the block (top_k_mass_gather's lists): one cluster-scope fence by
      // thread 0 publishes both (a fence is cumulative over what the block barrier ordered before it).
      // cluster.sync()'s arrival would fence in every thread: a membar per thread per exchange, ~10% of the warps'
      // stall samples under Nsight Compute, 2% of the kernel's time (bench/sampling-gpu.notes.md).
      if (threadIdx.x == 0) asm volatile("fence.acq_rel.cluster;" ::: "memory");
      asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory");
      asm volatile("barrier.cluster.wait;" ::: "memory");  // acquire
#else
      cluster.sync();
#endif
      if ((int)threadIdx.x < CL) in[threadIdx.x] = *cluster.map_shared_rank(&st.mail[buf], (int)threadIdx.x);
      __syncthreads();
#endif
    } else {
      __syncthreads();
      if (threadIdx.x == 0) in[0] = mine;
      __syncthreads();
    }
#else
    __syncthreads();
    if (threadIdx.x == 0) in[0] = mine;
    __syncthreads();
#endif
    (void)publish, (void)use;
    seen = in;
    partial_clear(total);
    for (int r = 0; r < CL; r++) partial_combine(total, seen[r], nc, best);
  }

  // Block reduction of each warp's lane-0 partial (already warp-reduced) by warp 0 (a fixed shuffle tree, so every
  // block combines its warps the same way), then the cluster exchange. nc: how many counts the pass uses; best:
  // whether it carries the max.
  __device__ void reduce(const Partial& warp_partial, int nc, bool best, Partial& total, bool publish = false) {
    Partial* parts = st.warp_part[exchange & 1];
    if (lane == 0) parts[warp] = warp_partial;
    __syncthreads();
    Partial mine;
    partial_clear(mine);
    if (warp == 0) {
      const Partial& q = parts[lane < nwarps ? lane : 0];  // fields read one at a time: fewer registers
      const bool on = lane < nwarps;
      mine.m[0] = warp_sum(on ? q.m[0] : 0.0);
      mine.m[1] = warp_sum(on ? q.m[1] : 0.0);
      for (int j = 0; j < nc; j++) mine.c[j] = warp_sum(on ? q.c[j] : 0);
      if (best) {
        float b = on ? q.best : -INFINITY;
        int bi = on ? q.best_idx : -1, fl = on ? q.flags : 0;
        warp_argmax(b, bi, fl);
        mine.best = b, mine.best_idx = bi, mine.flags = fl;
      }
    }
    exchange_partials(mine, total, nc, best, publish);
  }

  // Each block's masses of the two sets of the last pass, from the exchange, kept for the next inverse CDF.
  __device__ void keep_block_masses() {
    if ((int)threadIdx.x < CL) {
      st.block_mass[0][threadIdx.x] = seen[threadIdx.x].m[0];
      st.block_mass[1][threadIdx.x] = seen[threadIdx.x].m[1];
    }
    __syncthreads();
  }

  // A thread's part of pass 1: the max and argmax of the values it visits (each thread walks its indices upwards:
  // lowest index on ties) and the bad values among them; publish_max reduces them over the block and cluster.
  // Per value: one compare for NaN (folded into a predicate) and one for the max; a +inf needs none of its own, as
  // it is the max exactly when one was seen.
  struct MaxScan {
    float best = -INFINITY;
    int best_idx = -1;
    bool nan = false;
    __device__ __forceinline__ void operator()(float x, int i) {
      nan |= x != x;
      if (x > best) best = x, best_idx = i;
    }
    __device__ __forceinline__ int flags() const { return (nan ? 1 : 0) | (best == INFINITY ? 2 : 0); }
  };
  __device__ void publish_max(MaxScan m, Partial& total) {
    int flags = m.flags();
    warp_argmax(m.best, m.best_idx, flags);
    Partial p;
    partial_clear(p);
    p.best = m.best;
    p.best_idx = m.best_idx >= 0 ? base + m.best_idx : -1;
    p.flags = flags;
    reduce(p, 0, true, total);
  }

  // Pass 1: copy the slice in (SMEM: global -> shared; else global -> scratch) and find max, argmax, bad values.
  // Thread 0 runs while_loading() once: while its piece of the slice lands, where pass 1 copies by bulk copies.
  template <class WhileLoading>
  __device__ void load(const float* row, Partial& total, const WhileLoading& while_loading) {
    const float* src = row + base;
    MaxScan visit;
    const bool vec = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(w)) & 15) == 0;
#if MP_SAMPLE_CLUSTERS && MP_SAMPLE_BULK
    if (w_shared) {
      load_bulk(src, vec, visit, while_loading);
      publish_max(visit, total);
      return;
    }
#endif
    if (threadIdx.x == 0) while_loading();
    const int nt = blockDim.x;
    int i0 = 0;
    if (vec) {
      // Four independent 16-byte loads in flight per thread before any store: with one 1024-thread block per SM
      // that is 64 KB in flight, enough to cover HBM latency at the SM's share of the bandwidth.
      const int n4 = n / 4;
      const float4* s4 = reinterpret_cast<const float4*>(src);
      float4* w4 = reinterpret_cast<float4*>(w);
      int q = threadIdx.x;
      for (; q + 3 * nt < n4; q += 4 * nt) {
        float4 x[4];
#pragma unroll
        for (int u = 0; u < 4; u++) x[u] = __ldcs(s4 + q + u * nt);  // streamed: read once
#pragma unroll
        for (int u = 0; u < 4; u++) {
          w4[q + u * nt] = x[u];
          const int i = 4 * (q + u * nt);
          visit(x[u].x, i), visit(x[u].y, i + 1), visit(x[u].z, i + 2), visit(x[u].w, i + 3);
        }
      }
      for (; q < n4; q += nt) {
        float4 x = __ldcs(s4 + q);
        w4[q] = x;
        visit(x.x, 4 * q), visit(x.y, 4 * q + 1), visit(x.z, 4 * q + 2), visit(x.w, 4 * q + 3);
      }
      i0 = 4 * n4;
    }
    for (int i = i0 + threadIdx.x; i < n; i += nt) {
      float x = src[i];
      w[i] = x;
      visit(x, i);
    }
    publish_max(visit, total);
  }

#if MP_SAMPLE_CLUSTERS && MP_SAMPLE_BULK
  // Pass 1 into shared memory by bulk copies: lane 0 of each warp sets up its piece's transaction barrier and starts
  // one TMA copy of the piece's 16-byte part (src and w 16-byte aligned; a piece starts on a multiple of 4
  // elements); the warp waits for its piece and scans it while later pieces are still landing. No registers hold
  // data in flight, so the whole slice (~101 KB) is requested at once instead of four 16-byte loads a thread. Only
  // the slice's last piece can have a tail (n % 4 elements), loaded directly, as is all of a row that is not 16-byte
  // aligned (vec false; slow, but one path: a second one spilled registers throughout the kernel). Each block
  // samples one row, so every barrier completes once, in phase 0.
  template <class WhileLoading>
  __device__ void load_bulk(const float* src, bool vec, MaxScan& visit, const WhileLoading& while_loading) {
    const int len4 = vec ? (we - ws) & ~3 : 0;
    if (len4 > 0) {
      const uint32_t bar = (uint32_t)__cvta_generic_to_shared(&st.piece_full[warp]);
      if (lane == 0) {
        const uint32_t dst = (uint32_t)__cvta_generic_to_shared(w + ws);
        uint64_t policy;
        mbar_init<1>(bar);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // the init, before the copy signals it
        mbar_arrive_expect_tx(bar, len4 * 4);
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));  // read once
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
            "%4;" ::"r"(dst),
            "l"(src + ws), "r"(len4 * 4), "r"(bar), "l"(policy)
            : "memory");
      }
      if (threadIdx.x == 0) while_loading();  // while the piece lands
      __syncwarp();  // the init, before the other lanes wait on the barrier
      mbar_wait(bar, 0);
      const float4* w4 = reinterpret_cast<const float4*>(w + ws);
      for (int q = lane; q < len4 / 4; q += 32) {
        const float4 x = w4[q];
        const int i = ws + 4 * q;
        visit(x.x, i), visit(x.y, i + 1), visit(x.z, i + 2), visit(x.w, i + 3);
      }
    }
    if (len4 <= 0 && threadIdx.x == 0) while_loading();
    for (int i = ws + len4 + lane; i < we; i += 32) {
      const float x = src[i];
      w[i] = x;
      visit(x, i);
    }
  }
#endif

  // Pipelined path, pass 1 in two halves. fetch_issue starts the asynchronous copy of a row's slice into `dst`
  // (the 16-byte aligned part; nothing when the row is not 16-byte aligned); fetch_wait waits for it, copies what
  // the asynchronous part left (the tail, or all of an unaligned slice) and publishes the buffer to the block.
  __device__ void fetch_issue(const float* row, float* dst) {
    const float* src = row + base;
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
      const int n4 = n / 4;
      for (int q = threadIdx.x; q < n4; q += blockDim.x) cp_async16(dst + 4 * q, src + 4 * q);
    }
    cp_async_commit();
  }
  __device__ void fetch_wait(const float* row, float* dst) {
    cp_async_wait_all();
    const float* src = row + base;
    const int from = (reinterpret_cast<uintptr_t>(src) & 15) == 0 ? 4 * (n / 4) : 0;
    for (int i = from + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    __syncthreads();
  }

  // Max, argmax and bad values of the slice already in w (the pipelined path's pass 1, from shared memory).
  __device__ void scan_max(Partial& total) {
    MaxScan visit;
    const int n4 = n / 4;
    const float4* w4 = reinterpret_cast<const float4*>(w);
    for (int q = threadIdx.x; q < n4; q += blockDim.x) {
      const float4 x = w4[q];
      visit(x.x, 4 * q), visit(x.y, 4 * q + 1), visit(x.z, 4 * q + 2), visit(x.w, 4 * q + 3);
    }
    for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) visit(w[i], i);
    publish_max(visit, total);
  }

  // Pass 2: weights (in place when STORE; greedy only needs their sum), total mass and the mass above `low`
  // (min-p: WITH_LOW), per warp, per block and in all. z - zmax in two floats, as exact as the CPU's double: for
  // T = 1 (UNIT), x - best by TwoSum (exact); otherwise x / T as q_hi + q_lo (the product by 1 / T corrected by its
  // exact residual) minus zmax (z_hi + z_lo). A warp's piece starts 16-byte aligned: lanes take float4s, four
  // independent exponentials per step.
  template <bool UNIT, bool WITH_LOW, bool STORE>
  __device__ void weights(float T, float best, double zmax, float low, double& total_mass, double& low_mass) {
    double s0 = 0.0, s1 = 0.0;
    const float inv_t = 1.0f / T;
    const float z_hi = UNIT ? best : (float)zmax;
    const float z_lo = UNIT ? 0.0f : (float)(zmax - (double)z_hi);
    auto weight = [&](float x) {
      float d_hi, d_lo;
      if constexpr (UNIT) {
        two_sum(x, -best, d_hi, d_lo);
      } else {
        const float q_hi = x * inv_t;
        const float q_lo = fmaf(-q_hi, T, x) * inv_t;
        two_sum(q_hi, -z_hi, d_hi, d_lo);
        d_lo += q_lo - z_lo;
      }
      return weight_of(d_hi, d_lo);
    };
    auto add = [&](float wi) {
      const double wd = wi;
      s0 += wd;
      if constexpr (WITH_LOW) s1 += wi > low ? wd : 0.0;
    };
    const int n4 = (we - ws) >> 2;
    float4* w4 = reinterpret_cast<float4*>(w + ws);
    for (int q = lane; q < n4; q += 32) {
      const float4 x = w4[q];
      float4 y;
      y.x = weight(x.x), y.y = weight(x.y), y.z = weight(x.z), y.w = weight(x.w);
      if constexpr (STORE) w4[q] = y;
      add(y.x), add(y.y), add(y.z), add(y.w);
    }
    for (int i = ws + 4 * n4 + lane; i < we; i += 32) {
      const float y = weight(w[i]);
      if constexpr (STORE) w[i] = y;
      add(y);
    }
    if constexpr (!WITH_LOW) s1 = s0;
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
    Partial p;
    partial_clear(p);
    p.m[0] = s0, p.m[1] = s1;
    if (lane == 0) st.warp_mass[0][warp] = s0, st.warp_mass[1][warp] = s1;
    Partial t;
    reduce(p, 0, false, t);
    keep_block_masses();
    total_mass = t.m[0];
    low_mass = t.m[1];
  }

  // Counting pass of a round: #{w > a}, sum{w > a} and the same for b, per warp, per block and in all.
  __device__ void count_above(float a, float b, Partial& total) {
    int c0 = 0, c1 = 0;
    double m0 = 0.0, m1 = 0.0;
    // b >= a, so {w > b} is inside {w > a}; the conversion to double (a slow instruction) only where needed.
    auto visit = [&](float x) {
      if (x > a) {
        const double xd = x;
        c0++, m0 += xd;
        if (x > b) c1++, m1 += xd;
      }
    };
    const int n4 = (we - ws) >> 2;
    const float4* w4 = reinterpret_cast<const float4*>(w + ws);
    for (int q = lane; q < n4; q += 32) {
      const float4 x = w4[q];
      visit(x.x), visit(x.y), visit(x.z), visit(x.w);
    }
    for (int i = ws + 4 * n4 + lane; i < we; i += 32) visit(w[i]);
    c0 = warp_sum(c0), c1 = warp_sum(c1);
    m0 = warp_sum(m0), m1 = warp_sum(m1);
    Partial p;
    partial_clear(p);
    p.m[0] = m0, p.m[1] = m1, p.c[0] = c0, p.c[1] = c1;
    if (lane == 0) st.warp_mass[0][warp] = m0, st.warp_mass[1][warp] = m1;
    reduce(p, 2, false, total);
    keep_block_masses();
  }

  // The k-th largest weight: the largest fp32 x with #{w >= x} >= k, by bisection on the bit pattern (weights are
  // non-negative, so they order like their bits), kPivots pivots per pass, each pass shrinking the range 8-fold.
  // Once every block holds at most kCandCap weights inside the range, one pass copies them to a list in shared
  // memory and the remaining passes count over the lists only. Then Z_k = sum{w >= x}.
  __device__ double top_k_mass(int k) {
    uint32_t lo = 0, hi = __float_as_uint(1.0f) + 1;  // #{w >= 0} = V >= k; #{w > 1} = 0 < k
    // Per block: #{w >= lo}, #{w >= hi} in its slice (shared memory, written by thread r, read by all).
    int* cnt_lo = st.cnt_lo;
    int* cnt_hi = st.cnt_hi;
    if ((int)threadIdx.x < CL) {
      const int r = threadIdx.x;
      cnt_lo[r] = min(V, (r + 1) * S) - min(V, r * S), cnt_hi[r] = 0;
    }
    __syncthreads();
    bool listed = false;
    int list_n = 0, listed_above = 0;  // listed_above: #{w >= hi} in this block when the list was made
    double above = 0.0;  // this thread's share of sum{w >= hi} at the time of the copy
    Partial t;
    while (hi - lo > 1) {
      if (!listed) {
        int most = 0;
        for (int r = 0; r < CL; r++) most = max(most, cnt_lo[r] - cnt_hi[r]);
        if (most <= cand_cap(CL)) {
          __syncthreads();  // every thread has read the counts
          if (threadIdx.x == 0) st.cand_count = 0;
          __syncthreads();
          for (int b0 = ws; b0 < we; b0 += 32) {  // whole warps per step: the ballot needs every lane
            const int i = b0 + lane;
            const float x = i < we ? w[i] : 0.0f;
            const uint32_t bits = __float_as_uint(x);
            const bool in = i < we && bits >= lo && bits < hi;
            if (i < we && bits >= hi) above += (double)x;
            const unsigned m = __ballot_sync(0xffffffffu, in);
            int at = 0;
            if (lane == 0 && m) at = atomicAdd(&st.cand_count, __popc(m));
            at = __shfl_sync(0xffffffffu, at, 0);
            if (in) cand[at + __popc(m & ((1u << lane) - 1u))] = x;
          }
          __syncthreads();
          list_n = st.cand_count;
          listed_above = cnt_hi[rank];
          listed = true;
        }
      }
      uint32_t piv[kPivots];
      for (int j = 0; j < kPivots; j++) piv[j] = lo + (uint32_t)(((uint64_t)(hi - lo) * (uint64_t)(j + 1)) >> 3);
      int c[kPivots];
      for (int j = 0; j < kPivots; j++) c[j] = 0;
      if (listed) {
        for (int i = threadIdx.x; i < list_n; i += blockDim.x) {
          const uint32_t b = __float_as_uint(cand[i]);
#pragma unroll
          for (int j = 0; j < kPivots; j++) c[j] += b >= piv[j];
        }
      } else {
        for (int i = ws + lane; i < we; i += 32) {
          const uint32_t b = __float_as_uint(w[i]);
#pragma unroll
          for (int j = 0; j < kPivots; j++) c[j] += b >= piv[j];
        }
      }
      Partial p;
      partial_clear(p);
#pragma unroll
      for (int j = 0; j < kPivots; j++) p.c[j] = warp_sum(c[j]);
      if (listed && threadIdx.x == 0)  // the weights above the listed range count at every pivot
        for (int j = 0; j < kPivots; j++) p.c[j] += listed_above;
      reduce(p, kPivots, false, t);
      // Largest pivot still holding >= k weights (pivots may repeat when the range is small).
      int jlo = -1;
      for (int j = 0; j < kPivots; j++)
        if (t.c[j] >= k) jlo = j;
        else break;
      const uint32_t nlo = jlo >= 0 ? piv[jlo] : lo;
      const uint32_t nhi = jlo + 1 < kPivots ? piv[jlo + 1] : hi;
      if ((int)threadIdx.x < CL) {
        const int r = threadIdx.x;
        if (jlo >= 0) cnt_lo[r] = seen[r].c[jlo];
        if (jlo + 1 < kPivots) cnt_hi[r] = seen[r].c[jlo + 1];
      }
      __syncthreads();
      lo = nlo, hi = max(nhi, nlo + 1);  // nhi > nlo always (counts fall as pivots rise); kept for termination
    }
    const float x = __uint_as_float(lo);
    double m = 0.0;
    if (listed) {
      m = above;
      for (int i = threadIdx.x; i < list_n; i += blockDim.x)
        if (cand[i] >= x) m += (double)cand[i];
    } else {
      for (int i = ws + lane; i < we; i += 32) {
        const float v = w[i];
        if (v >= x) m += (double)v;
      }
    }
    Partial p;
    partial_clear(p);
    p.m[0] = warp_sum(m);
    reduce(p, 0, false, t);
    return t.m[0];
  }

  // top_k_mass with the final passes local: full counting passes (with cluster exchanges) narrow the range until
  // every block holds at most kCandCap / 2 / CL weights inside it; each block lists its own, one exchange tells
  // every block the list lengths and the counts and masses above the range, and every block copies all lists (its
  // cluster neighbours' through distributed shared memory) into one list, identical in every block. The remaining
  // bisection and the final mass run on that list with block barriers only: no cluster exchange per pass.
  __device__ double top_k_mass_gather(int k) {
    uint32_t lo = 0, hi = __float_as_uint(1.0f) + 1;  // #{w >= 0} = V >= k; #{w > 1} = 0 < k
    int* cnt_lo = st.cnt_lo;
    int* cnt_hi = st.cnt_hi;
    if ((int)threadIdx.x < CL) {
      const int r = threadIdx.x;
      cnt_lo[r] = min(V, (r + 1) * S) - min(V, r * S), cnt_hi[r] = 0;
    }
    __syncthreads();
    constexpr int kOwnCap = cand_cap(CL) / 2 / CL;  // own list in cand[0, cap / 2), gathered list after it
    float* gathered = cand + cand_cap(CL) / 2;
    Partial t;
    bool fit = false;
    while (hi - lo > 1) {
      int most = 0;
      for (int r = 0; r < CL; r++) most = max(most, cnt_lo[r] - cnt_hi[r]);
      if (most <= kOwnCap) {
        fit = true;
        break;
      }
      uint32_t piv[kPivots];
      for (int j = 0; j < kPivots; j++) piv[j] = lo + (uint32_t)(((uint64_t)(hi - lo) * (uint64_t)(j + 1)) >> 3);
      int c[kPivots];
      for (int j = 0; j < kPivots; j++) c[j] = 0;
      for (int i = ws + lane; i < we; i += 32) {
        const uint32_t b = __float_as_uint(w[i]);
#pragma unroll
        for (int j = 0; j < kPivots; j++) c[j] += b >= piv[j];
      }
      Partial p;
      partial_clear(p);
#pragma unroll
      for (int j = 0; j < kPivots; j++) p.c[j] = warp_sum(c[j]);
      reduce(p, kPivots, false, t);
      int jlo = -1;
      for (int j = 0; j < kPivots; j++)
        if (t.c[j] >= k) jlo = j;
        else break;
      const uint32_t nlo = jlo >= 0 ? piv[jlo] : lo;
      const uint32_t nhi = jlo + 1 < kPivots ? piv[jlo + 1] : hi;
      if ((int)threadIdx.x < CL) {
        const int r = threadIdx.x;
        if (jlo >= 0) cnt_lo[r] = seen[r].c[jlo];
        if (jlo + 1 < kPivots) cnt_hi[r] = seen[r].c[jlo + 1];
      }
      __syncthreads();
      lo = nlo, hi = max(nhi, nlo + 1);
    }
    if (!fit) {  // the full passes closed the range (the lists would not fit, e.g. many tied weights)
      const float x = __uint_as_float(lo);
      double m = 0.0;
      for (int i = ws + lane; i < we; i += 32) {
        const float v = w[i];
        if (v >= x) m += (double)v;
      }
      Partial p;
      partial_clear(p);
      p.m[0] = warp_sum(m);
      reduce(p, 0, false, t);
      return t.m[0];
    }
    const uint32_t hi_listed = hi;
    // Own list: the weights in [lo, hi); the weights at or above hi are counted and summed.
    __syncthreads();  // every thread has read the counts
    if (threadIdx.x == 0) st.cand_count = 0;
    __syncthreads();
    double above = 0.0;
    for (int b0 = ws; b0 < we; b0 += 32) {  // whole warps per step: the ballot needs every lane
      const int i = b0 + lane;
      const float x = i < we ? w[i] : 0.0f;
      const uint32_t bits = __float_as_uint(x);
      const bool in = i < we && bits >= lo && bits < hi_listed;
      if (i < we && bits >= hi_listed) above += (double)x;
      const unsigned m = __ballot_sync(0xffffffffu, in);
      int at = 0;
      if (lane == 0 && m) at = atomicAdd(&st.cand_count, __popc(m));
      at = __shfl_sync(0xffffffffu, at, 0);
      if (in) cand[at + __popc(m & ((1u << lane) - 1u))] = x;
    }
    __syncthreads();
    {
      Partial p;
      partial_clear(p);
      p.m[0] = warp_sum(above);
      if (threadIdx.x == 0) p.c[0] = st.cand_count, p.c[1] = cnt_hi[rank];
      reduce(p, 2, false, t, true);  // seen[r]: list length, count and mass above the range, of block r
    }
    // Every block's list, in rank order, into `gathered`.
    int off = 0, above_count = 0;
    for (int r = 0; r < CL; r++) {
      const int len = seen[r].c[0];
      const float* src = cand;
#if MP_SAMPLE_CLUSTERS
      if constexpr (CL > 1) src = cooperative_groups::this_cluster().map_shared_rank(cand, r);
#endif
      for (int i = threadIdx.x; i < len; i += blockDim.x) gathered[off + i] = src[i];
      off += len;
      above_count += seen[r].c[1];
    }
    const int ng = off;
#if MP_SAMPLE_CLUSTERS && MP_SAMPLE_PUSH
    // Pushes do not order these remote reads before a neighbour's next list or its exit: a cluster barrier does.
    if constexpr (CL > 1) cooperative_groups::this_cluster().sync();
    else __syncthreads();
#else
    __syncthreads();
#endif
    // Block-local bisection over the gathered list: counts at the pivots plus the count above the range.
    while (hi - lo > 1) {
      uint32_t piv[kPivots];
      for (int j = 0; j < kPivots; j++) piv[j] = lo + (uint32_t)(((uint64_t)(hi - lo) * (uint64_t)(j + 1)) >> 3);
      int c[kPivots];
      for (int j = 0; j < kPivots; j++) c[j] = 0;
      for (int i = threadIdx.x; i < ng; i += blockDim.x) {
        const uint32_t b = __float_as_uint(gathered[i]);
#pragma unroll
        for (int j = 0; j < kPivots; j++) c[j] += b >= piv[j];
      }
#pragma unroll
      for (int j = 0; j < kPivots; j++) c[j] = warp_sum(c[j]);
      if (lane == 0)
        for (int j = 0; j < kPivots; j++) st.warp_part[0][warp].c[j] = c[j];
      __syncthreads();
      int jlo = -1;
      for (int j = 0; j < kPivots; j++) {
        int total = above_count;
        for (int i = 0; i < nwarps; i++) total += st.warp_part[0][i].c[j];
        if (total >= k) jlo = j;
        else break;
      }
      __syncthreads();  // all have read warp_part before the next pass writes it
      const uint32_t nlo = jlo >= 0 ? piv[jlo] : lo;
      const uint32_t nhi = jlo + 1 < kPivots ? piv[jlo + 1] : hi;
      lo = nlo, hi = max(nhi, nlo + 1);
    }
    // Z_k = (mass above the listed range, all blocks in rank order) + (listed weights >= x), the same in every block.
    const float x = __uint_as_float(lo);
    double m = 0.0;
    for (int i = threadIdx.x; i < ng; i += blockDim.x)
      if (gathered[i] >= x) m += (double)gathered[i];
    m = warp_sum(m);
    if (lane == 0) st.warp_part[0][warp].m[0] = m;
    __syncthreads();
    double z = 0.0;
    for (int r = 0; r < CL; r++) z += seen[r].m[0];
    for (int i = 0; i < nwarps; i++) z += st.warp_part[0][i].m[0];
    __syncthreads();  // all have read warp_part before it is reused
    return z;
  }

  // The inverse CDF inside one warp piece [ps, pe) of this block, by the whole block: `before` is the mass of the set
  // ahead of the piece. Each warp takes a sub-piece, each lane a run of ~3 elements of it; a warp scan gives the
  // lanes' prefixes, a scan over the warps' totals (in every warp) the sub-piece holding the target, a ballot its
  // lane, which walks its run. The token and its weight go to st.warp_part[0][0] (read after a block barrier). Where
  // rounding leaves the target past the piece's end: the last kept token of the last sub-piece and lane holding
  // any (the CPU takes the last token of the set).
  __device__ void search_piece(float low, double target, double before, int ps, int pe, Partial& p) {
    const int len = pe - ps;
    const int sub = (len + nwarps - 1) / nwarps;
    const int s0 = ps + min(len, warp * sub), s1 = ps + min(len, (warp + 1) * sub);
    const int per = (s1 - s0 + 31) / 32;
    const int a0 = s0 + min(s1 - s0, lane * per), a1 = s0 + min(s1 - s0, (lane + 1) * per);
    double run = 0.0;
    int last = -1;
    for (int i = a0; i < a1; i++) {
      const float x = w[i];
      if (x > low) run += (double)x, last = i;
    }
    double incl, excl;
    warp_scan(run, lane, incl, excl);
    const unsigned nonempty = __ballot_sync(0xffffffffu, last >= 0);
    if (lane == 31) st.sub_mass[warp] = incl;
    if (lane == 0) st.sub_any[warp] = nonempty != 0;
    __syncthreads();
    // Sub-piece holding the target (every warp computes the same; nwarps <= 32).
    const double m = lane < nwarps ? st.sub_mass[lane] : 0.0;
    const bool any = lane < nwarps && st.sub_any[lane];
    double ci, ce;
    warp_scan(m, lane, ci, ce);
    const unsigned hit_k = __ballot_sync(0xffffffffu, any && before + ci > target);
    const unsigned any_k = __ballot_sync(0xffffffffu, any);  // != 0: the piece's mass is > 0
    const int ksel = hit_k ? __ffs(hit_k) - 1 : 31 - __clz(any_k);
    const double c_k = before + __shfl_sync(0xffffffffu, ce, ksel);
    if (warp != ksel) return;
    const unsigned hit = __ballot_sync(0xffffffffu, last >= 0 && c_k + incl > target);
    const int l = hit ? __ffs(hit) - 1 : 31 - __clz(nonempty);
    if (lane != l) return;
    double c3 = c_k + excl;
    int t = -1;
    for (int i = a0; i < a1; i++) {
      const float x = w[i];
      if (x > low) {
        c3 += (double)x;
        if (c3 > target) {
          t = i;
          break;
        }
      }
    }
    if (t < 0) t = last;  // rounding left the target past the run's end
    p.token = base + t;
    p.value = w[t];
    st.warp_part[0][0] = p;
  }

  // Inverse CDF over {w > low} (masses per block `bm` and per warp `wmass` from the pass that built the set):
  // the first token, in index order, where the running sum exceeds target. Returns the global index and weight
  // in every block of the row.
  __device__ void inverse_cdf(float low, double target, const double* bm, const double* wmass, int& token,
                              float& value) {
    // Block holding the target: lane r < CL holds block r's mass, and the first block with mass whose inclusive
    // prefix passes the target holds it (every block computes the same answer from the same numbers). If rounding
    // pushed the target past the end: the last token of the set, as the CPU does.
    int b;
    double cum;
    {
      const double m = lane < CL ? bm[lane] : 0.0;
      double incl, excl;
      warp_scan(m, lane, incl, excl);
      const unsigned hit = __ballot_sync(0xffffffffu, m > 0.0 && incl > target);
      const unsigned any = __ballot_sync(0xffffffffu, m > 0.0);
      b = hit ? __ffs(hit) - 1 : 31 - __clz(any);
      cum = __shfl_sync(0xffffffffu, excl, b);
      const double end = __shfl_sync(0xffffffffu, incl, b);
      if (!hit) target = end;  // unreachable: the scans below fall through to the last token of block b
    }
    Partial p;
    partial_clear(p);
    if (rank == b) {
      // Warp holding the target, the same way over the warp masses (in shared memory).
      const double m = lane < nwarps ? wmass[lane] : 0.0;
      double incl, excl;
      warp_scan(m, lane, incl, excl);
      const unsigned hit = __ballot_sync(0xffffffffu, m > 0.0 && cum + incl > target);
      const unsigned any = __ballot_sync(0xffffffffu, m > 0.0);
      const int wsel = hit ? __ffs(hit) - 1 : 31 - __clz(any);
      const double c2 = cum + __shfl_sync(0xffffffffu, excl, wsel);
      search_piece(low, target, c2, min(n, wsel * pw), min(n, min(n, wsel * pw) + pw), p);
    }
    __syncthreads();
    Partial mine;
    partial_clear(mine);
    if (threadIdx.x == 0 && rank == b) mine = st.warp_part[0][0];
    Partial all;
    exchange_partials(mine, all, 0, false);
    token = seen[b].token;
    value = seen[b].value;
  }
};

struct RowOutputs {
  int32_t* tokens;
  float* logprobs;
  int32_t* rounds;
  int32_t* status;
};

// Samples one row; every block of the row runs it and takes the same branches (returns included).
// PRELOADED: the slice is already in rs.w (pipelined path), so pass 1 only scans it. after_pass1() runs once on
// every path, right after pass 1 (or before an early return): the pipelined path starts the next row's copy there.
template <int CL, bool PRELOADED, class AfterPass1>
__device__ void sample_one_row(RowSampler<CL>& rs, BlockState& st, const float* row_logits, int row, int V,
                               const gen::SamplingParams& p, const float* lse, const RowOutputs& out,
                               const AfterPass1& after_pass1) {
  const bool leader = rs.rank == 0 && threadIdx.x == 0;
  auto finish_bad = [&](int32_t nr, int32_t stat) {
    if (leader) {
      out.tokens[row] = -1;
      out.logprobs[row] = NAN;
      if (out.rounds) out.rounds[row] = nr;
      out.status[row] = stat;
    }
  };
  const float lse_row = leader && lse ? lse[row] : 0.0f;  // in flight during pass 1
  Partial t;
  // The first round's uniform (a Philox block, ~0.1 us of dependent integer multiplies), by thread 0 while pass 1
  // waits for its piece of the logits; the other threads read it after pass 1's block barrier.
  auto first_uniform = [&] { st.u0 = draw_uniform(p, 0); };
  if constexpr (PRELOADED) {
    if (threadIdx.x == 0) first_uniform();
    rs.scan_max(t);
  } else {
    rs.load(row_logits, t, first_uniform);
  }
  MP_PROF(rs, 1);
  // The copy starts after pass 1's exchange rather than before it: a barrier's release may wait for the thread's
  // outstanding copies, which would put the next row's whole transfer inside this row's first exchange.
  after_pass1();
  // The parameters are checked after pass 1, so that the copy of the logits starts without waiting for their load
  // (a row with bad parameters costs its pass 1, nothing else).
  if (!params_ok(p)) {
    finish_bad(0, kSampleBadParams);
    return;
  }
  if (t.flags != 0 || t.best_idx < 0) {
    finish_bad(0, kSampleBadLogits);
    return;
  }
  const bool greedy = p.temperature == 0.0f;
  const float T = greedy ? 1.0f : p.temperature;
  const float best = t.best;
  const int argmax = t.best_idx;
  // zmax as the CPU forms it; the max weight is exactly 1 (the refined quotient of best in weights() is zmax).
  const double zmax = (double)best / (double)T;
  // logprob of token tok: from the caller's lse, or from the row's own total mass (the CPU formula, in double).
  // Only the leader thread writes the result, so only it reads the logit and takes the log. x: the token's logit;
  // log_total: log of the row's total mass (unused with lse). The leader loads the logit as soon as the token is
  // drawn and takes the log as soon as the mass is known, so that neither latency falls between the row's last
  // exchange and its end. (Taking the log and the first uniform while an exchange is in flight instead was
  // measured slower: the extra live state spilled; bench/sampling-gpu.notes.md.)
  auto finish = [&](int32_t tok, float x, double log_total, int32_t nr) {
    if (leader) {
      out.tokens[row] = tok;
      out.logprobs[row] = lse ? __fdiv_rn(x, T) - lse_row
                              : (float)(((double)x / (double)T - zmax) - log_total);
      if (out.rounds) out.rounds[row] = nr;
      out.status[row] = kSampleOk;
    }
  };
  if (greedy && lse) {  // the argmax is all greedy needs when the logprob comes from lse
    finish(argmax, best, 0.0, 0);
    return;
  }

  float low = -1.0f;  // every kept token has w > low
  if (p.min_p > 0.0f) low = nextafterf(p.min_p, 0.0f);  // {w >= min_p} = {w > prev float of min_p}
  double total, mass_low;
  if (greedy) {  // the total mass only: no weight is stored
    rs.template weights<true, false, false>(T, best, zmax, low, total, mass_low);
    MP_PROF(rs, 2);
    finish(argmax, best, leader ? log(total) : 0.0, 0);
    return;
  }
  if (T == 1.0f) {
    if (low >= 0.0f) rs.template weights<true, true, true>(T, best, zmax, low, total, mass_low);
    else rs.template weights<true, false, true>(T, best, zmax, low, total, mass_low);
  } else {
    if (low >= 0.0f) rs.template weights<false, true, true>(T, best, zmax, low, total, mass_low);
    else rs.template weights<false, false, true>(T, best, zmax, low, total, mass_low);
  }
  MP_PROF(rs, 2);
  const double log_total = leader && !lse ? log(total) : 0.0;
  // Which masses of the weights pass describe {w > low}. A round's inverse CDF reads its set's masses before the
  // round's counting pass overwrites slots 0 and 1 with the next set's, so the start set needs no slot of its own.
  int cur = p.min_p > 0.0f ? 1 : 0;
  if (cur == 0) mass_low = total;

  const int k = p.top_k > 0 && p.top_k < V ? p.top_k : 0;
  const double top_p = (double)p.top_p;
  const bool filtering = k > 0 || top_p < 1.0;
  double zk = -1.0;
  // The keep rule of gen/sampling.h (2) for the largest token at or below a pivot, given count and mass above it.
  // least: a weight the token in question is known to reach (the drawn one's, v): when count < k the token is in
  // the top-k set, so Z_k >= mass + least, which often settles the test without Z_k.
  auto keep = [&](int count, double mass, float least) -> bool {
    if (k > 0 && count >= k) return false;
    if (top_p >= 1.0) return true;
    const double bound = top_p * total;
    if (k == 0 || mass >= bound) return mass < bound;  // Z_k <= total decides without Z_k
    if (zk < 0.0) {
      if (mass < top_p * (mass + (double)least)) return true;
#if MP_SAMPLE_TOPK_GATHER
      MP_PROF(rs, 6);
      zk = rs.top_k_mass_gather(k);
      MP_PROF(rs, 5);
#else
      zk = rs.top_k_mass(k);
#endif
    }
    return mass < top_p * zk;
  };

  // A drawn token of at least this weight is kept without a counting pass, as the pass would find (same token,
  // same rounds): the largest weight 1 (nothing lies above it), and with top-p alone a weight above (1 - top_p) of
  // the mass, since the mass above the token is then below top_p of it (1e-6 of the mass added, far above the
  // rounding of the double sums). Common in real rows, where one token often holds most of the mass.
  const float keep_alone =
      k == 0 ? fminf(1.0f, __double2float_ru((1.0 - top_p + 1e-6) * total)) : 1.0f;
  float high = 1.0f;  // some token at or below high is kept
  for (uint32_t draw = 0; draw < gen::kMaxDraws; draw++) {
    const double target = (double)(draw == 0 ? st.u0 : draw_uniform(p, draw)) * mass_low;
    int tok;
    float v;
    MP_PROF(rs, 6);
    rs.inverse_cdf(low, target, st.block_mass[cur], st.warp_mass[cur], tok, v);
    MP_PROF(rs, 3);
    const float x_tok = leader ? row_logits[tok] : 0.0f;  // in flight during the counting pass
    if (!filtering || v > high || v >= keep_alone) {
      finish(tok, x_tok, log_total, (int32_t)draw + 1);
      return;
    }
    const float pivot = fminf(high, fmaxf(v, 0.5f * (v + high)));
    Partial c;
    rs.count_above(v, pivot, c);
    MP_PROF(rs, 4);
    if (keep(c.c[0], c.m[0], v)) {
      finish(tok, x_tok, log_total, (int32_t)draw + 1);
      return;
    }
    low = v, mass_low = c.m[0], cur = 0;  // tok and everything at or below it is rejected
    if (!keep(c.c[1], c.m[1], v)) low = pivot, mass_low = c.m[1], cur = 1;
    else high = pivot;
  }
  finish_bad((int32_t)gen::kMaxDraws, kSampleBadLogits);  // out of uniforms: not reachable in practice
}

// One row per block (CL == 1) or per cluster of CL blocks. SMEM: the slice lives in dynamic shared memory;
// otherwise in scratch ([R, round_up(V, 4)] fp32, rows 16-byte aligned for the float4 passes).
//
// PIPE (with SMEM): persistent blocks. The grid holds as many blocks (clusters) as are resident at once; cluster
// c takes rows c, c + G, c + 2G, ... (G clusters) and keeps two slice buffers: while it samples row r from one,
// the asynchronous copy of its next row fills the other, so HBM streams under the computation instead of
// between rows. Every row is sampled by the same code on the same slice shape, so a row's result does not depend
// on which cluster takes it, nor on the batch.
template <int CL, bool SMEM, bool PIPE, int MAXT>
__global__ void __launch_bounds__(MAXT) sample_rows_kernel(const float* __restrict__ logits, int64_t ld, int R, int V,
                                                           int S, const gen::SamplingParams* __restrict__ params,
                                                           const float* __restrict__ lse, RowOutputs out,
                                                           float* __restrict__ scratch) {
#if !MP_SAMPLE_CLUSTERS
  if constexpr (CL > 1) {
    __trap();  // never launched: the launcher uses clusters only with kernels compiled for sm_90
  } else
#endif
  {
    __shared__ BlockState st;
    extern __shared__ float4 dyn_smem[];
    float* dyn = reinterpret_cast<float*>(dyn_smem);
    const int rank = blockIdx.x % CL;
    const int base = min(V, rank * S);
    const int n = min(V, base + S) - base;

#if MP_SAMPLE_CLUSTERS && MP_SAMPLE_PUSH
    if constexpr (CL > 1) {
      // The inboxes' transaction barriers, one arrival (the block's own) a phase; the cluster barrier's arrival
      // here publishes them, and a block waits on it before its first push (exchange_partials).
      if (threadIdx.x == 0) {
        for (int b = 0; b < 2; b++) mbar_init<1>((uint32_t)__cvta_generic_to_shared(&st.inbox_full[b]));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
      }
      asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory");
    }
#endif
    RowSampler<CL> rs{st};
    rs.n = n;
    rs.S = S;
    rs.base = base;
    rs.V = V;
    rs.lane = threadIdx.x & 31;
    rs.warp = threadIdx.x >> 5;
    rs.nwarps = blockDim.x >> 5;
    rs.rank = rank;
    // Warp pieces start on multiples of 4 elements (16 bytes): the weight and count passes read float4s.
    const int per_warp = (n + 4 * rs.nwarps - 1) / (4 * rs.nwarps) * 4;
    rs.pw = per_warp;
    rs.ws = min(n, rs.warp * per_warp);
    rs.we = min(n, rs.ws + per_warp);

    if constexpr (PIPE) {
      rs.cand = dyn + 2 * S;
      const int G = gridDim.x / CL;
      int row = blockIdx.x / CL;
      if (row < R) rs.fetch_issue(logits + (size_t)row * ld, dyn);
      for (int i = 0; row < R; i++, row += G) {
        const float* row_logits = logits + (size_t)row * ld;
        float* cur = (i & 1) ? dyn + S : dyn;
        MP_PROF(rs, 6);
        rs.fetch_wait(row_logits, cur);  // ends with a block barrier: every thread is done with row - G
        MP_PROF(rs, 0);
        rs.w = cur;
        const gen::SamplingParams p = params[row];
        float* next = (i & 1) ? dyn : dyn + S;  // held row - G, which every thread is done with
        auto prefetch = [&] {
          if (row + G < R) rs.fetch_issue(logits + (size_t)(row + G) * ld, next);
        };
        sample_one_row<CL, true>(rs, st, row_logits, row, V, p, lse, out, prefetch);
#if MP_SAMPLE_PROFILE
        if (rs.rank == 0 && threadIdx.x == 0) rs.prof.acc[7]++;
#endif
      }
    } else {
      const int row = blockIdx.x / CL;
      rs.w = SMEM ? dyn : scratch + (size_t)row * (size_t)((V + 3) / 4 * 4) + base;
      rs.w_shared = SMEM;
      rs.cand = dyn + (SMEM ? S : 0);
      const gen::SamplingParams p = params[row];
      MP_PROF(rs, 0);
      sample_one_row<CL, false>(rs, st, logits + (size_t)row * ld, row, V, p, lse, out, [] {});
      MP_PROF(rs, 6);
#if MP_SAMPLE_PROFILE
      if (rs.rank == 0 && threadIdx.x == 0) rs.prof.acc[7]++;
#endif
    }
#if MP_SAMPLE_PROFILE
    rs.prof.flush(rs.rank == 0 && threadIdx.x == 0);
#endif
#if MP_SAMPLE_CLUSTERS
    // No block may exit while another block of its cluster can still read its shared memory. Pushed partials
    // need no such barrier: a block's last wait saw every push into it complete, and no block reads another's
    // inbox (top_k_mass_gather's remote reads end in a cluster barrier of their own). A block that never
    // exchanged still owes the wait that pairs with its first arrival.
    if constexpr (CL > 1) {
#if MP_SAMPLE_PUSH
      if (rs.exchange == 0) asm volatile("barrier.cluster.wait;" ::: "memory");
#else
      cooperative_groups::this_cluster().sync();
#endif
    }
#endif
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers

struct Plan {
  int cluster;        // blocks per row
  bool smem;          // slice in shared memory
  bool pipe;          // persistent blocks with two slice buffers (see sample_rows_kernel)
  int slice;          // S
  int threads;
  size_t dyn_smem;
  int max_threads;    // the kernel's launch bound: 1024 (64 registers a thread) or 512 (128 registers)
};

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// cluster: 0 = choose, 1 = one block per row over scratch, -1 = one block per row in shared memory (tests),
// 2/4/6/8 = a cluster holding the row in shared memory. pipelined: -1 = choose, 0 = one row per block (cluster),
// 1 = persistent double-buffered blocks (an error where the two buffers do not fit).
//
// The choice (cluster 0): the smallest cluster (1, or on sm_90 2, 4, 6 or 8 blocks) whose slice leaves room for two
// blocks per SM (512 threads each: one block loads its row from HBM while the other computes), else the smallest
// that fits one block per SM (1024 threads), else one block per row over scratch. Clusters only on sm_90.
//
// pipelined -1 chooses one row per block (cluster): measured on an H100 at V = 151936 (256 rows, top-p 0.9) the
// pipelined launch takes 0.24 ms against 0.16 ms (bench/results/sampling-gpu.json). It hides the HBM reads, but
// only 15 clusters of 8 are resident (one block per SM: the two buffers fill its shared memory) against 39 rows in
// flight with two blocks per SM, and a row's passes and exchanges (~22 us a row) are latency the SM then has nothing
// to overlap with.
// Pipelined blocks run 512 threads by default: the row loop's state then stays in registers (at 1024 threads the
// 64-register budget spills it).
// Clusters need an sm_90 device and kernels compiled for one: a PTX-only sm_80 build JIT-compiled on a Hopper GPU
// (how the GPU tests run the sm_80 paths there) has no cluster code.
// Looked up once per device (sample_rows plans on every call).
bool clusters_on(int dev, int major) {
  static std::atomic<int> known[64];  // 0 unknown, 1 no, 2 yes
  std::atomic<int>& k = known[dev & 63];
  int v = k.load(std::memory_order_relaxed);
  if (v == 0) {
    bool ok = major >= 9;
    if (ok) {
      FuncAttributes fa{};
      MP_GPU_CHECK(func_attributes(&fa, sample_rows_kernel<8, true, false, 1024>));
      ok = fa.ptxVersion >= 90;
    }
    v = ok ? 2 : 1;
    k.store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

Plan make_plan(int V, const SampleLaunch& lo) {
  const int cluster = lo.cluster, pipelined = lo.pipelined;
  MP_CHECK_ARG(pipelined >= -1 && pipelined <= 1,
               "sample_rows: pipelined must be -1, 0 or 1, got " + std::to_string(pipelined));
  MP_CHECK_ARG(lo.threads == 0 || lo.threads == 512 || lo.threads == 1024,
               "sample_rows: threads must be 0, 512 or 1024, got " + std::to_string(lo.threads));
  MP_CHECK_ARG(lo.resident >= 0, "sample_rows: resident must be >= 0, got " + std::to_string(lo.resident));
  int dev = 0, major = 0, max_optin = 0, per_sm = 0;
  MP_GPU_CHECK(get_device(&dev));
  MP_GPU_CHECK(compute_capability_major(dev, &major));
  const bool clusters = clusters_on(dev, major);
  MP_GPU_CHECK(max_smem_per_block_optin(dev, &max_optin));
  MP_GPU_CHECK(max_smem_per_sm(dev, &per_sm));
  auto slice_of = [&](int cl) { return round_up((V + cl - 1) / cl, 4); };
  // Shared memory of one block: the slice (if on chip; two buffers when pipelined), the top-k candidate list, the
  // static state, and the 1 KB the runtime reserves per block.
  auto block_bytes = [&](int cl, int buffers) {
    return (size_t)buffers * slice_of(cl) * sizeof(float) + cand_cap(cl) * sizeof(float) + sizeof(BlockState) + 1024;
  };
  auto fits = [&](int cl) { return block_bytes(cl, 1) <= (size_t)max_optin + 1024; };
  auto fits_two = [&](int cl) { return 2 * block_bytes(cl, 1) <= (size_t)per_sm; };
  auto fits_pipe = [&](int cl) {
    return block_bytes(cl, 2) <= (size_t)max_optin + 1024 && block_bytes(cl, 2) <= (size_t)per_sm;
  };
  auto plan = [&](int cl, bool smem, int threads) {
    Plan pl;
    pl.cluster = cl;
    pl.smem = smem;
    pl.pipe = false;
    pl.slice = slice_of(cl);
    pl.threads = std::min(threads, std::max(128, round_up((pl.slice + 15) / 16, 32)));  // >= 16 elements a thread
    pl.dyn_smem = (smem ? (size_t)pl.slice * sizeof(float) : 0) + cand_cap(cl) * sizeof(float);
    pl.max_threads = 1024;
    return pl;
  };
  auto pipe_plan = [&](int cl) {
    const int t = lo.threads ? lo.threads : 512;
    Plan pl = plan(cl, true, t);
    pl.pipe = true;
    pl.max_threads = t;
    pl.dyn_smem = 2 * (size_t)pl.slice * sizeof(float) + kCandCap * sizeof(float);
    return pl;
  };
  // One-row launches come in clusters of 1, 2, 4, 6 or 8 blocks, pipelined ones in powers of two. By default the
  // smallest cluster whose blocks fit two to an SM: the most rows at once. At V = 151936 that is 6 (slices of 101 KB
  // with a shorter candidate list), which on an H100 runs 39 rows at once against 30 for clusters of 8: a cluster
  // must sit in one GPC, and 8 divides the GPCs' block slots worse than 6 does (sample_rows_in_flight).
  const std::vector<int> shapes = clusters ? std::vector<int>{1, 2, 4, 6, 8} : std::vector<int>{1};
  const std::vector<int> pipe_shapes = clusters ? std::vector<int>{1, 2, 4, 8} : std::vector<int>{1};
  if (cluster == 0) {
    if (pipelined == 1) {
      for (int cl : pipe_shapes)
        if (fits_pipe(cl)) return pipe_plan(cl);
      MP_CHECK_ARG(false, "sample_rows: a row of V = " + std::to_string(V) +
                              " does not fit two slice buffers of any cluster (pipelined = 1)");
    }
    for (int cl : shapes)
      if (fits_two(cl)) return plan(cl, true, 512);
    for (int cl : shapes)
      if (fits(cl)) return plan(cl, true, 1024);
    return plan(1, false, 1024);
  }
  MP_CHECK_ARG(cluster == 1 || cluster == -1 || cluster == 2 || cluster == 4 || cluster == 6 || cluster == 8,
               "sample_rows: cluster must be 0, -1, 1, 2, 4, 6 or 8, got " + std::to_string(cluster));
  MP_CHECK_ARG(pipelined != 1 || cluster != 6, "sample_rows: clusters of 6 are not pipelined");
  if (cluster == 1) {
    MP_CHECK_ARG(pipelined != 1, "sample_rows: the scratch path (cluster 1) is not pipelined");
    return plan(1, false, 1024);
  }
  const int cl = cluster == -1 ? 1 : cluster;
  MP_CHECK_ARG(cl == 1 || clusters, "sample_rows: thread-block clusters need sm_90 or newer (device and build)");
  if (pipelined == 1) {
    MP_CHECK_ARG(fits_pipe(cl), "sample_rows: a row of V = " + std::to_string(V) +
                                    " does not fit two slice buffers of " + std::to_string(cl) + " block(s)");
    return pipe_plan(cl);
  }
  MP_CHECK_ARG(fits(cl), "sample_rows: a row of V = " + std::to_string(V) + " does not fit the shared memory of " +
                             std::to_string(cl) + " block(s)");
  return plan(cl, true, fits_two(cl) ? 512 : 1024);
}

// Clusters (rows, or persistent row loops) of this launch shape the device runs at once. The answer depends on the
// device and the shape only and pipelined launches repeat (one a decode step), so it is asked once per device and
// shape.
template <int CL, bool SMEM, bool PIPE, int MAXT = 1024>
int clusters_at_once(const Plan& pl) {
  struct Known {
    int dev;
    size_t smem;
    int threads, n;
  };
  static std::mutex mu;
  static std::vector<Known> known;
  int dev = 0;
  MP_GPU_CHECK(get_device(&dev));
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const Known& k : known)
      if (k.dev == dev && k.smem == pl.dyn_smem && k.threads == pl.threads) return k.n;
  }
  auto kernel = sample_rows_kernel<CL, SMEM, PIPE, MAXT>;
  MP_GPU_CHECK(set_max_dynamic_smem(kernel, (int)pl.dyn_smem));
  int n = 0;
  MP_GPU_CHECK(max_active_clusters(&n, kernel, (unsigned)pl.threads, pl.dyn_smem, (unsigned)CL));
  std::lock_guard<std::mutex> lock(mu);
  known.push_back({dev, pl.dyn_smem, pl.threads, n});
  return n;
}

template <int CL, bool SMEM, bool PIPE, int MAXT = 1024>
void launch(const Plan& pl, int resident, const float* logits, int64_t ld, int R, int V,
            const gen::SamplingParams* params, const float* lse, int32_t* tokens, float* logprobs, int32_t* rounds,
            int32_t* status, float* scratch, Stream s) {
  auto kernel = sample_rows_kernel<CL, SMEM, PIPE, MAXT>;
  MP_GPU_CHECK(set_max_dynamic_smem(kernel, (int)pl.dyn_smem));
  RowOutputs out{tokens, logprobs, rounds, status};
  int groups = R;  // rows, or (pipelined) clusters each looping over rows
  if constexpr (PIPE) {
    // As many clusters as run at once (the occupancy query: a cluster must sit inside one GPC, and the SMs of a
    // GPC seldom split evenly into clusters, so on an H100 15 clusters of 8 blocks run at once, not 132 / 8).
    const int fit = std::max(1, clusters_at_once<CL, SMEM, PIPE, MAXT>(pl));
    groups = std::min(R, resident > 0 ? resident : fit);
  }
  MP_GPU_CHECK(launch_clustered(kernel, (unsigned)(groups * CL), (unsigned)pl.threads, pl.dyn_smem, s, (unsigned)CL,
                                logits, ld, R, V, pl.slice, params, lse, out, scratch));
  MP_GPU_CHECK_LAUNCH("sample_rows_kernel");
}

// The kernel instantiation a plan runs: f(KernelShape<...>{}) for its cluster size, shared-memory path, pipelining
// and launch bound (one place for the launch and the occupancy query).
template <int CL, bool SMEM, bool PIPE, int MAXT>
struct KernelShape {
  static constexpr int cl = CL, maxt = MAXT;
  static constexpr bool smem = SMEM, pipe = PIPE;
};
template <class F>
int with_kernel(const Plan& pl, F&& f) {
  if (pl.pipe && pl.max_threads == 512) {
    switch (pl.cluster) {
      case 1: return f(KernelShape<1, true, true, 512>{});
      case 2: return f(KernelShape<2, true, true, 512>{});
      case 4: return f(KernelShape<4, true, true, 512>{});
      case 8: return f(KernelShape<8, true, true, 512>{});
    }
  } else if (pl.pipe) {
    switch (pl.cluster) {
      case 1: return f(KernelShape<1, true, true, 1024>{});
      case 2: return f(KernelShape<2, true, true, 1024>{});
      case 4: return f(KernelShape<4, true, true, 1024>{});
      case 8: return f(KernelShape<8, true, true, 1024>{});
    }
  } else {
    switch (pl.cluster) {
      case 1: return pl.smem ? f(KernelShape<1, true, false, 1024>{}) : f(KernelShape<1, false, false, 1024>{});
      case 2: return f(KernelShape<2, true, false, 1024>{});
      case 4: return f(KernelShape<4, true, false, 1024>{});
      case 6: return f(KernelShape<6, true, false, 1024>{});
      case 8: return f(KernelShape<8, true, false, 1024>{});
    }
  }
  MP_CHECK_INTERNAL(false, "sample_rows: bad plan");
  return 0;
}

}  // namespace

#if MP_SAMPLE_PROFILE
namespace {
__global__ void take_profile_kernel(unsigned long long* out) {
  if (threadIdx.x < kProfPhases) out[threadIdx.x] = g_sample_prof[threadIdx.x], g_sample_prof[threadIdx.x] = 0;
}

}  // namespace
void sample_profile_take(unsigned long long* out, Stream s) {
  void* d = nullptr;
  MP_GPU_CHECK(malloc_device(&d, kProfPhases * sizeof(unsigned long long)));
  take_profile_kernel<<<1, 32, 0, s>>>(static_cast<unsigned long long*>(d));
  MP_GPU_CHECK_LAUNCH("take_profile_kernel");
  MP_GPU_CHECK(memcpy_async(out, d, kProfPhases * sizeof(unsigned long long), s));
  MP_GPU_CHECK(stream_sync(s));
  MP_GPU_CHECK(free_device(d));
}
#endif

bool sample_clusters_available() {
  int dev = 0, major = 0;
  MP_GPU_CHECK(get_device(&dev));
  MP_GPU_CHECK(compute_capability_major(dev, &major));
  return clusters_on(dev, major);
}

int sample_rows_in_flight(int V, const SampleLaunch& lo) {
  MP_CHECK_ARG(V >= 1, "sample_rows_in_flight: vocabulary size V must be >= 1, got " + std::to_string(V));
  const Plan pl = make_plan(V, lo);
  return with_kernel(pl, [&](auto k) {
    using K = decltype(k);
    return clusters_at_once<K::cl, K::smem, K::pipe, K::maxt>(pl);
  });
}

size_t sample_rows_scratch_bytes(int R, int V, const SampleLaunch& launch) {
  if (R <= 0 || V <= 0) return 0;
  Plan pl = make_plan(V, launch);
  return pl.smem ? 0 : (size_t)R * (size_t)round_up(V, 4) * sizeof(float);
}

void sample_rows(const float* logits, int64_t ld, int R, int V, const gen::SamplingParams* params, const float* lse,
                 int32_t* tokens, float* logprobs, int32_t* rounds, int32_t* status, void* scratch, Stream s,
                 const SampleLaunch& lo) {
  MP_CHECK_ARG(R >= 0, "sample_rows: row count R must be >= 0, got " + std::to_string(R));
  MP_CHECK_ARG(V >= 1, "sample_rows: vocabulary size V must be >= 1, got " + std::to_string(V));
  MP_CHECK_ARG(ld >= V,
               "sample_rows: row stride ld must be >= V (" + std::to_string(V) + "), got " + std::to_string(ld));
  MP_CHECK_ARG((int64_t)R * kMaxCluster < (int64_t)1 << 31, "sample_rows: too many rows: " + std::to_string(R));
  MP_CHECK_ARG(V <= (1 << 30), "sample_rows: vocabulary size V must be <= 2^30, got " + std::to_string(V));
  if (R == 0) return;
  MP_CHECK_ARG(logits != nullptr, "sample_rows: logits is null");
  MP_CHECK_ARG(params != nullptr, "sample_rows: params is null");
  MP_CHECK_ARG(tokens != nullptr, "sample_rows: tokens is null");
  MP_CHECK_ARG(logprobs != nullptr, "sample_rows: logprobs is null");
  MP_CHECK_ARG(status != nullptr, "sample_rows: status is null");
  const Plan pl = make_plan(V, lo);
  float* sc = static_cast<float*>(scratch);
  MP_CHECK_ARG(pl.smem || sc != nullptr, "sample_rows: scratch is null but this device needs " +
                                             std::to_string(sample_rows_scratch_bytes(R, V, lo)) + " bytes of it");
  with_kernel(pl, [&](auto k) {
    using K = decltype(k);
    launch<K::cl, K::smem, K::pipe, K::maxt>(pl, lo.resident, logits, ld, R, V, params, lse, tokens, logprobs, rounds,
                                              status, sc, s);
    return 0;
  });
}

}  // namespace moepilot::gpu
