// Expert-parallel dispatch and combine of bf16 token rows on GPUs over NCCL (one rank per GPU).
//
// dispatch(x, topk): route (count rows per destination expert), permute rows into the send buffer in
// (chunk, rank, expert, token, k) order, exchange the counts, all-to-all-v the rows (grouped
// ncclSend/ncclRecv), and group the received rows by local expert. grouped() then holds, for local
// expert le, its rows at expert_offset(le) ordered by (source rank, token, k).
// combine(expert_out, weights, out): the reverse: un-group, all-to-all back, and
// out[t] = sum_k weights[t,k] * row(t,k).
//
// Grouping: Kernel receives each rank's rows contiguously and groups them with a copy kernel
// (ep_copy_segments; un-groups likewise before the return trip). Direct posts one receive per
// (source rank, local expert) straight into the grouped layout, and the return trip sends from it,
// so no grouping copies run; the rows, their order and the results are the same.
//
// Peer (the default) moves the rows without NCCL: every rank maps every rank's grouped buffer and
// return buffer (CUDA IPC handles, exchanged over the communicator), dispatch stores each token's row
// straight into its experts' grouped buffers (positions from the all-gathered counts), and combine
// stores each expert output row straight into its source rank's return buffer; device-side flags say
// when every rank's stores have landed. No send buffer, no grouping copies; NCCL carries only the
// counts. It needs every GPU in one NVLink/PCIe peer domain, one process per rank, and <= kMaxPeers
// ranks: where mapping fails on any rank, the constructor falls back (on every rank) to Kernel, which
// grouping() then reports. Peer ignores `chunks` (there is no exchange to overlap).
//
// Chunks (a count given to dispatch) cut the tokens into contiguous ranges whose copies run on the
// compute stream while the previous range's exchange runs on the communication stream; with one
// chunk every step runs after the previous one. The grouped layout does not depend on the chunk
// count. The host waits once per dispatch, for the counts (the exchange sizes live on the host).
//
// Lifetime of grouped(): until the next dispatch. With Peer grouping, other ranks store the next
// dispatch's rows into it once this rank's compute stream has run that dispatch's count step, so
// whatever reads grouped() (the experts) must be queued on the compute stream before the next dispatch.
//
// Built only with NCCL. Not thread-safe; one dispatcher per communicator and pair of streams. The
// constructor is collective with Peer grouping (every rank must construct it).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cuda/ep_kernels.h"
#include "cuda/vendor.h"

namespace moepilot::gpu {

enum class Grouping { Kernel, Direct, Peer };

class EpDispatcher {
 public:
  // compute: stream of the caller's kernels (inputs must be ready on it; outputs are ready on it).
  // comm: stream for NCCL (may be the communicator's own).
  EpDispatcher(CclComm comm, int rank, int size, Stream compute, Stream comm_stream,
               Grouping grouping = Grouping::Peer);
  ~EpDispatcher();
  EpDispatcher(const EpDispatcher&) = delete;
  EpDispatcher& operator=(const EpDispatcher&) = delete;

  // x: [tokens, hidden] bf16; topk: [tokens, k] expert ids in [0, experts); experts % size == 0.
  void dispatch(const bf16_bits* x, const int32_t* topk, int64_t tokens, int k, int64_t hidden, int experts, int chunks);

  // The grouping in use (Peer may have fallen back to Kernel).
  Grouping grouping() const { return grouping_; }
  // Why Peer fell back (empty when it did not).
  const std::string& fallback_reason() const { return fallback_reason_; }

  bf16_bits* grouped() const { return grouped_; }
  int64_t received_rows() const { return recv_rows_; }
  // Rows per local expert and where each starts in grouped().
  const std::vector<int64_t>& expert_rows() const { return expert_rows_; }
  const std::vector<int64_t>& expert_offset() const { return expert_offset_; }
  // Rows this rank sends to / receives from each rank (all chunks).
  const std::vector<int64_t>& send_rows() const { return send_rows_; }
  const std::vector<int64_t>& recv_rows() const { return recv_rows_per_rank_; }

  // expert_out: [received_rows, hidden] in the grouped layout (may be grouped() itself);
  // weights: [tokens, k] float; out: [tokens, hidden] bf16.
  void combine(const bf16_bits* expert_out, const float* weights, bf16_bits* out);

  // Peer grouping: how long a device-side wait for the other ranks' rows lasts before it gives up
  // (a dead peer must not hang the GPU; default 60 s). check() then throws Error(Timeout) naming the
  // silent rank: call it after synchronizing the compute stream; dispatch calls it too.
  void set_peer_timeout(std::chrono::nanoseconds t) { peer_timeout_ = t; }
  void check();

  // Trace: when on, dispatch and combine record an event at each phase's end; trace() then gives
  // (phase, ms since the dispatch started) for the last dispatch + combine (it synchronizes).
  void set_trace(bool on) { trace_on_ = on; }
  std::vector<std::pair<std::string, float>> trace();

  // One unchunked grouped send/recv with the per-rank byte counts of the last dispatch (back: of its
  // return trip), on the comm stream: the raw all-to-all the benchmark compares with.
  void raw_exchange(bool back);

 private:
  void plan_host();
  void ensure(void** p, size_t* have, size_t bytes);
  void exchange_chunk(int c, bool back);
  void ccl_ok(CclResult r, const char* what);
  void mark(const char* phase, Stream s);
  // Peer grouping.
  void peer_setup();
  void peer_dispatch(const bf16_bits* x, const int32_t* topk);
  void peer_plan();
  void peer_map_buffers();
  void peer_combine(const bf16_bits* expert_out, const float* weights, bf16_bits* out);
  void peer_release();
  int64_t all_count(int s, int e) const { return h_all_counts_[(size_t)s * (experts_ + 1) + e]; }

  int64_t sent(int d, int c, int le) const { return h_counts_[((size_t)d * chunks_ + c) * epr_ + le]; }
  int64_t got(int s, int c, int le) const { return h_recv_counts_[((size_t)s * chunks_ + c) * epr_ + le]; }

  CclComm comm_;
  int rank_, size_;
  Stream compute_, comm_stream_;
  Grouping grouping_;
  const bf16_bits* expert_out_ = nullptr;  // combine's input, for the Direct return trip

  // Shape of the last dispatch.
  int64_t tokens_ = 0, hidden_ = 0;
  int k_ = 0, experts_ = 0, epr_ = 0, chunks_ = 0;
  int64_t chunk_tokens_ = 0;

  // Host plan.
  std::vector<int64_t> send_off_, send_cnt_;  // [c][d] rows
  std::vector<int64_t> recv_off_, recv_cnt_;  // [c][s] rows
  std::vector<int64_t> send_rows_, recv_rows_per_rank_;
  std::vector<int64_t> expert_rows_, expert_offset_;
  std::vector<int64_t> seg_total_;  // rows per chunk in the receive layout
  // Segments (c, s, le) in receive order: start in the receive layout, in the grouped layout, and
  // the exclusive prefix of rows within the chunk (nseg + 1 per chunk).
  std::vector<int64_t> seg_src_, seg_dst_, seg_first_;
  std::vector<int64_t> send_seg_off_;  // [c][d][le]: start of (c, d, le) in the send layout
  int64_t recv_rows_ = 0;

  // Pinned host mirrors.
  int32_t* h_counts_ = nullptr;       // [d][c][le] sent
  int32_t* h_recv_counts_ = nullptr;  // [s][c][le] received
  int32_t* h_bad_ = nullptr;  // per rank: whether its ids were bad
  int64_t* h_upload_ = nullptr;  // seg_src, seg_dst [c][s*epr], seg_first [c][s*epr + 1] (Kernel grouping)
  size_t h_counts_cap_ = 0, h_upload_cap_ = 0;

  // Device buffers (grow only).
  void* d_counts_ = nullptr;
  void* d_recv_counts_ = nullptr;
  void* d_bad_ = nullptr;
  void* d_upload_ = nullptr;
  void* d_adj_ = nullptr;
  void* d_scratch_ = nullptr;
  void* d_pos_of_flat_ = nullptr;
  void* d_flat_of_pos_ = nullptr;
  void* d_send_ = nullptr;
  void* d_recv_ = nullptr;
  void* d_grouped_ = nullptr;
  void* d_retsend_ = nullptr;
  void* d_retrecv_ = nullptr;
  size_t c_adj_ = 0, c_scratch_ = 0, c_counts_ = 0, c_recv_counts_ = 0, c_bad_ = 0, c_upload_ = 0, c_pof_ = 0, c_fop_ = 0, c_send_ = 0,
         c_recv_ = 0, c_grouped_ = 0, c_retsend_ = 0, c_retrecv_ = 0;
  bf16_bits* grouped_ = nullptr;

  // Peer grouping. Each rank's flags: [phase 0 dispatch, 1 combine][source rank] uint64 epochs.
  std::string fallback_reason_;
  int device_ = -1;
  void* d_flags_ = nullptr;                 // this rank's flags (exported)
  void* d_arrived_ = nullptr;               // block counters of the two push kernels
  void* d_peer_grouped_ = nullptr;          // this rank's grouped buffer (exported)
  void* d_peer_ret_ = nullptr;              // this rank's return buffer (exported)
  std::vector<void*> retired_;              // buffers replaced at the last re-mapping, freed at the next dispatch
  std::vector<size_t> cap_grouped_, cap_ret_;  // every rank's buffer bytes (the same on every rank)
  std::vector<void*> map_flags_, map_grouped_, map_ret_;  // every rank's buffers mapped here (own: itself)
  uint64_t epoch_[2] = {0, 0};
  int32_t* h_all_counts_ = nullptr;         // pinned: [rank][experts + 1] (counts, then the bad flag)
  int32_t* h_timed_out_ = nullptr;          // pinned, written by the wait kernel
  std::chrono::nanoseconds peer_timeout_{std::chrono::seconds(60)};
  void* h_handles_ = nullptr;               // pinned: handles being exchanged
  void* d_handles_ = nullptr;
  void* d_all_counts_ = nullptr;
  int64_t* h_peer_upload_ = nullptr;        // pinned: delta [experts], first [nseg+1], dst rank [nseg], dst row [nseg]
  void* d_peer_upload_ = nullptr;
  size_t c_all_counts_ = 0, c_peer_upload_ = 0, h_all_cap_ = 0, h_peer_upload_cap_ = 0;

  std::vector<Event> ev_a_, ev_b_;
  Event ev_counts_ = nullptr;
  bool trace_on_ = false;
  Event trace_start_ = nullptr;
  std::vector<std::pair<std::string, Event>> trace_;
  std::vector<Event> trace_pool_;
};

}  // namespace moepilot::gpu
