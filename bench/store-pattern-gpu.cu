// Store-pattern microbenchmark (a diagnostic, not a speed goal): does the grouped dW's write pattern (fp32 tiles of
// TR x TC, rows K floats apart, in the dW kernels' tile orders, plain or streaming stores, one launch or a persistent
// grid) reach a memset's DRAM write bandwidth? Writes the dW of 60 experts x N x K floats at the A2.7B shapes.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a bench/store-pattern-gpu.cu -o /tmp/stores && /tmp/stores
// bench/results/store-pattern-gpu.txt: every pattern within 5% of the memset on H100 (see bench/train-gpu.notes.md,
// stop 26): the grouped dW's ~2.3 TB/s is not its store pattern.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

__global__ void linear_store(float4* p, size_t n4) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x)
    p[i] = make_float4(1.f, 2.f, 3.f, 4.f);
}

// One block a TR x TC tile of one group's [N][K] matrix, tiles group-major, column tiles inner (the dW kernels'
// order); 256 threads, float4 stores, a warp covering whole 16-byte pieces of consecutive columns.
template <int TR, int TC, bool kRowInner = false, bool kStream = false>
__global__ void __launch_bounds__(256) tile_store(float* p, int N, int K, int tiles_m, int tiles_n) {
  const int t = blockIdx.x, per = tiles_m * tiles_n;
  const int g = t / per, r = t % per;
  const int m0 = (kRowInner ? r % tiles_m : r / tiles_n) * TR, n0 = (kRowInner ? r / tiles_m : r % tiles_n) * TC;
  float* base = p + (size_t)g * N * K;
  constexpr int kVec = TC / 4;  // float4s a row
  for (int i = threadIdx.x; i < TR * kVec; i += 256) {
    const int row = m0 + i / kVec, col = n0 + (i % kVec) * 4;
    if (row < N && col < K) {
      float4* q = reinterpret_cast<float4*>(base + (size_t)row * K + col);
      const float4 v = make_float4(1.f, 2.f, 3.f, (float)i);
      if (kStream)
        __stcs(q, v);
      else
        *q = v;
    }
  }
}

// The same tiles from a persistent grid (one block an SM walking the list), as the persistent dW prototype.
template <int TR, int TC>
__global__ void __launch_bounds__(256) tile_store_persistent(float* p, int N, int K, int tiles_m, int tiles_n,
                                                             int total) {
  const int per = tiles_m * tiles_n;
  constexpr int kVec = TC / 4;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int g = t / per, r = t % per;
    const int m0 = (r / tiles_n) * TR, n0 = (r % tiles_n) * TC;
    float* base = p + (size_t)g * N * K;
    for (int i = threadIdx.x; i < TR * kVec; i += 256) {
      const int row = m0 + i / kVec, col = n0 + (i % kVec) * 4;
      if (row < N && col < K)
        *reinterpret_cast<float4*>(base + (size_t)row * K + col) = make_float4(1.f, 2.f, 3.f, (float)i);
    }
  }
}

template <class F>
double time_ms(F f) {
  f();
  CK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  const int iters = 20;
  CK(cudaEventRecord(a));
  for (int i = 0; i < iters; i++) f();
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  return ms / iters;
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int G = 60;
  struct Shape {
    int N, K;
  } shapes[] = {{1408, 2048}, {2048, 1408}, {2816, 2048}};
  for (const Shape& sh : shapes) {
    const size_t n = (size_t)G * sh.N * sh.K, bytes = n * 4;
    float* p;
    CK(cudaMalloc(&p, bytes));
    auto report = [&](const char* what, double ms) {
      std::printf("N %d K %d %-34s %.4f ms  %.0f GB/s\n", sh.N, sh.K, what, ms, bytes / ms / 1e6);
    };
    report("memset", time_ms([&] { CK(cudaMemsetAsync(p, 0, bytes)); }));
    report("linear float4", time_ms([&] { linear_store<<<sms * 8, 256>>>(reinterpret_cast<float4*>(p), n / 4); }));
    auto tiles = [&](const char* name, auto kern, int TR, int TC) {
      const int tm = (sh.N + TR - 1) / TR, tn = (sh.K + TC - 1) / TC;
      report(name, time_ms([&] { kern<<<G * tm * tn, 256>>>(p, sh.N, sh.K, tm, tn); }));
    };
    auto ptiles = [&](const char* name, auto kern, int TR, int TC) {
      const int tm = (sh.N + TR - 1) / TR, tn = (sh.K + TC - 1) / TC;
      report(name, time_ms([&] { kern<<<sms, 256>>>(p, sh.N, sh.K, tm, tn, G * tm * tn); }));
    };
    tiles("tiles 128x128", tile_store<128, 128>, 128, 128);
    tiles("tiles 64x256", tile_store<64, 256>, 64, 256);
    tiles("tiles 32x512", tile_store<32, 512>, 32, 512);
    tiles("tiles 16x1024", tile_store<16, 1024>, 16, 1024);
    tiles("tiles 128x32 (one store box wide)", tile_store<128, 32>, 128, 32);
    tiles("tiles 128x128 row tiles inner", tile_store<128, 128, true>, 128, 128);
    tiles("tiles 128x256 row tiles inner", tile_store<128, 256, true>, 128, 256);
    tiles("tiles 128x256", tile_store<128, 256>, 128, 256);
    tiles("tiles 128x128 st.cs", tile_store<128, 128, false, true>, 128, 128);
    tiles("tiles 128x128 row inner st.cs", tile_store<128, 128, true, true>, 128, 128);
    tiles("tiles 32x512 st.cs", tile_store<32, 512, false, true>, 32, 512);
    ptiles("persistent tiles 128x128", tile_store_persistent<128, 128>, 128, 128);
    ptiles("persistent tiles 32x512", tile_store_persistent<32, 512>, 32, 512);
    CK(cudaFree(p));
  }
  return 0;
}
