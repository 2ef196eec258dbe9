// The GPU backend of the rollout: the scheduler's rows, block tables and samples as one GpuRollout batch.
#include <algorithm>
#include <map>

#include "cuda/gpu_model.h"
#include "gen/backend.h"
#include "moepilot/error.h"

namespace moepilot::gen {

namespace {

int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

class GpuBackend final : public Backend {
 public:
  GpuBackend(std::shared_ptr<Engine> engine, int num_blocks, int block_size)
      : engine_(std::move(engine)), block_size_(block_size) {
    MP_CHECK_ARG(engine_->gpu() != nullptr, "generator: the engine is not on a GPU");
    rollout_ = std::make_unique<GpuRollout>(*engine_->gpu(), num_blocks, block_size);
  }

  void run(const std::vector<IterRow>& rows, const std::vector<IterSample>& samples, bool want_experts, bool decode,
           IterResult& out) override {
    RolloutBatch b;
    const int R = (int)rows.size();
    // Sequences: one block table per distinct table (a prompt's rows share their group's).
    std::map<const std::vector<int>*, int> seq_of;
    std::vector<const std::vector<int>*> tables;
    int longest = 1;
    for (const IterRow& r : rows) {
      if (seq_of.emplace(r.blocks, (int)tables.size()).second) tables.push_back(r.blocks);
      longest = std::max(longest, (int)r.blocks->size());
      longest = std::max(longest, r.pos / block_size_ + 1);
    }
    // The table width only grows (a power of two), so decode graphs keep their shapes.
    width_ = std::max(width_, pow2_at_least(longest));
    b.max_blocks = width_;
    b.block_tables.assign(tables.size() * (size_t)width_, 0);
    for (size_t t = 0; t < tables.size(); t++)
      std::copy(tables[t]->begin(), tables[t]->end(), b.block_tables.begin() + t * width_);
    b.tokens.resize(R);
    b.pos.resize(R);
    b.row_seq.resize(R);
    for (int i = 0; i < R; i++) {
      b.tokens[i] = rows[i].token;
      b.pos[i] = rows[i].pos;
      b.row_seq[i] = seq_of.at(rows[i].blocks);
      // Paged groups: runs of rows of one GRPO group (the scheduler keeps a group's samples contiguous, and a
      // prompt's rows are its group's only rows in the iteration that admits it).
      if (i == 0 || rows[i].group != rows[i - 1].group) {
        b.group_rows.push_back(i);
        b.shared_len.push_back(rows[i].shared_len);
      }
    }
    b.group_rows.push_back(R);
    b.sample_row.resize(samples.size());
    b.params.resize(samples.size());
    for (size_t s = 0; s < samples.size(); s++) {
      b.sample_row[s] = samples[s].row;
      b.params[s] = samples[s].params;
    }
    b.want_experts = want_experts;
    b.decode = decode;
    RolloutResult r;
    rollout_->step(b, r);
    out.tokens = std::move(r.tokens);
    out.logprobs = std::move(r.logprobs);
    out.experts = std::move(r.experts);
  }

  void copy_block(int dst, int src) override { rollout_->copy_block(dst, src); }

  void reserve_positions(int positions) override {
    width_ = std::max(width_, pow2_at_least((positions + block_size_ - 1) / block_size_));
  }

  void set_cuda_graphs(bool on) override { rollout_->set_cuda_graphs(on); }

 private:
  std::shared_ptr<Engine> engine_;
  int block_size_;
  int width_ = 1;
  std::unique_ptr<GpuRollout> rollout_;
};

}  // namespace

std::unique_ptr<Backend> make_gpu_backend(std::shared_ptr<Engine> engine, int num_blocks, int block_size) {
  return std::make_unique<GpuBackend>(std::move(engine), num_blocks, block_size);
}

}  // namespace moepilot::gen
