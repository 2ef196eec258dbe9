// Engine construction and the optimizer. The forward and backward passes are in model/forward.cpp.
#include "moepilot/engine.h"

#include <cmath>
#include <cstring>

#include "cpu/ops.h"
#include "moepilot/error.h"

namespace moepilot {

Engine::Engine(const ModelConfig& cfg) : cfg_(cfg), layout_(build_layout(cfg)) {
  params_.assign(layout_.total, 0.f);
  grads_.assign(layout_.total, 0.f);
}

void Engine::zero_grad() { std::memset(grads_.data(), 0, grads_.size() * sizeof(float)); }

double Engine::adamw_step(const AdamWConfig& opt) {
  MP_CHECK_ARG(opt.lr >= 0 && opt.beta1 >= 0 && opt.beta1 < 1 && opt.beta2 >= 0 && opt.beta2 < 1 && opt.eps > 0,
               "adamw: lr >= 0, 0 <= beta1, beta2 < 1 and eps > 0 required");
  if (adam_m_.empty()) {
    adam_m_.assign(layout_.total, 0.f);
    adam_v_.assign(layout_.total, 0.f);
  }
  const double norm = std::sqrt(cpu::sum_squares(grads_.data(), grads_.size()));
  MP_CHECK_ARG(std::isfinite(norm), "adamw: gradient norm is not finite (NaN or Inf in the gradients)");
  const float clip = (opt.max_grad_norm > 0 && norm > opt.max_grad_norm) ? (float)(opt.max_grad_norm / (norm + 1e-6)) : 1.f;
  step_++;
  // Weight decay applies to matrices only (not to norms and biases), as is usual for LLM training.
  for (const ParamInfo& p : layout_.tensors) {
    const float wd = p.shape.size() >= 2 ? opt.weight_decay : 0.f;
    cpu::adamw_update(params_.data() + p.offset, grads_.data() + p.offset, adam_m_.data() + p.offset,
                      adam_v_.data() + p.offset, p.numel, opt.lr, opt.beta1, opt.beta2, opt.eps, wd, clip, step_);
  }
  return norm;
}

}  // namespace moepilot
