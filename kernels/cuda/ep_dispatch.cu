// EpDispatcher (ep_dispatch.h).
#include <algorithm>
#include <chrono>
#include <string>

#include "cuda/ep_dispatch.h"

namespace moepilot::gpu {
namespace {

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
}

EpDispatcher::~EpDispatcher() {
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

}  // namespace moepilot::gpu
