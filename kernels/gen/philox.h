// Philox4x32-10: the counter-based generator of Salmon, Moraes, Dror and Shaw, "Parallel Random Numbers:
// As Easy as 1, 2, 3" (SC'11). A pure function of a 128-bit counter and a 64-bit key, so any random number
// can be computed where it is needed, in any order, on any thread or GPU lane, with no state to carry.
// Written from the published algorithm; checked against Random123's known-answer vectors
// (src/engine/sampler.test.ts, through the addon's philox4x32 test hook).
//
// One round on counter (c0, c1, c2, c3) with key (k0, k1):
//   hi0:lo0 = M0 * c0 (64-bit product),  hi1:lo1 = M1 * c2
//   (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// and between rounds the key is bumped by the Weyl constants (k0 += W0, k1 += W1).
// Host and device (a CUDA build defines __CUDACC__) share this one definition.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MP_HOST_DEVICE __host__ __device__
#else
#define MP_HOST_DEVICE
#endif

namespace moepilot::gen {

struct Philox4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

MP_HOST_DEVICE inline Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; round++) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint64_t p0 = (uint64_t)kPhiloxM0 * c.v[0];
    uint64_t p1 = (uint64_t)kPhiloxM1 * c.v[2];
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

// Uniform float in [0, 1) from one 32-bit output: the top 24 bits scaled by 2^-24. Every value is exactly
// representable in fp32 (a 24-bit significand), so the conversion is exact, identical on every backend, and
// the largest result is 1 - 2^-24 < 1. The low 8 bits are dropped.
MP_HOST_DEVICE inline float uniform_from_u32(uint32_t x) { return (float)(x >> 8) * (1.0f / 16777216.0f); }

}  // namespace moepilot::gen
