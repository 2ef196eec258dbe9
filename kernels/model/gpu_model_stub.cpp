// What builds without the CUDA backend link in place of cuda/gpu_model.cu: the same class, whose constructor
// says the build has no CUDA. (Builds with CUDA define MOEPILOT_WITH_CUDA and compile this file empty.)
#ifndef MOEPILOT_WITH_CUDA
#include "cuda/gpu_model.h"
#include "moepilot/error.h"

namespace moepilot {

bool gpu_backend_available() { return false; }

struct GpuModel::Impl {};

namespace {
[[noreturn]] void no_cuda() {
  throw Error(ErrorCode::InvalidArgument,
              "this build of the engine has no CUDA backend (rebuild where nvcc and the CUDA toolkit are installed)");
}
}  // namespace

GpuModel::GpuModel(const ModelConfig&, const ParamLayout&, int, bool, bool) { no_cuda(); }
GpuModel::~GpuModel() = default;
int GpuModel::device() const { no_cuda(); }
bool GpuModel::weights_only() const { no_cuda(); }
bool GpuModel::expert_grads_bf16() const { no_cuda(); }
GpuModel::Memory GpuModel::memory(bool) const { no_cuda(); }
void GpuModel::set_parallel(std::shared_ptr<Collectives>, const std::vector<int>&) { no_cuda(); }
bool GpuModel::parallel() const { no_cuda(); }
void GpuModel::all_reduce_dense_grads() { no_cuda(); }
void GpuModel::upload_params(const float*) { no_cuda(); }
void GpuModel::download_params(float*) { no_cuda(); }
void GpuModel::upload_grads(const float*) { no_cuda(); }
void GpuModel::download_grads(float*) { no_cuda(); }
bool GpuModel::has_optimizer_state() const { no_cuda(); }
void GpuModel::upload_optimizer_state(const float*, const float*, const float*, const float*) { no_cuda(); }
void GpuModel::download_optimizer_state(float*, float*, float*, float*) { no_cuda(); }
ForwardResult GpuModel::forward(const Batch&, const ForwardRequest&) { no_cuda(); }
LossResult GpuModel::forward_backward(const Batch&, const LossSpec&) { no_cuda(); }
void GpuModel::zero_grad() { no_cuda(); }
double GpuModel::adamw_step(const AdamWConfig&, int64_t) { no_cuda(); }
void GpuModel::fill_params_random(uint64_t, float) { no_cuda(); }

struct GpuRollout::Impl {};
GpuRollout::GpuRollout(GpuModel&, int, int) { no_cuda(); }
GpuRollout::~GpuRollout() = default;
void GpuRollout::step(const RolloutBatch&, RolloutResult&) { no_cuda(); }
void GpuRollout::copy_block(int, int) { no_cuda(); }
void GpuRollout::set_cuda_graphs(bool) { no_cuda(); }
int GpuRollout::graphs_captured() const { no_cuda(); }

}  // namespace moepilot
#endif
