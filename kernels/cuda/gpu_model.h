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
#include <vector>

#include "gen/sampling.h"

#include "moepilot/engine.h"
#include "moepilot/model.h"

namespace moepilot {

// Whether this build has the CUDA backend (false: GpuModel's constructor throws InvalidArgument).
bool gpu_backend_available();

class Collectives;  // moepilot/comm.h

class GpuModel {
 public:
  // Allocates the parameter and gradient buffers on device `device` (grads zeroed). Throws InvalidArgument for a
  // configuration the GPU path does not handle (a dimension the kernels cannot take). A partial expert range is
  // accepted, but passes refuse to run until set_parallel has named the ranks that own the other experts.
  //
  // weights_only: a copy for forward passes and rollout alone (a policy served from bf16 weights, a benchmark of
  // a model whose training state would not fit): the bf16 copy of every parameter plus fp32 for the dense range
  // only (the norms, biases and embedding the kernels read in fp32), no gradients, no optimizer state. For
  // Qwen1.5-MoE-A2.7B that is 36 GB instead of ~200. Training calls and set_parallel then throw InvalidArgument;
  // a download widens the experts' bf16 values.
  //
  // expert_grads_bf16: the routed experts' gradients in bf16 (the dense ones stay fp32). Each backward adds its
  // product to them with one rounding, so micro-batches accumulate in bf16 (the precision of a bf16 model's
  // gradients in PyTorch); AdamW and the norm read them widened. Half the gradient memory of the experts, and half the
  // bytes of their grouped dW, which bounds it. Ignored with weights_only.
  GpuModel(const ModelConfig& cfg, const ParamLayout& layout, int device, bool weights_only = false,
           bool expert_grads_bf16 = false);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  int device() const;
  bool weights_only() const;
  bool expert_grads_bf16() const;
  // Device memory the engine holds on this model's device (every allocation of the process there), now and at
  // most since the last reset: the figure for a step's peak memory.
  struct Memory {
    size_t current = 0, peak = 0;
  };
  Memory memory(bool reset_peak = false) const;

  // Expert + data parallelism (Engine::set_parallel): rank r of `comm` owns experts [bounds[r], bounds[r+1]) (this
  // model's range must be its block). `comm` must be the NCCL backend on this model's device: the token exchange,
  // the dense gradients' reduce-scatter and the parameters' all-gather pass device buffers to it. Only before the
  // optimizer state exists (the dense state is then allocated for this rank's shard only).
  //
  // Semantics are the CPU engine's (kernels/model/blocks.cpp, engine.cpp): each MoE layer sends its (token, k)
  // rows to the owning ranks in ascending (expert, assignment) order, the owner groups the received rows by local
  // expert (source rank, then the sender's order), runs its experts and sends the outputs back into each
  // assignment's slot, and the combine adds them in k order; the backward mirrors it. The load-balancing loss is
  // over the global batch. adamw_step: dense gradients reduce-scattered (rank order), AdamW on this rank's dense
  // shard, the updated shards all-gathered (fp32, then the bf16 copy refreshed); experts updated by their owner.
  // Every pass and step is collective; a rank with no sequences passes an empty batch.
  void set_parallel(std::shared_ptr<Collectives> comm, const std::vector<int>& bounds);
  bool parallel() const;
  // Sums the dense gradients [0, dense_total) over the ranks in place (Engine::all_reduce_dense_grads).
  void all_reduce_dense_grads();

  // Host <-> device copies of whole buffers ([layout.total] floats each; bf16 expert gradients rounded up, widened
  // down); synchronous.
  void upload_params(const float* params);
  void download_params(float* params);
  void upload_grads(const float* grads);
  void download_grads(float* grads);
  // AdamW state as the engine's host copy holds it: dense [this rank's shard: dense_total without set_parallel]
  // and expert [total - dense_total] parts (Engine::optimizer_shard).
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
  Impl& impl() { return *impl_; }  // GpuRollout (same file of the CUDA build) runs the layers

 private:
  std::unique_ptr<Impl> impl_;
};

// ---- Rollout on the device: gen::Generator's GPU backend (kernels/gen/gpu_backend.cpp).
// Dimension legend: R rows, S samples, NS sequences (block-table rows), MB block-table width, G paged groups
// (cuda/attention.h's PagedRows), ML MoE layers, K top-k.

// One iteration's rows and samples (host arrays; cuda/attention.h's PagedRows says what each means).
struct RolloutBatch {
  std::vector<int32_t> tokens, pos, row_seq;  // [R]
  int max_blocks = 0;                         // MB
  std::vector<int32_t> block_tables;          // [NS, MB]
  std::vector<int32_t> group_rows;            // [G + 1]
  std::vector<int32_t> shared_len;            // [G]
  std::vector<int32_t> sample_row;            // [S] the row whose logits sample s draws from
  std::vector<gen::SamplingParams> params;    // [S] (step set)
  bool want_experts = false;
  bool decode = false;  // one row per sequence, no prompt rows: may run as a CUDA graph
};

struct RolloutResult {
  std::vector<int32_t> tokens;   // [S]
  std::vector<float> logprobs;   // [S]
  std::vector<int32_t> experts;  // [R, ML, K] when asked
};

// A paged bf16 KV cache on the model's device, [num_blocks + 1][L][2][block_size][KVH*HD] (the last block is
// the padding rows' scratch), and the rollout's forward over it: embedding, the layers of GpuModel (the
// trainer's layer code, with kv_cache_write + paged_attention in place of attention_forward), the LM head via
// lm_head_forward_rows (each sample's row at its own temperature) and sample_rows with the head's lse. A
// sample's logprob therefore equals GpuModel::forward's logprob of the same token at the same temperature, bit
// for bit. Its own stream and buffers (the trainer's activations are untouched); each step first waits for the
// model's stream (parameters updated by AdamW are seen). Inputs go up in one copy, outputs come back in one.
//
// Decode iterations under CUDA graphs: rows padded to a power-of-two bucket (padding rows: token 0 at position 0
// of a scratch sequence in the spare block, greedy), one graph per bucket captured after a first eager run at
// that bucket, every input in fixed device buffers. Any regrowth of the buffers (or of the model's RoPE tables)
// drops the graphs, which are captured again. Graphs off: the same padded launches, eagerly (same bits).
class GpuRollout {
 public:
  // With expert parallelism (GpuModel::set_parallel) every step is collective: the MoE layers exchange their rows
  // as the trainer's do, an idle rank steps with no rows (R = 0: the exchanges only), and steps run eagerly,
  // without padding or graphs (the exchange synchronises with the host).
  GpuRollout(GpuModel& model, int num_blocks, int block_size);
  ~GpuRollout();
  GpuRollout(const GpuRollout&) = delete;
  GpuRollout& operator=(const GpuRollout&) = delete;

  void step(const RolloutBatch& batch, RolloutResult& out);
  void copy_block(int dst, int src);  // every layer's K/V of block src to dst, queued on the rollout's stream
  void set_cuda_graphs(bool on);
  int graphs_captured() const;  // tests: graphs alive now

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace moepilot
