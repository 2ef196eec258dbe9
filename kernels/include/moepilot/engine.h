// The engine: a model's flat parameter and gradient buffers, AdamW state, and the calls the trainer and
// the rollout make on them. One Engine per model per process; callers serialise calls (the addon holds
// `mu` for the duration of each call).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <mutex>
#include <utility>
#include <vector>

#include "moepilot/model.h"

namespace moepilot {

class Collectives;  // moepilot/comm.h
class GpuModel;     // cuda/gpu_model.h

// Zeroed host memory whose pages the OS maps on first write: calloc of a large block is fresh zero pages, and
// resize() value-initialises through construct(), which this allocator leaves to calloc. A host buffer that is
// never written (the gradients of an engine that trains on the GPU, the weights of a model made on the device)
// then costs no RAM: Qwen1.5-MoE-A2.7B's fp32 parameters and gradients alone would be 114 GB.
template <class T>
struct ZeroPagesAllocator {
  using value_type = T;
  ZeroPagesAllocator() = default;
  template <class U>
  ZeroPagesAllocator(const ZeroPagesAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    void* p = std::calloc(n ? n : 1, sizeof(T));
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }
  template <class U>
  void construct(U*) noexcept {}  // already zero
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <class U>
  bool operator==(const ZeroPagesAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const ZeroPagesAllocator<U>&) const noexcept { return false; }
};
using HostBuffer = std::vector<float, ZeroPagesAllocator<float>>;

// A batch of packed sequences.
struct Batch {
  std::vector<int32_t> tokens;    // [N]
  std::vector<int32_t> seq_lens;  // [B], each >= 1, summing to N
  // Router replay: experts to use instead of the router's top-k, [moe_layers, N, K]; empty = route.
  std::vector<int32_t> replay_experts;
};

struct ForwardRequest {
  bool want_logits = false;         // [N, V]
  bool want_logprobs = false;       // [N]: log p(tokens[i+1]) at row i; 0 at each sequence's last row
  bool want_router_logits = false;  // [moe_layers, N, E]
  bool want_experts = false;        // [moe_layers, N, K]
  bool want_entropy = false;        // [N]: entropy of the next-token distribution
  float temperature = 1.f;          // logprobs/entropy of logits / temperature (the sampling distribution)
};

// Wall time of a pass's phases (ms), reported to tracing: attention (norm, projections, RoPE, attention,
// output projection), routed-expert compute, the token exchange between ranks, the LM head.
struct PhaseTimes {
  double attention_ms = 0, experts_ms = 0, alltoall_ms = 0, lm_head_ms = 0, total_ms = 0;
  // Bytes this rank handed to the token exchanges' all-to-alls (its own share included, as NCCL's tests count an
  // all-to-all's size): with alltoall_ms, the exchange's bus bandwidth inside a step.
  double alltoall_bytes = 0;
};

struct ForwardResult {
  std::vector<float> logits, logprobs, router_logits, entropy;
  std::vector<int32_t> experts;
  std::vector<int32_t> expert_tokens;  // [moe_layers, E]: tokens this rank routed to each expert
  PhaseTimes phases;
};

enum class LossType : int { Sft = 0, Grpo = 1 };
enum class KlEstimator : int { K1 = 0, K3 = 1 };
enum class Aggregation : int { TokenMean = 0, SeqMeanTokenMean = 1, SeqMeanTokenSumNorm = 2 };

// Per-row inputs are [N]: row i is the prediction of tokens[i+1]; mask 0 at each sequence's last row.
struct LossSpec {
  LossType type = LossType::Sft;
  std::vector<float> mask;           // [N] 1 where the target is trained on
  std::vector<float> advantages;     // [N] GRPO: the sequence's advantage on each of its rows
  std::vector<float> old_logprobs;   // [N] GRPO: logprobs of the policy that sampled
  std::vector<float> ref_logprobs;   // [N] GRPO with beta > 0
  float eps_low = 0.2f, eps_high = 0.28f, beta = 0.f;
  KlEstimator kl = KlEstimator::K3;
  Aggregation aggregation = Aggregation::TokenMean;
  // Normalisers for the whole global batch (all micro-batches, all ranks), so that gradients
  // accumulated over micro-batches equal one pass over the batch. <= 0: this micro-batch's own.
  double total_tokens = 0;   // token-mean: masked tokens in the batch
  double total_seqs = 0;     // seq-mean-*: sequences in the batch
  double norm_length = 0;    // seq-mean-token-sum-norm: the constant length (e.g. max response length)
  float temperature = 1.f;   // logprobs of logits / temperature, as the rollout sampled them
  float aux_loss_coef = -1;  // < 0: the config's router_aux_loss_coef
  double aux_scale = 1.0;    // multiplies the aux loss (1 / number of micro-batches to average it)
};

struct LossResult {
  double loss = 0;      // the aggregated policy loss of this micro-batch (its share of the batch)
  double aux_loss = 0;  // load-balancing loss (before the coefficient)
  double tokens = 0;    // masked tokens
  double kl_sum = 0, clip_low_count = 0, clip_high_count = 0, ratio_sum = 0, entropy_sum = 0, logprob_sum = 0;
  std::vector<float> logprobs;         // [N]
  std::vector<int32_t> expert_tokens;  // [moe_layers, E]
  PhaseTimes forward_phases, backward_phases;
};

struct AdamWConfig {
  float lr = 1e-5f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f;
  float max_grad_norm = 0.f;  // <= 0: no clipping
};

class Engine {
 public:
  explicit Engine(const ModelConfig& cfg);

  const ModelConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  float* params() { return params_.data(); }
  float* grads() { return grads_.data(); }
  size_t num_params() const { return params_.size(); }

  ForwardResult forward(const Batch& batch, const ForwardRequest& req);
  // Forward + loss + backward; gradients accumulate (+=) into grads() until zero_grad().
  LossResult forward_backward(const Batch& batch, const LossSpec& loss);
  void zero_grad();
  // Global gradient norm over the whole buffer, then one AdamW step; returns the pre-clip norm.
  double adamw_step(const AdamWConfig& opt);
  int64_t optimizer_steps() const { return step_; }

  // Expert + data parallelism over `comm`'s ranks: rank r owns experts [bounds[r], bounds[r+1]) (this
  // engine's expert range must be its block); each rank trains on its own sequences. From then on every
  // forward/backward/optimizer call is collective: all ranks make the same calls in the same order
  // (a rank with nothing to do passes an empty batch).
  void set_parallel(std::shared_ptr<Collectives> comm, std::vector<int> expert_bounds);
  Collectives* comm() const { return comm_.get(); }
  const std::vector<int>& expert_bounds() const { return expert_bounds_; }
  // Sums the dense (replicated) gradients over the ranks in place, so every rank holds the full-batch
  // gradient (checks and plain data parallelism; adamw_step reduce-scatters instead).
  void all_reduce_dense_grads();
  // Optimizer state as the checkpoint sees it: [m | v] of this rank's dense shard and of its experts.
  struct OptimizerShard {
    size_t dense_begin = 0, dense_end = 0;  // the dense range [begin, end) of the flat buffer this rank updates
    std::vector<float>* dense_m;
    std::vector<float>* dense_v;
    std::vector<float>* expert_m;
    std::vector<float>* expert_v;
  };
  OptimizerShard optimizer_shard();
  void set_optimizer_steps(int64_t steps) { step_ = steps; }

  // ---- Device. to_device(d) copies the parameters, gradients and optimizer state (when allocated) to GPU d;
  // from then on forward, forward_backward, zero_grad and adamw_step run there. The host buffers (params(), grads(), optimizer_shard()) then hold the values
  // of the last sync_to_host(), which downloads all three. Throws InvalidArgument in builds without CUDA.
  // Expert parallelism on the GPU (cuda/gpu_model.h, GpuModel::set_parallel): set_parallel before or after
  // to_device, in either case before the first optimizer step; the communicator must be NCCL on this device.
  // weights_only (cuda/gpu_model.h): the device holds the bf16 weights (fp32 for the dense range) and nothing for
  // training: forward and rollout only; training calls throw InvalidArgument. expert_grads_bf16: the routed
  // experts' gradients in bf16 on the device (GpuModel's constructor says what that changes).
  void to_device(int device, bool weights_only = false, bool expert_grads_bf16 = false);
  bool on_device() const { return gpu_ != nullptr; }
  bool weights_only() const { return weights_only_; }
  // Device memory held on the engine's device, now and at most since the last reset ({0, 0} on the CPU).
  std::pair<size_t, size_t> device_memory(bool reset_peak = false) const;
  int device() const;  // -1 on the CPU
  GpuModel* gpu() const { return gpu_.get(); }
  // with_grads = false leaves the host gradients as they were: a checkpoint's snapshot (parameters and optimizer
  // state) does not need them, and they are a quarter of what it would copy.
  void sync_to_host(bool with_grads = true);
  // Downloads the parameters alone when an optimizer step on the GPU has changed them since the last download
  // (a no-op otherwise, and on the CPU). The CPU rollout reads the host copy and calls it before each step; a
  // generator on an engine on a GPU runs there from the device's weights and does not need it.
  void sync_params_to_host();
  // The other way: uploads the host buffers (parameters, gradients, optimizer state when allocated) to the GPU,
  // after the host copy was written (a checkpoint restored into it). A no-op on the CPU.
  void sync_to_device();
  // Random parameters made on the device (benchmarks of large shapes: no host-side weights to upload).
  void fill_params_random(uint64_t seed, float scale);

  std::mutex mu;

 private:
  void ensure_optimizer_state();
  std::pair<size_t, size_t> dense_shard() const;

  ModelConfig cfg_;
  ParamLayout layout_;
  HostBuffer params_, grads_;
  bool weights_only_ = false;
  // AdamW state: this rank's shard of the dense range (ZeRO-1) and its experts.
  std::vector<float> dense_m_, dense_v_, expert_m_, expert_v_;
  int64_t step_ = 0;
  bool host_params_stale_ = false;  // the GPU's parameters changed after the last download
  std::shared_ptr<Collectives> comm_;
  std::vector<int> expert_bounds_;
  std::shared_ptr<GpuModel> gpu_;
};

}  // namespace moepilot
