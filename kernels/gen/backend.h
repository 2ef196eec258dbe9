// The seam between the rollout's scheduler (gen::Generator: admission against the block reservation, block
// tables, GRPO groups sharing prompt blocks, stops, events) and what runs one iteration's rows through the model
// and samples: the CPU engine (CpuBackend, generator.cpp) or the GPU model with the KV cache on the device
// (GpuBackend, gpu_backend.cpp). One scheduler, two backends: both see the same rows, tables and samples.
//
// Dimension legend: R rows of the iteration, S samples drawn (one per running sample, n per newly admitted
// group, all from the group's last prompt row), ML MoE layers, K top-k.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "gen/sampling.h"
#include "moepilot/engine.h"

namespace moepilot::gen {

// One row of an iteration: `token` at position `pos` of the sequence whose block table is *blocks (position p
// lives in block (*blocks)[p / block_size]). Rows of one GRPO group are contiguous and carry its id; the first
// shared_len positions of their sequences sit in the same blocks (the shared full prompt blocks; 0 for a
// prompt's own rows). Backends write each row's K/V into the cache before its attention, so row r attends
// positions [0, pos_r] of its sequence.
struct IterRow {
  int32_t token = 0;
  int pos = 0;
  const std::vector<int>* blocks = nullptr;
  int64_t group = 0;
  int shared_len = 0;
};

// One sample drawn this iteration from the logits of row `row`, with its parameters (step = tokens the sample
// has generated so far).
struct IterSample {
  int row = 0;
  SamplingParams params;
};

struct IterResult {
  std::vector<int32_t> tokens;   // [S]
  std::vector<float> logprobs;   // [S]: log_softmax(logits / T)[token], T = 1 for greedy: the trainer's number
  std::vector<int32_t> experts;  // [R, ML, K] when asked
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Rows through the model, then the samples. decode: every row is a running sample's next token (one row
  // per sequence, no prompt rows), which a backend may run under a CUDA graph.
  virtual void run(const std::vector<IterRow>& rows, const std::vector<IterSample>& samples, bool want_experts,
                   bool decode, IterResult& out) = 0;
  // Copies every layer's K/V rows of cache block src to dst (a sample's own copy of the prompt's partial block),
  // after the work already queued.
  virtual void copy_block(int dst, int src) = 0;
  // Sequences will reach up to `positions` cache positions (sizes the device's block tables once).
  virtual void reserve_positions(int positions) {}
  // CUDA graphs for decode iterations (GPU only; on by default). Off: every iteration runs eagerly.
  virtual void set_cuda_graphs(bool on) {}
};

// The GPU backend of an engine on a device (Engine::to_device): a bf16 paged cache of num_blocks blocks on the
// device. Throws InvalidArgument in a build without CUDA.
std::unique_ptr<Backend> make_gpu_backend(std::shared_ptr<Engine> engine, int num_blocks, int block_size);

}  // namespace moepilot::gen
