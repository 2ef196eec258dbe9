// Device kernels of the expert-parallel dispatch and combine (token rows in bf16), and the small
// kernels the NCCL collectives need. Host-callable launchers; every pointer is device memory; every
// launch goes on the given stream and is checked.
//
// Layout words used here: a "flat" index is t*K + k (token t, its k-th routed expert); a "position"
// is a row of the send buffer. The send buffer is ordered by (chunk, destination rank, expert, token,
// k): chunks are contiguous token ranges (so that the exchange of one chunk can overlap the copies
// of the next); with one chunk this is exactly the order (rank, expert, token, k). Experts live on
// ranks in contiguous blocks: expert e on rank e / experts_per_rank.
#pragma once
#include <cstdint>

#include "cuda/vendor.h"
#include "moepilot/comm.h"

namespace moepilot::gpu {

// Raw bf16 bits; the kernels move rows and convert for the weighted sum only.
using bf16_bits = uint16_t;

// Runs a fill-and-check kernel on the current device and throws Error(Internal) if the device
// cannot run it or the values come back wrong. Also creates the context, so a later NCCL init does
// not pay for it (ranks then enter init together).
void self_test(int device);

// out[i] = sum over b = 0..blocks-1 of in[b*n + i], added in b order (deterministic). F32, F64, I32.
void sum_blocks(const void* in, void* out, int64_t n, int blocks, DType t, Stream s);

// counts[(d*chunks + c)*experts_per_rank + le] = number of (t, k) in chunk c routed to expert
// d*experts_per_rank + le. Zeroes counts first. Ids outside [0, experts) set *bad to 1.
// experts * chunks <= 12288 (here and in ep_adj).
void ep_count(const int32_t* topk, int64_t tokens, int k, int experts, int experts_per_rank, int64_t chunk_tokens,
              int chunks, int32_t* counts, int32_t* bad, Stream s);

// adj[c*experts + e] for ep_positions from the local counts (ep_count's layout): the start of the
// rows of (chunk c, expert e) in the send buffer minus e's rows in chunks before c.
void ep_adj(const int32_t* counts, int experts, int experts_per_rank, int chunks, int64_t* adj, Stream s);

// pos_of_flat[f] and flat_of_pos[p] for the send order: the entry f = t*K + k of chunk c and expert e
// goes to adj[c*experts + e] + (number of entries f' < f with the same expert, over all chunks).
// scratch: ep_positions_scratch(...) bytes. experts <= 1024.
size_t ep_positions_scratch(int64_t tokens, int k, int experts);
void ep_positions(const int32_t* topk, int64_t tokens, int k, int experts, int64_t chunk_tokens, const int64_t* adj,
                  int32_t* scratch, int32_t* pos_of_flat, int32_t* flat_of_pos, Stream s);

// send[p] = x[flat_of_pos[p] / k] for p in [p_begin, p_end): rows of `hidden` bf16 (entries = tokens*k).
void ep_gather(const bf16_bits* x, int64_t hidden, const int32_t* flat_of_pos, int k, int64_t entries, int64_t p_begin,
               int64_t p_end, bf16_bits* send, Stream s);

// Copies rows between two layouts: segment i moves rows[i] rows from src_row[i] to dst_row[i].
// `first` is the exclusive prefix sum of rows (first[nseg] = total rows).
struct RowSegments {
  const int64_t* src_row;
  const int64_t* dst_row;
  const int64_t* first;  // nseg + 1 entries
  int nseg;
  int64_t total;
};
void ep_copy_segments(const bf16_bits* src, bf16_bits* dst, int64_t hidden, const RowSegments& segs, Stream s);

// out[t] = sum_k weights[t*K + k] * ret[pos_of_flat[t*K + k]] for t in [t_begin, t_end), summed in
// float in k order, stored as bf16 (round to nearest even). 1 <= k <= 8.
void ep_combine(const bf16_bits* ret, const int32_t* pos_of_flat, const float* weights, int k, int64_t hidden,
                int64_t t_begin, int64_t t_end, bf16_bits* out, Stream s);

// ---- Peer transport: rows written straight into other GPUs' buffers (CUDA IPC over NVLink) ----
//
// Every rank maps every rank's receive buffers (its own included) into its address space. A push
// kernel stores rows into them, then signals: its last block to finish writes `epoch` into the flag
// word (this rank's slot) of every rank, after a system-scope fence that orders all the kernel's
// stores before it. ep_wait_peers, queued on the receiver's stream, waits until every rank's slot
// holds `epoch`; kernels queued after it see the rows. Epochs grow by one per push on every rank.

constexpr int kMaxPeers = 8;  // one NVLink domain of a node

struct PeerRows {
  bf16_bits* base[kMaxPeers];  // rank r's buffer, mapped here
};

struct PeerSignal {
  uint64_t* flag[kMaxPeers];  // rank r's flag word for (this phase, this rank), mapped here
  int ranks;
  uint64_t epoch;
  unsigned* arrived;  // this rank's block counter for the phase (device memory, 0 between launches)
};

// Dispatch: for each token t and q < k, with e = topk[t*k + q]: stores x[t] as row
// pos_of_flat[t*k + q] + delta[e] of rank e / experts_per_rank's buffer. One warp per token reads
// its row once and stores it k times. Then signals (always launched, so that peers never wait on a
// rank with no tokens).
void ep_push_dispatch(const bf16_bits* x, const int32_t* topk, const int32_t* pos_of_flat, const int64_t* delta,
                      int64_t tokens, int k, int64_t hidden, int experts_per_rank, const PeerRows& dst,
                      const PeerSignal& sig, Stream s);

// Segments of src (first: nseg + 1 exclusive prefix of rows): row first[i] + j goes to row
// dst_row[i] + j of rank dst_rank[i]'s buffer. Then signals.
void ep_push_segments(const bf16_bits* src, int64_t hidden, const int64_t* first, const int64_t* dst_rank,
                      const int64_t* dst_row, int nseg, int64_t total, const PeerRows& dst, const PeerSignal& sig,
                      Stream s);

// Waits on the device until flags[r] >= epoch for r < ranks (flags: this rank's words of the phase).
// Past timeout_ns it gives up and stores 1 + the first silent rank into *timed_out (host-visible pinned
// memory), which the host checks at its next step; the wait never blocks the GPU forever.
void ep_wait_peers(const uint64_t* flags, int ranks, uint64_t epoch, int64_t timeout_ns, int32_t* timed_out, Stream s);

}  // namespace moepilot::gpu
