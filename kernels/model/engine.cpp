// Engine construction, parallelism set-up and the optimizer. The forward and backward passes are in
// model/forward.cpp.
//
// Optimizer (ZeRO-1 over the data-parallel ranks): the dense range [0, dense_total) of the gradient
// buffer is reduce-scattered, each rank updates its shard of the dense parameters with its shard of the
// AdamW state, then the updated shards are all-gathered. Expert parameters are never reduced: each rank
// updates its own experts with their gradients (which already hold every rank's tokens) and keeps their
// state. With one rank all of it degenerates to a plain AdamW step with the same arithmetic.
#include "moepilot/engine.h"

#include <cmath>
#include <cstring>

#include "cpu/ops.h"
#include "cuda/gpu_model.h"
#include "moepilot/comm.h"
#include "moepilot/error.h"

namespace moepilot {

Engine::Engine(const ModelConfig& cfg) : cfg_(cfg), layout_(build_layout(cfg)) {
  params_.resize(layout_.total);  // zero pages, mapped when written
  grads_.resize(layout_.total);
}

void Engine::zero_grad() {
  if (gpu_) return gpu_->zero_grad();
  std::memset(grads_.data(), 0, grads_.size() * sizeof(float));
}

void Engine::to_device(int device, bool weights_only, bool expert_grads_bf16) {
  MP_CHECK_ARG(gpu_backend_available(), "to_device: this build of the engine has no CUDA backend (rebuild where nvcc "
                                        "and the CUDA toolkit are installed)");
  MP_CHECK_ARG(!gpu_, "to_device: the engine is already on device " + std::to_string(this->device()));
  MP_CHECK_ARG(!(weights_only && comm_), "to_device: a weights-only device copy cannot be expert-parallel "
                                         "(set_parallel trains; move the engine without weightsOnly)");
  MP_CHECK_ARG(!(weights_only && expert_grads_bf16), "to_device: a weights-only device copy has no gradients (bf16 "
                                                     "expert gradients need an engine moved without weightsOnly)");
  gpu_ = std::make_shared<GpuModel>(cfg_, layout_, device, weights_only, expert_grads_bf16);
  weights_only_ = weights_only;
  try {
    if (comm_) gpu_->set_parallel(comm_, expert_bounds_);  // before the optimizer state: its dense part is the shard
    sync_to_device();
  } catch (...) {
    gpu_.reset();
    weights_only_ = false;
    throw;
  }
}

void Engine::sync_to_device() {
  if (!gpu_) return;
  gpu_->upload_params(params_.data());
  host_params_stale_ = false;
  if (weights_only_) return;
  gpu_->upload_grads(grads_.data());
  if (!dense_m_.empty() || !expert_m_.empty())
    gpu_->upload_optimizer_state(dense_m_.data(), dense_v_.data(), expert_m_.data(), expert_v_.data());
}

int Engine::device() const { return gpu_ ? gpu_->device() : -1; }

std::pair<size_t, size_t> Engine::device_memory(bool reset_peak) const {
  if (!gpu_) return {0, 0};
  const GpuModel::Memory m = gpu_->memory(reset_peak);
  return {m.current, m.peak};
}

void Engine::sync_params_to_host() {
  if (!gpu_ || !host_params_stale_) return;
  gpu_->download_params(params_.data());
  host_params_stale_ = false;
}

void Engine::fill_params_random(uint64_t seed, float scale) {
  MP_CHECK_ARG(gpu_ != nullptr, "fill_params_random: the engine is not on a GPU (call to_device first)");
  gpu_->fill_params_random(seed, scale);
  host_params_stale_ = true;
}

void Engine::sync_to_host(bool with_grads) {
  if (!gpu_) return;
  gpu_->download_params(params_.data());
  host_params_stale_ = false;
  if (weights_only_) return;
  if (with_grads) gpu_->download_grads(grads_.data());
  if (gpu_->has_optimizer_state()) {
    ensure_optimizer_state();
    gpu_->download_optimizer_state(dense_m_.data(), dense_v_.data(), expert_m_.data(), expert_v_.data());
  }
}

void Engine::set_parallel(std::shared_ptr<Collectives> comm, std::vector<int> bounds) {
  MP_CHECK_ARG(comm != nullptr, "set_parallel: a communicator is required");
  const int W = comm->size(), r = comm->rank();
  MP_CHECK_ARG((int)bounds.size() == W + 1, "set_parallel: expert bounds need ranks + 1 = " + std::to_string(W + 1) +
                                                 " entries, got " + std::to_string(bounds.size()));
  MP_CHECK_ARG(bounds[0] == 0 && bounds[W] == cfg_.num_experts, "set_parallel: expert bounds must span [0, num_experts)");
  for (int i = 0; i < W; i++) MP_CHECK_ARG(bounds[i] <= bounds[i + 1], "set_parallel: expert bounds must not decrease");
  MP_CHECK_ARG(bounds[r] == cfg_.expert_begin && bounds[r + 1] == cfg_.expert_end,
               "set_parallel: rank " + std::to_string(r) + " must hold experts [" + std::to_string(bounds[r]) + ", " +
                   std::to_string(bounds[r + 1]) + ") but this engine holds [" + std::to_string(cfg_.expert_begin) +
                   ", " + std::to_string(cfg_.expert_end) + ")");
  MP_CHECK_ARG(dense_m_.empty() && step_ == 0 && !(gpu_ && gpu_->has_optimizer_state()),
               "set_parallel: must be called before the first optimizer step");
  if (gpu_) gpu_->set_parallel(comm, bounds);
  comm_ = std::move(comm);
  expert_bounds_ = std::move(bounds);
}

void Engine::all_reduce_dense_grads() {
  if (gpu_) return gpu_->all_reduce_dense_grads();
  if (comm_) comm_->all_reduce_sum(grads_.data(), layout_.dense_total);
}

std::pair<size_t, size_t> Engine::dense_shard() const {
  const size_t D = layout_.dense_total;
  if (!comm_) return {0, D};
  const size_t W = comm_->size(), r = comm_->rank();
  return {D * r / W, D * (r + 1) / W};
}

void Engine::ensure_optimizer_state() {
  if (!dense_m_.empty() || !expert_m_.empty()) return;
  const auto [b, e] = dense_shard();
  dense_m_.assign(e - b, 0.f);
  dense_v_.assign(e - b, 0.f);
  expert_m_.assign(layout_.total - layout_.dense_total, 0.f);
  expert_v_.assign(layout_.total - layout_.dense_total, 0.f);
}

Engine::OptimizerShard Engine::optimizer_shard() {
  ensure_optimizer_state();
  const auto [b, e] = dense_shard();
  return OptimizerShard{b, e, &dense_m_, &dense_v_, &expert_m_, &expert_v_};
}

double Engine::adamw_step(const AdamWConfig& opt) {
  MP_CHECK_ARG(opt.lr >= 0 && opt.beta1 >= 0 && opt.beta1 < 1 && opt.beta2 >= 0 && opt.beta2 < 1 && opt.eps > 0,
               "adamw: lr >= 0, 0 <= beta1, beta2 < 1 and eps > 0 required");
  if (gpu_) {
    const double norm = gpu_->adamw_step(opt, step_ + 1);
    step_++;
    host_params_stale_ = true;
    return norm;
  }
  ensure_optimizer_state();
  const size_t D = layout_.dense_total;
  const auto [sb, se] = dense_shard();
  // This rank's shard of the summed dense gradient.
  std::vector<float> gshard(se - sb);
  if (comm_) {
    const int W = comm_->size();
    std::vector<int64_t> counts(W);
    for (int r = 0; r < W; r++) counts[r] = (int64_t)(D * (r + 1) / W - D * r / W);
    comm_->reduce_scatter_sum(grads_.data(), gshard.data(), counts);
  } else {
    std::memcpy(gshard.data(), grads_.data(), gshard.size() * sizeof(float));
  }
  // Global norm: the dense shard plus this rank's experts, summed over ranks.
  double sq = cpu::sum_squares(gshard.data(), gshard.size()) +
              cpu::sum_squares(grads_.data() + D, layout_.total - D);
  if (comm_) comm_->all_reduce_sum(&sq, 1);
  const double norm = std::sqrt(sq);
  MP_CHECK_ARG(std::isfinite(norm), "adamw: gradient norm is not finite (NaN or Inf in the gradients)");
  const float clip = (opt.max_grad_norm > 0 && norm > opt.max_grad_norm) ? (float)(opt.max_grad_norm / (norm + 1e-6)) : 1.f;
  step_++;
  // Weight decay applies to matrices only (not to norms and biases), as is usual for LLM training.
  for (const ParamInfo& p : layout_.tensors) {
    const float wd = p.shape.size() >= 2 ? opt.weight_decay : 0.f;
    if (p.kind == ParamKind::Expert) {
      const size_t o = p.offset - D;
      cpu::adamw_update(params_.data() + p.offset, grads_.data() + p.offset, expert_m_.data() + o, expert_v_.data() + o,
                        p.numel, opt.lr, opt.beta1, opt.beta2, opt.eps, wd, clip, step_);
      continue;
    }
    // The part of this dense tensor inside the shard.
    const size_t b = std::max(p.offset, sb), e = std::min(p.offset + p.numel, se);
    if (b >= e) continue;
    cpu::adamw_update(params_.data() + b, gshard.data() + (b - sb), dense_m_.data() + (b - sb), dense_v_.data() + (b - sb),
                      e - b, opt.lr, opt.beta1, opt.beta2, opt.eps, wd, clip, step_);
  }
  if (comm_) {
    const int W = comm_->size();
    std::vector<int64_t> counts(W);
    for (int r = 0; r < W; r++) counts[r] = (int64_t)(D * (r + 1) / W - D * r / W);
    std::vector<float> mine(params_.begin() + sb, params_.begin() + se);
    comm_->all_gather(mine.data(), params_.data(), counts);
  }
  return norm;
}

}  // namespace moepilot
