// Benchmark: expert-parallel dispatch + combine of bf16 token rows over NCCL (kernels/cuda/ep_dispatch.h)
// against a raw NCCL all-to-all (grouped ncclSend/ncclRecv) of the same bytes, one process per GPU.
// Built by kernels/CMakeLists.txt when NCCL is found; run through bench/ep-dispatch-gpu.sh.
//
// Per size: uniform random top-k routing over `experts` experts, random bf16 rows. Each iteration:
// a barrier, then the raw exchange there and back (timed with events on the communication stream),
// a barrier, then dispatch + combine (events on the compute stream; routing, count exchange, the host
// wait for counts, permutes and both exchanges included; experts are the identity). Median over
// iterations per rank; reported: the slowest rank's median. Bytes: rows sent per rank (self included)
// * hidden * 2, each way. algbw = bytes / time; busbw = algbw * (n-1)/n (all-to-all).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>

#include "comm/nccl.h"
#include "cuda/ep_dispatch.h"
#include "cuda/fork_ranks.h"

using namespace moepilot;

namespace {

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoll(item));
  return out;
}

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if ((unsigned char)c >= 0x20) o += c;
  }
  return o + "\"";
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

struct Args {
  int ranks = 2;
  std::vector<int64_t> tokens{4096, 16384, 65536};
  std::vector<int64_t> topk{2};
  std::vector<int64_t> chunks{1, 2, 4};
  std::vector<std::string> groupings{"peer", "kernel"};
  int64_t hidden = 2048;
  int experts = 64;
  int iters = 20, warmup = 5;
  bool nonblocking = false;
  bool trace = false;
  std::string card, command, out;
};

// One rank: for every (grouping, topk, tokens, chunks) one line "grouping(0 kernel, 1 direct) topk
// tokens chunks fwd_bytes back_bytes raw_fwd_ms raw_both_ms disp_ms comb_ms total_ms".
int run_rank(const Args& a, int rank, RendezvousStore& store, std::string& report) {
  NcclOptions o;
  o.rank = rank;
  o.size = a.ranks;
  o.timeout = std::chrono::milliseconds(120000);
  o.nonblocking = a.nonblocking;
  auto coll = create_nccl_collectives(o, store);
  NcclHandles h = nccl_handles(*coll);
  gpu::Stream compute, comm = static_cast<gpu::Stream>(h.stream);
  MP_GPU_CHECK(gpu::stream_create(&compute));
  gpu::Event e0, e1, e2;
  MP_GPU_CHECK(gpu::event_create(&e0));
  MP_GPU_CHECK(gpu::event_create(&e1));
  MP_GPU_CHECK(gpu::event_create(&e2));
  std::ostringstream rep;
  for (const std::string& grouping : a.groupings) {
  const bool direct = grouping == "direct", peer = grouping == "peer";
  MP_CHECK_ARG(direct || peer || grouping == "kernel", "--grouping takes peer, direct and/or kernel");
  gpu::EpDispatcher ep(static_cast<gpu::CclComm>(h.comm), rank, a.ranks, compute, comm,
                       direct ? gpu::Grouping::Direct : peer ? gpu::Grouping::Peer : gpu::Grouping::Kernel);
  MP_CHECK_INTERNAL(!peer || ep.grouping() == gpu::Grouping::Peer, "peer grouping fell back: " + ep.fallback_reason());
  const int gcode = direct ? 1 : peer ? 2 : 0;
  for (int64_t k : a.topk) {
    for (int64_t T : a.tokens) {
      std::mt19937_64 g(1234 + 77 * rank + T + k);
      std::vector<uint16_t> x(T * a.hidden);
      std::uniform_real_distribution<float> u(-1, 1);
      for (auto& v : x) {
        float f = u(g);
        uint32_t b;
        std::memcpy(&b, &f, 4);
        v = (uint16_t)(b >> 16);
      }
      std::vector<int32_t> ids(T * k);
      std::vector<float> w(T * k, 1.0f / (float)k);
      std::uniform_int_distribution<int> pick(0, a.experts - 1);
      for (int64_t t = 0; t < T; t++)
        for (int64_t q = 0; q < k; q++) {
          int e;
          bool dup;
          do {
            e = pick(g);
            dup = false;
            for (int64_t p = 0; p < q; p++) dup |= ids[t * k + p] == e;
          } while (dup);
          ids[t * k + q] = e;
        }
      void *dx, *dids, *dw, *dout;
      MP_GPU_CHECK(gpu::malloc_device(&dx, x.size() * 2));
      MP_GPU_CHECK(gpu::malloc_device(&dids, ids.size() * 4));
      MP_GPU_CHECK(gpu::malloc_device(&dw, w.size() * 4));
      MP_GPU_CHECK(gpu::malloc_device(&dout, x.size() * 2));
      MP_GPU_CHECK(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
      MP_GPU_CHECK(cudaMemcpy(dids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
      MP_GPU_CHECK(cudaMemcpy(dw, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
      for (int64_t C : a.chunks) {
        if (peer && C != a.chunks[0]) continue;  // peer grouping has no chunks: one line per size
        std::vector<double> raw1, raw2, disp, comb, total;
        for (int it = 0; it < a.warmup + a.iters; it++) {
          coll->barrier();
          MP_GPU_CHECK(gpu::event_record(e0, comm));
          // The first iteration's dispatch sizes the raw exchange; raw needs a dispatch before it.
          if (it > 0) {
            ep.raw_exchange(false);
            MP_GPU_CHECK(gpu::event_record(e1, comm));
            ep.raw_exchange(true);
          } else {
            MP_GPU_CHECK(gpu::event_record(e1, comm));
          }
          MP_GPU_CHECK(gpu::event_record(e2, comm));
          MP_GPU_CHECK(gpu::event_sync(e2));
          float r1 = 0, r2 = 0;
          MP_GPU_CHECK(gpu::event_elapsed_ms(&r1, e0, e1));
          MP_GPU_CHECK(gpu::event_elapsed_ms(&r2, e0, e2));
          coll->barrier();
          MP_GPU_CHECK(gpu::event_record(e0, compute));
          ep.dispatch(static_cast<const uint16_t*>(dx), static_cast<const int32_t*>(dids), T, (int)k, a.hidden,
                      a.experts, (int)C);
          MP_GPU_CHECK(gpu::event_record(e1, compute));
          ep.combine(ep.grouped(), static_cast<const float*>(dw), static_cast<uint16_t*>(dout));
          MP_GPU_CHECK(gpu::event_record(e2, compute));
          MP_GPU_CHECK(gpu::event_sync(e2));
          float d = 0, t = 0;
          MP_GPU_CHECK(gpu::event_elapsed_ms(&d, e0, e1));
          MP_GPU_CHECK(gpu::event_elapsed_ms(&t, e0, e2));
          if (it >= a.warmup) {
            raw1.push_back(r1);
            raw2.push_back(r2);
            disp.push_back(d);
            comb.push_back(t - d);
            total.push_back(t);
          }
        }
        if (rank == 0 && a.trace) {
          // One more traced iteration: where the time goes, phase by phase (rank 0's view).
          coll->barrier();
          ep.set_trace(true);
          ep.dispatch(static_cast<const uint16_t*>(dx), static_cast<const int32_t*>(dids), T, (int)k, a.hidden,
                      a.experts, (int)C);
          ep.combine(ep.grouped(), static_cast<const float*>(dw), static_cast<uint16_t*>(dout));
          std::fprintf(stderr, "trace %s k=%lld tokens=%lld chunks=%lld:", grouping.c_str(), (long long)k,
                       (long long)T, (long long)C);
          for (auto& [phase, ms] : ep.trace()) std::fprintf(stderr, " [%s %.3f]", phase.c_str(), ms);
          std::fprintf(stderr, "\n");
          ep.set_trace(false);
        } else if (a.trace) {
          coll->barrier();
          ep.dispatch(static_cast<const uint16_t*>(dx), static_cast<const int32_t*>(dids), T, (int)k, a.hidden,
                      a.experts, (int)C);
          ep.combine(ep.grouped(), static_cast<const float*>(dw), static_cast<uint16_t*>(dout));
          MP_GPU_CHECK(gpu::stream_sync(compute));
        }
        int64_t fwd = 0, back = 0;
        for (int r = 0; r < a.ranks; r++) {
          fwd += ep.send_rows()[r];
          back += ep.recv_rows()[r];
        }
        char line[512];
        std::snprintf(line, sizeof(line), "%d %lld %lld %lld %lld %lld %.5f %.5f %.5f %.5f %.5f\n", gcode,
                      (long long)k,
                      (long long)T, (long long)C, (long long)(fwd * a.hidden * 2), (long long)(back * a.hidden * 2),
                      median(raw1), median(raw2), median(disp), median(comb), median(total));
        rep << line;
        if (rank == 0) std::fprintf(stderr, "rank 0: %s", line);
      }
      for (void* p : {dx, dids, dw, dout}) gpu::free_device(p);
    }
  }
  }
  report = rep.str();
  MP_GPU_CHECK(gpu::stream_destroy(compute));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; i++) {
    std::string f = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(f + " needs a value");
      return argv[++i];
    };
    if (f == "--ranks") a.ranks = std::stoi(next());
    else if (f == "--tokens") a.tokens = parse_list(next());
    else if (f == "--topk") a.topk = parse_list(next());
    else if (f == "--chunks") a.chunks = parse_list(next());
    else if (f == "--grouping") {
      a.groupings.clear();
      std::stringstream ss(next());
      for (std::string g; std::getline(ss, g, ',');) a.groupings.push_back(g);
    }
    else if (f == "--hidden") a.hidden = std::stoll(next());
    else if (f == "--experts") a.experts = std::stoi(next());
    else if (f == "--iters") a.iters = std::stoi(next());
    else if (f == "--warmup") a.warmup = std::stoi(next());
    else if (f == "--nonblocking") a.nonblocking = true;
    else if (f == "--trace") a.trace = true;
    else if (f == "--card") a.card = next();
    else if (f == "--command") a.command = next();
    else if (f == "--out") a.out = next();
    else {
      std::fprintf(stderr, "unknown flag %s\n", f.c_str());
      return 2;
    }
  }
  if (a.warmup < 1 || a.iters < 1) {
    std::fprintf(stderr, "--warmup and --iters must be >= 1\n");
    return 2;
  }
  auto results = forked::run_ranks(a.ranks, std::chrono::seconds(590), [&](int r, RendezvousStore& s, std::string& rep) {
    return run_rank(a, r, s, rep);
  });
  for (size_t r = 0; r < results.size(); r++)
    if (results[r].status != 0) {
      std::fprintf(stderr, "rank %zu failed (%d)\n", r, results[r].status);
      return 1;
    }
  // Slowest rank per line (the lines are in the same order on every rank).
  std::vector<std::vector<std::vector<double>>> rows(a.ranks);
  for (int r = 0; r < a.ranks; r++) {
    std::istringstream in(results[r].report);
    for (std::string line; std::getline(in, line);) {
      std::istringstream ls(line);
      std::vector<double> v;
      for (double x; ls >> x;) v.push_back(x);
      rows[r].push_back(v);
    }
  }
  const double n = a.ranks;
  const double bus = (n - 1) / n;
  std::ostringstream js;
  js << "{\n  \"benchmark\": \"ep-dispatch-gpu\",\n  \"card\": " << json_string(a.card) << ",\n  \"gpus\": " << a.ranks
     << ",\n  \"command\": " << json_string(a.command) << ",\n  \"hidden\": " << a.hidden << ",\n  \"experts\": " << a.experts
     << ",\n  \"dtype\": \"bf16\",\n  \"iterations\": " << a.iters << ",\n  \"warmup\": " << a.warmup
     << ",\n  \"nccl_nonblocking\": " << (a.nonblocking ? "true" : "false")
     << ",\n  \"method\": \"per rank: median over iterations of CUDA-event time; reported: the slowest rank. raw = one "
        "grouped ncclSend/ncclRecv all-to-all with the dispatch's per-rank byte counts, there and back. dispatch+combine "
        "= routing counts, count exchange (host waits for counts; the permute runs meanwhile), permute, all-to-all, group by "
        "expert (grouping kernel: a copy kernel; direct: one ncclRecv per (rank, expert) into the grouped layout), "
        "un-group likewise, all-to-all back, weighted combine (identity experts). grouping peer: count all-gather, positions, "
        "one kernel storing each token's row into its experts' grouped buffers on the other GPUs (CUDA IPC over NVLink), "
        "a device-side wait for every rank's signal; combine: one kernel storing expert rows back into the sources' buffers, "
        "a wait, the weighted sum; no NCCL in the data path, chunks do not apply. bytes = per-rank rows sent (self included) * hidden * 2. "
        "algbw = bytes/time, busbw = algbw*(n-1)/n; fraction_of_raw = raw_both_ms / total_ms\",\n  \"results\": [\n";
  std::printf("%-7s %-5s %-7s %-6s %10s %10s %10s %10s %10s %9s %9s %7s\n", "group", "topk", "tokens", "chunks", "raw_ms", "ep_ms",
              "disp_ms", "comb_ms", "raw_busbw", "ep_busbw", "ep_algbw", "of_raw");
  for (size_t i = 0; i < rows[0].size(); i++) {
    std::vector<double> worst = rows[0][i];
    double bytes = 0;
    for (int r = 0; r < a.ranks; r++) {
      for (size_t j = 6; j < worst.size(); j++) worst[j] = std::max(worst[j], rows[r][i][j]);
      bytes += rows[r][i][4] + rows[r][i][5];
    }
    bytes /= a.ranks;  // mean per rank, both trips
    const double raw_both = worst[7], total = worst[10];
    const char* grouping = worst[0] > 1.5 ? "peer" : worst[0] > 0.5 ? "direct" : "kernel";
    const double raw_alg = bytes / (raw_both * 1e-3) / 1e9, ep_alg = bytes / (total * 1e-3) / 1e9;
    char line[1024];
    std::snprintf(line, sizeof(line),
                  "    {\"grouping\": \"%s\", \"topk\": %d, \"tokens_per_rank\": %d, \"chunks\": %d, \"bytes_per_rank_each_way\": %.0f, "
                  "\"raw_one_way_ms\": %.4f, \"raw_both_ms\": %.4f, \"dispatch_ms\": %.4f, \"combine_ms\": %.4f, "
                  "\"dispatch_combine_ms\": %.4f, \"raw_algbw_GBps\": %.1f, \"raw_busbw_GBps\": %.1f, "
                  "\"ep_algbw_GBps\": %.1f, \"ep_busbw_GBps\": %.1f, \"fraction_of_raw\": %.3f}%s\n",
                  grouping, (int)worst[1], (int)worst[2], (int)worst[3], bytes / 2, worst[6], raw_both, worst[8], worst[9], total,
                  raw_alg, raw_alg * bus, ep_alg, ep_alg * bus, raw_both / total, i + 1 < rows[0].size() ? "," : "");
    js << line;
    std::printf("%-7s %-5d %-7d %-6d %10.4f %10.4f %10.4f %10.4f %10.1f %9.1f %9.1f %7.3f\n", grouping, (int)worst[1],
                (int)worst[2], (int)worst[3], raw_both, total, worst[8], worst[9], raw_alg * bus, ep_alg * bus, ep_alg,
                raw_both / total);
  }
  js << "  ]\n}\n";
  if (!a.out.empty()) {
    FILE* f = std::fopen(a.out.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", a.out.c_str());
      return 1;
    }
    std::fputs(js.str().c_str(), f);
    std::fclose(f);
  }
  return 0;
}
