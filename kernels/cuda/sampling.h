// Token sampling on the GPU (contract; implemented in cuda/sampling.cu): the distribution, filters, Philox
// stream and greedy rule of kernels/gen/sampling.h, row for row, as sorting-free kernels (one thread block, or
// one cluster of blocks, per row; dual-pivot rejection; min-p as one pivot; no sort of the vocabulary).
//
// For the same logits and parameters a row draws the same uniforms as the CPU sampler (gen::sampling_uniform),
// so both pick the same token except where a uniform falls within rounding of a CDF boundary. A row's result
// depends only on its logits and its parameters, never on the batch (nor on the launch shape below, up to the
// same rounding). Rounding here: each weight fp32(exp(z - zmax)) is the CPU's or its fp32 neighbour (exp runs in
// fp32 from an exact two-float argument; both give 0 below gen::kWeightFloor, where at T != 1 the two may round
// z - zmax to either side of the floor, ~4.5e-38 against 0), and masses are double sums in a tree order rather
// than index order; the logprob (own path) stays within ~1e-7 relative of the CPU's, or ~V 2^-52 absolute for
// logprobs near 0.
//
// logprob: log_softmax(logits / T)[token] over the full vocabulary (T = 1 for greedy). When `lse` is given
// ([R], the log-sum-exp of logits / T as the LM head computed it for the trainer) the logprob is
// fp32(logits[token] / T) - lse[row], which is exactly what the trainer computes from the same numbers; without
// it the kernel computes its own.
#pragma once
#include <cstdint>

#include "cuda/vendor.h"
#include "gen/sampling.h"

namespace moepilot::gpu {

// Row flags written to `status` (0 = ok).
enum SampleStatus : int32_t { kSampleOk = 0, kSampleBadLogits = 1, kSampleBadParams = 2 };

// logits [R, V] fp32 on the device (row stride ld >= V), params [R] (device copy of gen::SamplingParams), lse [R]
// or null; out: tokens [R], logprobs [R], rounds [R] (draws used, or null), status [R] (non-zero for a NaN / +inf /
// all -inf row or bad parameters: the row's token is then -1 and its logprob NaN; other rows are unaffected).
// scratch: sample_rows_scratch_bytes(R, V) bytes (0 where the row fits on chip, which is the case on sm_90 up to
// V ~ 410k and on sm_80 up to V ~ 36k; null is then fine). Launches on stream s; throws moepilot::Error
// (InvalidArgument) naming a bad argument (R, V, ld, a null pointer, a launch option).
//
// Launch options (SampleLaunch), for tests and benchmarks; the defaults choose, and the answer is the same whatever
// the shape, up to the rounding exception above (sums run in a shape-dependent order):
//   cluster: 0 chooses; 1 forces one block per row over scratch, -1 one block per row in shared memory, 2/4/6/8 a
//     cluster of that many blocks (sm_90) holding the row in distributed shared memory (6: one row per cluster
//     only, not pipelined).
//   pipelined: -1 chooses (one row per block: faster on an H100 at V = 151936, see sampling.cu), 0 one row per
//     block (cluster) as launched, 1 persistent blocks (clusters) that each take every G-th row and hold two slice
//     buffers, copying the next row in from HBM while sampling the current one (needs the two buffers to fit in
//     shared memory: at V = 151936 clusters of 8 with two 76 KB buffers per block).
//   resident: pipelined only, the number of persistent clusters G (0: as many as the SMs hold at once).
//   threads: pipelined only, threads per block, 512 or 1024 (0 chooses).
struct SampleLaunch {
  int cluster = 0;
  int pipelined = -1;
  int resident = 0;
  int threads = 0;
};
// Whether the current device can run cluster shapes (2/4/6/8): an sm_90 GPU and kernels compiled for one (not a
// PTX-only sm_80 build JIT-compiled on Hopper).
bool sample_clusters_available();
// How many rows the launch shape samples at once on the current device (one row per cluster, or per persistent
// cluster when pipelined): 256 rows take about 256 / this many rows' latencies.
int sample_rows_in_flight(int V, const SampleLaunch& launch = SampleLaunch{});
size_t sample_rows_scratch_bytes(int R, int V, const SampleLaunch& launch = SampleLaunch{});
void sample_rows(const float* logits, int64_t ld, int R, int V, const gen::SamplingParams* params, const float* lse,
                 int32_t* tokens, float* logprobs, int32_t* rounds, int32_t* status, void* scratch, Stream s,
                 const SampleLaunch& launch = SampleLaunch{});

// Benchmark instrumentation, only in a build with -DMP_SAMPLE_PROFILE=1: nanoseconds spent by each row's first
// block since the last call, per phase (0 waiting for the row's copy, 1 max pass, 2 weights pass, 3 inverse CDFs,
// 4 counting passes, 5 top-k mass, 6 the rest), and [7] the number of rows.
constexpr int kProfPhases = 8;
#if defined(MP_SAMPLE_PROFILE) && MP_SAMPLE_PROFILE
void sample_profile_take(unsigned long long* out, Stream s);
#endif

}  // namespace moepilot::gpu
