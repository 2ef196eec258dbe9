// Causal GQA attention of the CUDA backend (contract; implemented in cuda/attention.cu).
//
// Training: flash-style forward and backward over packed sequences, never holding [T x T] scores in memory.
// Rollout: attention of new rows over the paged KV cache (decode: one row per sequence; prefill: a prompt's
// rows), reading each block that a GRPO group's samples share once for the whole group.
//
// Exactness: a row's output from paged_attention equals, bit for bit, its output from attention_forward over
// the same keys and values (same tile boundaries in position space, same order, same instructions per row), so
// the rollout's logprobs equal the trainer's. Backward is deterministic (no floating-point atomics deciding an
// order): two runs give the same bits.
//
// Layouts: q rows [N, NH, HD] (row stride q_stride elements), k/v rows [N, KVH, HD] (row stride kv_stride);
// query head h reads key/value head h / (NH / KVH). scale = 1 / sqrt(HD). Precision: bf16 inputs, fp32
// softmax and accumulation. HD in {16, 32, 64, 128} (16 is the fixtures' tiny models; 128 is Qwen1.5-MoE).
// Sequences are packed: cu_seqlens [B+1] (device, int32) holds their row offsets; row i of a sequence attends
// its rows 0..i; no sequence may be longer than max_seqlen (rows past it are not computed). Every pointer is
// device memory, 16-byte aligned, and strides are multiples of 8 elements; calls are asynchronous on the stream
// and check their launch. Bad shapes, strides, alignment or null pointers throw Error(InvalidArgument).
#pragma once
#include <cstdint>

#include "cuda/vendor.h"

namespace moepilot::gpu {

using bf16_bits = uint16_t;

struct AttentionShape {
  int64_t N = 0;       // packed rows
  int B = 0;           // sequences
  int max_seqlen = 0;  // longest sequence (sizes the launch)
  int NH = 0, KVH = 0, HD = 0;
  int q_stride = 0, kv_stride = 0;  // row strides in elements
};

// out [N, NH*HD] bf16; lse [N, NH] fp32: log of the softmax denominator of the scaled scores (kept for backward).
void attention_forward(bf16_bits* out, float* lse, const bf16_bits* q, const bf16_bits* k, const bf16_bits* v,
                       const int32_t* cu_seqlens, const AttentionShape& shape, Stream s);

// dq [N, NH*HD], dk/dv [N, KVH*HD] in fp32 (=, dense rows: stride NH*HD and KVH*HD). out/lse from the forward;
// dout [N, NH*HD] bf16, dense like out. Deterministic: one kernel owns each dk/dv key tile (looping over the query
// tiles that see it), another each dq query tile (looping over its key tiles); no atomics.
void attention_backward(float* dq, float* dk, float* dv, const bf16_bits* dout, const bf16_bits* out,
                        const float* lse, const bf16_bits* q, const bf16_bits* k, const bf16_bits* v,
                        const int32_t* cu_seqlens, const AttentionShape& shape, Stream s);

// The paged KV cache, bf16: block b holds, for every layer, block_size rows of K then block_size rows of V:
// [num_blocks][layers][2][block_size][KVH*HD] (the CPU cache's layout, kernels/gen/kv_cache.h).
struct PagedKv {
  bf16_bits* pool = nullptr;
  int num_blocks = 0, block_size = 0, layers = 0, KVH = 0, HD = 0;
};

// The rows of one paged call. Row r belongs to sequence row_seq[r] and sits at position row_pos[r] of it; it
// attends positions 0..row_pos[r] of that sequence, whose position p lives in block
// block_tables[row_seq[r] * max_blocks + p / block_size]. Rows are ordered so that the rows of a group are
// contiguous: group g is rows [group_rows[g], group_rows[g+1]), and all its rows' sequences share their first
// shared_len[g] positions (a multiple of block_size; same block ids). A kernel may use that to read those
// blocks once per group; the result does not depend on it (nor on how rows are grouped). All arrays are device
// int32. Of a sequence, only positions up to the largest row_pos among the call's rows of it (of the group, for
// the shared prompt) are read: cache memory past them (unwritten, possibly NaN bits) is never touched.
struct PagedRows {
  int R = 0;  // rows
  const int32_t* row_seq = nullptr;
  const int32_t* row_pos = nullptr;
  const int32_t* block_tables = nullptr;
  int max_blocks = 0;
  int groups = 0;
  const int32_t* group_rows = nullptr;  // [groups + 1]
  const int32_t* shared_len = nullptr;  // [groups]
  int max_pos = 0;                      // >= every row_pos (sizes the launch)
};

// Writes the rows' k/v (rows [R, KVH*HD] with row stride kv_stride) into the cache at (row_seq, row_pos) of
// `layer`. Called before paged_attention for the same rows.
void kv_cache_write(const PagedKv& kv, int layer, const bf16_bits* k, const bf16_bits* v, int kv_stride,
                    const PagedRows& rows, Stream s);

// out [R, NH*HD] bf16 for q [R, NH, HD] (row stride q_stride) over the cache's `layer`.
void paged_attention(bf16_bits* out, const bf16_bits* q, int q_stride, int NH, const PagedKv& kv, int layer,
                     const PagedRows& rows, Stream s);

}  // namespace moepilot::gpu
