// Dense matmuls. Forward: a batch-invariant kernel of our own (each output element is one dot product
// with a fixed lane split and reduction tree, whatever the number of rows). Backward: OpenBLAS.
#ifdef MOEPILOT_WITH_OPENBLAS
#include <cblas.h>
#endif

#include <cstring>

#include "cpu/ops.h"

namespace moepilot::cpu {
namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
// The fixed reduction of the 8 lanes plus the scalar tail: identical for every caller.
inline float finish(v8 acc, const float* a, const float* b, int c8, int C) {
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (int c = c8; c < C; c++) s += a[c] * b[c];
  return s;
}

// 4 rows x 2 outputs: 8 independent dot products, each with the same per-element order as dot1.
inline void dot4x2(float* out, int out_stride, const float* a0, int a_stride, const float* w0, int w_stride, int C,
                   const float* bias) {
  const int c8 = C & ~7;
  const float* a1 = a0 + a_stride;
  const float* a2 = a1 + a_stride;
  const float* a3 = a2 + a_stride;
  const float* w1 = w0 + w_stride;
  v8 s00 = {}, s01 = {}, s10 = {}, s11 = {}, s20 = {}, s21 = {}, s30 = {}, s31 = {};
  for (int c = 0; c < c8; c += 8) {
    const v8 x0 = load8(w0 + c), x1 = load8(w1 + c);
    const v8 y0 = load8(a0 + c), y1 = load8(a1 + c), y2 = load8(a2 + c), y3 = load8(a3 + c);
    s00 += y0 * x0; s01 += y0 * x1;
    s10 += y1 * x0; s11 += y1 * x1;
    s20 += y2 * x0; s21 += y2 * x1;
    s30 += y3 * x0; s31 += y3 * x1;
  }
  const float b0 = bias ? bias[0] : 0.f, b1 = bias ? bias[1] : 0.f;
  out[0] = finish(s00, a0, w0, c8, C) + b0;
  out[1] = finish(s01, a0, w1, c8, C) + b1;
  out[out_stride] = finish(s10, a1, w0, c8, C) + b0;
  out[out_stride + 1] = finish(s11, a1, w1, c8, C) + b1;
  out[2 * out_stride] = finish(s20, a2, w0, c8, C) + b0;
  out[2 * out_stride + 1] = finish(s21, a2, w1, c8, C) + b1;
  out[3 * out_stride] = finish(s30, a3, w0, c8, C) + b0;
  out[3 * out_stride + 1] = finish(s31, a3, w1, c8, C) + b1;
}

inline float dot1(const float* a, const float* w, int C) {
  const int c8 = C & ~7;
  v8 s = {};
  for (int c = 0; c < c8; c += 8) s += load8(a + c) * load8(w + c);
  return finish(s, a, w, c8, C);
}

}  // namespace

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int N, int C, int OC) {
  // Tiles of 4 rows x 32 outputs; the row tail and odd outputs fall back to dot1, which computes the
  // same value per element as dot4x2 (same lanes, same tree).
  const int RB = 4, OB = 32;
  const int row_tiles = (N + RB - 1) / RB, out_tiles = (OC + OB - 1) / OB;
#pragma omp parallel for collapse(2) schedule(static) if ((long)N * OC * C > 200000)
  for (int rt = 0; rt < row_tiles; rt++) {
    for (int ot = 0; ot < out_tiles; ot++) {
      const int r0 = rt * RB, r1 = r0 + RB < N ? r0 + RB : N;
      const int o0 = ot * OB, o1 = o0 + OB < OC ? o0 + OB : OC;
      if (r1 - r0 == RB) {
        int o = o0;
        for (; o + 2 <= o1; o += 2)
          dot4x2(out + (size_t)r0 * OC + o, OC, inp + (size_t)r0 * C, C, weight + (size_t)o * C, C, C,
                 bias ? bias + o : nullptr);
        for (; o < o1; o++)
          for (int r = r0; r < r1; r++)
            out[(size_t)r * OC + o] = dot1(inp + (size_t)r * C, weight + (size_t)o * C, C) + (bias ? bias[o] : 0.f);
      } else {
        for (int r = r0; r < r1; r++)
          for (int o = o0; o < o1; o++)
            out[(size_t)r * OC + o] = dot1(inp + (size_t)r * C, weight + (size_t)o * C, C) + (bias ? bias[o] : 0.f);
      }
    }
  }
}

void matmul_backward(float* dinp_acc, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int N, int C, int OC) {
  if (N == 0) return;
#ifdef MOEPILOT_WITH_OPENBLAS
  if (dinp_acc)  // dinp[N,C] += dout[N,OC] @ W[OC,C]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.f, dout, OC, weight, C, 1.f, dinp_acc, C);
  if (dweight)  // dW[OC,C] += dout^T[OC,N] @ inp[N,C]
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.f, dout, OC, inp, C, 1.f, dweight, C);
#else
  // Builds without OpenBLAS (GPU images, where the CPU engine only serves as the reference): plain loops,
  // correct and slow.
  if (dinp_acc) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
      float* di = dinp_acc + (size_t)i * C;
      for (int o = 0; o < OC; o++) {
        const float g = dout[(size_t)i * OC + o];
        const float* w = weight + (size_t)o * C;
        for (int c = 0; c < C; c++) di[c] += g * w[c];
      }
    }
  }
  if (dweight) {
#pragma omp parallel for schedule(static)
    for (int o = 0; o < OC; o++) {
      float* dw = dweight + (size_t)o * C;
      for (int i = 0; i < N; i++) {
        const float g = dout[(size_t)i * OC + o];
        const float* x = inp + (size_t)i * C;
        for (int c = 0; c < C; c++) dw[c] += g * x[c];
      }
    }
  }
#endif
  if (dbias)
    for (int i = 0; i < N; i++)
      for (int o = 0; o < OC; o++) dbias[o] += dout[(size_t)i * OC + o];
}

}  // namespace moepilot::cpu
