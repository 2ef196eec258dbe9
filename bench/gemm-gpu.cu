// Benchmark of the GPU GEMMs (kernels/cuda/gemm.h) at the Qwen1.5-MoE-A2.7B shapes for 4 x 512 tokens
// (2048 rows; experts: 8192 assignments over 60 experts, uniform and skewed) and the LM head. Prints one line per
// case and writes JSON (--out). "forward" rows of >= 1024 rows time gemm_forward's default, cuBLASLt where the
// device passed its bit check; "forward_own_kernel" rows the own kernel at the same shapes. floor_dW_* rows: dW's fp32 bytes moved by a plain copy / memset, the memory floor
// of the grouped dW (their "tflops": what the dW would reach at that floor). Driven by bench/gemm-gpu.sh, which also
// runs the PyTorch baselines (bench/gemm-torch.py) on the same card and merges both files.
//
// Usage: gemm_gpu --out FILE [--tiles] [--only-tiles 5,40,...] [--grouped] [--no-wgmma]   (--grouped: the training
// shapes' grouped GEMMs alone; --tiles: also time every forced tile configuration, or only those listed;
// --no-wgmma: mma.sync kernels only)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/gemm.h"
#include "cuda/gemm_bench.cuh"

using namespace moepilot;
using namespace moepilot::gpu;

namespace {

struct Result {
  std::string op, name, dist;
  int64_t M;
  int N, K, G, tile;
  double ms, tflops;
};
std::vector<Result> g_results;

template <class T>
T* dev_alloc(size_t n) {
  void* p = nullptr;
  MP_GPU_CHECK(malloc_device(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return (T*)p;
}

__global__ void fill_bf16(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    const float f = ((h & 0xffff) / 65536.f - 0.5f) * 0.2f;
    uint32_t u;
    memcpy(&u, &f, 4);
    p[i] = (uint16_t)(u >> 16);
  }
}

// Mean milliseconds of f over enough runs for ~40 ms of work, after a warm-up.
double time_ms(const std::function<void()>& f) {
  Event a, b;
  MP_GPU_CHECK(event_create(&a));
  MP_GPU_CHECK(event_create(&b));
  f();
  MP_GPU_CHECK(cudaDeviceSynchronize());
  MP_GPU_CHECK(event_record(a, nullptr));
  f();
  MP_GPU_CHECK(event_record(b, nullptr));
  MP_GPU_CHECK(event_sync(b));
  float one = 0;
  MP_GPU_CHECK(event_elapsed_ms(&one, a, b));
  const int iters = std::max(3, std::min(200, (int)(40.0 / std::max(one, 1e-3f))));
  MP_GPU_CHECK(event_record(a, nullptr));
  for (int i = 0; i < iters; i++) f();
  MP_GPU_CHECK(event_record(b, nullptr));
  MP_GPU_CHECK(event_sync(b));
  float ms = 0;
  MP_GPU_CHECK(event_elapsed_ms(&ms, a, b));
  event_destroy(a);
  event_destroy(b);
  return ms / iters;
}

void record(const std::string& op, const std::string& name, const std::string& dist, int64_t M, int N, int K, int G,
            int tile, double flops, double ms) {
  Result r{op, name, dist, M, N, K, G, tile, ms, flops / (ms * 1e-3) / 1e12};
  std::printf("%-22s %-16s %-7s M=%-6lld N=%-6d K=%-5d tile=%d %8.3f ms %7.1f TFLOP/s\n", op.c_str(), name.c_str(),
              dist.c_str(), (long long)M, N, K, tile, ms, r.tflops);
  g_results.push_back(r);
}

std::vector<int32_t> group_sizes(int rows, int G, bool skewed) {
  std::vector<int32_t> s(G, 0);
  if (!skewed) {
    for (int g = 0; g < G; g++) s[g] = rows / G + (g < rows % G ? 1 : 0);
    return s;
  }
  // Zipf-like: weight 1/(g+1); the remainder of the floors goes to group 0. Same formula in gemm-torch.py.
  double total = 0;
  for (int g = 0; g < G; g++) total += 1.0 / (g + 1);
  int used = 0;
  for (int g = 0; g < G; g++) {
    s[g] = (int32_t)std::floor(rows * (1.0 / (g + 1)) / total);
    used += s[g];
  }
  s[0] += rows - used;
  return s;
}

}  // namespace

// The forced tiles to time among those a case lists (the automatic choice, 0, always): all, or those --only-tiles lists.
std::vector<int> g_only_tiles;
std::vector<int> pick(std::vector<int> ts) {
  if (g_only_tiles.empty()) return ts;
  std::vector<int> out;
  for (int t : ts)
    if (t == 0 || std::find(g_only_tiles.begin(), g_only_tiles.end(), t) != g_only_tiles.end()) out.push_back(t);
  return out;
}

int main(int argc, char** argv) {
  std::string out_path;
  bool tiles = false, grouped_only = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    if (a == "--tiles") tiles = true;
    if (a == "--only-tiles" && i + 1 < argc) {
      tiles = true;
      std::stringstream list(argv[++i]);
      for (std::string t; std::getline(list, t, ',');) g_only_tiles.push_back(std::stoi(t));
    }
    if (a == "--grouped") grouped_only = true;
    if (a == "--no-wgmma") gemm_set_wgmma_enabled(false);
  }
  try {
    cudaDeviceProp prop{};
    MP_GPU_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs, wgmma forward: %s\n", prop.name, prop.multiProcessorCount,
                gemm_wgmma_available() ? "yes" : "no");

    const int H = 2048, V = 151936, E = 60, EI = 1408, SI = 5632, T = 2048, R = 8192;
    // Buffers big enough for every case (the LM head dominates).
    const size_t maxA = (size_t)8192 * 8192, maxW = (size_t)V * H, maxC = (size_t)T * V;
    uint16_t* A = dev_alloc<uint16_t>(maxA);
    uint16_t* W = dev_alloc<uint16_t>(std::max(maxW, (size_t)E * 2 * EI * H));
    uint16_t* D = dev_alloc<uint16_t>(maxC);  // dOut
    float* C = dev_alloc<float>(std::max(maxC, (size_t)8192 * 8192));
    float* C2 = dev_alloc<float>(std::max((size_t)E * 2 * EI * H, (size_t)V * H));
    fill_bf16<<<1024, 256>>>(A, maxA, 1);
    fill_bf16<<<1024, 256>>>(W, std::max(maxW, (size_t)E * 2 * EI * H), 2);
    fill_bf16<<<1024, 256>>>(D, maxC, 3);
    MP_GPU_CHECK(cudaDeviceSynchronize());

    struct Dense {
      const char* name;
      int64_t M;
      int N, K;
    };
    const Dense dense[] = {
        {"attn_qkv", T, 3 * H, H},       {"attn_o", T, H, H},         {"shared_gate_up", T, 2 * SI, H},
        {"shared_down", T, H, SI},       {"lm_head", T, V, H},        {"square4096", 4096, 4096, 4096},
        {"square8192", 8192, 8192, 8192}, {"decode_lm_head", 64, V, H}, {"decode_qkv", 64, 3 * H, H},
        // A decode step of 1024 sequences (64 prompts x 16 samples): the rollout's q / k / v (one product each, on
        // side streams), o, the shared expert's gate / up / down and the LM head.
        {"decode1024_q", 1024, H, H},     {"decode1024_o", 1024, H, H}, {"decode1024_shared_gate", 1024, SI, H},
        {"decode1024_shared_down", 1024, H, SI}, {"decode1024_lm_head", 1024, V, H},
        // ... and its router (60 experts, padded to 64 columns) and shared-expert gate (one logit, padded to 8).
        {"decode1024_router", 1024, 64, H}, {"decode1024_shared_gate_logit", 1024, 8, H},
    };
    for (const auto& d : dense) {
      if (grouped_only) break;
      const double flops = 2.0 * d.M * d.N * d.K;
      std::vector<int> ts = {0};
      if (tiles)
        ts = d.M <= 64     ? std::vector<int>{0, 6}
             : d.N <= 64   ? std::vector<int>{0, 11, 31}
             : d.M <= 1024 ? std::vector<int>{0, 5, 7, 11, 30}
                           : std::vector<int>{0, 7};
      for (int t : pick(ts)) {
        gemm_set_tile_override(t);
        record("forward", d.name, "", d.M, d.N, d.K, 1, t, flops,
               time_ms([&] { gemm_forward(C, A, W, nullptr, d.M, d.N, d.K, false, nullptr); }));
      }
      gemm_set_tile_override(0);
      // Calls of >= 1024 rows take cuBLASLt where the device passed its bit check (gemm_forward's default above):
      // the own kernel's automatic tile beside it, for the comparison.
      if (gemm_lt_forward_ready(nullptr) && d.M >= 1024) {
        gemm_set_lt_forward_enabled(false);
        record("forward_own_kernel", d.name, "", d.M, d.N, d.K, 1, 0, flops,
               time_ms([&] { gemm_forward(C, A, W, nullptr, d.M, d.N, d.K, false, nullptr); }));
        gemm_set_lt_forward_enabled(true);
      }
    }
#ifdef MOEPILOT_WITH_CUBLASLT
    for (const auto& d : dense) {
      if (grouped_only || d.M < 2048 || d.M > 4096) continue;
      const double flops = 2.0 * d.M * d.N * d.K;
      record("backward_dA_cublaslt", d.name, "", d.M, d.N, d.K, 1, 0, flops,
             time_ms([&] { gemm_backward(C, nullptr, nullptr, D, A, W, d.M, d.N, d.K, false, nullptr); }));
      record("backward_dW_cublaslt", d.name, "", d.M, d.N, d.K, 1, 0, flops,
             time_ms([&] { gemm_backward(nullptr, C2, nullptr, D, A, W, d.M, d.N, d.K, false, nullptr); }));
    }
#endif
    // Routed experts: gate+up fused ([2*EI, H] per expert) and down ([H, EI]).
    int32_t* offsets = dev_alloc<int32_t>(E + 1);
    struct Grouped {
      const char* name;
      int N, K;
    };
    const Grouped grouped[] = {{"expert_gate_up", 2 * EI, H}, {"expert_gate", EI, H}, {"expert_down", H, EI}};
    for (bool skewed : {false, true}) {
      auto sizes = group_sizes(R, E, skewed);
      std::vector<int32_t> off(E + 1, 0);
      for (int g = 0; g < E; g++) off[g + 1] = off[g] + sizes[g];
      MP_GPU_CHECK(cudaMemcpy(offsets, off.data(), off.size() * 4, cudaMemcpyHostToDevice));
      const char* dist = skewed ? "skewed" : "uniform";
      std::printf("%s group sizes: max %d min %d\n", dist, *std::max_element(sizes.begin(), sizes.end()),
                  *std::min_element(sizes.begin(), sizes.end()));
      for (const auto& g : grouped) {
        const double flops = 2.0 * R * g.N * g.K;
        std::vector<int> ts = {0}, ta = {0}, tw = {0};
        if (tiles) ts = {0, 5, 25, 40}, ta = {0, 4, 12, 13, 25, 26, 41}, tw = {0, 3, 16, 17, 18, 20, 22, 23, 27, 28, 29};
        for (int t : pick(ts)) {
          gemm_set_tile_override(t);
          record("grouped_forward", g.name, dist, R, g.N, g.K, E, t, flops,
                 time_ms([&] { grouped_gemm_forward(C, A, W, offsets, E, R, g.N, g.K, nullptr); }));
        }
        for (int t : pick(ta)) {
          gemm_set_tile_override(t);
          record("grouped_backward_dA", g.name, dist, R, g.N, g.K, E, t, flops,
                 time_ms([&] { grouped_gemm_backward(C, nullptr, D, A, W, offsets, E, R, g.N, g.K, nullptr); }));
        }
        for (int t : pick(tw)) {
          gemm_set_tile_override(t);
          record("grouped_backward_dW", g.name, dist, R, g.N, g.K, E, t, flops,
                 time_ms([&] { grouped_gemm_backward(nullptr, C2, D, A, W, offsets, E, R, g.N, g.K, nullptr); }));
        }
        // Overwrite mode (accumulate_dW false: dW only written).
        for (int t : pick(tiles ? std::vector<int>{0, 18, 22, 23, 28} : std::vector<int>{0})) {
          gemm_set_tile_override(t);
          record("grouped_backward_dW_overwrite", g.name, dist, R, g.N, g.K, E, t, flops, time_ms([&] {
                   grouped_gemm_backward(nullptr, C2, D, A, W, offsets, E, R, g.N, g.K, false, nullptr);
                 }));
        }
        gemm_set_tile_override(0);
        // bf16 gradients (GpuModel's expert_grads_bf16), overwritten: half the bytes (automatic tile; C2 holds them).
        record("grouped_backward_dW_overwrite_bf16", g.name, dist, R, g.N, g.K, E, 0, flops, time_ms([&] {
                 grouped_gemm_backward(nullptr, reinterpret_cast<bf16_bits*>(C2), D, A, W, offsets, E, R, g.N, g.K,
                                       false, nullptr);
               }));
        // The backward of both (grouped_gemm_backward_pair, dGU [R, 2 EI]): the one input gradient, and both
        // weight gradients overwritten (against expert_gate's dA and dW twice).
        if (g.N == 2 * EI) {
          record("grouped_backward_dA_pair", "expert_gate_up", dist, R, g.N, g.K, E, 0, flops, time_ms([&] {
                   grouped_gemm_backward_pair(C, (float*)nullptr, (float*)nullptr, D, A, W, W + (size_t)E * EI * H,
                                              offsets, E, R, EI, H, false, nullptr);
                 }));
          record("grouped_backward_dW_overwrite_pair", "expert_gate_up", dist, R, g.N, g.K, E, 0, flops, time_ms([&] {
                   grouped_gemm_backward_pair(nullptr, C2, C2 + (size_t)E * EI * H, D, A, W, W + (size_t)E * EI * H,
                                              offsets, E, R, EI, H, false, nullptr);
                 }));
        }
        // The training forward's gate and up products: SwiGLU in the epilogue, and the fp32 products kept.
        if (g.N == 2 * EI && gemm_swiglu_available()) {
          for (int t : pick(tiles ? std::vector<int>{0, 5, 7, 40} : std::vector<int>{0})) {
            gemm_set_tile_override(t);
            record("grouped_forward", "expert_gate_up_swiglu_keep", dist, R, g.N, g.K, E, t, flops, time_ms([&] {
                     grouped_gemm_swiglu_forward(D, A, W, W + (size_t)E * EI * H, offsets, E, R, EI, H, nullptr, C,
                                                 C2);
                   }));
          }
          gemm_set_tile_override(0);
        }
        if (!skewed) {
          // The memory floor of dW: its fp32 bytes read and written once (a device-to-device copy of G*N*K floats
          // moves the same bytes as dW's read-modify-write), and written once (memset: the overwrite floor).
          // (C holds 2048 x 151936 floats, less than the gate_up dW: the copy covers what fits and is scaled.)
          const size_t bytes = (size_t)E * g.N * g.K * sizeof(float), nb = std::min(bytes, maxC * sizeof(float));
          const double copy_ms = time_ms([&] { MP_GPU_CHECK(cudaMemcpyAsync(C2, C, nb, cudaMemcpyDeviceToDevice, nullptr)); }) *
                                 ((double)bytes / nb);
          const double set_ms = time_ms([&] { MP_GPU_CHECK(cudaMemsetAsync(C2, 0, bytes, nullptr)); });
          std::printf("floor %-16s dW %.0f MB: copy (read+write) %.3f ms = %.0f GB/s, memset (write) %.3f ms = %.0f GB/s\n",
                      g.name, bytes / 1e6, copy_ms, 2 * bytes / copy_ms / 1e6, set_ms, bytes / set_ms / 1e6);
          record("floor_dW_copy", g.name, dist, R, g.N, g.K, E, 0, flops, copy_ms);
          record("floor_dW_memset", g.name, dist, R, g.N, g.K, E, 0, flops, set_ms);
        }
      }
    }
    // The routed experts of a decode step of 1024 sequences: 4096 assignments, ~68 rows per expert (uniform).
    if (!grouped_only) {
      const int Rd = 4096;
      auto sizes = group_sizes(Rd, E, false);
      std::vector<int32_t> off(E + 1, 0);
      for (int g = 0; g < E; g++) off[g + 1] = off[g] + sizes[g];
      MP_GPU_CHECK(cudaMemcpy(offsets, off.data(), off.size() * 4, cudaMemcpyHostToDevice));
      for (const auto& g : grouped) {
        const double flops = 2.0 * Rd * g.N * g.K;
        for (int t : pick(tiles ? std::vector<int>{0, 5, 7, 8, 9, 25, 26, 30, 40} : std::vector<int>{0})) {
          gemm_set_tile_override(t);
          record("grouped_forward", std::string("decode1024_") + g.name, "uniform", Rd, g.N, g.K, E, t, flops,
                 time_ms([&] { grouped_gemm_forward(C, A, W, offsets, E, Rd, g.N, g.K, nullptr); }));
        }
        gemm_set_tile_override(0);
      }
      // The same step's gate and up products with SwiGLU in the GEMM's epilogue (bf16 act out, no fp32 products):
      // the routed experts', then the shared expert's (against decode1024_expert_gate_up and 2 x
      // decode1024_shared_gate above, plus a swiglu_forward of their outputs).
      if (gemm_swiglu_available()) {
        const double flops = 2.0 * Rd * 2 * EI * H;
        record("grouped_forward", "decode1024_expert_gate_up_swiglu", "uniform", Rd, 2 * EI, H, E, 0, flops,
               time_ms([&] { grouped_gemm_swiglu_forward(D, A, W, W + (size_t)E * EI * H, offsets, E, Rd, EI, H, nullptr); }));
        const double flops_s = 2.0 * 1024 * 2 * SI * H;
        record("forward", "decode1024_shared_gate_up_swiglu", "", 1024, 2 * SI, H, 1, 0, flops_s,
               time_ms([&] { gemm_swiglu_forward(D, A, W, W + (size_t)SI * H, 1024, SI, H, nullptr); }));
      }
    }
    if (!out_path.empty()) {
      FILE* f = std::fopen(out_path.c_str(), "w");
      MP_CHECK_ARG(f != nullptr, "cannot write " + out_path);
      std::fprintf(f, "{\"device\": \"%s\", \"sms\": %d, \"results\": [\n", prop.name, prop.multiProcessorCount);
      for (size_t i = 0; i < g_results.size(); i++) {
        const auto& r = g_results[i];
        std::fprintf(f,
                     "  {\"impl\": \"moepilot\", \"op\": \"%s\", \"name\": \"%s\", \"dist\": \"%s\", \"M\": %lld, \"N\": %d, "
                     "\"K\": %d, \"G\": %d, \"tile\": %d, \"ms\": %.4f, \"tflops\": %.2f}%s\n",
                     r.op.c_str(), r.name.c_str(), r.dist.c_str(), (long long)r.M, r.N, r.K, r.G, r.tile, r.ms, r.tflops,
                     i + 1 < g_results.size() ? "," : "");
      }
      std::fprintf(f, "]}\n");
      std::fclose(f);
    }
    gemm_release();
  } catch (const std::exception& e) {
    std::printf("bench error: %s\n", e.what());
    return 1;
  }
  return 0;
}
