// EpDispatcher (ep_dispatch.h).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>

#include "cuda/ep_dispatch.h"

namespace moepilot::gpu {
namespace {

// Peer buffers grow with headroom (routing varies between calls); every rank applies this rule to every
// rank's needs, so all agree, without a message, on when the buffers are re-mapped.
size_t grown(size_t need) { return std::max<size_t>(need + need / 8, 1 << 20); }

}  // namespace

// A non-blocking communicator may answer ncclInProgress while it sets a call up: wait for that (the
// work itself stays asynchronous on the stream).
void EpDispatcher::ccl_ok(ncclResult_t r, const char* what) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (r == ncclInProgress) {
    if (std::chrono::steady_clock::now() > deadline)
      throw Error(ErrorCode::Timeout, std::string(what) + " on rank " + std::to_string(rank_) + ": still in progress after 120 s");
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    r = state;
  }
  if (r != ncclSuccess) throw Error(ErrorCode::Comm, std::string(what) + " on rank " + std::to_string(rank_) + ": " + ncclGetErrorString(r));
}

EpDispatcher::EpDispatcher(CclComm comm, int rank, int size, Stream compute, Stream comm_stream, Grouping grouping)
    : comm_(comm), rank_(rank), size_(size), compute_(compute), comm_stream_(comm_stream), grouping_(grouping) {
  MP_GPU_CHECK(event_create(&ev_counts_));
  if (grouping_ == Grouping::Peer) peer_setup();
}

EpDispatcher::~EpDispatcher() {
  peer_release();
  for (void* p : {d_adj_, d_scratch_, d_counts_, d_recv_counts_, d_bad_, d_upload_, d_pos_of_flat_, d_flat_of_pos_, d_send_, d_recv_,
                  d_grouped_, d_retsend_, d_retrecv_})
    if (p) free_device(p);
  for (void* p : {(void*)h_counts_, (void*)h_upload_})
    if (p) free_host(p);
  for (Event e : ev_a_) event_destroy(e);
  for (Event e : trace_pool_) event_destroy(e);
  if (trace_start_) event_destroy(trace_start_);
  for (Event e : ev_b_) event_destroy(e);
  if (ev_counts_) event_destroy(ev_counts_);
}

void EpDispatcher::mark(const char* phase, Stream s) {
  if (!trace_on_) return;
  if (trace_.size() == trace_pool_.size()) {
    Event e;
    MP_GPU_CHECK(event_create(&e));
    trace_pool_.push_back(e);
  }
  Event e = trace_pool_[trace_.size()];
  MP_GPU_CHECK(event_record(e, s));
  trace_.emplace_back(phase, e);
}

std::vector<std::pair<std::string, float>> EpDispatcher::trace() {
  std::vector<std::pair<std::string, float>> out;
  if (!trace_start_) return out;
  for (auto& [phase, e] : trace_) {
    MP_GPU_CHECK(event_sync(e));
    float ms = 0;
    MP_GPU_CHECK(event_elapsed_ms(&ms, trace_start_, e));
    out.emplace_back(phase, ms);
  }
  return out;
}

void EpDispatcher::ensure(void** p, size_t* have, size_t bytes) {
  if (bytes <= *have && *p) return;
  if (*p) MP_GPU_CHECK(free_device(*p));
  *p = nullptr;
  size_t want = std::max<size_t>(bytes + bytes / 8, 256);  // headroom: routing varies between calls
  MP_GPU_CHECK(malloc_device(p, want));
  *have = want;
}

void EpDispatcher::dispatch(const bf16_bits* x, const int32_t* topk, int64_t tokens, int k, int64_t hidden,
                            int experts, int chunks) {
  MP_CHECK_ARG(tokens >= 0 && k > 0 && hidden > 0, "dispatch: tokens >= 0, k > 0 and hidden > 0 expected");
  MP_CHECK_ARG(experts > 0 && experts % size_ == 0,
               "dispatch: experts (" + std::to_string(experts) + ") must be a positive multiple of the world size (" +
                   std::to_string(size_) + ")");
  MP_CHECK_ARG(chunks >= 1, "dispatch: chunks must be >= 1");
  tokens_ = tokens;
  k_ = k;
  hidden_ = hidden;
  experts_ = experts;
  epr_ = experts / size_;
  chunk_tokens_ = std::max<int64_t>(1, (tokens + chunks - 1) / chunks);
  chunks_ = (int)std::max<int64_t>(1, (tokens + chunk_tokens_ - 1) / chunk_tokens_);
  while ((int)ev_a_.size() < chunks_) {
    Event a, b;
    MP_GPU_CHECK(event_create(&a));
    MP_GPU_CHECK(event_create(&b));
    ev_a_.push_back(a);
    ev_b_.push_back(b);
  }
  if (grouping_ == Grouping::Peer) {
    chunks_ = 1;
    chunk_tokens_ = std::max<int64_t>(1, tokens);
    peer_dispatch(x, topk);
    return;
  }
  const size_t ncount = (size_t)experts_ * chunks_;
  const size_t row_bytes = (size_t)hidden * sizeof(bf16_bits);
  const int64_t entries = tokens * k;

  // Buffers whose size the routing does not change.
  ensure(&d_counts_, &c_counts_, ncount * sizeof(int32_t));
  ensure(&d_recv_counts_, &c_recv_counts_, ncount * sizeof(int32_t));
  ensure(&d_bad_, &c_bad_, (1 + size_) * sizeof(int32_t));  // this rank's flag, then every rank's
  ensure(&d_adj_, &c_adj_, ncount * sizeof(int64_t));
  ensure(&d_scratch_, &c_scratch_, ep_positions_scratch(tokens, k, experts));
  ensure(&d_pos_of_flat_, &c_pof_, (size_t)entries * sizeof(int32_t));
  ensure(&d_flat_of_pos_, &c_fop_, (size_t)entries * sizeof(int32_t));
  ensure(&d_send_, &c_send_, (size_t)entries * row_bytes);
  ensure(&d_retrecv_, &c_retrecv_, (size_t)entries * row_bytes);
  if (h_counts_cap_ < ncount) {
    if (h_counts_) MP_GPU_CHECK(free_host(h_counts_));
    MP_GPU_CHECK(malloc_host(reinterpret_cast<void**>(&h_counts_), (2 * ncount + size_) * sizeof(int32_t)));
    h_counts_cap_ = ncount;
  }
  h_recv_counts_ = h_counts_ + ncount;
  h_bad_ = h_counts_ + 2 * ncount;

  if (trace_on_) {
    if (!trace_start_) MP_GPU_CHECK(event_create(&trace_start_));
    MP_GPU_CHECK(event_record(trace_start_, compute_));
    trace_.clear();
  }
  // Routing counts; their exchange (and the host's one wait) on the comm stream ...
  ep_count(topk, tokens, k, experts, epr_, chunk_tokens_, chunks_, static_cast<int32_t*>(d_counts_),
           static_cast<int32_t*>(d_bad_), compute_);
  MP_GPU_CHECK(event_record(ev_counts_, compute_));
  mark("count", compute_);
  MP_GPU_CHECK(stream_wait(comm_stream_, ev_counts_));
  const size_t block = (size_t)chunks_ * epr_;  // counts per peer
  ccl_ok(ncclGroupStart(), "ncclGroupStart");
  for (int r = 0; r < size_; r++) {
    ccl_ok(ncclSend(static_cast<int32_t*>(d_counts_) + r * block, block, ncclInt32, r, comm_, comm_stream_), "ncclSend");
    ccl_ok(ncclRecv(static_cast<int32_t*>(d_recv_counts_) + r * block, block, ncclInt32, r, comm_, comm_stream_),
           "ncclRecv");
    // Bad ids anywhere stop every rank before the rows move (a rank that stopped alone would leave
    // its peers waiting for its rows).
    ccl_ok(ncclSend(d_bad_, 1, ncclInt32, r, comm_, comm_stream_), "ncclSend");
    ccl_ok(ncclRecv(static_cast<int32_t*>(d_bad_) + 1 + r, 1, ncclInt32, r, comm_, comm_stream_), "ncclRecv");
  }
  ccl_ok(ncclGroupEnd(), "ncclGroupEnd");
  MP_GPU_CHECK(memcpy_async(h_counts_, d_counts_, ncount * sizeof(int32_t), comm_stream_));
  MP_GPU_CHECK(memcpy_async(h_recv_counts_, d_recv_counts_, ncount * sizeof(int32_t), comm_stream_));
  MP_GPU_CHECK(memcpy_async(h_bad_, static_cast<int32_t*>(d_bad_) + 1, size_ * sizeof(int32_t), comm_stream_));
  mark("count exchange + copy to host", comm_stream_);

  // ... while the permute runs on the compute stream: the send layout needs the local counts only,
  // and chunk c fills positions [first token of c * k, end of c * k).
  ep_adj(static_cast<const int32_t*>(d_counts_), experts, epr_, chunks_, static_cast<int64_t*>(d_adj_), compute_);
  ep_positions(topk, tokens, k, experts, chunk_tokens_, static_cast<const int64_t*>(d_adj_),
               static_cast<int32_t*>(d_scratch_), static_cast<int32_t*>(d_pos_of_flat_),
               static_cast<int32_t*>(d_flat_of_pos_), compute_);
  mark("positions", compute_);
  for (int c = 0; c < chunks_; c++) {
    int64_t t0 = (int64_t)c * chunk_tokens_, t1 = std::min(tokens, t0 + chunk_tokens_);
    ep_gather(x, hidden, static_cast<const int32_t*>(d_flat_of_pos_), k, entries, t0 * k, t1 * k,
              static_cast<bf16_bits*>(d_send_), compute_);
    MP_GPU_CHECK(event_record(ev_a_[c], compute_));
  }
  mark("permute (gather)", compute_);

  MP_GPU_CHECK(stream_sync(comm_stream_));
  std::string bad_ranks;
  for (int r = 0; r < size_; r++)
    if (h_bad_[r]) bad_ranks += (bad_ranks.empty() ? "" : ", ") + std::to_string(r);
  MP_CHECK_ARG(bad_ranks.empty(), "dispatch: an expert id is outside [0, " + std::to_string(experts) + ") on rank " + bad_ranks);
  plan_host();
  ensure(&d_recv_, &c_recv_, (size_t)recv_rows_ * row_bytes);
  ensure(&d_grouped_, &c_grouped_, (size_t)recv_rows_ * row_bytes);
  ensure(&d_retsend_, &c_retsend_, (size_t)recv_rows_ * row_bytes);
  grouped_ = static_cast<bf16_bits*>(d_grouped_);
  const int nseg = size_ * epr_;
  if (grouping_ == Grouping::Kernel) {
    const size_t upload = seg_src_.size() + seg_dst_.size() + seg_first_.size();
    if (h_upload_cap_ < upload) {
      if (h_upload_) MP_GPU_CHECK(free_host(h_upload_));
      MP_GPU_CHECK(malloc_host(reinterpret_cast<void**>(&h_upload_), upload * sizeof(int64_t)));
      h_upload_cap_ = upload;
    }
    std::copy(seg_src_.begin(), seg_src_.end(), h_upload_);
    std::copy(seg_dst_.begin(), seg_dst_.end(), h_upload_ + seg_src_.size());
    std::copy(seg_first_.begin(), seg_first_.end(), h_upload_ + seg_src_.size() + seg_dst_.size());
    ensure(&d_upload_, &c_upload_, upload * sizeof(int64_t));
    MP_GPU_CHECK(memcpy_async(d_upload_, h_upload_, upload * sizeof(int64_t), compute_));
  }

  // Chunk c's exchange starts as soon as its rows are in place.
  for (int c = 0; c < chunks_; c++) {
    MP_GPU_CHECK(stream_wait(comm_stream_, ev_a_[c]));
    if (c == 0) mark("first exchange issued (host wait done)", comm_stream_);
    exchange_chunk(c, false);
    MP_GPU_CHECK(event_record(ev_b_[c], comm_stream_));
  }
  mark("all-to-all", comm_stream_);
  const int64_t* seg_src = static_cast<const int64_t*>(d_upload_);
  const int64_t* seg_dst = seg_src + (size_t)chunks_ * nseg;
  const int64_t* seg_first = seg_dst + (size_t)chunks_ * nseg;
  for (int c = 0; c < chunks_; c++) {
    MP_GPU_CHECK(stream_wait(compute_, ev_b_[c]));
    if (grouping_ == Grouping::Kernel) {
      RowSegments g{seg_src + (size_t)c * nseg, seg_dst + (size_t)c * nseg, seg_first + (size_t)c * (nseg + 1), nseg,
                    seg_total_[c]};
      ep_copy_segments(static_cast<const bf16_bits*>(d_recv_), grouped_, hidden, g, compute_);
    }
  }
  mark("grouped", compute_);
}

// Offsets of every layout from the exchanged counts; fills the pinned upload buffer.
void EpDispatcher::plan_host() {
  const int C = chunks_, S = size_, L = epr_;
  send_off_.assign((size_t)C * S, 0);
  send_cnt_.assign((size_t)C * S, 0);
  recv_off_.assign((size_t)C * S, 0);
  recv_cnt_.assign((size_t)C * S, 0);
  send_rows_.assign(S, 0);
  recv_rows_per_rank_.assign(S, 0);
  expert_rows_.assign(L, 0);
  expert_offset_.assign(L, 0);
  seg_total_.assign(C, 0);
  int64_t so = 0, ro = 0;
  for (int c = 0; c < C; c++) {
    for (int r = 0; r < S; r++) {
      int64_t sc = 0, rc = 0;
      for (int le = 0; le < L; le++) {
        sc += sent(r, c, le);
        rc += got(r, c, le);
        expert_rows_[le] += got(r, c, le);
      }
      send_off_[(size_t)c * S + r] = so;
      send_cnt_[(size_t)c * S + r] = sc;
      recv_off_[(size_t)c * S + r] = ro;
      recv_cnt_[(size_t)c * S + r] = rc;
      send_rows_[r] += sc;
      recv_rows_per_rank_[r] += rc;
      so += sc;
      ro += rc;
      seg_total_[c] += rc;
    }
  }
  recv_rows_ = ro;
  for (int le = 1; le < L; le++) expert_offset_[le] = expert_offset_[le - 1] + expert_rows_[le - 1];

  const int nseg = S * L;
  send_seg_off_.assign((size_t)C * nseg, 0);
  for (int c = 0; c < C; c++)
    for (int d = 0; d < S; d++) {
      int64_t off = send_off_[(size_t)c * S + d];
      for (int le = 0; le < L; le++) {
        send_seg_off_[((size_t)c * S + d) * L + le] = off;
        off += sent(d, c, le);
      }
    }
  // Receive layout [c][s][le] -> grouped layout [le][s][c].
  seg_src_.assign((size_t)C * nseg, 0);
  seg_dst_.assign((size_t)C * nseg, 0);
  seg_first_.assign((size_t)C * (nseg + 1), 0);
  std::vector<int64_t> from_s((size_t)L * S, 0);  // rows of (le, s) over all chunks
  for (int s = 0; s < S; s++)
    for (int c = 0; c < C; c++)
      for (int le = 0; le < L; le++) from_s[(size_t)le * S + s] += got(s, c, le);
  for (int c = 0; c < C; c++) {
    int64_t first = 0;
    for (int s = 0; s < S; s++) {
      int64_t src = recv_off_[(size_t)c * S + s];
      for (int le = 0; le < L; le++) {
        int64_t dst = expert_offset_[le];
        for (int q = 0; q < s; q++) dst += from_s[(size_t)le * S + q];
        for (int q = 0; q < c; q++) dst += got(s, q, le);
        size_t i = (size_t)c * nseg + (size_t)s * L + le;
        seg_src_[i] = src;
        seg_dst_[i] = dst;
        seg_first_[(size_t)c * (nseg + 1) + (size_t)s * L + le] = first;
        src += got(s, c, le);
        first += got(s, c, le);
      }
    }
    seg_first_[(size_t)c * (nseg + 1) + nseg] = first;
  }
}

// Chunk c of the forward trip (send -> recv, or -> grouped with Direct grouping) or of the return
// trip (retsend or the expert output -> retrecv). With Direct grouping each (rank, local expert)
// segment is its own send/receive; both sides post them in expert order and skip empty ones, so
// the pairs match.
void EpDispatcher::exchange_chunk(int c, bool back) {
  const size_t rb = (size_t)hidden_ * sizeof(bf16_bits);
  const int S = size_, L = epr_, nseg = S * L;
  ccl_ok(ncclGroupStart(), "ncclGroupStart");
  for (int r = 0; r < S; r++) {
    const size_t i = (size_t)c * S + r;
    if (grouping_ == Grouping::Direct) {
      const char* sbuf = reinterpret_cast<const char*>(back ? expert_out_ : static_cast<const bf16_bits*>(d_send_));
      char* rbuf = static_cast<char*>(back ? d_retrecv_ : d_grouped_);
      for (int le = 0; le < L; le++) {
        const size_t seg = (size_t)c * nseg + (size_t)r * L + le;
        const size_t mine = ((size_t)c * S + r) * L + le;
        int64_t n_send = back ? got(r, c, le) : sent(r, c, le);
        int64_t at = back ? seg_dst_[seg] : send_seg_off_[mine];
        if (n_send > 0) ccl_ok(ncclSend(sbuf + at * rb, n_send * rb, ncclUint8, r, comm_, comm_stream_), "ncclSend");
      }
      for (int le = 0; le < L; le++) {
        const size_t seg = (size_t)c * nseg + (size_t)r * L + le;
        const size_t mine = ((size_t)c * S + r) * L + le;
        int64_t n_recv = back ? sent(r, c, le) : got(r, c, le);
        int64_t at = back ? send_seg_off_[mine] : seg_dst_[seg];
        if (n_recv > 0) ccl_ok(ncclRecv(rbuf + at * rb, n_recv * rb, ncclUint8, r, comm_, comm_stream_), "ncclRecv");
      }
      continue;
    }
    const char* sbuf = static_cast<const char*>(back ? d_retsend_ : d_send_);
    char* rbuf = static_cast<char*>(back ? d_retrecv_ : d_recv_);
    const int64_t so = back ? recv_off_[i] : send_off_[i], sc = back ? recv_cnt_[i] : send_cnt_[i];
    const int64_t ro = back ? send_off_[i] : recv_off_[i], rc = back ? send_cnt_[i] : recv_cnt_[i];
    if (sc > 0) ccl_ok(ncclSend(sbuf + so * rb, sc * rb, ncclUint8, r, comm_, comm_stream_), "ncclSend");
    if (rc > 0) ccl_ok(ncclRecv(rbuf + ro * rb, rc * rb, ncclUint8, r, comm_, comm_stream_), "ncclRecv");
  }
  ccl_ok(ncclGroupEnd(), "ncclGroupEnd");
}

void EpDispatcher::combine(const bf16_bits* expert_out, const float* weights, bf16_bits* out) {
  MP_CHECK_ARG(chunks_ > 0, "combine: no dispatch yet");
  if (grouping_ == Grouping::Peer) {
    peer_combine(expert_out, weights, out);
    return;
  }
  const int nseg = size_ * epr_;
  expert_out_ = expert_out;
  if (grouping_ == Grouping::Kernel) {
    const int64_t* seg_src = static_cast<const int64_t*>(d_upload_);
    const int64_t* seg_dst = seg_src + (size_t)chunks_ * nseg;
    const int64_t* seg_first = seg_dst + (size_t)chunks_ * nseg;
    for (int c = 0; c < chunks_; c++) {
      // The grouping's segments read backwards: grouped -> receive layout.
      RowSegments g{seg_dst + (size_t)c * nseg, seg_src + (size_t)c * nseg, seg_first + (size_t)c * (nseg + 1), nseg,
                    seg_total_[c]};
      ep_copy_segments(expert_out, static_cast<bf16_bits*>(d_retsend_), hidden_, g, compute_);
      MP_GPU_CHECK(event_record(ev_a_[c], compute_));
    }
  } else {
    MP_GPU_CHECK(event_record(ev_a_[0], compute_));  // expert_out is ready
  }
  mark("un-grouped", compute_);
  for (int c = 0; c < chunks_; c++) {
    MP_GPU_CHECK(stream_wait(comm_stream_, ev_a_[grouping_ == Grouping::Kernel ? c : 0]));
    exchange_chunk(c, true);
    MP_GPU_CHECK(event_record(ev_b_[c], comm_stream_));
  }
  mark("all-to-all back", comm_stream_);
  for (int c = 0; c < chunks_; c++) {
    MP_GPU_CHECK(stream_wait(compute_, ev_b_[c]));
    int64_t t0 = (int64_t)c * chunk_tokens_, t1 = std::min(tokens_, t0 + chunk_tokens_);
    ep_combine(static_cast<const bf16_bits*>(d_retrecv_), static_cast<const int32_t*>(d_pos_of_flat_), weights, k_,
               hidden_, t0, t1, out, compute_);
  }
  mark("combined", compute_);
}

void EpDispatcher::raw_exchange(bool back) {
  const size_t row_bytes = (size_t)hidden_ * sizeof(bf16_bits);
  if (grouping_ == Grouping::Peer) {  // the NCCL buffers exist only for the comparison
    ensure(&d_send_, &c_send_, (size_t)tokens_ * k_ * row_bytes);
    ensure(&d_retrecv_, &c_retrecv_, (size_t)tokens_ * k_ * row_bytes);
    ensure(&d_recv_, &c_recv_, (size_t)recv_rows_ * row_bytes);
    ensure(&d_retsend_, &c_retsend_, (size_t)recv_rows_ * row_bytes);
  }
  const char* sbuf = static_cast<const char*>(back ? d_retsend_ : d_send_);
  char* rbuf = static_cast<char*>(back ? d_retrecv_ : d_recv_);
  const std::vector<int64_t>& sc = back ? recv_rows_per_rank_ : send_rows_;
  const std::vector<int64_t>& rc = back ? send_rows_ : recv_rows_per_rank_;
  ccl_ok(ncclGroupStart(), "ncclGroupStart");
  int64_t so = 0, ro = 0;
  for (int r = 0; r < size_; r++) {
    if (sc[r] > 0) ccl_ok(ncclSend(sbuf + so * row_bytes, sc[r] * row_bytes, ncclUint8, r, comm_, comm_stream_), "ncclSend");
    if (rc[r] > 0) ccl_ok(ncclRecv(rbuf + ro * row_bytes, rc[r] * row_bytes, ncclUint8, r, comm_, comm_stream_), "ncclRecv");
    so += sc[r];
    ro += rc[r];
  }
  ccl_ok(ncclGroupEnd(), "ncclGroupEnd");
}

// ---- Peer grouping ----

void EpDispatcher::check() {
  if (!h_timed_out_ || *h_timed_out_ == 0) return;
  const int r = *h_timed_out_ - 1;
  *h_timed_out_ = 0;
  throw Error(ErrorCode::Timeout, "expert-parallel exchange on rank " + std::to_string(rank_) + ": rank " +
                                      std::to_string(r) + " did not deliver its rows of a dispatch or combine within " +
                                      std::to_string(peer_timeout_.count() / 1'000'000) + " ms; the outputs are invalid");
}

// Collective: allocates this rank's flags, exchanges their IPC handles over the communicator and maps
// every peer's; then agrees (a min all-reduce) on whether every rank could. On any failure every rank
// falls back to Kernel grouping, so the ranks never disagree on the transport.
void EpDispatcher::peer_setup() {
  const int S = size_;
  if (S > kMaxPeers) {
    grouping_ = Grouping::Kernel;
    fallback_reason_ = std::to_string(S) + " ranks: peer grouping maps at most " + std::to_string(kMaxPeers);
    return;
  }
  MP_GPU_CHECK(get_device(&device_));
  cap_grouped_.assign(S, 0);
  cap_ret_.assign(S, 0);
  map_flags_.assign(S, nullptr);
  map_grouped_.assign(S, nullptr);
  map_ret_.assign(S, nullptr);
  const size_t hb = sizeof(IpcHandle);
  MP_GPU_CHECK(malloc_device(&d_flags_, (size_t)2 * S * sizeof(uint64_t)));
  MP_GPU_CHECK(malloc_device(&d_arrived_, 2 * sizeof(unsigned)));
  MP_GPU_CHECK(malloc_device(&d_handles_, (size_t)2 * S * hb + sizeof(int32_t)));
  MP_GPU_CHECK(malloc_host(&h_handles_, (size_t)2 * S * hb + sizeof(int32_t)));
  MP_GPU_CHECK(malloc_host(reinterpret_cast<void**>(&h_timed_out_), sizeof(int32_t)));
  *h_timed_out_ = 0;
  MP_GPU_CHECK(memset_async(d_flags_, 0, (size_t)2 * S * sizeof(uint64_t), compute_));
  MP_GPU_CHECK(memset_async(d_arrived_, 0, 2 * sizeof(unsigned), compute_));
  MP_GPU_CHECK(stream_sync(compute_));  // zeroed before any peer can signal into them

  std::string why;
  IpcHandle mine{};
  Status st = ipc_get_handle(&mine, d_flags_);
  if (st != kSuccess) why = std::string("cudaIpcGetMemHandle: ") + status_string(st);
  char* h = static_cast<char*>(h_handles_);
  std::memcpy(h + (size_t)rank_ * hb, &mine, hb);
  char* d = static_cast<char*>(d_handles_);
  MP_GPU_CHECK(memcpy_async(d + (size_t)rank_ * hb, h + (size_t)rank_ * hb, hb, comm_stream_));
  ccl_ok(ncclAllGather(d + (size_t)rank_ * hb, d, hb, ncclUint8, comm_, comm_stream_), "ncclAllGather (flag handles)");
  MP_GPU_CHECK(memcpy_async(h, d, (size_t)S * hb, comm_stream_));
  MP_GPU_CHECK(stream_sync(comm_stream_));
  for (int r = 0; r < S && why.empty(); r++) {
    if (r == rank_) {
      map_flags_[r] = d_flags_;
      continue;
    }
    IpcHandle theirs;
    std::memcpy(&theirs, h + (size_t)r * hb, hb);
    st = ipc_open(&map_flags_[r], theirs);
    if (st != kSuccess) {
      map_flags_[r] = nullptr;
      last_error();  // not sticky: clear it so later checks do not report it
      why = "cannot map rank " + std::to_string(r) + "'s memory: " + status_string(st);
    }
  }
  int32_t* ok_h = reinterpret_cast<int32_t*>(h + (size_t)2 * S * hb);
  int32_t* ok_d = reinterpret_cast<int32_t*>(d + (size_t)2 * S * hb);
  *ok_h = why.empty() ? 1 : 0;
  MP_GPU_CHECK(memcpy_async(ok_d, ok_h, sizeof(int32_t), comm_stream_));
  ccl_ok(ncclAllReduce(ok_d, ok_d, 1, ncclInt32, ncclMin, comm_, comm_stream_), "ncclAllReduce (peer mapping)");
  MP_GPU_CHECK(memcpy_async(ok_h, ok_d, sizeof(int32_t), comm_stream_));
  MP_GPU_CHECK(stream_sync(comm_stream_));
  if (*ok_h == 1) return;
  fallback_reason_ = why.empty() ? "another rank could not map its peers' memory" : why;
  peer_release();
  grouping_ = Grouping::Kernel;
}

void EpDispatcher::peer_release() {
  // Our own wait kernels returned only after every peer's stores into our buffers had landed; the
  // stream sync makes sure they ran. Errors are ignored: this runs in the destructor.
  if (compute_) stream_sync(compute_);
  for (int r = 0; r < (int)map_flags_.size(); r++) {
    if (r == rank_) continue;
    for (void* p : {map_flags_[r], map_grouped_[r], map_ret_[r]})
      if (p) ipc_close(p);
  }
  map_flags_.clear();
  map_grouped_.clear();
  map_ret_.clear();
  for (void* p : retired_) free_device(p);
  retired_.clear();
  for (void** p : {&d_flags_, &d_arrived_, &d_handles_, &d_peer_grouped_, &d_peer_ret_, &d_all_counts_, &d_peer_upload_})
    if (*p) {
      free_device(*p);
      *p = nullptr;
    }
  for (void** p : {&h_handles_, reinterpret_cast<void**>(&h_timed_out_), reinterpret_cast<void**>(&h_all_counts_),
                   reinterpret_cast<void**>(&h_peer_upload_)})
    if (*p) {
      free_host(*p);
      *p = nullptr;
    }
  last_error();
}

void EpDispatcher::peer_dispatch(const bf16_bits* x, const int32_t* topk) {
  const int S = size_, E = experts_;
  const int64_t entries = tokens_ * k_;
  const size_t gathered = (size_t)S * (E + 1);
  ensure(&d_counts_, &c_counts_, (E + 1) * sizeof(int32_t));  // counts per expert, then the bad-id flag
  ensure(&d_all_counts_, &c_all_counts_, gathered * sizeof(int32_t));
  ensure(&d_adj_, &c_adj_, (size_t)E * sizeof(int64_t));
  ensure(&d_scratch_, &c_scratch_, ep_positions_scratch(tokens_, k_, E));
  ensure(&d_pos_of_flat_, &c_pof_, (size_t)entries * sizeof(int32_t));
  ensure(&d_flat_of_pos_, &c_fop_, (size_t)entries * sizeof(int32_t));
  if (h_all_cap_ < gathered) {
    if (h_all_counts_) MP_GPU_CHECK(free_host(h_all_counts_));
    h_all_counts_ = nullptr;
    MP_GPU_CHECK(malloc_host(reinterpret_cast<void**>(&h_all_counts_), gathered * sizeof(int32_t)));
    h_all_cap_ = gathered;
  }
  if (trace_on_) {
    if (!trace_start_) MP_GPU_CHECK(event_create(&trace_start_));
    MP_GPU_CHECK(event_record(trace_start_, compute_));
    trace_.clear();
  }
  int32_t* counts = static_cast<int32_t*>(d_counts_);
  ep_count(topk, tokens_, k_, E, epr_, chunk_tokens_, 1, counts, counts + E, compute_);
  MP_GPU_CHECK(event_record(ev_counts_, compute_));
  mark("count", compute_);
  // Every rank needs every rank's counts: where its rows land in each grouped buffer, and how large
  // every rank's buffers must be.
  MP_GPU_CHECK(stream_wait(comm_stream_, ev_counts_));
  ccl_ok(ncclAllGather(counts, d_all_counts_, E + 1, ncclInt32, comm_, comm_stream_), "ncclAllGather (counts)");
  MP_GPU_CHECK(memcpy_async(h_all_counts_, d_all_counts_, gathered * sizeof(int32_t), comm_stream_));
  mark("count all-gather + copy to host", comm_stream_);
  // Meanwhile: each entry's rank among the entries of its expert (the send order, one chunk).
  ep_adj(counts, E, epr_, 1, static_cast<int64_t*>(d_adj_), compute_);
  ep_positions(topk, tokens_, k_, E, chunk_tokens_, static_cast<const int64_t*>(d_adj_),
               static_cast<int32_t*>(d_scratch_), static_cast<int32_t*>(d_pos_of_flat_),
               static_cast<int32_t*>(d_flat_of_pos_), compute_);
  mark("positions", compute_);
  MP_GPU_CHECK(stream_sync(comm_stream_));

  // Every rank has queued this dispatch, so none still maps the buffers retired at the last re-mapping.
  for (void* p : retired_) MP_GPU_CHECK(free_device(p));
  retired_.clear();
  check();
  std::string bad_ranks;
  for (int r = 0; r < S; r++)
    if (all_count(r, E)) bad_ranks += (bad_ranks.empty() ? "" : ", ") + std::to_string(r);
  MP_CHECK_ARG(bad_ranks.empty(), "dispatch: an expert id is outside [0, " + std::to_string(E) + ") on rank " + bad_ranks);
  peer_plan();
  peer_map_buffers();

  const int64_t* up = static_cast<const int64_t*>(d_peer_upload_);  // starts with delta
  PeerRows dst{};
  PeerSignal sig{};
  for (int r = 0; r < S; r++) {
    dst.base[r] = static_cast<bf16_bits*>(map_grouped_[r]);
    sig.flag[r] = static_cast<uint64_t*>(map_flags_[r]) + rank_;  // phase 0, slot of this rank
  }
  sig.ranks = S;
  sig.epoch = ++epoch_[0];
  sig.arrived = static_cast<unsigned*>(d_arrived_);
  ep_push_dispatch(x, topk, static_cast<const int32_t*>(d_pos_of_flat_), up, tokens_, k_, hidden_, epr_, dst, sig,
                   compute_);
  mark("rows stored to peers", compute_);
  ep_wait_peers(static_cast<const uint64_t*>(d_flags_), S, sig.epoch, peer_timeout_.count(), h_timed_out_, compute_);
  mark("every rank's rows arrived", compute_);
  grouped_ = static_cast<bf16_bits*>(d_peer_grouped_);
}

// From the all-gathered counts C[s][e]: this rank's grouped layout, where each of its entries lands in
// its expert's grouped buffer (delta per expert, added to the entry's rank-within-expert position),
// and where each of its grouped rows goes back (the source's send order). Fills the upload buffer.
void EpDispatcher::peer_plan() {
  const int S = size_, E = experts_, L = epr_, me = rank_;
  send_rows_.assign(S, 0);
  recv_rows_per_rank_.assign(S, 0);
  expert_rows_.assign(L, 0);
  expert_offset_.assign(L, 0);
  // start[s][e]: first position of expert e in rank s's send order (experts ascending).
  std::vector<int64_t> start((size_t)S * E, 0);
  for (int s = 0; s < S; s++) {
    int64_t run = 0;
    for (int e = 0; e < E; e++) {
      start[(size_t)s * E + e] = run;
      run += all_count(s, e);
    }
  }
  // goff[e]: first row of expert e in its rank's grouped buffer; rows by (source rank, token, k).
  std::vector<int64_t> goff(E, 0);
  for (int d = 0; d < S; d++) {
    int64_t run = 0;
    for (int le = 0; le < L; le++) {
      goff[d * L + le] = run;
      for (int s = 0; s < S; s++) run += all_count(s, d * L + le);
    }
  }
  for (int d = 0; d < S; d++)
    for (int le = 0; le < L; le++) send_rows_[d] += all_count(me, d * L + le);
  for (int s = 0; s < S; s++)
    for (int le = 0; le < L; le++) {
      recv_rows_per_rank_[s] += all_count(s, me * L + le);
      expert_rows_[le] += all_count(s, me * L + le);
    }
  recv_rows_ = 0;
  for (int le = 0; le < L; le++) {
    expert_offset_[le] = recv_rows_;
    recv_rows_ += expert_rows_[le];
  }
  const int nseg = S * L;
  const size_t upload = (size_t)E + (nseg + 1) + 2 * (size_t)nseg;
  if (h_peer_upload_cap_ < upload) {
    if (h_peer_upload_) MP_GPU_CHECK(free_host(h_peer_upload_));
    h_peer_upload_ = nullptr;
    MP_GPU_CHECK(malloc_host(reinterpret_cast<void**>(&h_peer_upload_), upload * sizeof(int64_t)));
    h_peer_upload_cap_ = upload;
  }
  int64_t* delta = h_peer_upload_;
  int64_t* first = delta + E;
  int64_t* dst_rank = first + nseg + 1;
  int64_t* dst_row = dst_rank + nseg;
  for (int e = 0; e < E; e++) {
    int64_t before = 0;  // rows of expert e from ranks before this one
    for (int q = 0; q < me; q++) before += all_count(q, e);
    delta[e] = goff[e] + before - start[(size_t)me * E + e];
  }
  int64_t row = 0;
  for (int le = 0; le < L; le++)
    for (int s = 0; s < S; s++) {
      const int i = le * S + s, e = me * L + le;
      first[i] = row;
      dst_rank[i] = s;
      dst_row[i] = start[(size_t)s * E + e];
      row += all_count(s, e);
    }
  first[nseg] = row;
  ensure(&d_peer_upload_, &c_peer_upload_, upload * sizeof(int64_t));
  // The previous upload has been consumed: it ran on the compute stream before this dispatch's count
  // step, which the host has waited for.
  MP_GPU_CHECK(memcpy_async(d_peer_upload_, h_peer_upload_, upload * sizeof(int64_t), compute_));
}

// Grows (collectively, by the shared rule) the buffers some rank now needs larger, and maps the new ones.
void EpDispatcher::peer_map_buffers() {
  const int S = size_, E = experts_;
  const size_t rb = (size_t)hidden_ * sizeof(bf16_bits);
  std::vector<char> grow_g(S, 0), grow_r(S, 0);
  bool any = false;
  for (int r = 0; r < S; r++) {
    int64_t recv = 0, sent = 0;
    for (int e = 0; e < E; e++) {
      sent += all_count(r, e);
      if (e / epr_ == r)
        for (int s = 0; s < S; s++) recv += all_count(s, e);
    }
    if ((size_t)recv * rb > cap_grouped_[r] || cap_grouped_[r] == 0) {
      cap_grouped_[r] = grown((size_t)recv * rb);
      grow_g[r] = 1;
      any = true;
    }
    if ((size_t)sent * rb > cap_ret_[r] || cap_ret_[r] == 0) {
      cap_ret_[r] = grown((size_t)sent * rb);
      grow_r[r] = 1;
      any = true;
    }
  }
  if (!any) return;
  // Old buffers stay allocated until every peer has closed its mapping (freed at the next dispatch).
  if (grow_g[rank_]) {
    if (d_peer_grouped_) retired_.push_back(d_peer_grouped_);
    d_peer_grouped_ = nullptr;
    MP_GPU_CHECK(malloc_device(&d_peer_grouped_, cap_grouped_[rank_]));
  }
  if (grow_r[rank_]) {
    if (d_peer_ret_) retired_.push_back(d_peer_ret_);
    d_peer_ret_ = nullptr;
    MP_GPU_CHECK(malloc_device(&d_peer_ret_, cap_ret_[rank_]));
  }
  map_grouped_[rank_] = d_peer_grouped_;
  map_ret_[rank_] = d_peer_ret_;
  const size_t hb = sizeof(IpcHandle);
  char* h = static_cast<char*>(h_handles_);
  char* d = static_cast<char*>(d_handles_);
  IpcHandle mine[2]{};
  MP_GPU_CHECK(ipc_get_handle(&mine[0], d_peer_grouped_));
  MP_GPU_CHECK(ipc_get_handle(&mine[1], d_peer_ret_));
  std::memcpy(h + (size_t)rank_ * 2 * hb, mine, 2 * hb);
  MP_GPU_CHECK(memcpy_async(d + (size_t)rank_ * 2 * hb, h + (size_t)rank_ * 2 * hb, 2 * hb, comm_stream_));
  ccl_ok(ncclAllGather(d + (size_t)rank_ * 2 * hb, d, 2 * hb, ncclUint8, comm_, comm_stream_),
         "ncclAllGather (buffer handles)");
  MP_GPU_CHECK(memcpy_async(h, d, (size_t)S * 2 * hb, comm_stream_));
  MP_GPU_CHECK(stream_sync(comm_stream_));
  for (int r = 0; r < S; r++) {
    if (r == rank_) continue;
    for (int which = 0; which < 2; which++) {
      if (!(which == 0 ? grow_g[r] : grow_r[r])) continue;
      void*& m = which == 0 ? map_grouped_[r] : map_ret_[r];
      if (m) MP_GPU_CHECK(ipc_close(m));
      m = nullptr;
      IpcHandle theirs;
      std::memcpy(&theirs, h + ((size_t)r * 2 + which) * hb, hb);
      Status st = ipc_open(&m, theirs);
      if (st != kSuccess) {
        m = nullptr;
        last_error();
        throw Error(ErrorCode::Comm, "dispatch on rank " + std::to_string(rank_) + ": cannot map rank " +
                                         std::to_string(r) + "'s " + (which == 0 ? "grouped" : "return") +
                                         " buffer: " + status_string(st));
      }
    }
  }
}

void EpDispatcher::peer_combine(const bf16_bits* expert_out, const float* weights, bf16_bits* out) {
  const int S = size_, nseg = S * epr_;
  const int64_t* up = static_cast<const int64_t*>(d_peer_upload_);
  const int64_t* first = up + experts_;
  const int64_t* dst_rank = first + nseg + 1;
  const int64_t* dst_row = dst_rank + nseg;
  PeerRows dst{};
  PeerSignal sig{};
  for (int r = 0; r < S; r++) {
    dst.base[r] = static_cast<bf16_bits*>(map_ret_[r]);
    sig.flag[r] = static_cast<uint64_t*>(map_flags_[r]) + S + rank_;  // phase 1, slot of this rank
  }
  sig.ranks = S;
  sig.epoch = ++epoch_[1];
  sig.arrived = static_cast<unsigned*>(d_arrived_) + 1;
  ep_push_segments(expert_out, hidden_, first, dst_rank, dst_row, nseg, recv_rows_, dst, sig, compute_);
  mark("rows stored back to sources", compute_);
  ep_wait_peers(static_cast<const uint64_t*>(d_flags_) + S, S, sig.epoch, peer_timeout_.count(), h_timed_out_, compute_);
  mark("every rank's rows back", compute_);
  ep_combine(static_cast<const bf16_bits*>(d_peer_ret_), static_cast<const int32_t*>(d_pos_of_flat_), weights, k_,
             hidden_, 0, tokens_, out, compute_);
  mark("combined", compute_);
}

}  // namespace moepilot::gpu
