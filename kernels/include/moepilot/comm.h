// Collectives between the ranks of one process group: one interface, a Gloo implementation (CPU, TCP)
// now and NCCL later. One process per rank; every rank must issue the same collectives in the same
// order. All counts are in elements.
//
// Failure contract: every call is bounded by the communicator's timeout. On a timeout, a peer's death
// or any transport error the call throws moepilot::Error (ErrorCode::Timeout or ErrorCode::Comm) whose
// message names the operation, this rank and, where the transport tells, the peer rank that failed;
// the communicator is then aborted: its connections are closed (so peers fail fast too) and every
// later call throws ErrorCode::Comm at once. Nothing hangs and nothing reaches std::terminate.
// Ranks that disagree on a call (another collective, other sizes) end in ErrorCode::Timeout, never
// in a buffer overrun.
//
// Thread safety: calls on one communicator are serialized by an internal lock; the order of calls
// issued from several threads is the caller's business (it must match across ranks). abort() may be
// called from any thread at any time, also while another thread is inside a collective.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moepilot/error.h"

namespace moepilot {

enum class DType { F32, F64, I32, U8 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::I32: return 4;
    case DType::U8: return 1;
  }
  return 1;
}
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::I32: return "i32";
    case DType::U8: return "u8";
  }
  return "?";
}

class Collectives {
 public:
  virtual ~Collectives() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::chrono::milliseconds timeout() const = 0;

  // send: sum(send_counts) elements, the block for rank r at offset sum(send_counts[0..r)).
  // recv: sum(recv_counts) elements, the block from rank r at offset sum(recv_counts[0..r)).
  // send_counts[r] here must equal recv_counts[me] on rank r (exchange_counts() gives recv_counts
  // when they are not known). Ranks that disagree fail with ErrorCode::Timeout naming the peer.
  virtual void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                            const std::vector<int64_t>& recv_counts, DType t) = 0;
  // In place: data[0..n) becomes the elementwise sum over ranks (F32, F64, I32). Every rank gets the
  // same bits.
  virtual void all_reduce_sum(void* data, size_t n, DType t) = 0;
  // send: sum(recv_counts) elements on every rank; recv: recv_counts[me] elements, the sum over ranks
  // of block `me` of send, added in rank order 0..size-1 (deterministic).
  virtual void reduce_scatter_sum(const void* send, void* recv, const std::vector<int64_t>& recv_counts,
                                  DType t) = 0;
  // send: counts[me] elements; recv: sum(counts) elements, rank r's block at sum(counts[0..r)).
  virtual void all_gather(const void* send, void* recv, const std::vector<int64_t>& counts, DType t) = 0;
  // data[0..n): input on `root`, output everywhere.
  virtual void broadcast(void* data, size_t n, int root, DType t) = 0;
  virtual void barrier() = 0;
  // Marks the communicator failed (later calls throw ErrorCode::Comm with `reason`) and closes its
  // connections, which makes a collective in flight here and on the peers fail instead of waiting.
  virtual void abort(const std::string& reason) = 0;
  virtual bool aborted() const = 0;
  // Ends this rank's use of the communicator without disturbing the peers (normal shutdown, after the
  // last collective): later calls fail with ErrorCode::Comm. Unlike abort(), peers see nothing.
  virtual void close() = 0;

  // Typed conveniences for the common cases.
  void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                    const std::vector<int64_t>& recv_counts) {
    all_to_all_v(send, send_counts, recv, recv_counts, DType::F32);
  }
  void all_to_all_v(const int32_t* send, const std::vector<int64_t>& send_counts, int32_t* recv,
                    const std::vector<int64_t>& recv_counts) {
    all_to_all_v(send, send_counts, recv, recv_counts, DType::I32);
  }
  void all_reduce_sum(float* data, size_t n) { all_reduce_sum(data, n, DType::F32); }
  void all_reduce_sum(double* data, size_t n) { all_reduce_sum(data, n, DType::F64); }
  void reduce_scatter_sum(const float* send, float* recv, const std::vector<int64_t>& recv_counts) {
    reduce_scatter_sum(send, recv, recv_counts, DType::F32);
  }
  // Equal blocks: send holds size() * per_rank elements, recv gets per_rank.
  void reduce_scatter_sum(const float* send, float* recv, size_t per_rank) {
    reduce_scatter_sum(send, recv, std::vector<int64_t>((size_t)size(), (int64_t)per_rank), DType::F32);
  }
  void all_gather(const float* send, float* recv, const std::vector<int64_t>& counts) {
    all_gather(send, recv, counts, DType::F32);
  }
  void broadcast(float* data, size_t n, int root) { broadcast(data, n, root, DType::F32); }

  // Exchanges per-peer counts: send_counts[r] (what this rank sends to r) becomes recv_counts[me] on
  // rank r. Returns this rank's recv_counts.
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_counts) {
    std::vector<int64_t> out(send_counts.size());
    // U8 blocks of 8 bytes carry one int64 each.
    std::vector<int64_t> bytes(send_counts.size(), 8);
    all_to_all_v(send_counts.data(), bytes, out.data(), bytes, DType::U8);
    return out;
  }
};

// The key-value store the ranks meet through (answered by the coordinator's rendezvous service).
class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;
  virtual void set(const std::string& key, const std::vector<char>& value) = 0;
  // Values of all keys in order, waiting until all exist; throws Error(Timeout) naming the missing keys.
  virtual std::vector<std::vector<char>> get(const std::vector<std::string>& keys,
                                             std::chrono::milliseconds timeout) = 0;
};

struct GlooOptions {
  int rank = 0;
  int size = 1;
  // Address this rank listens on for its peers: a host name or IP ("127.0.0.1" for one machine), or
  // a network interface name in `iface` (which wins when set).
  std::string host = "127.0.0.1";
  std::string iface;
  // Bound on the connection set-up and on every collective.
  std::chrono::milliseconds timeout{60000};
};

// Connects to all peers through `store` (blocking, bounded by options.timeout) and returns the
// communicator. Throws Error(Timeout/Comm) naming what failed.
std::shared_ptr<Collectives> create_gloo_collectives(const GlooOptions& options, RendezvousStore& store);

}  // namespace moepilot
