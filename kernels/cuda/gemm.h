// GEMMs of the CUDA backend (contract; implemented in cuda/gemm.cu).
//
// Precision: bf16 operands, fp32 accumulation, fp32 results. Weights are row-major [out, in] (the Hugging
// Face / nn.Linear layout), activations row-major [rows, features]. Every pointer is device memory; every call
// is asynchronous on the given stream and checks its launch.
//
// Forward GEMMs are batch-invariant: each output element is the sum over K in one fixed order that depends
// only on K (no split-K, no stream-K, no tile choice that varies with M), so a row gives the same bits whatever
// other rows share the call, however many rows there are, and whichever group position it has. That is what
// makes the rollout's decode (a few rows) and the trainer's forward (thousands of rows) produce identical
// logprobs. Forward calls of >= 1024 rows (outside graph capture) run on cuBLASLt with its split-K reductions
// masked off: each element is then the same chain, and on H100 the same bits, which a check on each device before
// its first use confirms (otherwise the own kernel keeps them; MOEPILOT_GEMM_LT_FORWARD=0 keeps it everywhere).
// Backward GEMMs need not be batch-invariant: cuBLASLt serves the dense ones.
//
// Grouped GEMMs (the routed experts): rows sorted by group; group g owns rows [offsets[g], offsets[g+1]) and
// multiplies its own weight matrix W + g * N * K. One launch for all groups; the offsets live on the device
// (no host synchronisation: a launch sized by an upper bound on the rows works under CUDA graphs).
//
// Dimension legend: M rows, N output features, K input features, G groups.
#pragma once
#include <cstdint>

#include "cuda/vendor.h"

namespace moepilot::gpu {

using bf16_bits = uint16_t;  // raw bf16 bits on the host side of the API

// out[M,N] (=, or += when accumulate) = A[M,K] @ W[N,K]^T (+ bias[N] when bias != null). Batch-invariant.
// K % 8 == 0 and N % 8 == 0 (16-byte rows); any M >= 0. ldc: out's row stride in floats (0: N); a strided out
// (ldc > N: columns of a wider matrix) needs ldc % 4 == 0 and out 16-byte aligned. The stride never changes a bit.
void gemm_forward(float* out, const bf16_bits* A, const bf16_bits* W, const float* bias, int64_t M, int N, int K,
                  bool accumulate, Stream s, int64_t ldc = 0);
// out[M,N] = resid[M,N] + A[M,K] @ W[N,K]^T: the bits of copying resid into out, then gemm_forward's +=, without the
// copy where the GEMM can read resid itself (cuBLASLt's C operand). resid may be out; otherwise they must not overlap.
void gemm_forward_residual(float* out, const float* resid, const bf16_bits* A, const bf16_bits* W, int64_t M, int N,
                           int K, Stream s);

// Grouped forward: out[r,N] = A[r,K] @ W_g[N,K]^T for r in group g. offsets [G+1] int32 on the device, offsets[0]
// = 0, non-decreasing; max_rows >= offsets[G] bounds the launch. Batch-invariant (same bits as gemm_forward for
// the same row and weights).
void grouped_gemm_forward(float* out, const bf16_bits* A, const bf16_bits* W, const int32_t* offsets, int G,
                          int64_t max_rows, int N, int K, Stream s);

// An MLP's gate and up products and SwiGLU in one GEMM: act[r, n] = bf16(silu(A W_gate^T) * (A W_up^T))[r, n], act
// [M or rows, N] bf16 (4-byte aligned), W_gate and W_up [N, K] (grouped: G of each, as grouped_gemm_forward). The
// same bits as gemm_forward / grouped_gemm_forward into gate and up, then swiglu_forward. gate and up (optional,
// both or neither; fp32 [M or rows, N], 8-byte aligned) receive the two products as well, with gemm_forward's bits
// (a training forward keeps them for the backward); without them no fp32 product is written. Needs
// gemm_swiglu_available() (the sm_90a build on a Hopper GPU); elsewhere use the three calls.
bool gemm_swiglu_available();
void gemm_swiglu_forward(bf16_bits* act, const bf16_bits* A, const bf16_bits* W_gate, const bf16_bits* W_up,
                         int64_t M, int N, int K, Stream s, float* gate = nullptr, float* up = nullptr);
void grouped_gemm_swiglu_forward(bf16_bits* act, const bf16_bits* A, const bf16_bits* W_gate, const bf16_bits* W_up,
                                 const int32_t* offsets, int G, int64_t max_rows, int N, int K, Stream s,
                                 float* gate = nullptr, float* up = nullptr);

// Dense backward of out = A @ W^T: dA[M,K] (= or += when accumulate_dA) = dOut[M,N] @ W[N,K] (skipped when dA is
// null); dW[N,K] += dOut^T @ A in fp32 (skipped when null); dbias[N] += column sums of dOut (skipped when null).
void gemm_backward(float* dA, float* dW, float* dbias, const bf16_bits* dOut, const bf16_bits* A,
                   const bf16_bits* W, int64_t M, int N, int K, bool accumulate_dA, Stream s);
// Same, with dW and dbias overwritten when accumulate_dW is false: dW = dOut^T @ A, dbias = column sums (zeros when
// M == 0). For a caller that knows they hold zeros (the first backward after zeroing the gradients): dW is then
// only written, not read back.
void gemm_backward(float* dA, float* dW, float* dbias, const bf16_bits* dOut, const bf16_bits* A,
                   const bf16_bits* W, int64_t M, int N, int K, bool accumulate_dA, bool accumulate_dW, Stream s);

// dA[M,K] = bf16(dOut[M,N] @ W[N,K]): gemm_backward's dA rounded once, for a caller whose next reader wants bf16
// (the attention's output gradient), without the fp32 round trip. dA 16-byte aligned.
void gemm_backward_dA_bf16(bf16_bits* dA, const bf16_bits* dOut, const bf16_bits* W, int64_t M, int N, int K,
                           Stream s);

// Grouped backward: per group g, dA[r,K] = dOut[r,N] @ W_g (for r in g; skipped when null) and dW_g[N,K] +=
// dOut_g^T @ A_g (skipped when null). dW has the layout of W (G matrices of [N,K]). One launch per product.
// dW is deterministic (run to run bit-identical; no split over the rows): dW_g = dW_g + (the product summed from 0).
// The dW product is bound by dW's fp32 read-modify-write (at these shapes ~80% of a device copy of dW's bytes).
void grouped_gemm_backward(float* dA, float* dW, const bf16_bits* dOut, const bf16_bits* A, const bf16_bits* W,
                           const int32_t* offsets, int G, int64_t max_rows, int N, int K, Stream s);

// Same, with dW overwritten when accumulate_dW is false: dW_g = dOut_g^T @ A_g, an empty group's dW_g = 0. For a
// caller that knows dW holds zeros (the first backward after zeroing the gradients): dW is then only written, half
// the memory traffic of += (measured 1.9x faster on H100). On sm_90 its bulk row copies want a 16-byte aligned dW
// (otherwise a slower path, same bits). accumulate_dW true is the call above.
// ld_out: dOut's row stride in elements (0: N; a multiple of 8), e.g. one half of grouped_gemm_backward_pair's dGU.
void grouped_gemm_backward(float* dA, float* dW, const bf16_bits* dOut, const bf16_bits* A, const bf16_bits* W,
                           const int32_t* offsets, int G, int64_t max_rows, int N, int K, bool accumulate_dW,
                           Stream s, int64_t ld_out = 0);

// Same, with bf16 gradients: dW_g = bf16(dW_g + product) (accumulate_dW) or bf16(product), the product the same fp32
// sum as above, rounded once per launch. Half the bytes of the fp32 form, which the dW is bound by: for a caller that
// keeps the routed experts' gradients in bf16 (GpuModel's expert_grads_bf16). dW 4-byte aligned (16 for the bulk
// copies of the overwriting form on sm_90a; otherwise a slower path, same bits).
void grouped_gemm_backward(float* dA, bf16_bits* dW, const bf16_bits* dOut, const bf16_bits* A, const bf16_bits* W,
                           const int32_t* offsets, int G, int64_t max_rows, int N, int K, bool accumulate_dW,
                           Stream s, int64_t ld_out = 0);

// The backward of a SwiGLU MLP's two grouped products (gate = A @ W_gate_g^T, up = A @ W_up_g^T, each [rows, N]) at
// once, from dGU [rows, 2N] bf16: d gate in columns [0, N), d up in [N, 2N). dA[r,K] (=) = dGate @ W_gate_g + dUp @
// W_up_g, one fp32 chain over the 2N products (gate's first) when N % 64 == 0 (two products added otherwise): one
// output and half the launches of two grouped_gemm_backward calls. dW_gate, dW_up (both or neither): as
// grouped_gemm_backward's dW from the two halves (the same bits).
void grouped_gemm_backward_pair(float* dA, float* dW_gate, float* dW_up, const bf16_bits* dGU, const bf16_bits* A,
                                const bf16_bits* W_gate, const bf16_bits* W_up, const int32_t* offsets, int G,
                                int64_t max_rows, int N, int K, bool accumulate_dW, Stream s);
// Same with bf16 dW_gate and dW_up (as the bf16 grouped_gemm_backward's dW).
void grouped_gemm_backward_pair(float* dA, bf16_bits* dW_gate, bf16_bits* dW_up, const bf16_bits* dGU,
                                const bf16_bits* A, const bf16_bits* W_gate, const bf16_bits* W_up,
                                const int32_t* offsets, int G, int64_t max_rows, int N, int K, bool accumulate_dW,
                                Stream s);

// Per-device state (cuBLASLt handle, workspace) is created on first use on each device and kept for the
// process; this releases it (tests, shutdown).
void gemm_release();

}  // namespace moepilot::gpu
