// Benchmark of the CUDA attention kernels (kernels/cuda/attention.cu) at Qwen1.5-MoE-A2.7B's attention shape
// (16 query heads, 16 KV heads, HD 128). Prints one JSON object on stdout; bench/attention-gpu.sh runs it next to
// PyTorch's flash SDPA (bench/attention-torch.py) and merges both.
//  - training: forward and forward+backward over B sequences of T tokens (packed varlen), TFLOP/s counted as
//    causal attention work (forward 2 matmuls of B*NH*T*T/2*HD multiply-adds; backward 2.5x the forward);
//  - decode: one row per sequence at position 127 or 95 (a 64-token prompt shared by groups of 16, then 64 or 32
//    tokens of its own: the last and the average step of a 64-token completion), also with groups laid out as a
//    decode graph does (one per row of the bucket, those past the batch's empty), time per layer call of
//    paged_attention (and of kv_cache_write), and bandwidth = bytes that must move (each shared prompt block once
//    per group, each sequence's own blocks, q in, out) / time.
// `--decode` runs the decode cases alone (bench/attention-gpu.sh's DECODE_VARIANTS builds).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/attention.h"

using namespace moepilot;
using gpu::bf16_bits;

namespace {

constexpr int NH = 16, KVH = 16, HD = 128;

template <class T>
T* dev_alloc(size_t n) {
  void* p = nullptr;
  MP_GPU_CHECK(gpu::malloc_device(&p, n * sizeof(T)));
  return (T*)p;
}

__global__ void fill_bf16(uint16_t* x, size_t n, uint32_t seed, float amp) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float f = amp * ((h & 0xffff) / 32768.f - 1.f);
    uint32_t u;
    memcpy(&u, &f, 4);
    x[i] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
}

// Mean milliseconds of f() over iters, after warm-up.
template <class F>
float time_ms(F f, int iters, gpu::Stream s) {
  for (int i = 0; i < 3; i++) f();
  gpu::Event a, b;
  MP_GPU_CHECK(gpu::event_create(&a));
  MP_GPU_CHECK(gpu::event_create(&b));
  MP_GPU_CHECK(gpu::event_record(a, s));
  for (int i = 0; i < iters; i++) f();
  MP_GPU_CHECK(gpu::event_record(b, s));
  MP_GPU_CHECK(gpu::event_sync(b));
  float ms = 0;
  MP_GPU_CHECK(gpu::event_elapsed_ms(&ms, a, b));
  gpu::event_destroy(a);
  gpu::event_destroy(b);
  return ms / iters;
}

std::string train_case(int B, int T, gpu::Stream s) {
  const int64_t N = (int64_t)B * T;
  const int qkv_w = (NH + 2 * KVH) * HD;  // the engine's fused qkv rows
  uint16_t* qkv = dev_alloc<uint16_t>(N * qkv_w);
  uint16_t* dout = dev_alloc<uint16_t>(N * NH * HD);
  uint16_t* out = dev_alloc<uint16_t>(N * NH * HD);
  float* lse = dev_alloc<float>(N * NH);
  float* dq = dev_alloc<float>(N * NH * HD);
  float* dk = dev_alloc<float>(N * KVH * HD);
  float* dv = dev_alloc<float>(N * KVH * HD);
  fill_bf16<<<1024, 256, 0, s>>>(qkv, N * qkv_w, 1, 2.f);
  fill_bf16<<<1024, 256, 0, s>>>(dout, N * NH * HD, 2, 1.f);
  std::vector<int32_t> cu(B + 1);
  for (int b = 0; b <= B; b++) cu[b] = b * T;
  int32_t* dcu = dev_alloc<int32_t>(B + 1);
  MP_GPU_CHECK(gpu::memcpy_async(dcu, cu.data(), cu.size() * 4, s));
  gpu::AttentionShape sh;
  sh.N = N, sh.B = B, sh.max_seqlen = T, sh.NH = NH, sh.KVH = KVH, sh.HD = HD, sh.q_stride = qkv_w,
  sh.kv_stride = qkv_w;
  const uint16_t *q = qkv, *k = qkv + NH * HD, *v = qkv + (NH + KVH) * HD;
  auto fwd = [&] { gpu::attention_forward(out, lse, q, k, v, dcu, sh, s); };
  auto bwd = [&] { gpu::attention_backward(dq, dk, dv, dout, out, lse, q, k, v, dcu, sh, s); };
  const float ms_f = time_ms(fwd, 20, s);
  const float ms_fb = time_ms([&] { fwd(); bwd(); }, 10, s);
  const float ms_b = time_ms(bwd, 10, s);
  const double fl_f = 4.0 * B * NH * (double)T * T / 2 * HD;  // causal: half of the square
  const double fl_fb = fl_f * 3.5;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "{\"B\": %d, \"T\": %d, \"fwd_ms\": %.4f, \"fwd_tflops\": %.1f, \"fwdbwd_ms\": %.4f, "
                "\"fwdbwd_tflops\": %.1f, \"bwd_ms\": %.4f, \"bwd_tflops\": %.1f}",
                B, T, ms_f, fl_f / ms_f / 1e9, ms_fb, fl_fb / ms_fb / 1e9, ms_b, fl_f * 2.5 / ms_b / 1e9);
  std::fprintf(stderr, "train B=%d T=%d: fwd %.3f ms (%.1f TFLOP/s), fwd+bwd %.3f ms (%.1f TFLOP/s), bwd %.3f ms\n", B,
               T, ms_f, fl_f / ms_f / 1e9, ms_fb, fl_fb / ms_fb / 1e9, ms_b);
  for (void* p : {(void*)qkv, (void*)dout, (void*)out, (void*)lse, (void*)dq, (void*)dk, (void*)dv, (void*)dcu})
    gpu::free_device(p);
  return buf;
}

// own: the tokens of its own each sequence has at this step (the decoded row included), 1..64; padded: groups
// laid out as a decode graph does (one per row of the bucket and one more, those past the batch's empty).
std::string decode_case(int seqs, int own, bool padded, gpu::Stream s) {
  const int group = 16, prompt = 64, gen = 64, bs = 16;
  const int groups = seqs / group;
  const int ctx = prompt + gen, max_blocks = ctx / bs;
  const int ngroups = padded ? seqs + 1 : groups;
  const int pb = prompt / bs, ob = gen / bs;
  const int num_blocks = groups * pb + seqs * ob;
  const int layers = 1;
  const int64_t KW = (int64_t)KVH * HD;
  gpu::PagedKv kv;
  kv.num_blocks = num_blocks, kv.block_size = bs, kv.layers = layers, kv.KVH = KVH, kv.HD = HD;
  const int64_t pool_elems = (int64_t)num_blocks * layers * 2 * bs * KW;
  uint16_t* pool = dev_alloc<uint16_t>(pool_elems);
  fill_bf16<<<1024, 256, 0, s>>>(pool, pool_elems, 3, 1.f);
  kv.pool = pool;
  std::vector<int32_t> tables((size_t)seqs * max_blocks), rs(seqs), rp(seqs), gr(ngroups + 1), sl(ngroups);
  for (int s_ = 0; s_ < seqs; s_++) {
    const int g = s_ / group;
    for (int b = 0; b < pb; b++) tables[(size_t)s_ * max_blocks + b] = g * pb + b;
    for (int b = 0; b < ob; b++) tables[(size_t)s_ * max_blocks + pb + b] = groups * pb + s_ * ob + b;
    rs[s_] = s_;
    rp[s_] = prompt + own - 1;
  }
  for (int g = 0; g <= ngroups; g++) gr[g] = std::min(g, groups) * group;
  for (int g = 0; g < ngroups; g++) sl[g] = g < groups ? prompt : 0;
  auto up = [&](const std::vector<int32_t>& h) {
    int32_t* d = dev_alloc<int32_t>(h.size());
    MP_GPU_CHECK(gpu::memcpy_async(d, h.data(), h.size() * 4, s));
    return d;
  };
  int32_t *dt = up(tables), *drs = up(rs), *drp = up(rp), *dgr = up(gr), *dsl = up(sl);
  gpu::PagedRows rows;
  rows.R = seqs, rows.row_seq = drs, rows.row_pos = drp, rows.block_tables = dt, rows.max_blocks = max_blocks;
  rows.groups = ngroups, rows.group_rows = dgr, rows.shared_len = dsl, rows.max_pos = padded ? ctx - 1 : prompt + own - 1;
  const int qkv_w = (NH + 2 * KVH) * HD;
  uint16_t* qkv = dev_alloc<uint16_t>((int64_t)seqs * qkv_w);
  uint16_t* out = dev_alloc<uint16_t>((int64_t)seqs * NH * HD);
  fill_bf16<<<1024, 256, 0, s>>>(qkv, (int64_t)seqs * qkv_w, 4, 2.f);
  const float ms_w =
      time_ms([&] { gpu::kv_cache_write(kv, 0, qkv + NH * HD, qkv + (NH + KVH) * HD, qkv_w, rows, s); }, 50, s);
  const float ms_a = time_ms([&] { gpu::paged_attention(out, qkv, qkv_w, NH, kv, 0, rows, s); }, 50, s);
  // Bytes that must move: each group's prompt K/V once, each sequence's own K/V (incl. the new row), q in, out.
  const double bytes = (double)groups * prompt * KW * 2 * 2 + (double)seqs * own * KW * 2 * 2 +
                       (double)seqs * NH * HD * 2 * 2;
  const double bytes_unshared = (double)seqs * (prompt + own) * KW * 2 * 2 + (double)seqs * NH * HD * 2 * 2;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "{\"seqs\": %d, \"group\": %d, \"context\": %d, \"padded_groups\": %s, \"attn_us\": %.2f, \"bytes\": %.0f, "
                "\"attn_GBps\": %.0f, \"attn_GBps_if_unshared\": %.0f, \"write_us\": %.2f}",
                seqs, group, prompt + own, padded ? "true" : "false", ms_a * 1e3, bytes, bytes / ms_a / 1e6, bytes_unshared / ms_a / 1e6, ms_w * 1e3);
  std::fprintf(stderr, "decode seqs=%d ctx=%d%s: paged %.1f us (%.0f GB/s of %.1f MB), cache write %.1f us\n", seqs,
               prompt + own, padded ? " (padded groups)" : "", ms_a * 1e3, bytes / ms_a / 1e6, bytes / 1e6, ms_w * 1e3);
  for (void* p : {(void*)pool, (void*)dt, (void*)drs, (void*)drp, (void*)dgr, (void*)dsl, (void*)qkv, (void*)out})
    gpu::free_device(p);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  const bool decode_only = argc > 1 && std::strcmp(argv[1], "--decode") == 0;
  try {
    gpu::Stream s;
    MP_GPU_CHECK(gpu::stream_create(&s));
    std::string name;
    MP_GPU_CHECK(gpu::device_name(0, &name));
    std::string json = "{\"gpu\": \"" + name + "\", \"NH\": 16, \"KVH\": 16, \"HD\": 128, \"train\": [";
    if (!decode_only) json += train_case(4, 512, s) + ", " + train_case(4, 2048, s);
    json += "], \"decode\": [";
    json += decode_case(128, 64, false, s) + ", " + decode_case(1024, 64, false, s) + ", " +
            decode_case(128, 32, true, s) + ", " + decode_case(1024, 32, false, s) + ", " + decode_case(1024, 32, true, s) +
            "]}";
    std::printf("%s\n", json.c_str());
    gpu::stream_destroy(s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attention-gpu: %s\n", e.what());
    return 1;
  }
  return 0;
}
