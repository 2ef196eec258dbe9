// Rollout generation over the paged KV cache: GRPO groups (one prompt, n samples) prefilled once with the
// prompt's blocks shared by the samples, then decoded in batches. Every row goes through the same
// row-invariant ops as the trainer's forward, so a sample's logprobs equal the trainer's bit for bit.
#pragma once
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "gen/backend.h"
#include "gen/kv_cache.h"
#include "gen/sampling.h"
#include "moepilot/engine.h"

namespace moepilot::gen {

enum class FinishReason : int { None = 0, Stop = 1, Length = 2, Cancelled = 3 };
const char* finish_reason_name(FinishReason r);

struct SampleSpec {
  int64_t sample_id = 0;
  SamplingParams params;  // temperature 0 = greedy
};

struct GroupSpec {
  int64_t group_id = 0;
  std::vector<int32_t> prompt;  // [P], P >= 1
  std::vector<SampleSpec> samples;
  int max_new_tokens = 16;
  std::vector<int32_t> stop_ids;  // eos and extra stop tokens: generation ends after emitting one
  bool want_experts = false;      // router replay: experts chosen per token per MoE layer
};

// What one step produced for one sample (tokens since the last step).
struct SampleEvent {
  int64_t sample_id = 0, group_id = 0;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::vector<int32_t> experts;  // [rows fed through the model for this sample this step, moe_layers, K]
  FinishReason finished = FinishReason::None;
};

struct GroupPrefill {
  int64_t group_id = 0;
  std::vector<int32_t> experts;  // [P, moe_layers, K]
};

struct StepResult {
  std::vector<SampleEvent> events;
  std::vector<GroupPrefill> prefills;
  // Whether any rank (this one alone without expert parallelism) may still have work: the caller keeps
  // stepping while it is true, also a rank with nothing of its own, since the others' tokens pass by it.
  bool global_active = false;
};

struct GeneratorStats {
  int block_size = 0, num_blocks = 0, free_blocks = 0, reserved_blocks = 0, active_samples = 0, waiting_groups = 0;
};

class Generator {
 public:
  // On an engine that is on a GPU (Engine::to_device), the rows run on the device with the KV cache there
  // (gen::make_gpu_backend); otherwise on the CPU engine over a host cache.
  Generator(std::shared_ptr<Engine> engine, int num_blocks, int block_size);
  ~Generator();

  // Worst-case blocks a group needs. A group is admitted only when all of them are available, so a running
  // sample never runs out of cache and nothing is truncated; a waiting group stays queued.
  int blocks_needed(int prompt_len, int n, int max_new_tokens) const;
  // Validates and queues a group; it is admitted and prefilled by a later step when blocks allow.
  // Throws InvalidArgument when the group could never fit the pool.
  void add_group(GroupSpec spec);
  // Runs up to max_steps iterations, each one forward over the running samples' next tokens and the prompts
  // of groups admitted then (prefill and decode share the batch). One rank alone stops early once a sample
  // finishes, so that finished samples stream out promptly. With expert parallelism the call is collective:
  // every rank must make it, and all stop together when no rank has rows left.
  StepResult step(int max_steps);
  void cancel(int64_t sample_id);
  GeneratorStats stats() const;
  // Distinct cache blocks a group's samples hold now (shared prompt blocks counted once).
  int group_blocks(int64_t group_id) const;
  bool idle() const { return seqs_.empty() && queue_.empty() && cancelled_.empty(); }
  bool on_device() const { return on_device_; }
  // Decode iterations under CUDA graphs (GPU only; on by default): off runs them eagerly (tests compare both).
  void set_cuda_graphs(bool on) { backend_->set_cuda_graphs(on); }

  std::mutex mu;  // held by the addon for each call

 private:
  struct Sequence {
    int64_t id = 0, group = 0;
    SamplingParams params;
    std::vector<int> blocks;  // block table: position p lives in blocks[p / block_size]
    int len = 0;              // tokens in the cache
    int32_t next = -1;        // the last sampled token, fed at the next decode step
    int generated = 0;
    FinishReason finished = FinishReason::None;
  };
  struct Group {
    GroupSpec spec;
    int reserved = 0;
    int live = 0;                    // samples not finished
    std::vector<int> prompt_blocks;  // from admission to the fork
  };
  // Records a sampled token (and its logprob) and applies the stop rules.
  void accept(Sequence& s, int32_t token, float logprob, SampleEvent& ev);
  void finish(Sequence& s, FinishReason why);
  std::vector<int64_t> admit();
  // tokens/logprobs: the group's samples' draws, in spec order.
  void fork_group(int64_t group_id, const int32_t* tokens, const float* logprobs, StepResult& out);

  std::shared_ptr<Engine> engine_;
  bool on_device_ = false;
  KvPool pool_;
  std::unique_ptr<Backend> backend_;  // after pool_ (the CPU backend holds the pool's rows)
  std::deque<int64_t> queue_;      // groups waiting for admission, in arrival order
  std::map<int64_t, Group> groups_;
  std::vector<Sequence> seqs_;     // admitted samples still generating
  std::vector<SampleEvent> cancelled_;  // delivered by the next step
  int reserved_ = 0;
};

}  // namespace moepilot::gen
