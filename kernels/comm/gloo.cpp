// Collectives over Gloo's TCP transport (one process per rank, CPU buffers).
//
// Gloo reports failures as exceptions (gloo::IoException for a closed socket or a timeout,
// gloo::EnforceNotMet for a broken invariant); each one is caught here and turned into a
// moepilot::Error that names the operation, this rank and, where it can be told, the peer: for a
// lost connection from the state of the pair sockets (Gloo's own message quotes an unreliable address
// then), for the all-to-all from the per-peer wait that failed. The communicator is then aborted and
// its connections closed: a peer that waits on us fails at once with "connection closed" instead of
// running into its timeout.
//
// Mismatched calls (ranks disagreeing on sizes) must not reach Gloo as such: a message larger than
// the receive posted for it trips an assertion on Gloo's event-loop thread, where nothing can catch
// it, and the process aborts. So every message travels on a slot derived from its size as both
// ends see it: when they disagree, the message is simply not matched and the call times out with an
// error. For the all-to-all the slot is per pair (built here from Gloo's send/recv primitives).
#include "moepilot/comm.h"

#ifndef MOEPILOT_WITH_GLOO

namespace moepilot {

std::shared_ptr<Collectives> create_gloo_collectives(const GlooOptions&, RendezvousStore&) {
  throw Error(ErrorCode::InvalidArgument,
              "the Gloo backend is not in this build of the engine (libgloo-dev was not found when it was built; "
              "Debian: apt-get install libgloo-dev, then rebuild with scripts/build-native.sh)");
}

}  // namespace moepilot

#else

#include <dirent.h>
#include <gloo/allgatherv.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/address.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/types.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <sstream>

#include "moepilot/comm.h"

namespace moepilot {
namespace {

using std::chrono::milliseconds;

// Gloo's messages start with "[/path/file.cc:123] "; the location says nothing to our users.
std::string strip_location(const std::string& msg) {
  if (msg.size() > 1 && msg[0] == '[') {
    size_t end = msg.find("] ");
    if (end != std::string::npos && msg.find(".cc:") < end) return msg.substr(end + 2);
  }
  return msg;
}

// Removes socket addresses ("[127.0.0.1]:41902") from a Gloo message: for a dead peer Gloo prints
// an address that does not belong to it, and we name the rank instead.
std::string drop_addresses(const std::string& msg) {
  std::string out;
  size_t i = 0;
  while (i < msg.size()) {
    size_t open = msg.find('[', i);
    if (open == std::string::npos) break;
    size_t close = msg.find("]:", open);
    size_t digits = close == std::string::npos ? close : close + 2;
    size_t end = digits;
    while (end != std::string::npos && end < msg.size() && std::isdigit((unsigned char)msg[end])) end++;
    if (close == std::string::npos || end == digits || msg.find(' ', open) < close) {
      out += msg.substr(i, open + 1 - i);
      i = open + 1;
      continue;
    }
    size_t cut = open > 0 && msg[open - 1] == ' ' ? open - 1 : open;
    out += msg.substr(i, cut - i);
    i = end;
  }
  out += msg.substr(std::min(i, msg.size()));
  return out;
}

bool looks_like_timeout(const std::string& msg) {
  std::string m = msg;
  std::transform(m.begin(), m.end(), m.begin(), [](unsigned char c) { return (char)std::tolower(c); });
  return m.find("timed out") != std::string::npos || m.find("timeout") != std::string::npos;
}

std::string join_ranks(const std::vector<int>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); i++) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

// Resolves `host` to a numeric address. Gloo's own lookup reads an unset pointer when the name
// does not resolve (it checks getaddrinfo's result against -1 only) and crashes the process, so only
// numeric addresses reach it.
std::string resolve_host(const std::string& host) {
  struct addrinfo hints {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  struct addrinfo* result = nullptr;
  int rv = getaddrinfo(host.c_str(), nullptr, &hints, &result);
  if (rv != 0 || result == nullptr) {
    throw Error(ErrorCode::InvalidArgument, "gloo: cannot resolve host '" + host + "': " + gai_strerror(rv));
  }
  std::string numeric;
  for (struct addrinfo* p = result; p != nullptr && numeric.empty(); p = p->ai_next) {
    if (p->ai_family != AF_INET && p->ai_family != AF_INET6) continue;
    char buf[NI_MAXHOST];
    if (getnameinfo(p->ai_addr, p->ai_addrlen, buf, sizeof(buf), nullptr, 0, NI_NUMERICHOST) == 0) numeric = buf;
  }
  freeaddrinfo(result);
  if (numeric.empty()) throw Error(ErrorCode::InvalidArgument, "gloo: host '" + host + "' has no IPv4 or IPv6 address");
  return numeric;
}

// Our slot prefix, clear of Gloo's own (0x01..0x08).
constexpr uint8_t kExchangeSlotPrefix = 0x4d;

// FNV-1a over 64-bit words: the same on every rank (std::hash is not guaranteed to be).
uint32_t mix(std::initializer_list<uint64_t> words) {
  uint64_t h = 1469598103934665603ULL;
  for (uint64_t w : words) {
    for (int i = 0; i < 8; i++) {
      h ^= (w >> (8 * i)) & 0xff;
      h *= 1099511628211ULL;
    }
  }
  return (uint32_t)(h ^ (h >> 32));
}

// A failure that knows which peers are to blame.
struct PeerFailure : std::runtime_error {
  PeerFailure(const std::string& msg, std::vector<int> peers) : std::runtime_error(msg), peers(std::move(peers)) {}
  std::vector<int> peers;
};

// Calls fn(fd, local, peer) for every connected TCP socket of this process, with the endpoints in
// Gloo's address notation. Gloo keeps its sockets to itself; this is how we find the ones of a
// communicator (to name the peer behind an address, and to shut them down on abort).
template <class Fn>
void for_each_tcp_socket(Fn&& fn) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return;
  while (struct dirent* e = readdir(dir)) {
    char* end = nullptr;
    long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    struct sockaddr_storage self {}, peer {};
    socklen_t self_len = sizeof(self), peer_len = sizeof(peer);
    if (getsockname((int)fd, (struct sockaddr*)&self, &self_len) != 0) continue;
    if (self.ss_family != AF_INET && self.ss_family != AF_INET6) continue;
    if (getpeername((int)fd, (struct sockaddr*)&peer, &peer_len) != 0) continue;  // listening sockets
    try {
      fn((int)fd, gloo::transport::tcp::Address((struct sockaddr*)&self, self_len).str(),
         gloo::transport::tcp::Address((struct sockaddr*)&peer, peer_len).str());
    } catch (...) {
      // A socket that changed under us (closed by another thread): not ours to handle.
    }
  }
  closedir(dir);
}

int64_t total(const std::vector<int64_t>& counts) { return std::accumulate(counts.begin(), counts.end(), int64_t{0}); }

// Adapts our RendezvousStore (answered by the coordinator) to the interface Gloo's connectFullMesh uses.
class StoreAdapter : public gloo::rendezvous::Store {
 public:
  StoreAdapter(RendezvousStore& store, milliseconds timeout) : store_(store), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override { store_.set(key, data); }
  std::vector<char> get(const std::string& key) override { return fetch({key}, timeout_).at(0); }
  void wait(const std::vector<std::string>& keys) override { fetch(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const milliseconds& timeout) override {
    fetch(keys, std::min(timeout, timeout_));
  }

 private:
  // Gloo's keys are the ranks whose addresses it waits for; say so in the error.
  std::vector<std::vector<char>> fetch(const std::vector<std::string>& keys, milliseconds timeout) {
    try {
      return store_.get(keys, timeout);
    } catch (const Error& e) {
      bool ranks = !keys.empty();
      for (const auto& k : keys) ranks = ranks && !k.empty() && k.find_first_not_of("0123456789") == std::string::npos;
      if (!ranks) throw;
      std::string list;
      for (size_t i = 0; i < keys.size(); i++) list += (i ? ", " : "") + keys[i];
      throw Error(e.code(), "waiting for the address of rank " + list + ": " + e.what());
    }
  }

  RendezvousStore& store_;
  milliseconds timeout_;
};

class GlooCollectives final : public Collectives {
 public:
  // peer_by_address: socket address (as Gloo prints it) -> rank; sockets: "local|peer" of each pair;
  // rank_by_local: this rank's end of each pair socket -> the peer.
  GlooCollectives(const GlooOptions& o, std::shared_ptr<gloo::rendezvous::Context> ctx,
                  std::map<std::string, int> peer_by_address, std::set<std::string> sockets,
                  std::map<std::string, int> rank_by_local)
      : rank_(o.rank), size_(o.size), timeout_(o.timeout), ctx_(std::move(ctx)),
        peer_by_address_(std::move(peer_by_address)), sockets_(std::move(sockets)),
        rank_by_local_(std::move(rank_by_local)) {}

  ~GlooCollectives() override { close_quietly(); }

  void close() override {
    if (!mark_aborted("communicator closed")) return;
    std::lock_guard<std::mutex> op(op_mutex_);
    std::lock_guard<std::mutex> lock(close_mutex_);
    if (closed_) return;
    closed_ = true;
    // Closing Gloo's pairs from this thread races with its device thread, which may still be handling the
    // peers' own shutdown on the same sockets, and Gloo then fails an internal check on that thread (an
    // uncaught exception: the process aborts). So a normal close leaves the connections as they are: the
    // context is parked for the life of the process and the kernel closes the sockets at exit, which the
    // peers handle as they handle any peer leaving.
    static std::mutex parked_mutex;
    static auto* parked = new std::vector<std::shared_ptr<gloo::rendezvous::Context>>();
    std::lock_guard<std::mutex> p(parked_mutex);
    parked->push_back(std::move(ctx_));
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  milliseconds timeout() const override { return timeout_; }
  bool aborted() const override { return aborted_.load(); }

  void abort(const std::string& reason) override {
    if (!mark_aborted(reason)) return;
    // Gloo has no call that interrupts a pending wait, and closing a pair does not wake it either.
    // Shutting the pair sockets down does: the transport then sees end-of-stream and fails the
    // waiting operation with its own error, exactly as when a peer dies (and the peers see the same).
    shutdown_pair_sockets();
    std::unique_lock<std::mutex> idle(op_mutex_, std::try_to_lock);
    if (idle.owns_lock()) close_quietly();
    // Otherwise the collective in flight fails now and run() closes the connections after it.
  }

  void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                    const std::vector<int64_t>& recv_counts, DType t) override {
    std::string op = describe("all_to_all_v", t, total(send_counts), total(recv_counts));
    check_counts(op, send_counts, "send_counts");
    check_counts(op, recv_counts, "recv_counts");
    MP_CHECK_ARG(send_counts[rank_] == recv_counts[rank_],
                 op + ": send_counts[" + std::to_string(rank_) + "] and recv_counts[" + std::to_string(rank_) +
                     "] (this rank's block to itself) differ");
    const size_t es = dtype_size(t);
    run(op, [&] { exchange(static_cast<const char*>(send), scaled(send_counts, es), static_cast<char*>(recv),
                           scaled(recv_counts, es), 1); });
  }

  void all_reduce_sum(void* data, size_t n, DType t) override {
    std::string op = describe("all_reduce_sum", t, (int64_t)n, (int64_t)n);
    MP_CHECK_ARG(t != DType::U8, op + ": u8 cannot be summed");
    if (n == 0) return run(op, [] {});
    run(op, [&] {
      gloo::AllreduceOptions opts(ctx_);
      switch (t) {
        case DType::F32: set_sum<float>(opts, data, n); break;
        case DType::F64: set_sum<double>(opts, data, n); break;
        case DType::I32: set_sum<int32_t>(opts, data, n); break;
        case DType::U8: break;
      }
      opts.setTag(mix({3, n, (uint64_t)t}));
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
    });
  }

  // A direct exchange (each rank sends block r to rank r) followed by a local sum in rank order:
  // the same traffic as a ring reduce-scatter, and the result does not depend on the algorithm.
  void reduce_scatter_sum(const void* send, void* recv, const std::vector<int64_t>& recv_counts,
                          DType t) override {
    std::string op = describe("reduce_scatter_sum", t, total(recv_counts), 0);
    check_counts(op, recv_counts, "recv_counts");
    MP_CHECK_ARG(t != DType::U8, op + ": u8 cannot be summed");
    const int64_t mine = recv_counts[rank_];
    const size_t es = dtype_size(t);
    std::vector<char> gathered((size_t)mine * size_ * es + 1);
    std::vector<int64_t> in_counts(size_, mine);
    run(op, [&] { exchange(static_cast<const char*>(send), scaled(recv_counts, es), gathered.data(),
                           scaled(in_counts, es), 2); });
    switch (t) {
      case DType::F32: sum_blocks<float>(gathered.data(), recv, mine); break;
      case DType::F64: sum_blocks<double>(gathered.data(), recv, mine); break;
      case DType::I32: sum_blocks<int32_t>(gathered.data(), recv, mine); break;
      case DType::U8: break;
    }
  }

  void all_gather(const void* send, void* recv, const std::vector<int64_t>& counts, DType t) override {
    std::string op = describe("all_gather", t, 0, total(counts));
    check_counts(op, counts, "counts");
    const size_t es = dtype_size(t);
    std::vector<size_t> out(size_);
    for (int r = 0; r < size_; r++) out[r] = (size_t)counts[r] * es;
    run(op, [&] {
      gloo::AllgathervOptions opts(ctx_);
      opts.setInput(bytes(const_cast<void*>(send)), out[rank_]);
      opts.setOutput(bytes(recv), out);
      std::vector<uint64_t> words{4};
      for (size_t b : out) words.push_back(b);
      uint32_t tag = 0;
      for (uint64_t w : words) tag = mix({tag, w});
      opts.setTag(tag);
      opts.setTimeout(timeout_);
      gloo::allgatherv(opts);
    });
  }

  void broadcast(void* data, size_t n, int root, DType t) override {
    std::string op = describe("broadcast", t, (int64_t)n, (int64_t)n) + " from root " + std::to_string(root);
    MP_CHECK_ARG(root >= 0 && root < size_, op + ": root must be in [0, " + std::to_string(size_) + ")");
    if (n == 0) return run(op, [] {});
    run(op, [&] {
      gloo::BroadcastOptions opts(ctx_);
      if (rank_ == root) opts.setInput(bytes(data), n * dtype_size(t));
      opts.setOutput(bytes(data), n * dtype_size(t));
      opts.setRoot(root);
      opts.setTag(mix({5, n, (uint64_t)t, (uint64_t)root}));
      opts.setTimeout(timeout_);
      gloo::broadcast(opts);
    });
  }

  void barrier() override {
    run("barrier", [&] {
      gloo::BarrierOptions opts(ctx_);
      opts.setTimeout(timeout_);
      gloo::barrier(opts);
    });
  }

 private:
  // Gloo buffers are typed by element size only; we pass bytes and scale the counts. Gloo asks for a
  // valid pointer even for zero bytes, hence the dummy.
  char* bytes(void* p) { return p ? static_cast<char*>(p) : &dummy_; }
  static std::vector<int64_t> scaled(const std::vector<int64_t>& counts, size_t es) {
    std::vector<int64_t> out(counts.size());
    for (size_t i = 0; i < counts.size(); i++) out[i] = counts[i] * (int64_t)es;
    return out;
  }

  template <class T>
  static void set_sum(gloo::AllreduceOptions& opts, void* data, size_t n) {
    opts.setOutput(static_cast<T*>(data), n);
    opts.setReduceFunction([](void* out, const void* a, const void* b, size_t k) {
      T* o = static_cast<T*>(out);
      const T* x = static_cast<const T*>(a);
      const T* y = static_cast<const T*>(b);
      for (size_t i = 0; i < k; i++) o[i] = x[i] + y[i];
    });
  }

  template <class T>
  void sum_blocks(const char* gathered, void* recv, int64_t n) const {
    const T* g = reinterpret_cast<const T*>(gathered);
    T* out = static_cast<T*>(recv);
    for (int64_t i = 0; i < n; i++) out[i] = g[i];
    for (int r = 1; r < size_; r++)
      for (int64_t i = 0; i < n; i++) out[i] += g[(size_t)r * n + i];
  }

  // All-to-all of byte blocks: block r of `send` goes to rank r, block r of `recv` comes from rank r.
  // Each message rides on a slot derived from (kind, its size), so sender and receiver only meet
  // when they agree on the size (see the top of this file).
  void exchange(const char* send, const std::vector<int64_t>& send_bytes, char* recv,
                const std::vector<int64_t>& recv_bytes, uint64_t kind) {
    std::vector<size_t> send_off(size_, 0), recv_off(size_, 0);
    for (int r = 1; r < size_; r++) {
      send_off[r] = send_off[r - 1] + (size_t)send_bytes[r - 1];
      recv_off[r] = recv_off[r - 1] + (size_t)recv_bytes[r - 1];
    }
    // One buffer per peer and direction: Gloo reports which rank completed only when a single
    // operation is pending on a buffer, and this way a timeout names the peer it waited for.
    auto slot = [&](int64_t nbytes) { return (uint64_t)gloo::Slot::build(kExchangeSlotPrefix, mix({kind, (uint64_t)nbytes})); };
    std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> in(size_), out(size_);
    for (int r = 0; r < size_; r++) {
      if (r == rank_ || recv_bytes[r] == 0) continue;
      out[r] = ctx_->createUnboundBuffer(recv + recv_off[r], (size_t)recv_bytes[r]);
      out[r]->recv(r, slot(recv_bytes[r]));
    }
    for (int r = 0; r < size_; r++) {
      if (r == rank_ || send_bytes[r] == 0) continue;
      in[r] = ctx_->createUnboundBuffer(const_cast<char*>(send) + send_off[r], (size_t)send_bytes[r]);
      in[r]->send(r, slot(send_bytes[r]));
    }
    if (send_bytes[rank_] > 0) std::memcpy(recv + recv_off[rank_], send + send_off[rank_], (size_t)send_bytes[rank_]);

    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    auto remaining = [&] {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
      return std::max(left, milliseconds(1));  // 0 would mean "no timeout" to Gloo
    };
    auto blame = [&](int peer, const char* what, const std::exception& e) {
      std::string cause = drop_addresses(strip_location(e.what()));
      throw PeerFailure(std::string(what) + " rank " + std::to_string(peer) + " (" + cause + ")", {peer});
    };
    for (int r = 0; r < size_; r++) {
      if (!out[r]) continue;
      try {
        out[r]->waitRecv(remaining());
      } catch (const std::exception& e) {
        blame(r, "no data from", e);
      }
    }
    for (int r = 0; r < size_; r++) {
      if (!in[r]) continue;
      try {
        in[r]->waitSend(remaining());
      } catch (const std::exception& e) {
        blame(r, "data not taken by", e);
      }
    }
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

  std::string where() const { return "rank " + std::to_string(rank_) + " of " + std::to_string(size_); }

  template <class Body>
  void run(const std::string& op, Body&& body) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    if (aborted_.load()) {
      std::lock_guard<std::mutex> r(reason_mutex_);
      throw Error(ErrorCode::Comm, op + " on " + where() + ": communicator is aborted (" + reason_ + ")");
    }
    std::string msg;
    try {
      body();
      if (aborted_.load()) close_quietly();  // aborted from another thread, but this call got through
      return;
    } catch (const PeerFailure& e) {
      fail(op, e.what(), e.peers);
    } catch (const std::exception& e) {
      msg = strip_location(e.what());
    } catch (...) {
      msg = "unknown exception from gloo";
    }
    // A transport error (not a timeout): find the pairs that broke; the address in Gloo's message
    // is only a hint.
    std::vector<int> peers = looks_like_timeout(msg) ? peers_in(msg) : broken_pairs();
    if (peers.empty()) peers = peers_in(msg);
    fail(op, peers.empty() ? msg : drop_addresses(msg), peers);
  }

  // Returns whether this call did the aborting.
  bool mark_aborted(const std::string& reason) {
    std::lock_guard<std::mutex> lock(reason_mutex_);
    if (aborted_.load()) return false;
    reason_ = reason;
    aborted_.store(true);
    return true;
  }

  void shutdown_pair_sockets() noexcept {
    for_each_tcp_socket([&](int fd, const std::string& local, const std::string& peer) {
      if (sockets_.count(local + "|" + peer)) ::shutdown(fd, SHUT_RDWR);
    });
  }

  // Peers whose connection to us is gone: its socket closed already (Gloo closes a pair that failed)
  // or at end-of-stream / reset. Gloo's own message is no help here: when the peer is dead the
  // address it prints is not reliable.
  std::vector<int> broken_pairs() const {
    std::set<int> alive;
    std::set<int> broken;
    DIR* dir = opendir("/proc/self/fd");
    if (dir == nullptr) return {};
    while (struct dirent* e = readdir(dir)) {
      char* end = nullptr;
      long fd = std::strtol(e->d_name, &end, 10);
      if (end == e->d_name || *end != '\0' || fd == dirfd(dir)) continue;
      struct sockaddr_storage self {};
      socklen_t self_len = sizeof(self);
      if (getsockname((int)fd, (struct sockaddr*)&self, &self_len) != 0) continue;
      if (self.ss_family != AF_INET && self.ss_family != AF_INET6) continue;
      std::string local;
      try {
        local = gloo::transport::tcp::Address((struct sockaddr*)&self, self_len).str();
      } catch (...) {
        continue;
      }
      auto it = rank_by_local_.find(local);
      if (it == rank_by_local_.end()) continue;
      char c;
      ssize_t n = ::recv((int)fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
      if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))) alive.insert(it->second);
      else broken.insert(it->second);
    }
    closedir(dir);
    for (const auto& [addr, r] : rank_by_local_)
      if (!alive.count(r)) broken.insert(r);
    return std::vector<int>(broken.begin(), broken.end());
  }

  // Names the peer whose socket address appears in Gloo's message, when one does.
  std::vector<int> peers_in(const std::string& msg) const {
    std::vector<int> ranks;
    for (const auto& [addr, r] : peer_by_address_)
      if (r != rank_ && msg.find(addr) != std::string::npos) ranks.push_back(r);
    std::sort(ranks.begin(), ranks.end());
    ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
    return ranks;
  }

  [[noreturn]] void fail(const std::string& op, const std::string& cause, const std::vector<int>& peers) {
    if (aborted_.load()) {
      // Interrupted by abort() from another thread: the transport's message would blame a peer.
      close_quietly();
      std::lock_guard<std::mutex> r(reason_mutex_);
      throw Error(ErrorCode::Comm, op + " on " + where() + " interrupted: communicator aborted (" + reason_ + ")");
    }
    const bool timeout = looks_like_timeout(cause);
    std::string msg = op + " failed on " + where();
    const std::string pairs = peers.empty()       ? ""
                              : peers.size() == 1 ? " (pair with rank " + join_ranks(peers) + ")"
                                                  : " (pairs with ranks " + join_ranks(peers) + ")";
    msg += pairs;
    // A timeout also covers ranks that disagree on the call (sizes, kind): their messages never match.
    msg += timeout ? ": timed out after " + std::to_string(timeout_.count()) +
                         " ms (a peer is slow, stuck, or called a different collective or size): " + cause
                   : ": " + cause;
    msg += "; communicator aborted";
    mark_aborted(op + " failed" + pairs + ": " + cause);
    close_quietly();
    throw Error(timeout ? ErrorCode::Timeout : ErrorCode::Comm, msg);
  }

  void close_quietly() noexcept {
    std::lock_guard<std::mutex> lock(close_mutex_);
    if (closed_) return;
    closed_ = true;
    try {
      if (ctx_) ctx_->closeConnections();
    } catch (...) {
      // Closing a pair whose socket already failed may throw; the pair is gone either way.
    }
  }

  const int rank_;
  const int size_;
  const milliseconds timeout_;
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  const std::map<std::string, int> peer_by_address_;
  const std::set<std::string> sockets_;
  const std::map<std::string, int> rank_by_local_;
  std::mutex op_mutex_;
  std::mutex reason_mutex_;
  std::mutex close_mutex_;
  std::atomic<bool> aborted_{false};
  bool closed_ = false;
  std::string reason_;
  char dummy_ = 0;
};

}  // namespace

std::shared_ptr<Collectives> create_gloo_collectives(const GlooOptions& o, RendezvousStore& store) {
  MP_CHECK_ARG(o.size >= 1, "gloo: world size must be >= 1, got " + std::to_string(o.size));
  MP_CHECK_ARG(o.rank >= 0 && o.rank < o.size,
               "gloo: rank must be in [0, " + std::to_string(o.size) + "), got " + std::to_string(o.rank));
  MP_CHECK_ARG(o.timeout.count() > 0, "gloo: timeout must be positive");
  MP_CHECK_ARG(!o.host.empty() || !o.iface.empty(), "gloo: host or iface must be set");
  const std::string who = "rank " + std::to_string(o.rank) + " of " + std::to_string(o.size);
  std::shared_ptr<gloo::rendezvous::Context> ctx;
  std::string stage = "creating the TCP device";
  try {
    gloo::transport::tcp::attr attr;
    if (!o.iface.empty()) attr.iface = o.iface;
    else attr.hostname = resolve_host(o.host);
    auto dev = gloo::transport::tcp::CreateDevice(attr);
    ctx = std::make_shared<gloo::rendezvous::Context>(o.rank, o.size);
    ctx->setTimeout(o.timeout);
    stage = "connecting to all peers";
    StoreAdapter adapter(store, o.timeout);
    ctx->connectFullMesh(adapter, dev);

    // Publish the local address of each pair so that a later failure message, which quotes the
    // peer's socket address, can be mapped back to the peer's rank.
    stage = "exchanging pair addresses";
    std::string mine;
    std::map<std::string, int> local;  // this rank's pair address -> the peer it is for
    for (int r = 0; r < o.size; r++) {
      if (r == o.rank) continue;
      local[ctx->getPair(r)->address().str()] = r;
      mine += ctx->getPair(r)->address().str() + "\n";
    }
    store.set("moepilot/pairs/" + std::to_string(o.rank), std::vector<char>(mine.begin(), mine.end()));
    std::vector<std::string> keys;
    for (int r = 0; r < o.size; r++) keys.push_back("moepilot/pairs/" + std::to_string(r));
    std::vector<std::vector<char>> all = store.get(keys, o.timeout);
    std::map<std::string, int> by_address;
    for (int r = 0; r < o.size; r++) {
      std::istringstream lines(std::string(all[r].begin(), all[r].end()));
      for (std::string line; std::getline(lines, line);)
        if (!line.empty()) by_address[line] = r;
    }
    // The published addresses are where each pair listened; the side that connected did so from
    // another port. Find the actual sockets: one end is always a published address.
    std::map<std::string, int> remote = by_address;
    std::set<std::string> sockets;
    std::map<std::string, int> rank_by_local;
    for_each_tcp_socket([&](int, const std::string& self, const std::string& peer) {
      int r = -1;
      auto p = by_address.find(peer);
      if (p != by_address.end() && p->second != o.rank) r = p->second;  // we connected to r's listener
      auto l = local.find(self);
      if (r < 0 && l != local.end()) r = l->second;  // r connected to our listener
      if (r < 0) return;
      remote[peer] = r;
      sockets.insert(self + "|" + peer);
      rank_by_local[self] = r;
    });
    return std::make_shared<GlooCollectives>(o, ctx, std::move(remote), std::move(sockets), std::move(rank_by_local));
  } catch (const Error& e) {
    if (ctx) { try { ctx->closeConnections(); } catch (...) {} }
    throw Error(e.code(), "gloo rendezvous of " + who + " failed while " + stage + ": " + e.what());
  } catch (const std::exception& e) {
    if (ctx) { try { ctx->closeConnections(); } catch (...) {} }
    std::string cause = strip_location(e.what());
    throw Error(looks_like_timeout(cause) ? ErrorCode::Timeout : ErrorCode::Comm,
                "gloo rendezvous of " + who + " failed while " + stage + ": " + cause);
  }
}

}  // namespace moepilot

#endif  // MOEPILOT_WITH_GLOO
