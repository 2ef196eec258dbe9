// Runs N ranks as N forked processes of a standalone GPU program (tests, benchmarks) that meet
// through a key-value store in shared memory: the same RendezvousStore interface the engine uses
// over gRPC, with no files and no ports. The parent forks before touching CUDA (a CUDA context does
// not survive fork) and waits for all children, killing them past a deadline.
#pragma once
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "moepilot/comm.h"

namespace moepilot::forked {

constexpr int kSlots = 64;
constexpr int kKeyBytes = 120;
constexpr int kValueBytes = 4096;
constexpr int kResultBytes = 1 << 16;
constexpr int kMaxRanks = 16;

struct Slot {
  std::atomic<int> ready;
  char key[kKeyBytes];
  uint32_t len;
  char value[kValueBytes];
};

struct Shared {
  std::atomic<int> lock;
  Slot slots[kSlots];
  char results[kMaxRanks][kResultBytes];  // each rank's report (text), read by the parent
};

class ShmStore : public RendezvousStore {
 public:
  explicit ShmStore(Shared* s) : s_(s) {}

  void set(const std::string& key, const std::vector<char>& value) override {
    MP_CHECK_ARG(key.size() < kKeyBytes && value.size() <= kValueBytes, "shm store: key or value too large");
    while (s_->lock.exchange(1, std::memory_order_acquire)) std::this_thread::yield();
    int free = -1;
    for (int i = 0; i < kSlots; i++) {
      if (!s_->slots[i].ready.load() && free < 0) free = i;
      if (s_->slots[i].ready.load() && key == s_->slots[i].key) free = i;
    }
    if (free < 0) {
      s_->lock.store(0, std::memory_order_release);
      throw Error(ErrorCode::Internal, "shm store is full");
    }
    Slot& sl = s_->slots[free];
    sl.ready.store(0);
    std::memcpy(sl.key, key.c_str(), key.size() + 1);
    sl.len = (uint32_t)value.size();
    std::memcpy(sl.value, value.data(), value.size());
    sl.ready.store(1, std::memory_order_release);
    s_->lock.store(0, std::memory_order_release);
  }

  std::vector<std::vector<char>> get(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      std::vector<std::vector<char>> out;
      std::string missing;
      for (const std::string& k : keys) {
        bool found = false;
        for (int i = 0; i < kSlots && !found; i++) {
          Slot& sl = s_->slots[i];
          if (sl.ready.load(std::memory_order_acquire) && k == sl.key) {
            out.emplace_back(sl.value, sl.value + sl.len);
            found = true;
          }
        }
        if (!found) missing += (missing.empty() ? "" : ", ") + k;
      }
      if (missing.empty()) return out;
      if (std::chrono::steady_clock::now() > deadline) throw Error(ErrorCode::Timeout, "shm store: missing keys " + missing);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

 private:
  Shared* s_;
};

// Keys under a prefix: several communicators (or rounds) through one store without collisions, as
// the coordinator's store separates groups and generations.
class PrefixStore : public RendezvousStore {
 public:
  PrefixStore(RendezvousStore& inner, std::string prefix) : inner_(inner), prefix_(std::move(prefix)) {}
  void set(const std::string& key, const std::vector<char>& value) override { inner_.set(prefix_ + key, value); }
  std::vector<std::vector<char>> get(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    std::vector<std::string> k;
    for (const std::string& x : keys) k.push_back(prefix_ + x);
    return inner_.get(k, timeout);
  }

 private:
  RendezvousStore& inner_;
  std::string prefix_;
};

struct RankResult {
  int status;          // exit code, or 128 + signal
  std::string report;  // what the rank wrote into its result slot
};

// fn(rank, store, report) runs in child `rank`; its return value is the child's exit code. An
// exception is printed and gives exit code 1.
inline std::vector<RankResult> run_ranks(int n, std::chrono::seconds deadline,
                                         const std::function<int(int, RendezvousStore&, std::string&)>& fn) {
  MP_CHECK_ARG(n >= 1 && n <= kMaxRanks, "run_ranks: 1.." + std::to_string(kMaxRanks) + " ranks");
  void* mem = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  MP_CHECK_INTERNAL(mem != MAP_FAILED, "mmap");
  Shared* shared = new (mem) Shared();
  std::vector<pid_t> pids;
  for (int r = 0; r < n; r++) {
    std::fflush(stdout);
    std::fflush(stderr);
    pid_t pid = fork();
    MP_CHECK_INTERNAL(pid >= 0, "fork");
    if (pid == 0) {
      int rc = 1;
      std::string report;
      try {
        ShmStore store(shared);
        rc = fn(r, store, report);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
        rc = 1;
      }
      std::snprintf(shared->results[r], kResultBytes, "%s", report.c_str());
      std::fflush(stdout);
      std::fflush(stderr);
      _exit(rc);
    }
    pids.push_back(pid);
  }
  std::vector<RankResult> out(n, RankResult{-1, ""});
  auto end = std::chrono::steady_clock::now() + deadline;
  int left = n;
  while (left > 0) {
    for (int r = 0; r < n; r++) {
      if (out[r].status != -1) continue;
      int st = 0;
      pid_t w = waitpid(pids[r], &st, WNOHANG);
      if (w == pids[r]) {
        out[r].status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        left--;
      }
    }
    if (left > 0 && std::chrono::steady_clock::now() > end) {
      for (int r = 0; r < n; r++)
        if (out[r].status == -1) {
          std::fprintf(stderr, "rank %d still running past the deadline: killed\n", r);
          kill(pids[r], SIGKILL);
        }
      end = std::chrono::steady_clock::now() + std::chrono::seconds(3600);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (int r = 0; r < n; r++) out[r].report = shared->results[r];
  munmap(mem, sizeof(Shared));
  return out;
}

}  // namespace moepilot::forked
