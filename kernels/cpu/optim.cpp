// AdamW and the reductions it needs.
#include <cmath>

#include "cpu/ops.h"

namespace moepilot::cpu {

double sum_squares(const float* x, size_t n) {
  double s = 0;
#pragma omp parallel for reduction(+ : s) if (n > (1 << 16))
  for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
  return s;
}

// Decoupled weight decay (Loshchilov & Hutter): p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p).
void adamw_update(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                  float eps, float weight_decay, float grad_scale, int64_t step) {
  const float bc1 = 1.f - std::pow(beta1, (float)step), bc2 = 1.f - std::pow(beta2, (float)step);
#pragma omp parallel for if (n > (1 << 16))
  for (size_t i = 0; i < n; i++) {
    const float g = grad[i] * grad_scale;
    m[i] = beta1 * m[i] + (1.f - beta1) * g;
    v[i] = beta2 * v[i] + (1.f - beta2) * g * g;
    const float mh = m[i] / bc1, vh = v[i] / bc2;
    param[i] -= lr * (mh / (std::sqrt(vh) + eps) + weight_decay * param[i]);
  }
}

}  // namespace moepilot::cpu
