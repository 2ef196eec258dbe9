// Kernels and launchers behind cuda/ops.h. Sections: helpers, casts, embedding, RMSNorm, RoPE, SwiGLU,
// router, MoE dispatch, LM head, optimizer. In each, kernels first, then their launchers.
#include <algorithm>
#include <cmath>
#include <string>

#include "cuda/bf16_math.cuh"
#include "cuda/gemm.h"
#include "cuda/ops.h"
#include "moepilot/error.h"

namespace moepilot::gpu {
namespace {

// ================================================================ helpers
__device__ __forceinline__ float bf2f(bf16_bits b) { return bf16_to_f32(b); }
__device__ __forceinline__ bf16_bits f2bf(float f) { return f32_to_bf16(f); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of whole warps (<= 32 warps), the same order every time; every thread gets the result.
template <class T>
__device__ T block_sum(T v, T* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read from a previous call
  if (lane == 0) sh[w] = v;
  __syncthreads();
  T r = 0;
  for (int i = 0; i < nw; i++) r += sh[i];
  return r;
}
int blocks_for(size_t n, int threads) { return (int)std::min<size_t>((n + threads - 1) / threads, 1u << 20); }
// Whether every pointer is aligned to `bytes` (the vector-width kernels' precondition).
template <class... P>
bool aligned_to(size_t bytes, const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % bytes == 0) && ...);
}

// Column reduction in a fixed order: out[c] (+= when acc, else =) = sum over rows r of f(r, c). A block owns 16
// columns with 64 row lanes each (1024 threads; a warp reads two rows' 64-byte pieces); a lane strides over the
// rows with eight loads in flight into four partial sums, then the 64 lanes' sums are added in order. (32 columns x
// 16 lanes a block left most SMs idle at C = 2048: 64 blocks, ~25 us a call on H100.)
constexpr int kColCols = 16, kColLanes = 64;
template <class F>
__global__ void __launch_bounds__(kColCols* kColLanes) column_reduce_kernel(float* out, bool acc, int N, int C, F f) {
  __shared__ float part[kColLanes][kColCols + 1];
  const int c = blockIdx.x * kColCols + threadIdx.x;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  if (c < C) {
    int r = threadIdx.y;
    for (; r + 7 * kColLanes < N; r += 8 * kColLanes) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; u++) v[u] = f(r + kColLanes * u, c);
      s0 += v[0];
      s1 += v[1];
      s2 += v[2];
      s3 += v[3];
      s0 += v[4];
      s1 += v[5];
      s2 += v[6];
      s3 += v[7];
    }
    for (; r < N; r += kColLanes) s0 += f(r, c);
  }
  part[threadIdx.y][threadIdx.x] = (s0 + s1) + (s2 + s3);
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t = 0.f;
    for (int i = 0; i < kColLanes; i++) t += part[i][threadIdx.x];
    out[c] = acc ? out[c] + t : t;
  }
}
template <class F>
void column_reduce(float* out, bool acc, int N, int C, F f, Stream s, const char* name) {
  if (C <= 0) return;
  column_reduce_kernel<<<(C + kColCols - 1) / kColCols, dim3(kColCols, kColLanes), 0, s>>>(out, acc, N, C, f);
  MP_GPU_CHECK_LAUNCH(name);
}

// ================================================================ casts and copies
__global__ void cast_f32_bf16_kernel(bf16_bits* out, const float* inp, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = f2bf(inp[i]);
}
__global__ void cast_f32_bf16x4_kernel(bf16_bits* out, const float* inp, size_t n4) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
    const float4 v = reinterpret_cast<const float4*>(inp)[i];
    reinterpret_cast<ushort4*>(out)[i] = make_ushort4(f2bf(v.x), f2bf(v.y), f2bf(v.z), f2bf(v.w));
  }
}
__global__ void cast_bf16_f32_kernel(float* out, const bf16_bits* inp, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = bf2f(inp[i]);
}
__global__ void pad_rows_kernel(bf16_bits* out, const float* inp, int rows, int rows_pad, int cols) {
  const size_t n = (size_t)rows_pad * cols;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = i / cols < (size_t)rows ? f2bf(inp[i]) : (bf16_bits)0;
}
__global__ void add_kernel(float* dst, const float* src, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    dst[i] += src[i];
}

__global__ void fill_constant_kernel(float* x, float value, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    x[i] = value;
}
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__global__ void fill_uniform_kernel(float* x, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const uint64_t r = splitmix64(seed * 0x100000001b3ull + i);
    const float u = (float)(r >> 40) * (1.f / 16777216.f);  // [0, 1)
    x[i] = (2.f * u - 1.f) * scale;
  }
}

// ================================================================ embedding
__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* wte, int N, int C) {
  const int i = blockIdx.x;
  const float* src = wte + (size_t)tokens[i] * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) out[(size_t)i * C + c] = src[c];
}
// One block per distinct token: its rows are added in row order, so no two threads touch one element.
__global__ void embedding_backward_kernel(float* dwte, const float* dout, const int32_t* order, const int32_t* starts,
                                          const int32_t* uniq, int C) {
  const int u = blockIdx.x;
  float* dst = dwte + (size_t)uniq[u] * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = dst[c];
    for (int j = starts[u]; j < starts[u + 1]; j++) acc += dout[(size_t)order[j] * C + c];
    dst[c] = acc;
  }
}

// ================================================================ RMSNorm
// One warp per row. A lane takes columns lane, lane + 32, ... and sums their squares in that order; the loads are
// issued kRmsUnroll at a time (a decode step's 1024 rows are only ~8 warps per SM, each waiting on one load at a
// time otherwise: 24 us a call on an H100), with the arithmetic and its order unchanged.
constexpr int kRmsUnroll = 16;
__global__ void rmsnorm_forward_kernel(float* out32, bf16_bits* out16, float* rstd, const float* inp,
                                       const float* weight, int N, int C, float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= N) return;
  const float* x = inp + (size_t)row * C;
  float ss = 0.f;
  int c = lane;
  for (; c + 32 * (kRmsUnroll - 1) < C; c += 32 * kRmsUnroll) {
    float v[kRmsUnroll];
#pragma unroll
    for (int u = 0; u < kRmsUnroll; u++) v[u] = x[c + 32 * u];
#pragma unroll
    for (int u = 0; u < kRmsUnroll; u++) ss += v[u] * v[u];
  }
  for (; c < C; c += 32) ss += x[c] * x[c];
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf(ss / C + eps);
  auto put = [&](int c, float xv, float wv) {
    const float o = wv * (xv * r);
    if (out32) out32[(size_t)row * C + c] = o;
    if (out16) out16[(size_t)row * C + c] = f2bf(o);
  };
  for (c = lane; c + 32 * (kRmsUnroll - 1) < C; c += 32 * kRmsUnroll) {
    float v[kRmsUnroll], w[kRmsUnroll];
#pragma unroll
    for (int u = 0; u < kRmsUnroll; u++) {
      v[u] = x[c + 32 * u];
      w[u] = weight[c + 32 * u];
    }
#pragma unroll
    for (int u = 0; u < kRmsUnroll; u++) put(c + 32 * u, v[u], w[u]);
  }
  for (; c < C; c += 32) put(c, x[c], weight[c]);
  if (lane == 0 && rstd) rstd[row] = r;
}
__global__ void rmsnorm_backward_kernel(float* dinp, bf16_bits* dinp16, const float* dout, const float* inp,
                                        const float* weight, const float* rstd, int N, int C, bool accumulate) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= N) return;
  const float* x = inp + (size_t)row * C;
  const float* dy = dout + (size_t)row * C;
  const float r = rstd[row];
  float dot = 0.f;  // sum_c (w * dy)_c * x_c, in the lane's column order as in the forward
  int c = lane;
  for (; c + 32 * (kRmsUnroll - 1) < C; c += 32 * kRmsUnroll) {
    float w[kRmsUnroll], d[kRmsUnroll], v[kRmsUnroll];
#pragma unroll
    for (int u = 0; u < kRmsUnroll; u++) {
      w[u] = weight[c + 32 * u];
      d[u] = dy[c + 32 * u];
      v[u] = x[c + 32 * u];
    }
#pragma unroll
    for (int u = 0; u < kRmsUnroll; u++) dot += w[u] * d[u] * v[u];
  }
  for (; c < C; c += 32) dot += weight[c] * dy[c] * x[c];
  dot = warp_sum(dot);
  const float k = dot * r * r * r / C;
  float* dx = dinp + (size_t)row * C;
  bf16_bits* dx16 = dinp16 ? dinp16 + (size_t)row * C : nullptr;
  auto put = [&](int c, float wv, float dv, float xv, float old) {
    const float d = wv * dv * r - xv * k;
    const float o = accumulate ? old + d : d;
    dx[c] = o;
    if (dx16) dx16[c] = f2bf(o);
  };
  for (c = lane; c + 32 * (kRmsUnroll - 1) < C; c += 32 * kRmsUnroll) {  // loads in flight, as above
    float w[kRmsUnroll], d[kRmsUnroll], v[kRmsUnroll], o[kRmsUnroll];
#pragma unroll
    for (int u = 0; u < kRmsUnroll; u++) {
      w[u] = weight[c + 32 * u];
      d[u] = dy[c + 32 * u];
      v[u] = x[c + 32 * u];
      o[u] = accumulate ? dx[c + 32 * u] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kRmsUnroll; u++) put(c + 32 * u, w[u], d[u], v[u], o[u]);
  }
  for (; c < C; c += 32) put(c, weight[c], dy[c], x[c], accumulate ? dx[c] : 0.f);
}
struct RmsDweight {
  const float *dout, *inp, *rstd;
  int C;
  __device__ float operator()(int r, int c) const {
    return dout[(size_t)r * C + c] * inp[(size_t)r * C + c] * rstd[r];
  }
};

// ================================================================ RoPE
// The rotation of one pair (x1 = column j, x2 = column j + HD/2 of a head): one function for the in-place kernel
// and the bf16-writing one, so that their fp32 results are the same expressions, compiled alike.
__device__ __forceinline__ void rope_pair(float x1, float x2, float c, float s, float& o1, float& o2) {
  o1 = x1 * c - x2 * s;
  o2 = x2 * c + x1 * s;
}
// Its backward (the rotation by -angle), likewise shared by the in-place and the bf16-writing kernels.
__device__ __forceinline__ void rope_pair_backward(float x1, float x2, float c, float s, float& o1, float& o2) {
  o1 = x1 * c + x2 * s;
  o2 = -x1 * s + x2 * c;
}
template <bool kBackward>
__device__ __forceinline__ void rope_pair_dir(float x1, float x2, float c, float s, float& o1, float& o2) {
  if constexpr (kBackward)
    rope_pair_backward(x1, x2, c, s, o1, o2);
  else
    rope_pair(x1, x2, c, s, o1, o2);
}
template <bool kBackward>
__global__ void rope_kernel(float* x, const int32_t* pos, const float* cs, const float* sn, int N, int heads, int HD) {
  const int half = HD / 2;
  const size_t n = (size_t)N * heads * half;
  for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < n; t += (size_t)gridDim.x * blockDim.x) {
    const int j = (int)(t % half);
    const size_t rh = t / half;  // row * heads + head
    const int row = (int)(rh / heads);
    const size_t a = (size_t)pos[row] * half + j;
    const float c = cs[a], s = sn[a];
    float* v = x + rh * HD;
    const float x1 = v[j], x2 = v[j + half];
    rope_pair_dir<kBackward>(x1, x2, c, s, v[j], v[j + half]);
  }
}
// Forward rotation of x into bf16 out (x unchanged): the attention's q and k, one pass instead of a rotation in
// place and a cast. kBackward: the backward rotation (dq and dk for the GEMMs), likewise.
template <bool kBackward>
__global__ void rope_bf16_kernel(bf16_bits* out, const float* x, const int32_t* pos, const float* cs,
                                 const float* sn, int N, int heads, int HD) {
  const int half = HD / 2;
  const size_t n = (size_t)N * heads * half;
  for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < n; t += (size_t)gridDim.x * blockDim.x) {
    const int j = (int)(t % half);
    const size_t rh = t / half;
    const int row = (int)(rh / heads);
    const size_t a = (size_t)pos[row] * half + j;
    const float* v = x + rh * HD;
    float o1, o2;
    rope_pair_dir<kBackward>(v[j], v[j + half], cs[a], sn[a], o1, o2);
    out[rh * HD + j] = f2bf(o1);
    out[rh * HD + j + half] = f2bf(o2);
  }
}

// Two adjacent pairs a thread (8-byte loads of x and the tables, 4-byte stores) and 32-bit index arithmetic: the
// same rope_pair per element as rope_bf16_kernel. Needs HD % 4 == 0, N * heads * HD / 4 < 2^31 and 8-byte aligned
// x, cs, sn (4-byte aligned out).
template <bool kBackward>
__global__ void rope_bf16x2_kernel(bf16_bits* out, const float* x, const int32_t* pos, const float* cs,
                                   const float* sn, int N, int heads, int HD) {
  const int half = HD / 2, quads = HD / 4;
  const int n = N * heads * quads;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n; t += gridDim.x * blockDim.x) {
    const int j = (t % quads) * 2;
    const int rh = t / quads;  // row * heads + head
    const int row = rh / heads;
    const size_t a = (size_t)pos[row] * half + j;
    const float* v = x + (size_t)rh * HD;
    const float2 x1 = *reinterpret_cast<const float2*>(v + j), x2 = *reinterpret_cast<const float2*>(v + j + half);
    const float2 c = *reinterpret_cast<const float2*>(cs + a), sn2 = *reinterpret_cast<const float2*>(sn + a);
    float o1a, o2a, o1b, o2b;
    rope_pair_dir<kBackward>(x1.x, x2.x, c.x, sn2.x, o1a, o2a);
    rope_pair_dir<kBackward>(x1.y, x2.y, c.y, sn2.y, o1b, o2b);
    bf16_bits* o = out + (size_t)rh * HD;
    *reinterpret_cast<ushort2*>(o + j) = make_ushort2(f2bf(o1a), f2bf(o1b));
    *reinterpret_cast<ushort2*>(o + j + half) = make_ushort2(f2bf(o2a), f2bf(o2b));
  }
}

// ================================================================ SwiGLU
__global__ void swiglu_forward_kernel(bf16_bits* act, const float* gate, const float* up, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    act[i] = f2bf(swiglu(gate[i], up[i]));
}
// Four elements a thread (16-byte loads, an 8-byte store): the same arithmetic per element.
__global__ void swiglu_forward4_kernel(bf16_bits* act, const float* gate, const float* up, size_t n4) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
    const float4 g = reinterpret_cast<const float4*>(gate)[i];
    const float4 u = reinterpret_cast<const float4*>(up)[i];
    ushort4 o;
    o.x = f2bf(swiglu(g.x, u.x));
    o.y = f2bf(swiglu(g.y, u.y));
    o.z = f2bf(swiglu(g.z, u.z));
    o.w = f2bf(swiglu(g.w, u.w));
    reinterpret_cast<ushort4*>(act)[i] = o;
  }
}
// d(act)/d(gate) and d(act)/d(up) of one element: one function for the scalar and the four-wide kernels.
__device__ __forceinline__ void swiglu_grad(float da, float g, float u, bf16_bits& dg, bf16_bits& du) {
  const float sg = 1.f / (1.f + expf(-g));
  du = f2bf(da * (g * sg));
  dg = f2bf(da * u * (sg * (1.f + g * (1.f - sg))));
}
// Outputs: element i of the rows of `width` at (i / width) * out_ld + i % width (width 0: at i).
__device__ __forceinline__ size_t swiglu_out_index(size_t i, int width, int64_t out_ld) {
  return width ? (i / width) * out_ld + i % width : i;
}
__global__ void swiglu_backward_kernel(bf16_bits* dgate, bf16_bits* dup, const float* dact, const float* gate,
                                       const float* up, size_t n, int width, int64_t out_ld) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t o = swiglu_out_index(i, width, out_ld);
    swiglu_grad(dact[i], gate[i], up[i], dgate[o], dup[o]);
  }
}
// Four elements a thread (16-byte loads, 8-byte stores; width % 4 == 0): the same arithmetic per element.
__global__ void swiglu_backward4_kernel(bf16_bits* dgate, bf16_bits* dup, const float* dact, const float* gate,
                                        const float* up, size_t n4, int width, int64_t out_ld) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(dact)[i];
    const float4 g = reinterpret_cast<const float4*>(gate)[i];
    const float4 u = reinterpret_cast<const float4*>(up)[i];
    ushort4 dg, du;
    swiglu_grad(a.x, g.x, u.x, dg.x, du.x);
    swiglu_grad(a.y, g.y, u.y, dg.y, du.y);
    swiglu_grad(a.z, g.z, u.z, dg.z, du.z);
    swiglu_grad(a.w, g.w, u.w, dg.w, du.w);
    const size_t o = swiglu_out_index(4 * i, width, out_ld) / 4;
    reinterpret_cast<ushort4*>(dgate)[o] = dg;
    reinterpret_cast<ushort4*>(dup)[o] = du;
  }
}

// ================================================================ router
// One warp per row: the softmax in double (as the CPU op), then K warp arg-max passes for the top-k (the larger
// probability wins, the lower index on ties: the CPU op's selection order).
__global__ void router_forward_kernel(float* probs, float* weights, int32_t* experts, const float* logits, int ld,
                                      int N, int E, int K, bool renormalize) {
  const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (i >= N) return;
  const float* z = logits + (size_t)i * ld;
  float* p = probs + (size_t)i * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) mx = fmaxf(mx, z[e]);
  mx = warp_max(mx);
  double sum = 0;
  for (int e = lane; e < E; e += 32) sum += exp((double)z[e] - mx);
  sum = warp_sum(sum);
  for (int e = lane; e < E; e += 32) p[e] = (float)(exp((double)z[e] - mx) / sum);
  int32_t* ex = experts + (size_t)i * K;
  float* w = weights + (size_t)i * K;
  unsigned taken = 0;  // bit t: this lane's expert lane + 32 t is taken (E <= 1024)
  float wsum = 0.f;
  for (int kk = 0; kk < K; kk++) {
    float bv = -1.f;
    int be = 0x7fffffff;
    for (int t = 0, e = lane; e < E; t++, e += 32) {
      if ((taken >> t) & 1u) continue;
      const float v = p[e];  // written above by this lane
      if (v > bv) bv = v, be = e;
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oe = __shfl_xor_sync(0xffffffffu, be, o);
      if (ov > bv || (ov == bv && oe < be)) bv = ov, be = oe;
    }
    if ((be & 31) == lane) taken |= 1u << (be >> 5);
    if (lane == 0) {
      ex[kk] = be;
      w[kk] = bv;
    }
    wsum += bv;
  }
  if (renormalize && lane == 0)
    for (int kk = 0; kk < K; kk++) w[kk] /= wsum;
}
__global__ void router_replay_kernel(float* weights, int32_t* experts, const float* probs, const int32_t* replay,
                                     int N, int E, int K, bool renormalize) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  float s = 0.f;
  for (int k = 0; k < K; k++) {
    const int e = replay[(size_t)i * K + k];
    experts[(size_t)i * K + k] = e;
    weights[(size_t)i * K + k] = probs[(size_t)i * E + e];
    s += weights[(size_t)i * K + k];
  }
  if (renormalize)
    for (int k = 0; k < K; k++) weights[(size_t)i * K + k] /= s;
}
// One warp per row: dp[e] = aux_dp[e] (+ the top-k terms), dz = p * (dp - p.dp).
__global__ void router_backward_kernel(bf16_bits* dlogits, int ld, const float* dweights, const float* aux_dp,
                                       const float* probs, const float* weights, const int32_t* experts, int N, int E,
                                       int K, bool renormalize) {
  const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (i >= N) return;
  const float* p = probs + (size_t)i * E;
  const float* w = weights + (size_t)i * K;
  const float* dw = dweights + (size_t)i * K;
  const int32_t* ex = experts + (size_t)i * K;
  float S = 0.f, wdw = 0.f;
  for (int k = 0; k < K; k++) {
    S += p[ex[k]];
    wdw += w[k] * dw[k];
  }
  // dp of expert e: the extra gradient plus its top-k term(s).
  auto dp_of = [&](int e) {
    float d = aux_dp ? aux_dp[e] : 0.f;
    for (int k = 0; k < K; k++)
      if (ex[k] == e) d += renormalize ? (dw[k] - wdw) / S : dw[k];
    return d;
  };
  double pdp = 0;
  for (int e = lane; e < E; e += 32) pdp += (double)p[e] * dp_of(e);
  pdp = warp_sum(pdp);
  for (int e = lane; e < ld; e += 32)
    dlogits[(size_t)i * ld + e] = e < E ? f2bf(p[e] * (dp_of(e) - (float)pdp)) : (bf16_bits)0;
}
struct ColumnOf {
  const float* x;
  int ld;
  __device__ float operator()(int r, int c) const { return x[(size_t)r * ld + c]; }
};

// ================================================================ MoE dispatch
// Assignment a's expert (-1 past the warp's segment end a1 or outside [0, E)), and the mask of the warp's lanes that
// hold the same one.
__device__ __forceinline__ unsigned same_expert_lanes(const int32_t* experts, int a, int a1, int E, int& e) {
  e = a < a1 ? experts[a] : -1;
  if (e >= E) e = -1;
  return __match_any_sync(0xffffffffu, e < 0 ? -1 : e);
}
// The counting sort of moe_permute in one block of nw warps. Warp w owns the assignments [w * seg, (w + 1) * seg)
// and walks them 32 at a time; lanes holding the same expert find each other with __match_any_sync, so a step
// needs no atomics: (1) per-warp counts of each expert, (2) a scan over warps (within an expert) and over experts
// (the offsets) turns them into each warp's first row per expert, (3) each warp places its assignments in order,
// a lane's rank among the step's lanes of its expert after its warp's running base. Stable in a, deterministic.
// Experts outside [0, E) are skipped (not counted, not placed). Shared memory: [nw * E] counts, then [E + 1]
// offsets.
__global__ void moe_permute_kernel(int32_t* order, int32_t* pos_of, int32_t* offsets, int32_t* counts,
                                   const int32_t* experts, int NK, int E) {
  extern __shared__ int32_t sh[];
  int32_t* base = sh;            // [nw][E]
  int32_t* off = sh + (size_t)(blockDim.x >> 5) * E;  // [E + 1]
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int seg = (NK + nw - 1) / nw;
  const int a0 = min(NK, w * seg), a1 = min(NK, a0 + seg);
  for (int i = threadIdx.x; i < nw * E; i += blockDim.x) base[i] = 0;
  __syncthreads();
  for (int s0 = a0; s0 < a1; s0 += 32) {
    int e;
    const unsigned same = same_expert_lanes(experts, s0 + lane, a1, E, e);
    if (e >= 0 && lane == __ffs(same) - 1) base[w * E + e] += __popc(same);
  }
  __syncthreads();
  // Per expert: exclusive prefix over warps (in place); totals into off[e + 1].
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int c = 0;
    for (int v = 0; v < nw; v++) {
      const int t = base[v * E + e];
      base[v * E + e] = c;
      c += t;
    }
    counts[e] = c;
    off[e + 1] = c;
  }
  __syncthreads();
  if (w == 0) {  // inclusive scan of the totals by warp 0, 32 experts at a time
    int carry = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
      const int e = e0 + lane;
      int v = e < E ? off[e + 1] : 0;
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
      }
      if (e < E) off[e + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
    if (lane == 0) off[0] = 0;
  }
  __syncthreads();
  for (int i = threadIdx.x; i <= E; i += blockDim.x) offsets[i] = off[i];
  for (int i = threadIdx.x; i < nw * E; i += blockDim.x) base[i] += off[i % E];
  __syncthreads();
  for (int s0 = a0; s0 < a1; s0 += 32) {
    const int a = s0 + lane;
    int e;
    const unsigned same = same_expert_lanes(experts, a, a1, E, e);
    if (e >= 0) {
      const int p = base[w * E + e] + __popc(same & ((1u << lane) - 1u));
      order[p] = a;
      pos_of[a] = p;
    }
    __syncwarp();  // every lane has read its base before the leader moves it
    if (e >= 0 && lane == __ffs(same) - 1) base[w * E + e] += __popc(same);
    __syncwarp();
  }
}
// One warp per grouped row, 16-byte copies (C % 8 == 0).
__global__ void moe_gather_kernel(bf16_bits* xg, const bf16_bits* x, const int32_t* order, int NK, int K, int C) {
  const int m = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (m >= NK) return;
  const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)(order[m] / K) * C);
  uint4* dst = reinterpret_cast<uint4*>(xg + (size_t)m * C);
  for (int c = lane; c < C / 8; c += 32) dst[c] = src[c];
}
__global__ void moe_combine_forward_kernel(float* h, const float* resid, const float* y, const int32_t* pos_of,
                                           const float* weights, const float* s_out, const float* s_logit, int s_ld,
                                           int C, int K) {
  const int i = blockIdx.x;
  const float sg = s_out ? 1.f / (1.f + expf(-s_logit[(size_t)i * s_ld])) : 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float o = 0.f;
    for (int k = 0; k < K; k++) o += weights[(size_t)i * K + k] * y[(size_t)pos_of[(size_t)i * K + k] * C + c];
    if (s_out) o += sg * s_out[(size_t)i * C + c];
    h[(size_t)i * C + c] = resid[(size_t)i * C + c] + o;
  }
}
// One block per token.
__global__ void moe_combine_backward_kernel(bf16_bits* dy, float* dweights, bf16_bits* ds_out, bf16_bits* ds_logit,
                                            const float* dh, const float* y, const int32_t* pos_of,
                                            const float* weights, const float* s_out, const float* s_logit, int s_ld,
                                            int C, int K) {
  __shared__ float sh[32];
  const int i = blockIdx.x, bd = blockDim.x;
  const float* d = dh + (size_t)i * C;
  // dot = sum over the thread's columns of d * src (in column order), out = bf16(scale * d); eight columns' loads in
  // flight at a time, the arithmetic and its order as one column at a time.
  auto dot_and_scale = [&](const float* src, bf16_bits* out, float scale) {
    float dot = 0.f;
    int c = threadIdx.x;
    for (; c + 7 * bd < C; c += 8 * bd) {
      float dv[8], sv[8];
#pragma unroll
      for (int u = 0; u < 8; u++) dv[u] = d[c + u * bd], sv[u] = src[c + u * bd];
#pragma unroll
      for (int u = 0; u < 8; u++) {
        dot += dv[u] * sv[u];
        out[c + u * bd] = f2bf(scale * dv[u]);
      }
    }
    for (; c < C; c += bd) {
      dot += d[c] * src[c];
      out[c] = f2bf(scale * d[c]);
    }
    return dot;
  };
  for (int k = 0; k < K; k++) {
    const size_t p = pos_of[(size_t)i * K + k];
    const float w = weights[(size_t)i * K + k];
    float dot = dot_and_scale(y + p * C, dy + p * C, w);
    dot = block_sum(dot, sh);
    if (threadIdx.x == 0) dweights[(size_t)i * K + k] = dot;
  }
  if (s_out) {
    const float sg = 1.f / (1.f + expf(-s_logit[(size_t)i * s_ld]));
    float dot = dot_and_scale(s_out + (size_t)i * C, ds_out + (size_t)i * C, sg);
    dot = block_sum(dot, sh);
    for (int c = threadIdx.x; c < s_ld; c += blockDim.x)
      ds_logit[(size_t)i * s_ld + c] = c == 0 ? f2bf(dot * sg * (1.f - sg)) : (bf16_bits)0;
  }
}
__global__ void moe_scatter_add_kernel(float* dx, const float* dxa, const float* dxb, const int32_t* pos_of, int C,
                                       int K) {
  const int i = blockIdx.x;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = dx[(size_t)i * C + c];
    for (int k = 0; k < K; k++) {
      const size_t p = pos_of[(size_t)i * K + k];
      acc += dxa[p * C + c];
      if (dxb) acc += dxb[p * C + c];
    }
    dx[(size_t)i * C + c] = acc;
  }
}

// ================================================================ LM head
// Running state of a row over the chunks seen so far: max m, s = sum exp(z - m), t = sum exp(z - m) * z, and
// the target's scaled logit zt.
struct LmState {
  float m, s, t, zt;
};
// Merges two partial states (m, s, t) of one row; commutative bit for bit (IEEE + and * are), so a butterfly
// reduction gives every lane the same result.
__device__ __forceinline__ void lm_merge(float& m, float& s, float& t, float m2, float s2, float t2) {
  const float M = fmaxf(m, m2);
  if (M == -INFINITY) return;
  const float a = expf(m - M), b = expf(m2 - M);
  s = s * a + s2 * b;
  t = t * a + t2 * b;
  m = M;
}
// One block per row, one pass over one chunk [Vc] of logits (row stride ld; 16-byte loads: Vc % 4 == 0, ld % 4 ==
// 0): each thread keeps an online (max, sum of exp, sum of exp * z), merged in a fixed order, then folded into the
// row's state.
// row_temperature [N] (optional): each row's own temperature in place of `temperature` (the rollout's rows).
__global__ void lm_head_chunk_kernel(LmState* st, const float* chunk, int64_t ld, const int32_t* target, int v0,
                                     int Vc, float temperature, const float* row_temperature, bool first) {
  __shared__ float shm[32], shs[32], sht[32];
  const int i = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (row_temperature) temperature = row_temperature[i];
  const float* row = chunk + (size_t)i * ld;
  const float4* row4 = reinterpret_cast<const float4*>(row);
  float m = -INFINITY, s = 0.f, t = 0.f;
  auto take = [&](float x) {
    const float z = temperature != 1.f ? x / temperature : x;
    if (z == -INFINITY) return;
    if (z > m) {
      const float a = expf(m - z);
      s = s * a + 1.f;
      t = t * a + z;
      m = z;
    } else {
      const float e = expf(z - m);
      s += e;
      t += e * z;
    }
  };
  // Four 16-byte loads in flight a thread, then the elements in the thread's order (the same as one load at a time).
  const int n4 = Vc / 4, step = blockDim.x;
  int j4 = threadIdx.x;
  for (; j4 + 3 * step < n4; j4 += 4 * step) {
    float4 q[4];
#pragma unroll
    for (int u = 0; u < 4; u++) q[u] = row4[j4 + u * step];
#pragma unroll
    for (int u = 0; u < 4; u++) take(q[u].x), take(q[u].y), take(q[u].z), take(q[u].w);
  }
  for (; j4 < n4; j4 += step) {
    const float4 q = row4[j4];
    take(q.x), take(q.y), take(q.z), take(q.w);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o),
                t2 = __shfl_xor_sync(0xffffffffu, t, o);
    lm_merge(m, s, t, m2, s2, t2);
  }
  if (lane == 0) shm[w] = m, shs[w] = s, sht[w] = t;
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = shm[0], S = shs[0], T = sht[0];
    for (int k = 1; k < nw; k++) lm_merge(M, S, T, shm[k], shs[k], sht[k]);
    LmState R = first ? LmState{-INFINITY, 0.f, 0.f, 0.f} : st[i];
    lm_merge(R.m, R.s, R.t, M, S, T);
    const int tg = target ? target[i] : -1;
    if (tg >= v0 && tg < v0 + Vc) R.zt = temperature != 1.f ? row[tg - v0] / temperature : row[tg - v0];
    st[i] = R;
  }
}
__global__ void lm_head_finish_kernel(float* logprob, float* lse, float* entropy, const LmState* st,
                                      const int32_t* target, int N) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const LmState S = st[i];
  const float l = S.m + logf(S.s);
  lse[i] = l;
  if (entropy) entropy[i] = l - S.t / S.s;
  if (logprob) logprob[i] = target && target[i] >= 0 ? S.zt - l : 0.f;
}
// dlogits of one chunk: g_i / T * (onehot(target) - exp(z - lse)), bf16 for the GEMM backward. Four columns a
// thread (16-byte loads, 8-byte stores; Vc % 4 == 0 and ld % 4 == 0, as the LM head's chunks are).
__global__ void lm_head_dlogits_kernel(bf16_bits* dl, const float* chunk, int64_t ld, const float* g, const float* lse,
                                       const int32_t* target, int v0, int Vc, float temperature) {
  const int i = blockIdx.x;
  const float gi = g[i];
  const int tg = target[i];
  const float gt = gi / temperature, l = lse[i];
  const bool live = gi != 0.f && tg >= 0;
  const float4* row4 = reinterpret_cast<const float4*>(chunk + (size_t)i * ld);
  ushort4* out4 = reinterpret_cast<ushort4*>(dl + (size_t)i * Vc);
  auto d_of = [&](float logit, int j) {
    const float z = temperature != 1.f ? logit / temperature : logit;
    float d = -gt * expf(z - l);
    if (v0 + j == tg) d += gt;
    return f2bf(d);
  };
  for (int j4 = threadIdx.x; j4 < Vc / 4; j4 += blockDim.x) {
    ushort4 o;
    if (live) {
      const float4 q = row4[j4];
      o = make_ushort4(d_of(q.x, 4 * j4), d_of(q.y, 4 * j4 + 1), d_of(q.z, 4 * j4 + 2), d_of(q.w, 4 * j4 + 3));
    } else {
      o = make_ushort4(0, 0, 0, 0);
    }
    out4[j4] = o;
  }
}

// ================================================================ loss gradient
__global__ void policy_grad_kernel(float* g, const float* logprob, const double* w, PolicyGradArgs a, int N) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  if (w[i] == 0.0) {  // masked out (policy_loss skips the row: its g stays 0)
    g[i] = 0.f;
    return;
  }
  const double lp = logprob[i];
  double dper = -1;
  if (a.grpo) {
    const double adv = a.advantages[i];
    const double ratio = exp(lp - a.old_logprobs[i]);
    const double clipped = fmin(fmax(ratio, 1.0 - a.eps_low), 1.0 + a.eps_high);
    if (ratio * adv <= clipped * adv)
      dper = -ratio * adv;
    else
      dper = (ratio > 1.0 - a.eps_low && ratio < 1.0 + a.eps_high) ? -ratio * adv : 0.0;
    if (a.ref_logprobs) {
      const double d = a.ref_logprobs[i] - lp;
      dper += a.beta * (a.k3 ? -exp(d) + 1 : 1.0);
    }
  }
  g[i] = (float)(w[i] * dper);
}

__global__ void aux_load_grad_kernel(float* aux_dp, const int32_t* counts, int ML, int E, int N, float coef) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const double denom = (double)ML * fmax((double)N, 1.0);
  double F = 0;
  for (int l = 0; l < ML; l++) F += counts[(size_t)l * E + e];
  F /= denom;
  aux_dp[e] = (float)(coef * E * F / denom);
}

// ================================================================ optimizer
// A gradient element as fp32: fp32 gradients as they are, bf16 ones (expert_grads_bf16) widened.
__device__ __forceinline__ float grad_f32(float g) { return g; }
__device__ __forceinline__ float grad_f32(bf16_bits g) { return bf2f(g); }

template <class T>
__global__ void sum_squares_kernel(double* partial, const T* x, size_t n) {
  __shared__ double sh[32];
  double acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const double g = grad_f32(x[i]);
    acc += g * g;
  }
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
__global__ void sum_partials_kernel(double* out, const double* partial, int n) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double acc = 0;
  for (int i = 0; i < n; i++) acc += partial[i];
  *out = acc;
}
template <class T>
__global__ void adamw_kernel(float* param, bf16_bits* param16, const T* grad, float* m, float* v, size_t n,
                             float lr, float beta1, float beta2, float bc1, float bc2, float eps, float wd,
                             float grad_scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float g = grad_f32(grad[i]) * grad_scale;
    const float mi = beta1 * m[i] + (1.f - beta1) * g;
    const float vi = beta2 * v[i] + (1.f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float mh = mi / bc1, vh = vi / bc2;
    const float p = param[i] - lr * (mh / (sqrtf(vh) + eps) + wd * param[i]);
    param[i] = p;
    if (param16) param16[i] = f2bf(p);
  }
}

}  // namespace

// ================================================================ launchers
void cast_f32_to_bf16(bf16_bits* out, const float* inp, size_t n, Stream s) {
  if (n == 0) return;
  if (n % 4 == 0 && aligned_to(8, out) && aligned_to(16, inp))  // 16-byte loads where they line up
    cast_f32_bf16x4_kernel<<<blocks_for(n / 4, 256), 256, 0, s>>>(out, inp, n / 4);
  else
    cast_f32_bf16_kernel<<<blocks_for(n, 256), 256, 0, s>>>(out, inp, n);
  MP_GPU_CHECK_LAUNCH("cast_f32_to_bf16");
}
void cast_bf16_to_f32(float* out, const bf16_bits* inp, size_t n, Stream s) {
  if (n == 0) return;
  cast_bf16_f32_kernel<<<blocks_for(n, 256), 256, 0, s>>>(out, inp, n);
  MP_GPU_CHECK_LAUNCH("cast_bf16_to_f32");
}
void pad_rows_to_bf16(bf16_bits* out, const float* inp, int rows, int rows_pad, int cols, Stream s) {
  MP_CHECK_ARG(rows_pad >= rows, "pad_rows_to_bf16: rows_pad must be >= rows");
  if ((size_t)rows_pad * cols == 0) return;
  pad_rows_kernel<<<blocks_for((size_t)rows_pad * cols, 256), 256, 0, s>>>(out, inp, rows, rows_pad, cols);
  MP_GPU_CHECK_LAUNCH("pad_rows_to_bf16");
}
void add_inplace(float* dst, const float* src, size_t n, Stream s) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n, 256), 256, 0, s>>>(dst, src, n);
  MP_GPU_CHECK_LAUNCH("add_inplace");
}

void fill_constant(float* x, float value, size_t n, Stream s) {
  if (n == 0) return;
  fill_constant_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, value, n);
  MP_GPU_CHECK_LAUNCH("fill_constant");
}
void fill_uniform(float* x, size_t n, uint64_t seed, float scale, Stream s) {
  if (n == 0) return;
  fill_uniform_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, n, seed, scale);
  MP_GPU_CHECK_LAUNCH("fill_uniform");
}

void embedding_forward(float* out, const int32_t* tokens, const float* wte, int N, int C, Stream s) {
  if (N == 0) return;
  embedding_forward_kernel<<<N, 256, 0, s>>>(out, tokens, wte, N, C);
  MP_GPU_CHECK_LAUNCH("embedding_forward");
}
void embedding_backward(float* dwte, const float* dout, const int32_t* order, const int32_t* starts,
                        const int32_t* uniq, int U, int C, Stream s) {
  if (U == 0) return;
  embedding_backward_kernel<<<U, 256, 0, s>>>(dwte, dout, order, starts, uniq, C);
  MP_GPU_CHECK_LAUNCH("embedding_backward");
}

void rmsnorm_forward(float* out32, bf16_bits* out16, float* rstd, const float* inp, const float* weight, int N, int C,
                     float eps, Stream s) {
  if (N == 0) return;
  rmsnorm_forward_kernel<<<(N + 7) / 8, 256, 0, s>>>(out32, out16, rstd, inp, weight, N, C, eps);
  MP_GPU_CHECK_LAUNCH("rmsnorm_forward");
}
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int N, int C, bool accumulate, Stream s, bf16_bits* dinp16) {
  if (N == 0) return;
  rmsnorm_backward_kernel<<<(N + 7) / 8, 256, 0, s>>>(dinp, dinp16, dout, inp, weight, rstd, N, C, accumulate);
  MP_GPU_CHECK_LAUNCH("rmsnorm_backward");
  if (dweight) rmsnorm_backward_dweight(dweight, dout, inp, rstd, N, C, s);
}
void rmsnorm_backward_dweight(float* dweight, const float* dout, const float* inp, const float* rstd, int N, int C,
                              Stream s) {
  if (N == 0) return;
  column_reduce(dweight, true, N, C, RmsDweight{dout, inp, rstd, C}, s, "rmsnorm_backward(dweight)");
}

void rope_tables(std::vector<float>& cos, std::vector<float>& sin, int P, const std::vector<double>& inv_freq) {
  const size_t half = inv_freq.size();
  cos.assign((size_t)P * half, 0.f);
  sin.assign((size_t)P * half, 0.f);
  for (int p = 0; p < P; p++)
    for (size_t j = 0; j < half; j++) {
      const double a = (double)p * inv_freq[j];  // what the CPU op computes (cpu/ops.cpp rope_angles)
      cos[p * half + j] = (float)std::cos(a);
      sin[p * half + j] = (float)std::sin(a);
    }
}

void rope_forward(float* x, const int32_t* pos, const float* cos, const float* sin, int N, int heads, int HD,
                  Stream s) {
  const size_t n = (size_t)N * heads * (HD / 2);
  if (n == 0) return;
  rope_kernel<false><<<blocks_for(n, 256), 256, 0, s>>>(x, pos, cos, sin, N, heads, HD);
  MP_GPU_CHECK_LAUNCH("rope_forward");
}
namespace {
template <bool kBackward>
void rope_bf16(bf16_bits* out, const float* x, const int32_t* pos, const float* cos, const float* sin, int N, int heads,
               int HD, Stream s, const char* name) {
  const size_t n = (size_t)N * heads * (HD / 2);
  if (n == 0) return;
  const bool by2 = HD % 4 == 0 && n / 2 < (size_t{1} << 31) && aligned_to(8, x, cos, sin) && aligned_to(4, out);
  if (by2)
    rope_bf16x2_kernel<kBackward><<<blocks_for(n / 2, 256), 256, 0, s>>>(out, x, pos, cos, sin, N, heads, HD);
  else
    rope_bf16_kernel<kBackward><<<blocks_for(n, 256), 256, 0, s>>>(out, x, pos, cos, sin, N, heads, HD);
  MP_GPU_CHECK_LAUNCH(name);
}
}  // namespace
void rope_forward_bf16(bf16_bits* out, const float* x, const int32_t* pos, const float* cos, const float* sin, int N,
                       int heads, int HD, Stream s) {
  rope_bf16<false>(out, x, pos, cos, sin, N, heads, HD, s, "rope_forward_bf16");
}
void rope_backward_bf16(bf16_bits* out, const float* dx, const int32_t* pos, const float* cos, const float* sin, int N,
                        int heads, int HD, Stream s) {
  rope_bf16<true>(out, dx, pos, cos, sin, N, heads, HD, s, "rope_backward_bf16");
}
void rope_backward(float* dx, const int32_t* pos, const float* cos, const float* sin, int N, int heads, int HD,
                   Stream s) {
  const size_t n = (size_t)N * heads * (HD / 2);
  if (n == 0) return;
  rope_kernel<true><<<blocks_for(n, 256), 256, 0, s>>>(dx, pos, cos, sin, N, heads, HD);
  MP_GPU_CHECK_LAUNCH("rope_backward");
}

void swiglu_forward(bf16_bits* act, const float* gate, const float* up, size_t n, Stream s) {
  if (n == 0) return;
  const bool by4 = n % 4 == 0 && aligned_to(8, act) && aligned_to(16, gate, up);
  if (by4)
    swiglu_forward4_kernel<<<blocks_for(n / 4, 256), 256, 0, s>>>(act, gate, up, n / 4);
  else
    swiglu_forward_kernel<<<blocks_for(n, 256), 256, 0, s>>>(act, gate, up, n);
  MP_GPU_CHECK_LAUNCH("swiglu_forward");
}
void swiglu_backward(bf16_bits* dgate, bf16_bits* dup, const float* dact, const float* gate, const float* up,
                     size_t n, Stream s, int width, int64_t out_ld) {
  MP_CHECK_ARG(width >= 0 && (width == 0 || (n % width == 0 && out_ld >= width)),
               "swiglu_backward: n must be whole rows of width, out_ld >= width");
  if (n == 0) return;
  const bool by4 = n % 4 == 0 && width % 4 == 0 && out_ld % 4 == 0 && aligned_to(8, dgate, dup) &&
                   aligned_to(16, dact, gate, up);
  if (by4)
    swiglu_backward4_kernel<<<blocks_for(n / 4, 256), 256, 0, s>>>(dgate, dup, dact, gate, up, n / 4, width, out_ld);
  else
    swiglu_backward_kernel<<<blocks_for(n, 256), 256, 0, s>>>(dgate, dup, dact, gate, up, n, width, out_ld);
  MP_GPU_CHECK_LAUNCH("swiglu_backward");
}

void router_forward(float* probs, float* weights, int32_t* experts, const float* logits, int ld, int N, int E, int K,
                    bool renormalize, Stream s) {
  MP_CHECK_ARG(E >= 1 && E <= 1024 && K >= 1 && K <= 32 && K <= E && ld >= E,
               "router_forward: need 1 <= K <= min(E, 32), E <= 1024, ld >= E");
  if (N == 0) return;
  router_forward_kernel<<<(N + 7) / 8, 256, 0, s>>>(probs, weights, experts, logits, ld, N, E, K, renormalize);
  MP_GPU_CHECK_LAUNCH("router_forward");
}
void router_replay(float* weights, int32_t* experts, const float* probs, const int32_t* replay, int N, int E, int K,
                   bool renormalize, Stream s) {
  if (N == 0) return;
  router_replay_kernel<<<(N + 127) / 128, 128, 0, s>>>(weights, experts, probs, replay, N, E, K, renormalize);
  MP_GPU_CHECK_LAUNCH("router_replay");
}
void router_backward(bf16_bits* dlogits, int ld, const float* dweights, const float* aux_dp, const float* probs,
                     const float* weights, const int32_t* experts, int N, int E, int K, bool renormalize, Stream s) {
  MP_CHECK_ARG(ld >= E, "router_backward: ld must be >= E");
  if (N == 0) return;
  router_backward_kernel<<<(N + 7) / 8, 256, 0, s>>>(dlogits, ld, dweights, aux_dp, probs, weights, experts, N, E, K,
                                                     renormalize);
  MP_GPU_CHECK_LAUNCH("router_backward");
}
void column_sums(float* out, const float* x, int ld, int N, int E, Stream s) {
  column_reduce(out, false, N, E, ColumnOf{x, ld}, s, "column_sums");
}

void moe_permute(int32_t* order, int32_t* pos_of, int32_t* offsets, int32_t* counts, const int32_t* experts, int NK,
                 int E, Stream s) {
  MP_CHECK_ARG(E >= 1 && E <= 4096, "moe_permute: E must be in [1, 4096], got " + std::to_string(E));
  MP_CHECK_ARG(NK >= 0, "moe_permute: NK must be >= 0, got " + std::to_string(NK));
  // As many warps (up to 32) as leave the per-warp counts within 48 KB of shared memory.
  const int nw = std::max(1, std::min(32, (12288 - (E + 1)) / E));
  const size_t smem = ((size_t)nw * E + E + 1) * sizeof(int32_t);
  moe_permute_kernel<<<1, nw * 32, smem, s>>>(order, pos_of, offsets, counts, experts, NK, E);
  MP_GPU_CHECK_LAUNCH("moe_permute");
}
void moe_gather(bf16_bits* xg, const bf16_bits* x, const int32_t* order, int NK, int K, int C, Stream s) {
  MP_CHECK_ARG(C % 8 == 0, "moe_gather: C must be a multiple of 8");
  if (NK == 0) return;
  moe_gather_kernel<<<(NK + 7) / 8, 256, 0, s>>>(xg, x, order, NK, K, C);
  MP_GPU_CHECK_LAUNCH("moe_gather");
}
void moe_combine_forward(float* h, const float* y, const int32_t* pos_of, const float* weights, const float* s_out,
                         const float* s_logit, int s_ld, int N, int C, int K, Stream s, const float* resid) {
  if (N == 0) return;
  moe_combine_forward_kernel<<<N, 256, 0, s>>>(h, resid ? resid : h, y, pos_of, weights, s_out, s_logit, s_ld, C, K);
  MP_GPU_CHECK_LAUNCH("moe_combine_forward");
}
void moe_combine_backward(bf16_bits* dy, float* dweights, bf16_bits* ds_out, bf16_bits* ds_logit, const float* dh,
                          const float* y, const int32_t* pos_of, const float* weights, const float* s_out,
                          const float* s_logit, int s_ld, int N, int C, int K, Stream s) {
  if (N == 0) return;
  moe_combine_backward_kernel<<<N, 256, 0, s>>>(dy, dweights, ds_out, ds_logit, dh, y, pos_of, weights, s_out, s_logit,
                                                s_ld, C, K);
  MP_GPU_CHECK_LAUNCH("moe_combine_backward");
}
void moe_scatter_add(float* dx, const float* dxa, const float* dxb, const int32_t* pos_of, int N, int C, int K,
                     Stream s) {
  if (N == 0) return;
  moe_scatter_add_kernel<<<N, 256, 0, s>>>(dx, dxa, dxb, pos_of, C, K);
  MP_GPU_CHECK_LAUNCH("moe_scatter_add");
}

// Scratch layout: [N * chunk] logits of the chunk, then [N * chunk / 2] bf16 dlogits (backward), then the
// [N] row states (4 floats each).
size_t lm_head_scratch_floats(int N, int V) {
  const size_t Vc = (size_t)std::min(V, kLmHeadChunk);
  return (size_t)N * Vc + ((size_t)N * Vc + 1) / 2 + (size_t)N * 4 + 64;
}

namespace {
void lm_head_forward_impl(float* logprob, float* lse, float* entropy, float* logits_out, const bf16_bits* x,
                          const bf16_bits* W, const int32_t* target, int N, int C, int V, float temperature,
                          const float* row_temperature, float* scratch, Stream s, const LmHeadSide* side) {
  MP_CHECK_ARG(V % 8 == 0 && C % 8 == 0, "lm_head_forward: V and C must be multiples of 8");
  if (N == 0) return;
  MP_CHECK_ARG(aligned_to(16, logits_out),
               "lm_head_forward: logits_out must be 16-byte aligned");
  MP_CHECK_ARG(!side || (logits_out && side->stream && side->fork && side->join),
               "lm_head_forward: the side stream needs logits_out, a stream and two events");
  const int Vc = std::min(V, kLmHeadChunk);
  LmState* st = reinterpret_cast<LmState*>(scratch + (size_t)N * Vc + ((size_t)N * Vc + 1) / 2);

  const Stream pass = side ? side->stream : s;  // where the log-sum-exp passes run, in chunk order
  for (int v0 = 0; v0 < V; v0 += Vc) {
    const int vn = std::min(Vc, V - v0);
    // Kept logits: the GEMM writes the chunk's columns in place (no copy pass), and the pass reads them while they
    // are still in L2. Otherwise the chunk lives in scratch.
    float* chunk = logits_out ? logits_out + v0 : scratch;
    const int64_t ld = logits_out ? V : vn;
    gemm_forward(chunk, x, W + (size_t)v0 * C, nullptr, N, vn, C, false, s, ld);
    if (side) {  // this chunk's pass waits for its GEMM only (re-recording the event later does not move the wait)
      MP_GPU_CHECK(event_record(side->fork, s));
      MP_GPU_CHECK(stream_wait(pass, side->fork));
    }
    lm_head_chunk_kernel<<<N, 256, 0, pass>>>(st, chunk, ld, target, v0, vn, temperature, row_temperature, v0 == 0);
    MP_GPU_CHECK_LAUNCH("lm_head_forward(chunk)");
  }
  if (side) {
    MP_GPU_CHECK(event_record(side->join, pass));
    MP_GPU_CHECK(stream_wait(s, side->join));
  }
  lm_head_finish_kernel<<<(N + 127) / 128, 128, 0, s>>>(logprob, lse, entropy, st, target, N);
  MP_GPU_CHECK_LAUNCH("lm_head_forward(finish)");
}
}  // namespace

void lm_head_forward(float* logprob, float* lse, float* entropy, float* logits_out, const bf16_bits* x,
                     const bf16_bits* W, const int32_t* target, int N, int C, int V, float temperature, float* scratch,
                     Stream s, const LmHeadSide* side) {
  MP_CHECK_ARG(temperature > 0, "lm_head_forward: temperature must be > 0");
  lm_head_forward_impl(logprob, lse, entropy, logits_out, x, W, target, N, C, V, temperature, nullptr, scratch, s,
                       side);
}

void lm_head_forward_rows(float* logprob, float* lse, float* entropy, float* logits_out, const bf16_bits* x,
                          const bf16_bits* W, const int32_t* target, const float* temperature, int N, int C, int V,
                          float* scratch, Stream s) {
  MP_CHECK_ARG(temperature != nullptr, "lm_head_forward_rows: temperature is null");
  lm_head_forward_impl(logprob, lse, entropy, logits_out, x, W, target, N, C, V, 1.f, temperature, scratch, s,
                       nullptr);
}

void lm_head_backward(float* dx, float* dW, const float* g, const float* lse, const float* logits, const bf16_bits* x,
                      const bf16_bits* W, const int32_t* target, int N, int C, int V, float temperature, float* scratch,
                      Stream s, bool accumulate_dW, bf16_bits* dlogits) {
  MP_CHECK_ARG(temperature > 0, "lm_head_backward: temperature must be > 0");
  MP_CHECK_ARG(V % 8 == 0 && C % 8 == 0, "lm_head_backward: V and C must be multiples of 8");
  MP_CHECK_ARG(aligned_to(16, logits),
               "lm_head_backward: logits must be 16-byte aligned");
  MP_CHECK_ARG(!dlogits || (logits && aligned_to(16, dlogits)),
               "lm_head_backward: dlogits needs the kept logits and 16-byte alignment");
  if (N == 0) return;
  // With room for the whole vocabulary's dlogits, the loop below makes one pass over one chunk of V columns.
  const int Vc = dlogits ? V : std::min(V, kLmHeadChunk);
  float* chunk = scratch;
  bf16_bits* dl = dlogits ? dlogits : reinterpret_cast<bf16_bits*>(scratch + (size_t)N * Vc);
  for (int v0 = 0; v0 < V; v0 += Vc) {
    const int vn = std::min(Vc, V - v0);
    if (!logits) gemm_forward(chunk, x, W + (size_t)v0 * C, nullptr, N, vn, C, false, s);
    const float* src = logits ? logits + v0 : chunk;
    lm_head_dlogits_kernel<<<N, 256, 0, s>>>(dl, src, logits ? V : vn, g, lse, target, v0, vn, temperature);
    MP_GPU_CHECK_LAUNCH("lm_head_backward(dlogits)");
    gemm_backward(dx, dW ? dW + (size_t)v0 * C : nullptr, nullptr, dl, x, W + (size_t)v0 * C, N, vn, C, v0 > 0,
                  accumulate_dW, s);
  }
}

void policy_grad(float* g, const float* logprob, const double* w, const PolicyGradArgs& a, int N, Stream s) {
  MP_CHECK_ARG(!a.grpo || (a.advantages && a.old_logprobs), "policy_grad: GRPO needs advantages and old_logprobs");
  if (N == 0) return;
  policy_grad_kernel<<<(N + 255) / 256, 256, 0, s>>>(g, logprob, w, a, N);
  MP_GPU_CHECK_LAUNCH("policy_grad");
}

void aux_load_grad(float* aux_dp, const int32_t* counts, int moe_layers, int E, int N, float coef, Stream s) {
  if (E == 0) return;
  aux_load_grad_kernel<<<(E + 127) / 128, 128, 0, s>>>(aux_dp, counts, moe_layers, E, N, coef);
  MP_GPU_CHECK_LAUNCH("aux_load_grad");
}

namespace {
template <class T>
void sum_squares_any(double* out, const T* x, size_t n, double* scratch, Stream s) {
  sum_squares_kernel<<<kSumSquaresBlocks, 256, 0, s>>>(scratch, x, n);
  MP_GPU_CHECK_LAUNCH("sum_squares");
  sum_partials_kernel<<<1, 32, 0, s>>>(out, scratch, kSumSquaresBlocks);
  MP_GPU_CHECK_LAUNCH("sum_squares(final)");
}
template <class T>
void adamw_any(float* param, bf16_bits* param16, const T* grad, float* m, float* v, size_t n, float lr, float beta1,
               float beta2, float bc1, float bc2, float eps, float weight_decay, float grad_scale, Stream s) {
  if (n == 0) return;
  adamw_kernel<<<blocks_for(n, 256), 256, 0, s>>>(param, param16, grad, m, v, n, lr, beta1, beta2, bc1, bc2, eps,
                                                  weight_decay, grad_scale);
  MP_GPU_CHECK_LAUNCH("adamw_update");
}
}  // namespace

void sum_squares(double* out, const float* x, size_t n, double* scratch, Stream s) {
  sum_squares_any(out, x, n, scratch, s);
}
void sum_squares(double* out, const bf16_bits* x, size_t n, double* scratch, Stream s) {
  sum_squares_any(out, x, n, scratch, s);
}
void adamw_update(float* param, bf16_bits* param16, const float* grad, float* m, float* v, size_t n, float lr,
                  float beta1, float beta2, float bc1, float bc2, float eps, float weight_decay, float grad_scale,
                  Stream s) {
  adamw_any(param, param16, grad, m, v, n, lr, beta1, beta2, bc1, bc2, eps, weight_decay, grad_scale, s);
}
void adamw_update(float* param, bf16_bits* param16, const bf16_bits* grad, float* m, float* v, size_t n, float lr,
                  float beta1, float beta2, float bc1, float bc2, float eps, float weight_decay, float grad_scale,
                  Stream s) {
  adamw_any(param, param16, grad, m, v, n, lr, beta1, beta2, bc1, bc2, eps, weight_decay, grad_scale, s);
}

}  // namespace moepilot::gpu
