// Paged KV cache: a pool of fixed-size blocks sized once at start-up; no per-token allocation.
// Block b holds, for every layer, block_size rows of K and of V: [blocks][L][2][block_size][KVH*HD].
// Blocks are reference-counted so that a GRPO group's prompt blocks are shared read-only by its samples.
// Without host data (host_data = false) the pool only does the bookkeeping: the rows live elsewhere (the GPU
// rollout's cache on the device, same block ids).
#pragma once
#include <algorithm>
#include <cstddef>
#include <vector>

#include "moepilot/error.h"

namespace moepilot::gen {

class KvPool {
 public:
  KvPool(int num_blocks, int block_size, int layers, int kv_dim, bool host_data = true)
      : num_blocks_(num_blocks), block_size_(block_size), layers_(layers), kv_dim_(kv_dim) {
    MP_CHECK_ARG(num_blocks > 0 && block_size > 0, "kv cache: num_blocks and block_size must be > 0");
    if (host_data) data_.assign((size_t)num_blocks * block_floats(), 0.f);
    refcount_.assign(num_blocks, 0);
    for (int b = num_blocks - 1; b >= 0; b--) free_.push_back(b);
  }

  int block_size() const { return block_size_; }
  int num_blocks() const { return num_blocks_; }
  int free_blocks() const { return (int)free_.size(); }
  size_t block_floats() const { return (size_t)layers_ * 2 * block_size_ * kv_dim_; }

  int alloc() {
    MP_CHECK_INTERNAL(!free_.empty(), "kv cache: allocation past the reservation");
    const int b = free_.back();
    free_.pop_back();
    refcount_[b] = 1;
    return b;
  }
  void retain(int b) { refcount_[b]++; }
  void release(int b) {
    MP_CHECK_INTERNAL(refcount_[b] > 0, "kv cache: release of a free block");
    if (--refcount_[b] == 0) free_.push_back(b);
  }

  // K rows of `layer` in `block`: [block_size][kv_dim]; V rows follow.
  float* k(int block, int layer) { return data_.data() + (size_t)block * block_floats() + (size_t)layer * 2 * block_size_ * kv_dim_; }
  float* v(int block, int layer) { return k(block, layer) + (size_t)block_size_ * kv_dim_; }
  void copy_block(int dst, int src) {
    const size_t n = block_floats();
    std::copy(data_.begin() + (size_t)src * n, data_.begin() + (size_t)(src + 1) * n, data_.begin() + (size_t)dst * n);
  }

 private:
  int num_blocks_, block_size_, layers_, kv_dim_;
  std::vector<float> data_;
  std::vector<int> refcount_;
  std::vector<int> free_;
};

}  // namespace moepilot::gen
