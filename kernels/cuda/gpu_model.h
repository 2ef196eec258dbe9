// The model on one GPU: the CUDA engine behind moepilot::Engine once it is moved to a device
// (Engine::to_device). Same calls and result structs as the CPU backend (kernels/model/forward.cpp), computed
// with the ops of cuda/ops.h, the GEMMs of cuda/gemm.h and the attention of cuda/attention.h.
//
// Precision: fp32 master parameters [total] on the device and a bf16 copy (the GEMMs' operand) refreshed after
// every upload and AdamW step; fp32 gradients and AdamW state; activations as cuda/ops.h describes. Memory:
// one allocation each for parameters (fp32 + bf16), gradients, optimizer state (on first step) and activations
// (sized for the largest batch so far, regrown when a larger one comes).
//
// This header names no CUDA type, so the engine (compiled without nvcc) can hold a GpuModel; builds without
// CUDA link kernels/model/gpu_model_stub.cpp, whose constructor throws.
#pragma once
#include <cstdint>
#include <memory>

#include "moepilot/engine.h"
#include "moepilot/model.h"

namespace moepilot {

// Whether this build has the CUDA backend (false: GpuModel's constructor throws InvalidArgument).
bool gpu_backend_available();

class GpuModel {
 public:
  // Allocates the parameter and gradient buffers on device `device` (grads zeroed). Throws InvalidArgument for a
  // configuration the GPU path does not handle (a partial expert range, a dimension the kernels cannot take).
  GpuModel(const ModelConfig& cfg, const ParamLayout& layout, int device);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  int device() const;
  // Host <-> device copies of whole buffers ([layout.total] floats each); synchronous.
  void upload_params(const float* params);
  void download_params(float* params);
  void upload_grads(const float* grads);
  void download_grads(float* grads);
  // AdamW state as the engine's host copy holds it: dense [dense_total] and expert [total - dense_total] parts.
  bool has_optimizer_state() const;
  void upload_optimizer_state(const float* dense_m, const float* dense_v, const float* expert_m,
                              const float* expert_v);
  void download_optimizer_state(float* dense_m, float* dense_v, float* expert_m, float* expert_v);

  // As Engine::forward / forward_backward / zero_grad / adamw_step. `step` is the step number being taken
  // (1 for the first), for the bias correction. Returns the pre-clip global gradient norm.
  ForwardResult forward(const Batch& batch, const ForwardRequest& req);
  LossResult forward_backward(const Batch& batch, const LossSpec& spec);
  void zero_grad();
  double adamw_step(const AdamWConfig& opt, int64_t step);
  // Benchmarks: fills the parameters on the device (no host copy of a multi-GB model): vectors whose name ends
  // in "norm.weight" with 1, other vectors (biases) with 0, matrices uniform in [-scale, scale) from `seed`.
  void fill_params_random(uint64_t seed, float scale);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace moepilot
