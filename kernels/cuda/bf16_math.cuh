// Device arithmetic that two kernels must spell identically to give the same bits: the bf16 rounding of every
// fp32 -> bf16 store and the SwiGLU of the MLPs (swiglu_forward in ops.cu, and the fused gate/up GEMM epilogue in
// gemm.cu, whose act must equal the separate GEMMs' then swiglu_forward bit for bit). Both translation units are
// compiled with the same flags; one definition keeps the expressions, and so their code, the same.
#pragma once

#include <cstdint>

namespace moepilot::gpu {

__device__ __forceinline__ float bf16_to_f32(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ uint16_t f32_to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// silu(g) * u.
__device__ __forceinline__ float swiglu(float g, float u) { return g / (1.f + expf(-g)) * u; }

}  // namespace moepilot::gpu
