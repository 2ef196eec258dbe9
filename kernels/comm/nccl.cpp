// Collectives over NCCL (one process per GPU). See nccl.h for the contract.
//
// Bounding every call: the communicator is created non-blocking, so NCCL calls return at once (or
// with ncclInProgress) and the work runs on this communicator's stream. run() then polls the stream
// and ncclCommGetAsyncError until the work completes, NCCL reports an error, abort() is called, or
// the timeout passes; in the last three cases the communicator is torn down with ncclCommAbort (which
// also stops NCCL kernels stuck waiting for a peer) and the call throws naming the operation, this
// rank and the peers it was exchanging with. NCCL does not tell a waiting rank which peer is gone,
// so peers here are "the ranks this operation talks to", not a diagnosis.
//
// Host buffers are copied into device staging buffers before the operation and back after it has
// completed (a device-to-host copy into pageable memory blocks the calling thread until the stream
// drains, so it is issued only once the NCCL work is known to be done).
#include "comm/nccl.h"

#ifndef MOEPILOT_WITH_NCCL

namespace moepilot {

bool nccl_available() { return false; }

std::shared_ptr<Collectives> create_nccl_collectives(const NcclOptions&, RendezvousStore&) {
  throw Error(ErrorCode::InvalidArgument,
              "the NCCL backend is not in this build of the engine (nvcc, the CUDA runtime or the NCCL headers were "
              "not found when it was built; set NCCL_HOME and CUDA_HOME and rebuild with scripts/build-native.sh)");
}

NcclHandles nccl_handles(Collectives&) {
  throw Error(ErrorCode::InvalidArgument, "the NCCL backend is not in this build of the engine");
}

}  // namespace moepilot

#else

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <sstream>
#include <thread>

#include "cuda/ep_kernels.h"
#include "cuda/vendor.h"

namespace moepilot {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr const char* kUniqueIdKey = "moepilot/nccl/unique-id";

int64_t total(const std::vector<int64_t>& counts) { return std::accumulate(counts.begin(), counts.end(), int64_t{0}); }

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::I32: return ncclInt32;
    case DType::U8: return ncclUint8;
  }
  return ncclUint8;
}

std::string join_ranks(const std::vector<int>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); i++) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

// A device buffer that grows on demand (staging for host pointers, scratch for reductions).
class DeviceBuffer {
 public:
  ~DeviceBuffer() { release(); }
  void* get(size_t bytes) {
    if (bytes > size_) {
      release();
      size_t want = std::max<size_t>(bytes, 1 << 16);
      MP_GPU_CHECK(gpu::malloc_device(&ptr_, want));
      size_ = want;
    }
    return ptr_;
  }
  void release() noexcept {
    if (ptr_) gpu::free_device(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

class NcclCollectives final : public Collectives {
 public:
  NcclCollectives(const NcclOptions& o, int device, ncclComm_t comm, gpu::Stream stream)
      : rank_(o.rank), size_(o.size), device_(device), timeout_(o.timeout), comm_(comm), stream_(stream) {}

  ~NcclCollectives() override {
    std::lock_guard<std::mutex> lock(op_mutex_);
    teardown();
    if (stream_) gpu::stream_destroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  milliseconds timeout() const override { return timeout_; }
  bool aborted() const override { return aborted_.load(); }
  NcclHandles handles() { return NcclHandles{comm_, device_, stream_}; }

  void abort(const std::string& reason) override {
    if (!mark_aborted(reason)) return;
    // A call in flight polls aborted_ and tears the communicator down itself; otherwise do it here.
    std::unique_lock<std::mutex> idle(op_mutex_, std::try_to_lock);
    if (idle.owns_lock()) teardown();
  }

  // Normal shutdown after the last collective: later calls fail; the communicator is freed locally
  // (teardown waits for this rank's work; nothing is sent to the peers).
  void close() override {
    if (!mark_aborted("communicator closed")) return;
    std::lock_guard<std::mutex> lock(op_mutex_);
    teardown();
  }

  void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                    const std::vector<int64_t>& recv_counts, DType t) override {
    std::string op = describe("all_to_all_v", t, total(send_counts), total(recv_counts));
    check_counts(op, send_counts, "send_counts");
    check_counts(op, recv_counts, "recv_counts");
    const size_t es = dtype_size(t);
    std::vector<int> peers;
    for (int r = 0; r < size_; r++)
      if (r != rank_ && (send_counts[r] || recv_counts[r])) peers.push_back(r);
    run(op, peers, [&] {
      const char* in = static_cast<const char*>(stage_in(send, total(send_counts) * es, in_stage_));
      char* out = static_cast<char*>(stage_out(recv, total(recv_counts) * es));
      exchange(op, in, send_counts, out, recv_counts, t);
      wait(op, peers);
      finish_out(recv, out, total(recv_counts) * es);
    });
  }

  void all_reduce_sum(void* data, size_t n, DType t) override {
    std::string op = describe("all_reduce_sum", t, (int64_t)n, (int64_t)n);
    MP_CHECK_ARG(t != DType::U8, op + ": u8 cannot be summed");
    run(op, others(), [&] {
      if (n == 0) return;
      void* d = stage_in(data, n * dtype_size(t), in_stage_);
      ccl(op, ncclAllReduce(d, d, n, nccl_type(t), ncclSum, comm_, stream_));
      wait(op, others());
      finish_out(data, d, n * dtype_size(t));
    });
  }

  // An exchange of blocks followed by a sum in rank order on the device: the contract asks for a
  // result that does not depend on the algorithm, which NCCL's own reduce-scatter does not give.
  void reduce_scatter_sum(const void* send, void* recv, const std::vector<int64_t>& recv_counts, DType t) override {
    std::string op = describe("reduce_scatter_sum", t, total(recv_counts), 0);
    check_counts(op, recv_counts, "recv_counts");
    MP_CHECK_ARG(t != DType::U8, op + ": u8 cannot be summed");
    const int64_t mine = recv_counts[rank_];
    const size_t es = dtype_size(t);
    run(op, others(), [&] {
      const char* in = static_cast<const char*>(stage_in(send, total(recv_counts) * es, in_stage_));
      char* gathered = static_cast<char*>(scratch_.get((size_t)mine * size_ * es + 1));
      exchange(op, in, recv_counts, gathered, std::vector<int64_t>(size_, mine), t);
      char* out = static_cast<char*>(stage_out(recv, (size_t)mine * es));
      gpu::sum_blocks(gathered, out, mine, size_, t, stream_);
      wait(op, others());
      finish_out(recv, out, (size_t)mine * es);
    });
  }

  void all_gather(const void* send, void* recv, const std::vector<int64_t>& counts, DType t) override {
    std::string op = describe("all_gather", t, 0, total(counts));
    check_counts(op, counts, "counts");
    const size_t es = dtype_size(t);
    run(op, others(), [&] {
      const char* in = static_cast<const char*>(stage_in(send, (size_t)counts[rank_] * es, in_stage_));
      char* out = static_cast<char*>(stage_out(recv, total(counts) * es));
      ccl(op, ncclGroupStart());
      int64_t off = 0;
      for (int r = 0; r < size_; r++) {
        if (counts[rank_] > 0) ccl(op, ncclSend(in, (size_t)counts[rank_], nccl_type(t), r, comm_, stream_));
        if (counts[r] > 0) ccl(op, ncclRecv(out + off * es, (size_t)counts[r], nccl_type(t), r, comm_, stream_));
        off += counts[r];
      }
      ccl(op, ncclGroupEnd());
      wait(op, others());
      finish_out(recv, out, total(counts) * es);
    });
  }

  void broadcast(void* data, size_t n, int root, DType t) override {
    std::string op = describe("broadcast", t, (int64_t)n, (int64_t)n) + " from root " + std::to_string(root);
    MP_CHECK_ARG(root >= 0 && root < size_, op + ": root must be in [0, " + std::to_string(size_) + ")");
    run(op, others(), [&] {
      if (n == 0) return;
      void* d = stage_in(data, n * dtype_size(t), in_stage_);
      ccl(op, ncclBroadcast(d, d, n, nccl_type(t), root, comm_, stream_));
      wait(op, others());
      finish_out(data, d, n * dtype_size(t));
    });
  }

  void barrier() override {
    run("barrier", others(), [&] {
      void* d = scratch_.get(sizeof(int32_t));
      MP_GPU_CHECK(gpu::memset_async(d, 0, sizeof(int32_t), stream_));
      ccl("barrier", ncclAllReduce(d, d, 1, ncclInt32, ncclSum, comm_, stream_));
      wait("barrier", others());
    });
  }

 private:
  std::vector<int> others() const {
    std::vector<int> r;
    for (int i = 0; i < size_; i++)
      if (i != rank_) r.push_back(i);
    return r;
  }

  // Grouped point-to-point: block r of `in` to rank r, block from rank r into `out`.
  void exchange(const std::string& op, const char* in, const std::vector<int64_t>& send_counts, char* out,
                const std::vector<int64_t>& recv_counts, DType t) {
    const size_t es = dtype_size(t);
    ccl(op, ncclGroupStart());
    int64_t so = 0, ro = 0;
    for (int r = 0; r < size_; r++) {
      if (send_counts[r] > 0) ccl(op, ncclSend(in + so * es, (size_t)send_counts[r], nccl_type(t), r, comm_, stream_));
      if (recv_counts[r] > 0) ccl(op, ncclRecv(out + ro * es, (size_t)recv_counts[r], nccl_type(t), r, comm_, stream_));
      so += send_counts[r];
      ro += recv_counts[r];
    }
    ccl(op, ncclGroupEnd());
  }

  // Device pointer: used as is. Host pointer: copied into `stage` first.
  void* stage_in(const void* p, size_t bytes, DeviceBuffer& stage) {
    if (bytes == 0) return nullptr;
    if (gpu::is_device_pointer(p)) return const_cast<void*>(p);
    void* d = stage.get(bytes);
    MP_GPU_CHECK(gpu::memcpy_async(d, p, bytes, stream_));
    return d;
  }
  void* stage_out(void* p, size_t bytes) {
    if (bytes == 0) return nullptr;
    return gpu::is_device_pointer(p) ? p : out_stage_.get(bytes);
  }
  // After wait(): copy a staged result back to the host pointer.
  void finish_out(void* host, const void* dev, size_t bytes) {
    if (bytes == 0 || host == dev) return;
    MP_GPU_CHECK(gpu::memcpy_async(host, dev, bytes, stream_));
    MP_GPU_CHECK(gpu::stream_sync(stream_));
  }

  // An NCCL call's immediate result: in progress means the non-blocking communicator is still
  // setting the call up; wait for that before the next call.
  void ccl(const std::string& op, ncclResult_t r) {
    if (r == ncclSuccess) return;
    if (r != ncclInProgress) fail(op, {}, std::string(ncclGetErrorString(r)) + detail(), false);
    const auto deadline = Clock::now() + timeout_;
    for (;;) {
      ncclResult_t state = ncclSuccess;
      ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
      if (q != ncclSuccess) fail(op, {}, std::string("ncclCommGetAsyncError: ") + ncclGetErrorString(q), false);
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) fail(op, {}, std::string(ncclGetErrorString(state)) + detail(), false);
      if (aborted_.load()) fail(op, {}, "", false);
      if (Clock::now() > deadline) fail(op, {}, "NCCL call still in progress", true);
      std::this_thread::yield();
    }
  }

  // Waits for everything issued on the stream, bounded by the timeout and watching NCCL's errors.
  void wait(const std::string& op, const std::vector<int>& peers) {
    const auto deadline = Clock::now() + timeout_;
    int spins = 0;
    for (;;) {
      gpu::Status q = gpu::stream_query(stream_);
      if (q == gpu::kSuccess) return;
      if (q != gpu::kNotReady) fail(op, peers, std::string("CUDA: ") + gpu::status_string(q), false);
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state != ncclSuccess && state != ncclInProgress) fail(op, peers, ncclGetErrorString(state) + detail(), false);
      if (aborted_.load()) fail(op, peers, "", false);
      if (Clock::now() > deadline) fail(op, peers, "", true);
      // Spin briefly (short collectives), then back off so a long wait does not burn a core.
      if (++spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  std::string detail() const {
    const char* s = comm_ ? ncclGetLastError(comm_) : nullptr;
    return s && *s ? std::string(" (") + s + ")" : std::string();
  }

  std::string describe(const char* name, DType t, int64_t n_in, int64_t n_out) const {
    std::ostringstream s;
    s << name << "(" << dtype_name(t) << ", " << n_in << " -> " << n_out << " elements)";
    return s.str();
  }

  void check_counts(const std::string& op, const std::vector<int64_t>& counts, const char* what) const {
    MP_CHECK_ARG((int)counts.size() == size_, op + ": " + what + " has " + std::to_string(counts.size()) +
                                                  " entries, expected one per rank (" + std::to_string(size_) + ")");
    for (int64_t c : counts) MP_CHECK_ARG(c >= 0, op + ": " + what + " has a negative count");
  }

  std::string where() const {
    return "rank " + std::to_string(rank_) + " of " + std::to_string(size_) + " (nccl, device " +
           std::to_string(device_) + ")";
  }

  template <class Body>
  void run(const std::string& op, const std::vector<int>& peers, Body&& body) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    if (aborted_.load()) {
      std::lock_guard<std::mutex> r(reason_mutex_);
      throw Error(ErrorCode::Comm, op + " on " + where() + ": communicator is aborted (" + reason_ + ")");
    }
    MP_GPU_CHECK(gpu::set_device(device_));  // the worker thread may serve several devices' communicators
    try {
      body();
    } catch (const Error& e) {
      // Our own failures were already reported by fail(); anything else (a CUDA error while staging,
      // an out-of-memory) leaves the stream in an unknown state: abort as for a transport error.
      if (aborted_.load()) throw;
      fail(op, peers, e.what(), false);
    }
    if (aborted_.load()) teardown();  // aborted from another thread, but this call got through
  }

  bool mark_aborted(const std::string& reason) {
    std::lock_guard<std::mutex> lock(reason_mutex_);
    if (aborted_.load()) return false;
    reason_ = reason;
    aborted_.store(true);
    return true;
  }

  [[noreturn]] void fail(const std::string& op, const std::vector<int>& peers, const std::string& cause,
                         bool timeout) {
    std::string with = peers.empty() ? "" : " (exchanging with rank " + join_ranks(peers) + ")";
    if (aborted_.load()) {
      teardown();
      std::lock_guard<std::mutex> r(reason_mutex_);
      throw Error(ErrorCode::Comm, op + " on " + where() + with + " interrupted: communicator aborted (" + reason_ + ")");
    }
    std::string msg = op + " failed on " + where() + with;
    msg += timeout ? ": not complete within " + std::to_string(timeout_.count()) + " ms" +
                         (cause.empty() ? std::string() : " (" + cause + ")")
                   : ": " + cause;
    msg += "; communicator aborted";
    mark_aborted(op + " failed" + with + (timeout ? ": timeout" : ": " + cause));
    teardown();
    throw Error(timeout ? ErrorCode::Timeout : ErrorCode::Comm, msg);
  }

  // Frees the NCCL communicator without waiting for peers. Caller holds op_mutex_.
  void teardown() noexcept {
    if (!comm_) return;
    gpu::set_device(device_);
    ncclCommAbort(comm_);
    comm_ = nullptr;
    // Any staged copy still queued behind the aborted kernels drains now; errors here change nothing.
    gpu::stream_sync(stream_);
    gpu::last_error();
    in_stage_.release();
    out_stage_.release();
    scratch_.release();
  }

  const int rank_;
  const int size_;
  const int device_;
  const milliseconds timeout_;
  ncclComm_t comm_;
  gpu::Stream stream_;
  DeviceBuffer in_stage_, out_stage_, scratch_;
  std::mutex op_mutex_;
  std::mutex reason_mutex_;
  std::atomic<bool> aborted_{false};
  std::string reason_;
};

}  // namespace

bool nccl_available() { return true; }

std::shared_ptr<Collectives> create_nccl_collectives(const NcclOptions& o, RendezvousStore& store) {
  MP_CHECK_ARG(o.size >= 1, "nccl: world size must be >= 1, got " + std::to_string(o.size));
  MP_CHECK_ARG(o.rank >= 0 && o.rank < o.size,
               "nccl: rank must be in [0, " + std::to_string(o.size) + "), got " + std::to_string(o.rank));
  MP_CHECK_ARG(o.timeout.count() > 0, "nccl: timeout must be positive");
  const std::string who = "rank " + std::to_string(o.rank) + " of " + std::to_string(o.size);
  // NVLink multicast (NVLS) stays off: on shared hosts it can take the GPUs out of service.
  setenv("NCCL_NVLS_ENABLE", "0", 1);

  std::string stage = "finding the device";
  ncclComm_t comm = nullptr;
  gpu::Stream stream = nullptr;
  try {
    int count = 0;
    MP_GPU_CHECK(gpu::device_count(&count));
    MP_CHECK_ARG(count > 0, "no CUDA device visible");
    int device = o.device >= 0 ? o.device : o.rank % count;
    MP_CHECK_ARG(device < count, "device " + std::to_string(device) + " does not exist (" + std::to_string(count) +
                                     " visible)");
    // Before NCCL: a rank whose device is slow to start or broken fails here, alone, instead of
    // leaving the others waiting inside ncclCommInitRank.
    stage = "the GPU self-test";
    gpu::self_test(device);
    // High priority: NCCL kernels queued here start ahead of compute kernels that share the GPU.
    MP_GPU_CHECK(gpu::stream_create_high_priority(&stream));

    stage = "exchanging the NCCL unique id";
    ncclUniqueId id{};
    if (o.rank == 0) {
      ncclResult_t r = ncclGetUniqueId(&id);
      if (r != ncclSuccess) throw Error(ErrorCode::Comm, std::string("ncclGetUniqueId: ") + ncclGetErrorString(r));
      const char* b = reinterpret_cast<const char*>(&id);
      store.set(kUniqueIdKey, std::vector<char>(b, b + sizeof(id)));
    }
    std::vector<char> got = store.get({kUniqueIdKey}, o.timeout).at(0);
    if (got.size() != sizeof(id)) {
      throw Error(ErrorCode::Comm, "the stored NCCL unique id has " + std::to_string(got.size()) + " bytes, expected " +
                                       std::to_string(sizeof(id)));
    }
    std::memcpy(&id, got.data(), sizeof(id));

    stage = "initializing the NCCL communicator";
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = o.nonblocking ? 0 : 1;
    ncclResult_t r = ncclCommInitRankConfig(&comm, o.size, id, o.rank, &config);
    const auto deadline = Clock::now() + o.timeout;
    while (r == ncclInProgress) {
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm, &state);
      if (state != ncclInProgress) {
        r = state;
        break;
      }
      if (Clock::now() > deadline) {
        ncclCommAbort(comm);
        comm = nullptr;
        throw Error(ErrorCode::Timeout, "not all " + std::to_string(o.size) + " ranks joined within " +
                                            std::to_string(o.timeout.count()) + " ms");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (r != ncclSuccess) {
      std::string last = comm ? ncclGetLastError(comm) : "";
      throw Error(ErrorCode::Comm, std::string(ncclGetErrorString(r)) + (last.empty() ? "" : " (" + last + ")"));
    }
    return std::make_shared<NcclCollectives>(o, device, comm, stream);
  } catch (const Error& e) {
    if (comm) ncclCommAbort(comm);
    if (stream) gpu::stream_destroy(stream);
    throw Error(e.code(), "nccl set-up of " + who + " failed during " + stage + ": " + e.what());
  }
}

NcclHandles nccl_handles(Collectives& c) {
  auto* n = dynamic_cast<NcclCollectives*>(&c);
  MP_CHECK_ARG(n != nullptr, "not an NCCL communicator");
  return n->handles();
}

}  // namespace moepilot

#endif
