// CPU backend: one function per op, forward and backward side by side, argument order
// (outputs, inputs, dimensions). Accumulation rule: parameter gradients +=, activation gradients =,
// unless a name says `_acc` (activation gradient accumulated).
// The forward ops are batch-invariant: every output row is computed by the same instructions in the same
// order whatever other rows are in the batch, which is what makes rollout logprobs equal trainer logprobs.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moepilot::cpu {

// ---- reductions and the optimizer
double sum_squares(const float* x, size_t n);
void adamw_update(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                  float eps, float weight_decay, float grad_scale, int64_t step);

}  // namespace moepilot::cpu
