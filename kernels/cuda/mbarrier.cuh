// Transaction barriers (mbarrier) in shared memory, by their shared-memory address (sm_90: a phase completes once
// its arrivals are in and the bytes it expects have landed, as TMA and bulk copies count them). Shared by the
// sampler's cluster exchanges and the warp-specialized grouped GEMM's operand ring.
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
namespace moepilot::gpu {

// kArrivals arrivals a phase.
template <int kArrivals>
__device__ __forceinline__ void mbar_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "n"(kArrivals) : "memory");
}
// One arrival, which also sets how many more bytes must land before the phase completes.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Spins until the phase of the given parity completes. The wait's default CTA-scope acquire makes bytes that landed
// in this block's shared memory visible to the thread, as for a TMA copy; a cluster-scope acquire would also
// invalidate the L1 cache in every waiting thread (CCTL.IVALL), which Nsight Compute showed as a quarter of the
// sampler's stall samples.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

}  // namespace moepilot::gpu
#endif
