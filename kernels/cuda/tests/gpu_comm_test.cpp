// GPU test of the NCCL collectives and the expert-parallel dispatch/combine (not run by CI: it needs
// one GPU per rank). Usage: gpu_comm_test [--ranks N] (default: every visible GPU, at least 2).
//
// Each check prints "ok <name>" or "FAIL <name>: why" from rank 0 (other ranks print failures only);
// the exit code is 0 only when every rank passed every check.
//
// Collectives: every op and dtype on device and on host buffers, against values each rank can
// compute for every other rank; then the failure contract (a timeout names the op and rank and leaves
// the communicator aborted; abort() from another thread interrupts a collective in flight).
// Dispatch: the grouped rows must equal, bit for bit, a CPU reference built from every rank's inputs
// (regenerated from the shared seeds), for several shapes and chunk counts, with empty experts; the
// combined output must match the CPU's weighted sum of the expert outputs within one bf16 ulp.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>

#include "comm/nccl.h"
#include "cuda/ep_dispatch.h"
#include "cuda/fork_ranks.h"

using namespace moepilot;
using namespace std::chrono;

namespace {

struct Checker {
  int rank;
  int failures = 0;
  void ok(bool cond, const std::string& name, const std::string& why = "") {
    if (!cond) {
      failures++;
      std::fprintf(stderr, "rank %d: FAIL %s%s%s\n", rank, name.c_str(), why.empty() ? "" : ": ", why.c_str());
    } else if (rank == 0) {
      std::printf("ok %s\n", name.c_str());
    }
  }
};

// Device copies of host vectors for the device-pointer variants.
template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { MP_GPU_CHECK(gpu::malloc_device(reinterpret_cast<void**>(&p), std::max<size_t>(n, 1) * sizeof(T))); }
  Dev(const std::vector<T>& v) : Dev(v.size()) { MP_GPU_CHECK(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
  ~Dev() { gpu::free_device(p); }
  std::vector<T> host() const {
    std::vector<T> v(n);
    MP_GPU_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

// Element i of the block rank `src` sends to rank `dst` in the all-to-all test.
int32_t a2a_value(int src, int dst, int64_t i) { return (int32_t)(src * 1000003 + dst * 1009 + i); }
int64_t a2a_count(int src, int dst) { return (src * 7 + dst * 3) % 5 + (src == dst ? 0 : 1) * 3; }

template <class T>
void test_all_to_all(Collectives& c, Checker& ck, DType t, bool device) {
  int me = c.rank(), n = c.size();
  std::vector<int64_t> sc(n), rc(n);
  std::vector<T> send, expect;
  for (int r = 0; r < n; r++) {
    sc[r] = a2a_count(me, r);
    rc[r] = a2a_count(r, me);
    for (int64_t i = 0; i < sc[r]; i++) send.push_back((T)(a2a_value(me, r, i) % 251));
    for (int64_t i = 0; i < rc[r]; i++) expect.push_back((T)(a2a_value(r, me, i) % 251));
  }
  std::vector<T> got(expect.size(), (T)-1);
  std::string name = std::string("all_to_all_v ") + dtype_name(t) + (device ? " device" : " host");
  if (device) {
    Dev<T> ds(send), dr(got);
    c.all_to_all_v(ds.p, sc, dr.p, rc, t);
    got = dr.host();
  } else {
    c.all_to_all_v(send.data(), sc, got.data(), rc, t);
  }
  ck.ok(got == expect, name);
}

template <class T>
void test_reductions(Collectives& c, Checker& ck, DType t, bool device) {
  int me = c.rank(), n = c.size();
  const std::string where = std::string(dtype_name(t)) + (device ? " device" : " host");
  // all_reduce_sum: small integers, so every summation order gives the same exact result.
  const size_t len = 1000 + 37;
  std::vector<T> data(len), expect(len, (T)0);
  for (size_t i = 0; i < len; i++) {
    data[i] = (T)((me + 1) * (int64_t)(i % 97) - 40);
    for (int r = 0; r < n; r++) expect[i] += (T)((r + 1) * (int64_t)(i % 97) - 40);
  }
  std::vector<T> got = data;
  if (device) {
    Dev<T> d(data);
    c.all_reduce_sum(d.p, len, t);
    got = d.host();
  } else {
    c.all_reduce_sum(got.data(), len, t);
  }
  ck.ok(got == expect, "all_reduce_sum " + where);

  // reduce_scatter_sum with uneven blocks.
  std::vector<int64_t> counts(n);
  int64_t total = 0;
  for (int r = 0; r < n; r++) total += counts[r] = 5 + 3 * r;
  std::vector<T> in(total), rs_expect(counts[me], (T)0);
  for (int64_t i = 0; i < total; i++) in[i] = (T)((me + 2) * (i % 13));
  int64_t off = 0;
  for (int r = 0; r < me; r++) off += counts[r];
  for (int64_t i = 0; i < counts[me]; i++)
    for (int r = 0; r < n; r++) rs_expect[i] += (T)((r + 2) * ((off + i) % 13));
  std::vector<T> rs(counts[me], (T)-7);
  if (device) {
    Dev<T> di(in), dout(rs);
    c.reduce_scatter_sum(di.p, dout.p, counts, t);
    rs = dout.host();
  } else {
    c.reduce_scatter_sum(in.data(), rs.data(), counts, t);
  }
  ck.ok(rs == rs_expect, "reduce_scatter_sum " + where);
}

void test_gather_broadcast(Collectives& c, Checker& ck, bool device) {
  int me = c.rank(), n = c.size();
  const std::string where = device ? " device" : " host";
  std::vector<int64_t> counts(n);
  std::vector<float> mine, expect;
  for (int r = 0; r < n; r++) {
    counts[r] = 2 + (r * 5) % 7;
    for (int64_t i = 0; i < counts[r]; i++) expect.push_back(r * 100.0f + i);
  }
  for (int64_t i = 0; i < counts[me]; i++) mine.push_back(me * 100.0f + i);
  std::vector<float> got(expect.size(), -1.0f);
  if (device) {
    Dev<float> ds(mine), dr(got);
    c.all_gather(ds.p, dr.p, counts, DType::F32);
    got = dr.host();
  } else {
    c.all_gather(mine.data(), got.data(), counts, DType::F32);
  }
  ck.ok(got == expect, "all_gather f32" + where);

  const int root = n - 1;
  std::vector<double> b(333), bexp(333);
  for (size_t i = 0; i < b.size(); i++) {
    bexp[i] = root * 0.5 + i * 0.25;
    b[i] = me == root ? bexp[i] : -1.0;
  }
  if (device) {
    Dev<double> d(b);
    c.broadcast(d.p, b.size(), root, DType::F64);
    b = d.host();
  } else {
    c.broadcast(b.data(), b.size(), root, DType::F64);
  }
  ck.ok(b == bexp, "broadcast f64 from last rank" + where);
}

void test_collectives(int rank, int size, RendezvousStore& store, Checker& ck) {
  forked::PrefixStore ps(store, "main/");
  NcclOptions o;
  o.rank = rank;
  o.size = size;
  o.timeout = milliseconds(30000);
  auto c = create_nccl_collectives(o, ps);
  ck.ok(c->rank() == rank && c->size() == size, "create_nccl_collectives");
  for (bool device : {true, false}) {
    test_all_to_all<int32_t>(*c, ck, DType::I32, device);
    test_all_to_all<float>(*c, ck, DType::F32, device);
    test_all_to_all<double>(*c, ck, DType::F64, device);
    test_all_to_all<uint8_t>(*c, ck, DType::U8, device);
    test_reductions<float>(*c, ck, DType::F32, device);
    test_reductions<double>(*c, ck, DType::F64, device);
    test_reductions<int32_t>(*c, ck, DType::I32, device);
    test_gather_broadcast(*c, ck, device);
  }
  std::vector<int64_t> sendc(size);
  for (int r = 0; r < size; r++) sendc[r] = rank * 10 + r;
  std::vector<int64_t> recvc = c->exchange_counts(sendc);
  bool counts_ok = true;
  for (int r = 0; r < size; r++) counts_ok &= recvc[r] == r * 10 + rank;
  ck.ok(counts_ok, "exchange_counts (host u8)");
  c->barrier();
  c->all_reduce_sum(static_cast<float*>(nullptr), 0);
  ck.ok(true, "barrier and empty all_reduce_sum");
  bool bad_arg = false;
  try {
    c->all_to_all_v(static_cast<const float*>(nullptr), std::vector<int64_t>(size + 1, 0), static_cast<float*>(nullptr),
                    std::vector<int64_t>(size, 0));
  } catch (const Error& e) {
    bad_arg = e.code() == ErrorCode::InvalidArgument && std::string(e.what()).find("send_counts") != std::string::npos;
  }
  ck.ok(bad_arg && !c->aborted(), "wrong count vector is an InvalidArgument naming it");

  // Timeout: rank 0 enters an all-reduce the others never join.
  forked::PrefixStore ts(store, "timeout/");
  o.timeout = milliseconds(2000);
  auto t = create_nccl_collectives(o, ts);
  if (rank == 0) {
    float v[4] = {1, 2, 3, 4};
    auto t0 = steady_clock::now();
    std::string msg;
    ErrorCode code = ErrorCode::Internal;
    try {
      t->all_reduce_sum(v, 4);
    } catch (const Error& e) {
      msg = e.what();
      code = e.code();
    }
    double s = duration<double>(steady_clock::now() - t0).count();
    ck.ok(code == ErrorCode::Timeout && msg.find("all_reduce_sum") != std::string::npos &&
              msg.find("rank 0 of") != std::string::npos && s >= 1.9 && s < 10,
          "a collective nobody joins times out naming op and rank (" + std::to_string(s) + " s)", msg);
    ck.ok(t->aborted(), "timed-out communicator is aborted");
    bool fast = false;
    auto t1 = steady_clock::now();
    try {
      t->barrier();
    } catch (const Error& e) {
      fast = e.code() == ErrorCode::Comm && duration<double>(steady_clock::now() - t1).count() < 0.5;
    }
    ck.ok(fast, "calls after the abort fail at once with COMM");
    ts.set("rank0-done", {1});
  } else {
    ts.get({"rank0-done"}, milliseconds(60000));
    t->abort("test: peer gave up");
  }

  // abort() from another thread interrupts a collective in flight (long timeout: must not wait it).
  forked::PrefixStore as(store, "abort/");
  o.timeout = milliseconds(60000);
  auto a = create_nccl_collectives(o, as);
  if (rank == 0) {
    std::string msg;
    ErrorCode code = ErrorCode::Internal;
    auto t0 = steady_clock::now();
    std::thread th([&] {
      try {
        a->barrier();
      } catch (const Error& e) {
        msg = e.what();
        code = e.code();
      }
    });
    std::this_thread::sleep_for(milliseconds(500));
    a->abort("stopped by the test");
    th.join();
    double s = duration<double>(steady_clock::now() - t0).count();
    ck.ok(code == ErrorCode::Comm && msg.find("stopped by the test") != std::string::npos && s < 5,
          "abort() from another thread interrupts a barrier in flight (" + std::to_string(s) + " s)", msg);
    as.set("rank0-done", {1});
  } else {
    as.get({"rank0-done"}, milliseconds(60000));
    a->abort("test: peer gave up");
  }
}

// ---- dispatch ----

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
float from_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Case {
  int64_t tokens, hidden;
  int k, experts, chunks;
  int empty_expert;  // an expert no token picks (-1: none)
};

struct Inputs {
  std::vector<uint16_t> x;
  std::vector<int32_t> topk;
  std::vector<float> w;
};

// Every rank can rebuild every rank's inputs from (case index, rank).
Inputs make_inputs(const Case& cs, int ci, int rank) {
  std::mt19937_64 g(0x5eed + 7919 * ci + 104729 * rank);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Inputs in;
  in.x.resize(cs.tokens * cs.hidden);
  for (auto& v : in.x) v = to_bf16(u(g));
  in.topk.resize(cs.tokens * cs.k);
  in.w.resize(cs.tokens * cs.k);
  std::uniform_int_distribution<int> pick(0, cs.experts - 1);
  for (int64_t t = 0; t < cs.tokens; t++) {
    for (int q = 0; q < cs.k; q++) {
      int e;
      bool dup;
      do {
        e = pick(g);
        dup = e == cs.empty_expert;
        for (int p = 0; p < q; p++) dup |= in.topk[t * cs.k + p] == e;
      } while (dup);
      in.topk[t * cs.k + q] = e;
      in.w[t * cs.k + q] = 0.1f + 0.9f * (u(g) + 1.0f) / 2.0f;
    }
  }
  return in;
}

float expert_scale(int e) { return 1.0f + 0.125f * (float)(e % 5); }

void test_dispatch(int rank, int size, RendezvousStore& store, Checker& ck) {
  forked::PrefixStore ps(store, "ep/");
  NcclOptions o;
  o.rank = rank;
  o.size = size;
  o.timeout = milliseconds(60000);
  auto c = create_nccl_collectives(o, ps);
  NcclHandles h = nccl_handles(*c);
  gpu::Stream compute;
  MP_GPU_CHECK(gpu::stream_create(&compute));
  const std::vector<Case> cases = {
      {1000, 256, 2, 4 * size, 1, -1}, {1000, 256, 2, 4 * size, 3, 1}, {777, 64, 4, 8 * size, 4, 0},
      {4096, 2048, 2, 16 * size, 2, -1}, {5, 128, 1, size, 2, -1},
  };
  for (gpu::Grouping grouping : {gpu::Grouping::Peer, gpu::Grouping::Kernel, gpu::Grouping::Direct}) {
  gpu::EpDispatcher ep(static_cast<gpu::CclComm>(h.comm), rank, size, compute, static_cast<gpu::Stream>(h.stream),
                       grouping);
  const char* label = grouping == gpu::Grouping::Kernel ? "kernel-grouped " : grouping == gpu::Grouping::Direct ? "direct-grouped " : "peer-grouped ";
  if (grouping == gpu::Grouping::Peer)
    ck.ok(ep.grouping() == gpu::Grouping::Peer, "peer grouping maps every rank's buffers (NVLink/IPC)", ep.fallback_reason());
  for (size_t ci = 0; ci < cases.size(); ci++) {
    const Case& cs = cases[ci];
    const std::string name = std::string(label) +
                             "dispatch+combine tokens=" + std::to_string(cs.tokens) + " hidden=" +
                             std::to_string(cs.hidden) + " k=" + std::to_string(cs.k) + " experts=" +
                             std::to_string(cs.experts) + " chunks=" + std::to_string(cs.chunks);
    std::vector<Inputs> all;
    for (int r = 0; r < size; r++) all.push_back(make_inputs(cs, (int)ci, r));
    const Inputs& mine = all[rank];
    Dev<uint16_t> dx(mine.x);
    Dev<int32_t> dk(mine.topk);
    Dev<float> dw(mine.w);
    ep.dispatch(dx.p, dk.p, cs.tokens, cs.k, cs.hidden, cs.experts, cs.chunks);
    MP_GPU_CHECK(gpu::stream_sync(compute));

    // Reference grouping: local expert le, rows by (source rank, token, k).
    const int epr = cs.experts / size;
    std::vector<uint16_t> ref;
    std::vector<int> ref_expert;  // global expert of each reference row
    std::vector<int64_t> ref_rows(epr, 0);
    for (int le = 0; le < epr; le++) {
      int e = rank * epr + le;
      for (int s = 0; s < size; s++)
        for (int64_t t = 0; t < cs.tokens; t++)
          for (int q = 0; q < cs.k; q++)
            if (all[s].topk[t * cs.k + q] == e) {
              ref.insert(ref.end(), all[s].x.begin() + t * cs.hidden, all[s].x.begin() + (t + 1) * cs.hidden);
              ref_expert.push_back(e);
              ref_rows[le]++;
            }
    }
    const int64_t rows = (int64_t)ref_expert.size();
    ck.ok(ep.received_rows() == rows && ep.expert_rows() == ref_rows, name + ": row counts per expert",
          std::to_string(ep.received_rows()) + " vs " + std::to_string(rows));
    if (ep.received_rows() != rows) continue;
    std::vector<uint16_t> grouped(rows * cs.hidden);
    if (rows) MP_GPU_CHECK(cudaMemcpy(grouped.data(), ep.grouped(), grouped.size() * 2, cudaMemcpyDeviceToHost));
    ck.ok(grouped == ref, name + ": grouped rows equal the CPU reference bit for bit");

    // Experts (on the host): row * scale(e), rounded to bf16; then combine on the GPU.
    std::vector<uint16_t> y(grouped.size());
    for (int64_t r = 0; r < rows; r++)
      for (int64_t j = 0; j < cs.hidden; j++)
        y[r * cs.hidden + j] = to_bf16(from_bf16(grouped[r * cs.hidden + j]) * expert_scale(ref_expert[r]));
    Dev<uint16_t> dy(y);
    Dev<uint16_t> dout(cs.tokens * cs.hidden);
    MP_GPU_CHECK(cudaMemset(dout.p, 0xff, dout.n * 2));  // NaN: every element must be written
    ep.combine(dy.p, dw.p, dout.p);
    MP_GPU_CHECK(gpu::stream_sync(compute));
    std::vector<uint16_t> out = dout.host();
    double max_rel = 0;
    int64_t bad = 0;
    for (int64_t t = 0; t < cs.tokens; t++) {
      for (int64_t j = 0; j < cs.hidden; j++) {
        float acc = 0;
        for (int q = 0; q < cs.k; q++) {
          int e = mine.topk[t * cs.k + q];
          float v = from_bf16(to_bf16(from_bf16(mine.x[t * cs.hidden + j]) * expert_scale(e)));
          acc = std::fma(mine.w[t * cs.k + q], v, acc);
        }
        float got = from_bf16(out[t * cs.hidden + j]);
        float ref_v = from_bf16(to_bf16(acc));
        double err = std::fabs((double)got - ref_v);
        double tol = std::fabs(ref_v) * std::ldexp(1.0, -7) + 1e-6;
        if (!(err <= tol)) bad++;  // NaN fails too
        if (ref_v != 0) max_rel = std::max(max_rel, err / std::fabs(ref_v));
      }
    }
    ck.ok(bad == 0, name + ": combined output within one bf16 ulp of the CPU reference (max rel " +
                        std::to_string(max_rel) + ")",
          std::to_string(bad) + " elements off");

    // Same inputs again: the same bits (no order-dependent sums anywhere).
    ep.dispatch(dx.p, dk.p, cs.tokens, cs.k, cs.hidden, cs.experts, cs.chunks);
    MP_GPU_CHECK(gpu::stream_sync(compute));
    std::vector<uint16_t> grouped2(rows * cs.hidden);
    if (rows) MP_GPU_CHECK(cudaMemcpy(grouped2.data(), ep.grouped(), grouped2.size() * 2, cudaMemcpyDeviceToHost));
    MP_GPU_CHECK(cudaMemset(dout.p, 0xff, dout.n * 2));
    ep.combine(dy.p, dw.p, dout.p);
    MP_GPU_CHECK(gpu::stream_sync(compute));
    ck.ok(grouped2 == grouped && dout.host() == out, name + ": a second run gives the same bits");
  }
  }
  {
    // An expert id out of range on one rank is an InvalidArgument on every rank (naming that rank),
    // and nobody is left waiting in the exchange (default grouping: Peer).
    gpu::EpDispatcher ep(static_cast<gpu::CclComm>(h.comm), rank, size, compute, static_cast<gpu::Stream>(h.stream));
    Case cs{64, 64, 2, 2 * size, 1, -1};
    Inputs in = make_inputs(cs, 99, rank);
    if (rank == 0) in.topk[5] = 2 * size + 3;
    Dev<uint16_t> dx(in.x);
    Dev<int32_t> dk(in.topk);
    std::string msg;
    try {
      ep.dispatch(dx.p, dk.p, cs.tokens, cs.k, cs.hidden, cs.experts, cs.chunks);
    } catch (const Error& e) {
      msg = e.what();
    }
    MP_GPU_CHECK(gpu::stream_sync(compute));
    ck.ok(msg.find("outside [0,") != std::string::npos && msg.find("on rank 0") != std::string::npos,
          "dispatch rejects an expert id out of range on every rank, naming the rank", msg);
  }
  {
    // Peer grouping: a rank that never delivers its rows (here: every rank but 0 skips the combine)
    // makes rank 0's device-side wait give up after the peer timeout instead of hanging the GPU, and
    // check() then names a silent rank.
    forked::PrefixStore ds(store, "silent/");
    gpu::EpDispatcher ep(static_cast<gpu::CclComm>(h.comm), rank, size, compute, static_cast<gpu::Stream>(h.stream));
    if (ep.grouping() == gpu::Grouping::Peer) {
      ep.set_peer_timeout(milliseconds(1000));
      Case cs{256, 64, 2, 2 * size, 1, -1};
      Inputs in = make_inputs(cs, 98, rank);
      Dev<uint16_t> dx(in.x);
      Dev<int32_t> dk(in.topk);
      Dev<float> dw(in.w);
      Dev<uint16_t> dout(cs.tokens * cs.hidden);
      ep.dispatch(dx.p, dk.p, cs.tokens, cs.k, cs.hidden, cs.experts, cs.chunks);
      MP_GPU_CHECK(gpu::stream_sync(compute));
      if (rank == 0) {
        auto t0 = steady_clock::now();
        ep.combine(ep.grouped(), dw.p, dout.p);
        MP_GPU_CHECK(gpu::stream_sync(compute));
        double s = duration<double>(steady_clock::now() - t0).count();
        std::string msg;
        ErrorCode code = ErrorCode::Internal;
        try {
          ep.check();
        } catch (const Error& e) {
          msg = e.what();
          code = e.code();
        }
        ck.ok(code == ErrorCode::Timeout && msg.find("did not deliver") != std::string::npos &&
                  msg.find("rank 0 did not") == std::string::npos && s >= 0.9 && s < 10,
              "peer grouping: a silent rank ends rank 0's wait after the timeout, and check() names it (" +
                  std::to_string(s) + " s)",
              msg);
        bool cleared = true;
        try {
          ep.check();
        } catch (const Error&) {
          cleared = false;
        }
        ck.ok(cleared, "peer grouping: check() reports a timeout once");
        ds.set("rank0-done", {1});
      } else {
        ds.get({"rank0-done"}, milliseconds(60000));
      }
    }
  }
  MP_GPU_CHECK(gpu::stream_destroy(compute));
}

}  // namespace

int main(int argc, char** argv) {
  int ranks = 0;
  for (int i = 1; i < argc; i++) {
    if (std::string(argv[i]) == "--ranks" && i + 1 < argc) ranks = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--ranks N]\n", argv[0]);
      return 2;
    }
  }
  if (ranks == 0) {
    // Count devices in a child: the parent must not create a CUDA context before forking.
    auto r = forked::run_ranks(1, seconds(60), [](int, RendezvousStore&, std::string& rep) {
      int n = 0;
      MP_GPU_CHECK(gpu::device_count(&n));
      rep = std::to_string(n);
      return 0;
    });
    ranks = std::atoi(r[0].report.c_str());
  }
  if (ranks < 2) {
    std::fprintf(stderr, "gpu_comm_test needs at least 2 GPUs (found %d)\n", ranks);
    return 2;
  }
  std::printf("gpu_comm_test: %d ranks\n", ranks);
  auto results = forked::run_ranks(ranks, seconds(540), [ranks](int rank, RendezvousStore& store, std::string& rep) {
    Checker ck{rank};
    test_collectives(rank, ranks, store, ck);
    test_dispatch(rank, ranks, store, ck);
    rep = std::to_string(ck.failures);
    return ck.failures == 0 ? 0 : 1;
  });
  int bad = 0;
  for (size_t r = 0; r < results.size(); r++) {
    if (results[r].status != 0) {
      std::fprintf(stderr, "rank %zu exited with %d\n", r, results[r].status);
      bad++;
    }
  }
  std::printf(bad ? "gpu_comm_test: FAILED\n" : "gpu_comm_test: all passed\n");
  return bad ? 1 : 0;
}
