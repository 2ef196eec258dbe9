// The whole model on one GPU: buffers, the layer loop forward, the loss (on the host, from the logprobs), the
// backward bottom-up, and AdamW. Mirrors kernels/model/forward.cpp + blocks.cpp + engine.cpp step for step;
// comments there say why each step is what it is.
//
// Dimension legend: moepilot/model.h. NK = N * K routed assignments; Ep = E padded to a multiple of 8 (the
// GEMM's output width); QD = NH * HD, KVD = KVH * HD.
#include "cuda/gpu_model.h"
#include "model/loss.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "comm/nccl.h"
#include "cuda/attention.h"
#include "cuda/gemm.h"
#include "cuda/ops.h"
#include "cuda/sampling.h"
#include "cuda/vendor.h"
#include "moepilot/comm.h"
#include "moepilot/error.h"

namespace moepilot {

bool gpu_backend_available() { return true; }

namespace {

using gpu::bf16_bits;
using gpu::Stream;

int pad8(int n) { return (n + 7) / 8 * 8; }

// A behaviour switch read from the environment once: on unless `name` is set to `off` (benchmarks compare the two
// settings in one build).
bool env_unless(const char* name, const char* off) {
  const char* v = std::getenv(name);
  return v == nullptr || std::string(v) != off;
}

// Bump allocator over one device allocation: a first pass with base == nullptr sizes it.
struct Arena {
  char* base = nullptr;
  size_t off = 0;
  template <class T>
  T* take(size_t n) {
    off = (off + 255) & ~(size_t)255;
    T* p = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += n * sizeof(T);
    return p;
  }
};

// Per-layer activations kept from the forward for the backward.
struct LayerActs {
  bf16_bits *ln1, *ln2;          // [N,C]
  float *rstd1, *rstd2;          // [N]
  float *q_raw, *k_raw;          // [N,QD] [N,KVD] projections before qk-norm (qk-norm models only)
  float *q_rstd, *k_rstd;        // [N*NH] [N*KVH]
  bf16_bits *q, *k, *v;          // [N,QD] [N,KVD] [N,KVD] attention inputs
  bf16_bits* att;                // [N,QD]
  float* att_lse;                // [N,NH]
  // MoE
  float *rlogits, *probs, *weights;  // [N,Ep] [N,E] [N,K]
  int32_t *experts, *order, *pos_of, *offsets;  // [N,K] [NK] [NK] [E+1]
  bf16_bits* xg;                 // [NK,C]
  float *gate, *up;              // [NK,H]
  bf16_bits* act;                // [NK,H]
  float* y;                      // [NK,C]
  float *s_gate, *s_up;          // [N,HS]
  bf16_bits* s_act;              // [N,HS]
  float *s_out, *s_logit;        // [N,C] [N,8]
  // dense MLP
  float *m_gate, *m_up;          // [N,HD_]
  bf16_bits* m_act;              // [N,HD_]
};

// Scratch of one pass (reused by every layer).
struct Scratch {
  float *q32, *k32, *v32, *qn32, *kn32;  // [N,QD] [N,KVD] [N,KVD] [N,QD] [N,KVD]
  float* lm;                             // lm_head_scratch_floats(N, V)
  float *dh, *dln;                       // [N,C]
  bf16_bits* d16;                        // [N, max(C, QD, KVD)]
  bf16_bits* datt16;                     // [N,QD]
  float *dq, *dk, *dv, *dq2, *dk2;       // [N,QD] [N,KVD] [N,KVD] [N,QD] [N,KVD]
  bf16_bits *dq16, *dk16, *dv16;
  bf16_bits* dy;                         // [NK,C]
  float* dxa;                            // [NK,C]
  float* dact;                           // [max(NK*H, N*HS, N*HD_)]
  bf16_bits *dg16, *du16;                // same
  float* dweights;                       // [N,K]
  bf16_bits* dlogits;                    // [N,Ep]
  bf16_bits *ds_out, *ds_logit;          // [N,C] [N,8]
  // The shared expert's backward on a side stream beside the routed experts' (which use dact, dg16): [N,HS].
  float* s_dact;
  bf16_bits *s_dg16, *s_du16;
};

struct Acts {
  int cap_n = 0;  // rows the allocation holds
  std::vector<LayerActs> layers;
  float* h = nullptr;  // [(2L+1), N, C] residual stream at each sub-layer boundary
  bf16_bits* lnf = nullptr;
  float *rstdf = nullptr, *lse = nullptr, *logprob = nullptr, *entropy = nullptr;  // [N]
  float* logits = nullptr;     // [N,V] kept by a training forward for the backward (null when too large)
  bf16_bits* dlogits = nullptr;  // [N,V] the backward's, with the logits
  float* probsum = nullptr;    // [moe_layers, E]
  int32_t* counts = nullptr;   // [moe_layers, E]
  Scratch sc{};
  // Inputs uploaded per batch (int32): tokens, pos, target [N]; cu_seqlens [N+1]; embedding groups:
  // order [N], starts [N+1], uniq [N]; replay [moe_layers * N * K].
  int32_t *tokens = nullptr, *pos = nullptr, *target = nullptr, *cu = nullptr, *emb_order = nullptr,
          *emb_starts = nullptr, *emb_uniq = nullptr, *replay = nullptr;
  float *g = nullptr, *aux_dp = nullptr;  // [N] [E]
  double* loss_w = nullptr;               // [N] the loss's row weights (the on-device loss gradient's input)
  float* loss_rows = nullptr;             // [3, N] GRPO's advantages, old and reference logprobs
};

// Wall time of phases from events on the stream: mark(p) starts phase p.
enum Phase { kAttention = 0, kExperts = 1, kLmHead = 2, kOther = 3 };
// With MOEPILOT_GPU_PROFILE set, every labelled interval's time is also summed per label and printed to stderr
// after each pass (benchmarks: where the time goes).
struct PhaseClock {
  std::vector<gpu::Event> pool;
  std::vector<int> tags;
  std::vector<const char*> labels;
  size_t used = 0;
  bool profile = std::getenv("MOEPILOT_GPU_PROFILE") != nullptr;
  size_t first = 0;  // the current segment's first mark (a pass's backward keeps its forward's marks before it)
  void reset() {
    used = 0;
    first = 0;
    tags.clear();
    labels.clear();
  }
  // Starts a segment after the marks so far, which finish(0, end) can still sum once the whole pass has run.
  size_t begin_segment() { return first = used; }
  void mark(int phase, Stream s, const char* label = nullptr) {
    labels.push_back(label ? label : (phase == kAttention ? "attention" : phase == kExperts ? "mlp" : phase == kLmHead ? "lm_head" : "other"));
    if (used == pool.size()) {
      gpu::Event e;
      MP_GPU_CHECK(gpu::event_create(&e));
      pool.push_back(e);
    }
    MP_GPU_CHECK(gpu::event_record(pool[used], s));
    tags.push_back(phase);
    used++;
  }
  // After the last mark: sums the current segment's intervals per phase.
  PhaseTimes finish() { return finish(first, used); }
  // The intervals between marks [b, e).
  PhaseTimes finish(size_t b, size_t e) {
    PhaseTimes t;
    if (e < b + 2) return t;
    MP_GPU_CHECK(gpu::event_sync(pool[e - 1]));
    for (size_t i = b; i + 1 < e; i++) {
      float ms = 0;
      MP_GPU_CHECK(gpu::event_elapsed_ms(&ms, pool[i], pool[i + 1]));
      if (tags[i] == kAttention) t.attention_ms += ms;
      if (tags[i] == kExperts) t.experts_ms += ms;
      if (tags[i] == kLmHead) t.lm_head_ms += ms;
    }
    float total = 0;
    MP_GPU_CHECK(gpu::event_elapsed_ms(&total, pool[b], pool[e - 1]));
    t.total_ms = total;
    if (profile) {
      std::vector<std::pair<std::string, double>> sums;
      for (size_t i = b; i + 1 < e; i++) {
        float ms = 0;
        MP_GPU_CHECK(gpu::event_elapsed_ms(&ms, pool[i], pool[i + 1]));
        auto it = std::find_if(sums.begin(), sums.end(), [&](const auto& p) { return p.first == labels[i]; });
        if (it == sums.end()) sums.emplace_back(labels[i], ms);
        else it->second += ms;
      }
      std::string line = "gpu profile (ms): total " + std::to_string(total);
      for (auto& [k, v] : sums) line += " | " + k + " " + std::to_string(v);
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    return t;
  }
  ~PhaseClock() {
    for (auto e : pool) gpu::event_destroy(e);
  }
};

// Side streams for the products of a layer that do not depend on each other: q, k and v, and the shared expert
// beside the routed experts (forward and backward), and a training backward's attention weight gradients beside the
// input gradients. A decode step's skinny GEMMs each leave most SMs idle, so running them side by side fills the
// card; in training they fill the waves that one GEMM leaves part empty. The arithmetic is the same as in order (the
// same bits); in a captured decode graph the fork and join become the graph's edges.
struct Overlap {
  static constexpr int kSides = 5;
  Stream side[kSides] = {};
  gpu::Event fork_ev = nullptr, join_ev[kSides] = {};
  // Side streams 0 and 1 at `priority`; 2, 3 and 4, for a training backward's weight gradients that nothing after
  // them in the pass reads, at `background` (see GpuModel's constructor).
  void create(int priority = 0, int background = 0) {
    for (int i = 0; i < kSides; i++)
      MP_GPU_CHECK(gpu::stream_create_with_priority(&side[i], i < 2 ? priority : background));
    MP_GPU_CHECK(gpu::event_create_untimed(&fork_ev));
    for (gpu::Event& e : join_ev) MP_GPU_CHECK(gpu::event_create_untimed(&e));
  }
  void destroy() {
    for (gpu::Event e : join_ev)
      if (e) gpu::event_destroy(e);
    if (fork_ev) gpu::event_destroy(fork_ev);
    for (Stream x : side)
      if (x) gpu::stream_destroy(x);
  }
  // Side streams [first, n) start after the work queued on `s` so far.
  void fork(Stream s, int n, int first = 0) const {
    MP_GPU_CHECK(gpu::event_record(fork_ev, s));
    for (int i = first; i < n; i++) MP_GPU_CHECK(gpu::stream_wait(side[i], fork_ev));
  }
  // `s` continues after the work queued on side stream i so far.
  void join(Stream s, int i) const {
    MP_GPU_CHECK(gpu::event_record(join_ev[i], side[i]));
    MP_GPU_CHECK(gpu::stream_wait(s, join_ev[i]));
  }
};

// Work that `s` forks onto side stream i (products whose inputs `s` has just made) until joined; without an
// Overlap, `s` itself.
struct SideWork {
  const Overlap* ov;
  Stream s;
  int i;
  bool pending = false;
  Stream fork() {
    if (!ov) return s;
    ov->fork(s, i + 1, i);
    pending = true;
    return ov->side[i];
  }
  void join() {
    if (pending) ov->join(s, i);
    pending = false;
  }
};

}  // namespace

struct GpuModel::Impl {
  ModelConfig cfg;
  ParamLayout L;
  int device = 0;
  Stream stream = nullptr;
  int C, NH, KVH, HD, QD, KVD, E, Ep, K, H, HS, HDm, V, ML;
  // Parameters, gradients (fp32 [total]), the bf16 copy [total], AdamW state (fp32 [Ds + total - dense_total]
  // each, lazily: this rank's dense shard, then its experts; Ds = dense_total on one rank). Weights-only: params
  // fp32 [dense_total], no gradients or state.
  float *params = nullptr, *grads = nullptr, *m = nullptr, *v = nullptr;
  bool weights_only = false;
  // With expert_grads_bf16 (the constructor's), grads16 holds the routed experts' gradients [total - dense_total] in
  // bf16 and grads the dense range alone. The grouped dW is bound by its gradient bytes (8.3 GB of fp32 writes a
  // 4 x 512-token pass at the A2.7B widths, 4 layers); bf16 halves them and the memory. Each backward rounds once
  // (bf16(old + product)), so micro-batches accumulate in bf16; AdamW reads them widened.
  bf16_bits* grads16 = nullptr;
  // The gradients are all zero (allocated, or zero_grad since the last backward): each expert projection's grouped
  // dW may then overwrite its block instead of adding to it (one grouped dW per projection per backward; half the
  // memory traffic of the fp32 read-modify-write that bounds it).
  bool grads_zero = true;
  // Gate/up GEMMs carry SwiGLU in their epilogue where the device has it. MOEPILOT_GLU_EPILOGUE=0 keeps the three
  // separate calls (same bits; benchmarks compare the two in one build).
  bool glu_epilogue = env_unless("MOEPILOT_GLU_EPILOGUE", "0");
  // A training pass runs independent products on side streams (q, k, v; the shared expert beside the routed path,
  // forward and backward; the LM head's log-sum-exp passes beside its GEMMs; the attention block's weight gradients).
  // MOEPILOT_TRAIN_OVERLAP=0 keeps one stream (same bits: model-gpu checks it; benchmarks compare the two in one
  // build).
  bool train_overlap = env_unless("MOEPILOT_TRAIN_OVERLAP", "0");
  // With train_overlap, a training backward's routed-expert and LM head weight gradients run in the background (side
  // streams 2 to 4, see backward_pass). MOEPILOT_BACKGROUND_DW=0 keeps them on the main stream (the same bits).
  bool background_dw = env_unless("MOEPILOT_BACKGROUND_DW", "0");
  // With background_dw, the routed experts' dW on two side streams (see backward_pass); MOEPILOT_ROUTED_DW_STREAMS=1
  // keeps them on one (the same bits).
  bool routed_dw_two_streams = env_unless("MOEPILOT_ROUTED_DW_STREAMS", "1");
  bf16_bits* params16 = nullptr;
  // bf16 copies of matrices whose output width is padded to 8: per layer the router [Ep,C] (when E % 8 != 0)
  // and the shared expert's gate [8,C]; pad_dw the fp32 gradient of one such matrix.
  bf16_bits* pad16 = nullptr;
  std::vector<size_t> pad_router, pad_sgate;  // [L] offsets into pad16, SIZE_MAX where absent
  float* pad_dw = nullptr;
  // RoPE angle tables [P, HD/2].
  float *rope_cos = nullptr, *rope_sin = nullptr;
  int rope_p = 0;
  std::vector<double> inv_freq;
  // Activations: one allocation.
  void* act_mem = nullptr;
  Acts A;
  double* norm_scratch = nullptr;  // [kSumSquaresBlocks + 1]
  PhaseClock clock;
  Overlap overlap;  // a training pass's side streams (see train_overlap)
  // Pinned host staging for a training pass's small transfers (the batch's inputs, the logprobs and router sums
  // down, the loss gradient up). Pageable copies go through the driver's own staging, ~30 us each and synchronous
  // for the host: the batch's seven uploads and their sync took 0.3-0.5 ms of each 4 x 512-token pass on H100.
  // A pass takes consecutive slices from the front, after a sync (no copy of an earlier pass is in flight).
  struct Pinned {
    char* base = nullptr;
    size_t cap = 0, used = 0;
    template <class T>
    T* take(size_t n) {
      used = (used + 63) & ~(size_t)63;
      MP_CHECK_INTERNAL(used + n * sizeof(T) <= cap, "pinned staging sized too small for the pass");
      T* p = reinterpret_cast<T*>(base + used);
      used += n * sizeof(T);
      return p;
    }
  } pinned;

  // ---- Expert + data parallelism (set_parallel). Without it: one rank (W = 1) holding every expert.
  // Dimension legend: W ranks, El local experts (e0 the first), R rows this rank's experts receive in one MoE
  // layer, Ds the floats of this rank's dense shard.
  std::shared_ptr<Collectives> comm;
  std::vector<int> bounds;  // [W+1] rank r owns experts [bounds[r], bounds[r+1])
  int W = 1, rank = 0, e0 = 0, El = 0;
  size_t shard_b = 0, shard_e = 0;  // the dense shard [shard_b, shard_e) this rank updates (ZeRO-1)
  float* gshard = nullptr;          // [Ds] the reduce-scattered dense gradient, then the all-gather's input
  double a2a_ms = 0;                // host wall time inside the token exchange during the current pass
  double a2a_bytes = 0;             // bytes this rank handed to those exchanges (PhaseTimes::alltoall_bytes)
  // Per MoE layer: the exchange's plan (host) and the owner's grouped activations (device, kept for the
  // backward). Indexed by layer; grown on demand.
  struct EpLayer {
    std::vector<int64_t> send_rows, recv_rows;  // [W] rows to / from each rank
    int R = 0;
    size_t cap = 0;  // rows the allocation holds
    void* mem = nullptr;
    int32_t *group_src = nullptr, *group_inv = nullptr;  // [R] received row of each grouped row, and back
    int32_t* offsets = nullptr;                          // [El+1] local expert e owns grouped rows [o[e], o[e+1])
    bf16_bits* xg = nullptr;                             // [R,C]
    float *gate = nullptr, *up = nullptr;                // [R,H]
    bf16_bits* act = nullptr;                            // [R,H]
  };
  std::vector<EpLayer> ep;
  // Scratch of the exchange on the owner's side, shared by the layers.
  struct EpScratch {
    size_t cap = 0;
    void* mem = nullptr;
    bf16_bits *xr = nullptr, *dyg = nullptr;  // [R,C] rows received (forward: inputs; backward: output grads), grouped dy
    float *yl = nullptr, *yr = nullptr;       // [R,C] expert outputs grouped, then in received order (also dx)
    float* dact = nullptr;                    // [R,H]
    bf16_bits* dg16 = nullptr;                // [R,2H]: d gate | d up
    float* dxa = nullptr;                     // [R,C]
  } eps;

  ~Impl() {
    if (stream) gpu::stream_sync(stream);
    for (void* p : {(void*)params, (void*)grads, (void*)grads16, (void*)m, (void*)v, (void*)params16, (void*)pad16,
                    (void*)pad_dw, (void*)rope_cos, (void*)rope_sin, act_mem, (void*)norm_scratch, (void*)gshard,
                    eps.mem})
      if (p) gpu::free_device(p);
    if (pinned.base) gpu::free_host(pinned.base);
    overlap.destroy();
    for (EpLayer& p : ep)
      if (p.mem) gpu::free_device(p.mem);
    if (stream) gpu::stream_destroy(stream);
  }

  const float* P(size_t off) const { return off == SIZE_MAX ? nullptr : params + off; }
  float* G(size_t off) const { return off == SIZE_MAX ? nullptr : grads + off; }
  // A routed projection's grouped backward: dA (may be null) and, with dW, its weight gradient at offset w into the
  // experts' gradients, fp32 or bf16 (expert_grads_bf16). acc: add to them (false: they hold zeros, overwrite).
  void expert_backward(float* dA, bool dW, size_t w, const bf16_bits* dOut, const bf16_bits* act,
                       const int32_t* offsets, int G_, int64_t rows, int N, int K_, bool acc, Stream s,
                       int64_t ld_out = 0) const {
    with_expert_grads(dW, [&](auto* g, size_t first) {
      gpu::grouped_gemm_backward(dA, g ? g + (w - first) : g, dOut, act, P16(w), offsets, G_, rows, N, K_, acc, s,
                                 ld_out);
    });
  }
  void expert_backward_pair(float* dA, bool dW, size_t wg, size_t wu, const bf16_bits* dGU, const bf16_bits* x,
                            const int32_t* offsets, int G_, int64_t rows, int N, int K_, bool acc, Stream s) const {
    with_expert_grads(dW, [&](auto* g, size_t first) {
      gpu::grouped_gemm_backward_pair(dA, g ? g + (wg - first) : g, g ? g + (wu - first) : g, dGU, x, P16(wg),
                                      P16(wu), offsets, G_, rows, N, K_, acc, s);
    });
  }
  // f(g, first): a routed expert's gradient at flat offset w is g + (w - first), fp32 (grads) or bf16 (grads16,
  // which starts at the first expert's offset); g null without dW.
  template <class F>
  void with_expert_grads(bool dW, F&& f) const {
    if (!dW)
      f((float*)nullptr, size_t{0});
    else if (grads16)
      f(grads16, L.dense_total);
    else
      f(grads, size_t{0});
  }
  const bf16_bits* P16(size_t off) const { return params16 + off; }
  const bf16_bits* router16(int l) const {
    return pad_router[l] == SIZE_MAX ? P16(L.layers[l].router) : pad16 + pad_router[l];
  }

  template <class T>
  T* alloc(size_t n) {
    void* p = nullptr;
    MP_GPU_CHECK(gpu::malloc_device(&p, std::max<size_t>(n, 1) * sizeof(T)));
    return static_cast<T*>(p);
  }

  // Every gradient to zero, queued on the stream.
  void clear_grads() {
    const size_t D = L.dense_total, T = L.total;
    MP_GPU_CHECK(gpu::memset_async(grads, 0, (grads16 ? D : T) * sizeof(float), stream));
    if (grads16) MP_GPU_CHECK(gpu::memset_async(grads16, 0, (T - D) * sizeof(bf16_bits), stream));
  }

  void require_training(const char* what) const {
    MP_CHECK_ARG(!weights_only, std::string(what) + ": the engine's GPU copy holds the weights only (toDevice with "
                                "weightsOnly); training needs an engine moved without it");
  }

  // Weights-only: the experts' range [dense_total, total) exists in bf16 alone. fp32 host values go through a
  // bounded staging buffer (rounded on the device as the full copy's cast rounds them), and come back widened.
  static constexpr size_t kStageFloats = size_t{1} << 24;  // 64 MiB
  // Runs step(stage, at, c) for each chunk [at, at + c) of the experts' range, c <= kStageFloats, with one fp32
  // stage buffer reused (each chunk synced before the next).
  template <class Step>
  void over_experts_staged(Step&& step) {
    const size_t D = L.dense_total, n = L.total - D;
    if (n == 0) return;
    float* stage = alloc<float>(std::min(n, kStageFloats));
    try {
      for (size_t off = 0; off < n; off += kStageFloats) {
        step(stage, D + off, std::min(kStageFloats, n - off));
        sync();  // the stage is reused by the next chunk
      }
    } catch (...) {
      gpu::free_device(stage);
      throw;
    }
    gpu::free_device(stage);
  }
  void upload_experts_bf16(const float* host) {
    over_experts_staged([&](float* stage, size_t at, size_t c) {
      upload(stage, host + at, c);
      gpu::cast_f32_to_bf16(params16 + at, stage, c, stream);
    });
  }
  void download_experts_widened(float* host) {
    over_experts_staged([&](float* stage, size_t at, size_t c) {
      gpu::cast_bf16_to_f32(stage, params16 + at, c, stream);
      download(host + at, stage, c);
    });
  }

  void refresh_padded() {
    for (int l = 0; l < cfg.layers; l++) {
      if (pad_router[l] != SIZE_MAX)
        gpu::pad_rows_to_bf16(pad16 + pad_router[l], params + L.layers[l].router, E, Ep, C, stream);
      if (pad_sgate[l] != SIZE_MAX)
        gpu::pad_rows_to_bf16(pad16 + pad_sgate[l], params + L.layers[l].shared_expert_gate, 1, 8, C, stream);
    }
  }

  // One layer's activations for N rows: the MoE block's (moe) and/or the dense MLP's (dense).
  void plan_layer(Arena& ar, LayerActs& a, int N, bool moe, bool dense) {
    const size_t NK = (size_t)N * K;
    a = LayerActs{};
    a.ln1 = ar.take<bf16_bits>((size_t)N * C);
    a.ln2 = ar.take<bf16_bits>((size_t)N * C);
    a.rstd1 = ar.take<float>(N);
    a.rstd2 = ar.take<float>(N);
    if (cfg.qk_norm) {
      a.q_raw = ar.take<float>((size_t)N * QD);
      a.k_raw = ar.take<float>((size_t)N * KVD);
      a.q_rstd = ar.take<float>((size_t)N * NH);
      a.k_rstd = ar.take<float>((size_t)N * KVH);
    }
    a.q = ar.take<bf16_bits>((size_t)N * QD);
    a.k = ar.take<bf16_bits>((size_t)N * KVD);
    a.v = ar.take<bf16_bits>((size_t)N * KVD);
    a.att = ar.take<bf16_bits>((size_t)N * QD);
    a.att_lse = ar.take<float>((size_t)N * NH);
    if (moe) {
      a.rlogits = ar.take<float>((size_t)N * Ep);
      a.probs = ar.take<float>((size_t)N * E);
      a.weights = ar.take<float>(NK);
      a.experts = ar.take<int32_t>(NK);
      a.order = ar.take<int32_t>(NK);
      a.pos_of = ar.take<int32_t>(NK);
      a.offsets = ar.take<int32_t>(E + 1);
      a.xg = ar.take<bf16_bits>(NK * C);
      a.gate = ar.take<float>(NK * H);
      a.up = ar.take<float>(NK * H);
      a.act = ar.take<bf16_bits>(NK * H);
      a.y = ar.take<float>(NK * C);
      if (HS > 0) {
        a.s_gate = ar.take<float>((size_t)N * HS);
        a.s_up = ar.take<float>((size_t)N * HS);
        a.s_act = ar.take<bf16_bits>((size_t)N * HS);
        a.s_out = ar.take<float>((size_t)N * C);
        a.s_logit = ar.take<float>((size_t)N * 8);
      }
    }
    if (dense) {
      a.m_gate = ar.take<float>((size_t)N * HDm);
      a.m_up = ar.take<float>((size_t)N * HDm);
      a.m_act = ar.take<bf16_bits>((size_t)N * HDm);
    }
  }

  void plan(Arena& ar, int N) {
    const size_t NK = (size_t)N * K;
    A.layers.assign(cfg.layers, LayerActs{});
    A.h = ar.take<float>((size_t)(2 * cfg.layers + 1) * N * C);
    for (int l = 0; l < cfg.layers; l++) plan_layer(ar, A.layers[l], N, cfg.layer_is_moe[l], !cfg.layer_is_moe[l]);
    A.lnf = ar.take<bf16_bits>((size_t)N * C);
    A.rstdf = ar.take<float>(N);
    A.lse = ar.take<float>(N);
    A.logprob = ar.take<float>(N);
    A.entropy = ar.take<float>(N);
    // Keeping the logits trades N*V floats for one of the LM head's four GEMMs (over 4 GiB: recompute).
    // With them, the bf16 dlogits (half as many bytes): one dlogits pass and two GEMMs over the whole vocabulary
    // instead of one of each per chunk.
    if ((size_t)N * V * sizeof(float) <= (size_t{4} << 30)) {
      A.logits = ar.take<float>((size_t)N * V);
      A.dlogits = ar.take<bf16_bits>((size_t)N * V);
    }
    A.probsum = ar.take<float>((size_t)std::max(ML, 1) * std::max(E, 1));
    A.counts = ar.take<int32_t>((size_t)std::max(ML, 1) * std::max(E, 1));
    Scratch& s = A.sc;
    s.q32 = ar.take<float>((size_t)N * QD);
    s.k32 = ar.take<float>((size_t)N * KVD);
    s.v32 = ar.take<float>((size_t)N * KVD);
    s.qn32 = ar.take<float>((size_t)N * QD);
    s.kn32 = ar.take<float>((size_t)N * KVD);
    s.lm = ar.take<float>(gpu::lm_head_scratch_floats(N, V));
    s.dh = ar.take<float>((size_t)N * C);
    s.dln = ar.take<float>((size_t)N * C);
    s.d16 = ar.take<bf16_bits>((size_t)N * std::max(C, std::max(QD, KVD)));
    s.datt16 = ar.take<bf16_bits>((size_t)N * QD);
    s.dq = ar.take<float>((size_t)N * QD);
    s.dk = ar.take<float>((size_t)N * KVD);
    s.dv = ar.take<float>((size_t)N * KVD);
    s.dq2 = ar.take<float>((size_t)N * QD);
    s.dk2 = ar.take<float>((size_t)N * KVD);
    s.dq16 = ar.take<bf16_bits>((size_t)N * QD);
    s.dk16 = ar.take<bf16_bits>((size_t)N * KVD);
    s.dv16 = ar.take<bf16_bits>((size_t)N * KVD);
    const size_t hidden = std::max({NK * H, (size_t)N * HS, (size_t)N * HDm, (size_t)1});
    if (ML > 0) {
      s.dy = ar.take<bf16_bits>(NK * C);
      s.dxa = ar.take<float>(NK * C);
      s.dweights = ar.take<float>(NK);
      s.dlogits = ar.take<bf16_bits>((size_t)N * Ep);
      s.ds_out = ar.take<bf16_bits>((size_t)N * C);
      s.ds_logit = ar.take<bf16_bits>((size_t)N * 8);
    }
    s.dact = ar.take<float>(hidden);
    // One buffer: the routed experts' d gate | d up rows side by side ([NK, 2H], grouped_gemm_backward_pair's
    // dGU); the shared and dense MLPs' two halves.
    s.dg16 = ar.take<bf16_bits>(2 * hidden);
    s.du16 = s.dg16 ? s.dg16 + hidden : nullptr;
    if (ML > 0 && HS > 0 && !weights_only) {
      s.s_dact = ar.take<float>((size_t)N * HS);
      s.s_dg16 = ar.take<bf16_bits>((size_t)2 * N * HS);
      s.s_du16 = s.s_dg16 + (size_t)N * HS;
    }
    A.tokens = ar.take<int32_t>(N);
    A.pos = ar.take<int32_t>(N);
    A.target = ar.take<int32_t>(N);
    A.cu = ar.take<int32_t>((size_t)N + 1);
    A.emb_order = ar.take<int32_t>(N);
    A.emb_starts = ar.take<int32_t>((size_t)N + 1);
    A.emb_uniq = ar.take<int32_t>(N);
    A.replay = ar.take<int32_t>((size_t)std::max(ML, 1) * NK);
    A.g = ar.take<float>(N);
    A.aux_dp = ar.take<float>(std::max(E, 1));
    A.loss_w = ar.take<double>(N);
    A.loss_rows = ar.take<float>((size_t)3 * N);
  }

  void ensure_acts(int N) {
    if (N <= A.cap_n && act_mem) return;
    MP_GPU_CHECK(gpu::stream_sync(stream));
    if (act_mem) gpu::free_device(act_mem);
    act_mem = nullptr;
    A.cap_n = 0;
    Arena sizing;
    plan(sizing, N);
    MP_GPU_CHECK(gpu::malloc_device(&act_mem, sizing.off + 256));
    Arena real{static_cast<char*>(act_mem), 0};
    plan(real, N);
    A.cap_n = N;
  }

  void ensure_rope(int P) {
    if (P <= rope_p) return;
    P = std::max(P, 2 * rope_p);
    std::vector<float> cs, sn;
    gpu::rope_tables(cs, sn, P, inv_freq);
    MP_GPU_CHECK(gpu::stream_sync(stream));
    if (rope_cos) gpu::free_device(rope_cos);
    if (rope_sin) gpu::free_device(rope_sin);
    rope_cos = alloc<float>(cs.size());
    rope_sin = alloc<float>(sn.size());
    upload(rope_cos, cs.data(), cs.size());
    upload(rope_sin, sn.data(), sn.size());
    rope_p = P;
  }

  template <class T>
  void upload(T* dst, const T* src, size_t n) {
    if (n) MP_GPU_CHECK(gpu::memcpy_async(dst, src, n * sizeof(T), stream));
  }
  template <class T>
  void download(T* dst, const T* src, size_t n) {
    if (n) MP_GPU_CHECK(gpu::memcpy_async(dst, src, n * sizeof(T), stream));
  }
  void sync() { MP_GPU_CHECK(gpu::stream_sync(stream)); }

  // ------------------------------------------------------------------ expert parallelism
  void check_experts_held() const {
    MP_CHECK_ARG(comm || ML == 0 || (e0 == 0 && El == E),
                 "the GPU engine holds experts [" + std::to_string(e0) + ", " + std::to_string(e0 + El) + ") of " +
                     std::to_string(E) + ": set_parallel must name the ranks that own the others before a pass");
  }

  void plan_ep_layer(Arena& ar, EpLayer& p, size_t cap) {
    p.group_src = ar.take<int32_t>(cap);  // each array 256-byte aligned (the arena's), as the kernels' inputs
    p.group_inv = ar.take<int32_t>(cap);
    p.offsets = ar.take<int32_t>((size_t)El + 1);
    p.xg = ar.take<bf16_bits>(cap * C);
    p.gate = ar.take<float>(cap * H);
    p.up = ar.take<float>(cap * H);
    p.act = ar.take<bf16_bits>(cap * H);
  }
  void plan_ep_scratch(Arena& ar, size_t cap) {
    eps.xr = ar.take<bf16_bits>(cap * C);
    eps.dyg = ar.take<bf16_bits>(cap * C);
    eps.yl = ar.take<float>(cap * C);
    eps.yr = ar.take<float>(cap * C);
    eps.dact = ar.take<float>(cap * H);
    eps.dg16 = ar.take<bf16_bits>(cap * 2 * H);  // [R, 2H]: d gate | d up (grouped_gemm_backward_pair's dGU)
    eps.dxa = ar.take<float>(cap * C);
  }
  // Regrowth (rows only known once the counts are exchanged): a quarter more than asked, so that a slowly
  // growing load does not reallocate every step.
  template <class PlanFn>
  void grow(void*& mem, size_t& cap, size_t rows, PlanFn plan_fn) {
    if (rows <= cap && mem) return;
    sync();
    if (mem) gpu::free_device(mem);
    mem = nullptr;
    cap = std::max<size_t>(rows + rows / 4, 16);
    Arena sizing;
    plan_fn(sizing, cap);
    MP_GPU_CHECK(gpu::malloc_device(&mem, sizing.off + 256));
    Arena real{static_cast<char*>(mem), 0};
    plan_fn(real, cap);
  }

  static std::vector<int64_t> scaled(const std::vector<int64_t>& rows, int64_t width) {
    std::vector<int64_t> out(rows.size());
    for (size_t r = 0; r < rows.size(); r++) out[r] = rows[r] * width;
    return out;
  }

  static int64_t sum(const std::vector<int64_t>& v) {
    int64_t n = 0;
    for (int64_t x : v) n += x;
    return n;
  }

  // Times a collective call into a2a_ms; `bytes` (what this rank sends in it) into a2a_bytes.
  template <class Fn>
  void timed_exchange(double bytes, Fn fn) {
    a2a_bytes += bytes;
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    a2a_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }

  // The exchange's plan for MoE layer l from this rank's rows per expert (counts [E], host): the per-expert counts
  // go to the owners (one all_to_all_v whose sizes are known: El_r to rank r, El from each rank), which gives the
  // rows per rank both ways and the grouping of the received rows by local expert. Received rows come source by
  // source, each source's in ascending expert (its send order); grouped rows are expert by expert, each expert's by
  // source then the sender's order: the stable sort of blocks.cpp.
  void ep_plan(int l, const std::vector<int32_t>& counts) {
    EpLayer& p = ep[l];
    std::vector<int64_t> sc(W), rc(W, El);
    for (int r = 0; r < W; r++) sc[r] = bounds[r + 1] - bounds[r];
    std::vector<int32_t> got((size_t)W * El + 1, 0);  // got[s*El + e]: rows source s sends to local expert e
    timed_exchange((double)sum(sc) * sizeof(int32_t), [&] { comm->all_to_all_v(counts.data(), sc, got.data(), rc); });
    p.send_rows.assign(W, 0);
    p.recv_rows.assign(W, 0);
    for (int r = 0; r < W; r++)
      for (int e = bounds[r]; e < bounds[r + 1]; e++) p.send_rows[r] += counts[e];
    std::vector<int32_t> offsets(El + 1, 0);
    for (int s = 0; s < W; s++)
      for (int e = 0; e < El; e++) {
        MP_CHECK_INTERNAL(got[(size_t)s * El + e] >= 0, "moe: negative row count received");
        p.recv_rows[s] += got[(size_t)s * El + e];
        offsets[e + 1] += got[(size_t)s * El + e];
      }
    for (int e = 0; e < El; e++) offsets[e + 1] += offsets[e];
    const int R = offsets[El];
    std::vector<int32_t> src(R), inv(R);
    std::vector<int32_t> fill(offsets.begin(), offsets.end() - 1);
    int j = 0;
    for (int s = 0; s < W; s++)
      for (int e = 0; e < El; e++)
        for (int t = 0; t < got[(size_t)s * El + e]; t++, j++) {
          const int g = fill[e]++;
          src[g] = j;
          inv[j] = g;
        }
    grow(p.mem, p.cap, (size_t)R, [&](Arena& ar, size_t cap) { plan_ep_layer(ar, p, cap); });
    p.R = R;
    upload(p.group_src, src.data(), src.size());
    upload(p.group_inv, inv.data(), inv.size());
    upload(p.offsets, offsets.data(), offsets.size());
    sync();  // the host vectors die at return
  }

  // The routed experts of MoE layer l under expert parallelism. a.xg [NK,C] holds this rank's rows in send order
  // (moe_permute's grouped order: ascending expert, hence ascending owner), counts [E] (device) its rows per
  // expert; a.y [NK,C] receives each row's expert output in the same order, so that moe_combine_forward reads it
  // through pos_of exactly as on one GPU. Rows travel as the bf16 GEMM operands (the bits the one-GPU path
  // feeds its grouped GEMM), outputs as fp32. N may be 0: the rank still serves the other ranks' rows. s: the
  // model's stream (trainer) or the rollout's; the plan's small copies go through the model's stream.
  void ep_experts_forward(int l, LayerActs& a, int N, const int32_t* counts_dev, Stream s) {
    const LayerOffsets& o = L.layers[l];
    std::vector<int32_t> counts(std::max(E, 1), 0);
    MP_GPU_CHECK(gpu::stream_sync(s));  // the counts and the rows to send are ready
    if (N > 0) {
      download(counts.data(), counts_dev, E);
      sync();
    }
    ep_plan(l, counts);
    EpLayer& p = ep[l];
    const int R = p.R;
    grow(eps.mem, eps.cap, (size_t)R, [&](Arena& ar, size_t cap) { plan_ep_scratch(ar, cap); });
    timed_exchange((double)sum(p.send_rows) * C * 2, [&] {
      comm->all_to_all_v(a.xg, scaled(p.send_rows, (int64_t)C * 2), eps.xr, scaled(p.recv_rows, (int64_t)C * 2),
                         DType::U8);
    });
    if (R > 0) {
      gpu::moe_gather(p.xg, eps.xr, p.group_src, R, 1, C, s);
      gpu::grouped_gemm_forward(p.gate, p.xg, P16(o.expert_gate), p.offsets, El, R, H, C, s);
      gpu::grouped_gemm_forward(p.up, p.xg, P16(o.expert_up), p.offsets, El, R, H, C, s);
      gpu::swiglu_forward(p.act, p.gate, p.up, (size_t)R * H, s);
      gpu::grouped_gemm_forward(eps.yl, p.act, P16(o.expert_down), p.offsets, El, R, C, H, s);
      gpu::embedding_forward(eps.yr, p.group_inv, eps.yl, R, C, s);  // back to received order (a row gather)
    }
    MP_GPU_CHECK(gpu::stream_sync(s));
    timed_exchange((double)sum(p.recv_rows) * C * sizeof(float),
                   [&] { comm->all_to_all_v(eps.yr, scaled(p.recv_rows, C), a.y, scaled(p.send_rows, C)); });
  }

  // Its mirror: A.sc.dy [NK,C] (bf16, send order, w * dh) goes to the owners, whose expert backward adds the weight
  // gradients there; each row's input gradient (gate and up paths summed) comes home into A.sc.dxa [NK,C] in send
  // order, for moe_scatter_add.
  void ep_experts_backward(int l, Stream s) {
    const LayerOffsets& o = L.layers[l];
    const EpLayer& p = ep[l];
    const int R = p.R;
    Scratch& sc = A.sc;
    sync();
    timed_exchange((double)sum(p.send_rows) * C * 2, [&] {
      comm->all_to_all_v(sc.dy, scaled(p.send_rows, (int64_t)C * 2), eps.xr, scaled(p.recv_rows, (int64_t)C * 2),
                         DType::U8);
    });
    if (R > 0) {
      gpu::moe_gather(eps.dyg, eps.xr, p.group_src, R, 1, C, s);
      expert_backward(eps.dact, true, o.expert_down, eps.dyg, p.act, p.offsets, El, R, C, H, !grads_zero, s);
      gpu::swiglu_backward(eps.dg16, eps.dg16 + H, eps.dact, p.gate, p.up, (size_t)R * H, s, H, 2 * H);
      expert_backward_pair(eps.dxa, true, o.expert_gate, o.expert_up, eps.dg16, p.xg, p.offsets, El, R, H, C,
                           !grads_zero, s);
      gpu::embedding_forward(eps.yr, p.group_inv, eps.dxa, R, C, s);
    }
    sync();
    timed_exchange((double)sum(p.recv_rows) * C * sizeof(float),
                   [&] { comm->all_to_all_v(eps.yr, scaled(p.recv_rows, C), sc.dxa, scaled(p.send_rows, C)); });
  }

  // A rank without sequences: the MoE layers' exchanges, in the order a pass with rows makes them (it still runs
  // its experts on the other ranks' rows and accumulates their weight gradients).
  void ep_idle_forward() {
    for (int l = 0; l < cfg.layers; l++)
      if (cfg.layer_is_moe[l]) ep_experts_forward(l, A.layers[l], 0, nullptr, stream);
  }
  void ep_idle_backward() {
    for (int l = cfg.layers - 1; l >= 0; l--)
      if (cfg.layer_is_moe[l]) ep_experts_backward(l, stream);
  }

  // ------------------------------------------------------------------ batch set-up
  struct BatchInfo {
    int N = 0, B = 0, max_len = 0, U = 0;
    std::vector<int32_t> target, seq_off;
    std::vector<double> loss_w;  // the loss's row weights, when upload_loss_rows made them
    double loss_tokens = 0;
  };

  // The batch was validated by Engine::forward / forward_backward (model/forward.cpp's check_batch).
  // Starts a pass's pinned staging with room for its transfers (counted generously): the batch (6 N + B + 2 +
  // replay int32 at most), the loss's inputs (5 N: double weights, three float rows) and the logprobs and loss
  // gradient back and forth (3 N + E + 2 moe_layers x E words).
  void begin_pinned(const Batch& b) {
    const size_t N = b.tokens.size(), words = 16 * N + b.seq_lens.size() + b.replay_experts.size() +
                                             2 * (size_t)std::max(E, 1) * (std::max(ML, 1) + 1) + 64;
    const size_t bytes = words * 4 + 64 * 16;
    if (bytes > pinned.cap) {
      if (pinned.base) MP_GPU_CHECK(gpu::free_host(pinned.base));
      pinned.base = nullptr;
      pinned.cap = 0;
      void* p = nullptr;
      MP_GPU_CHECK(gpu::malloc_host(&p, bytes + bytes / 2));
      pinned.base = static_cast<char*>(p);
      pinned.cap = bytes + bytes / 2;
    }
    pinned.used = 0;
  }
  // Copies host data into a pinned slice and queues its upload.
  template <class T>
  void upload_pinned(T* dst, const T* src, size_t n) {
    if (!n) return;
    T* h = pinned.take<T>(n);
    std::memcpy(h, src, n * sizeof(T));
    upload(dst, h, n);
  }

  BatchInfo upload_batch(const Batch& b) {
    BatchInfo bi;
    bi.N = (int)b.tokens.size();
    bi.B = (int)b.seq_lens.size();
    const int N = bi.N;
    ensure_acts(N);
    sync();  // a pass that threw may have left copies from the staging queued
    begin_pinned(b);
    std::vector<int32_t> pos(N), cu(bi.B + 1, 0);
    bi.target.assign(N, -1);
    for (int s = 0; s < bi.B; s++) {
      const int o = cu[s], T = b.seq_lens[s];
      bi.max_len = std::max(bi.max_len, T);
      for (int t = 0; t < T; t++) {
        pos[o + t] = t;
        bi.target[o + t] = t + 1 < T ? b.tokens[o + t + 1] : -1;
      }
      cu[s + 1] = o + T;
    }
    bi.seq_off = cu;
    ensure_rope(bi.max_len);
    // From pinned slices: queued, no wait (the slices outlive the copies; the pass ends synchronized).
    upload_pinned(A.tokens, b.tokens.data(), N);
    upload_pinned(A.pos, pos.data(), N);
    upload_pinned(A.target, bi.target.data(), N);
    upload_pinned(A.cu, cu.data(), cu.size());
    upload_pinned(A.replay, b.replay_experts.data(), b.replay_experts.size());
    return bi;
  }

  // The embedding backward's rows grouped by token, each group in row order, and the distinct tokens (bi.U of
  // them). forward_backward makes them while the forward runs on the device (a sort of the rows: host time that
  // would otherwise stand before the forward's first kernel) and queues their upload behind it.
  void upload_embedding_order(const Batch& b, BatchInfo& bi) {
    const int N = bi.N;
    std::vector<uint64_t> keyed(N);  // token in the high word, row in the low one: a plain sort is the stable one
    for (int i = 0; i < N; i++) keyed[i] = (uint64_t)(uint32_t)b.tokens[i] << 32 | (uint32_t)i;
    std::sort(keyed.begin(), keyed.end());
    int32_t* order = pinned.take<int32_t>(N);
    int32_t* starts = pinned.take<int32_t>((size_t)N + 1);
    int32_t* uniq = pinned.take<int32_t>(N);
    int U = 0;
    for (int j = 0; j < N; j++) {
      order[j] = (int32_t)(uint32_t)keyed[j];
      const int32_t tok = (int32_t)(keyed[j] >> 32);
      if (j == 0 || tok != uniq[U - 1]) starts[U] = j, uniq[U++] = tok;
    }
    starts[U] = N;
    bi.U = U;
    upload(A.emb_order, order, N);
    upload(A.emb_starts, starts, (size_t)U + 1);
    upload(A.emb_uniq, uniq, U);
  }

  // The on-device loss gradient's inputs: the row weights (loss_row_weights: also the check of the mask at each
  // sequence's last row, before any work is queued) and GRPO's rows. Returns policy_grad's arguments.
  // Keeps the weights in bi for the loss's figures after the pass.
  gpu::PolicyGradArgs upload_loss_rows(const LossSpec& spec, BatchInfo& bi) {
    const int N = bi.N;
    loss_row_weights(spec, bi.seq_off.data(), bi.B, bi.target.data(), N, bi.loss_w, bi.loss_tokens);
    upload_pinned(A.loss_w, bi.loss_w.data(), N);
    gpu::PolicyGradArgs a;
    if (spec.type != LossType::Grpo) return a;
    a.grpo = true;
    a.eps_low = spec.eps_low;
    a.eps_high = spec.eps_high;
    a.beta = spec.beta;
    a.k3 = spec.kl == KlEstimator::K3;
    upload_pinned(A.loss_rows, spec.advantages.data(), N);
    upload_pinned(A.loss_rows + N, spec.old_logprobs.data(), N);
    a.advantages = A.loss_rows;
    a.old_logprobs = A.loss_rows + N;
    if (!spec.ref_logprobs.empty()) {
      upload_pinned(A.loss_rows + 2 * (size_t)N, spec.ref_logprobs.data(), N);
      a.ref_logprobs = A.loss_rows + 2 * (size_t)N;
    }
    return a;
  }

  // ------------------------------------------------------------------ forward
  // Paged attention of the rollout, in place of attention_forward.
  struct PagedCall {
    gpu::PagedKv kv;
    gpu::PagedRows rows;
  };

  // What the attention block reads besides the rows: positions [N], the RoPE tables, and either the packed
  // sequences (shape, cu_seqlens in A.cu: the trainer) or the paged cache (the rollout).
  struct AttnIn {
    const int32_t* pos = nullptr;
    const float *rope_cos = nullptr, *rope_sin = nullptr;
    const gpu::AttentionShape* shape = nullptr;
    const PagedCall* paged = nullptr;
  };

  // One layer's forward over N rows: h_in -> h_mid (attention block) -> h_out (MLP block). The trainer passes
  // three slices of its residual history; the rollout passes one buffer three times (then h += ... in place:
  // the same arithmetic, no copies). Attention: attention_forward over packed sequences or, with in.paged,
  // kv_cache_write + paged_attention over the cache (bit-identical rows). MoE layers: experts [N,K] receives
  // the router's choice; replay [N,K] (optional) replaces it; probsum [E] (optional) the probability mass;
  // counts [E] the rows per expert. timed: phase marks on the clock (the trainer). ov: side streams for the
  // independent products (the rollout; null: all on s).
  void layer_forward(int l, LayerActs& a, Scratch& sc, const float* h_in, float* h_mid, float* h_out, int N,
                     const AttnIn& in, const int32_t* replay, int32_t* experts, float* probsum, int32_t* counts,
                     bool timed, Stream s, const Overlap* ov = nullptr) {
    const size_t NK = (size_t)N * K;
    const int32_t* pos = in.pos;
    const float* rope_cos = in.rope_cos;
    const float* rope_sin = in.rope_sin;
    const PagedCall* paged = in.paged;
    auto mark = [&](int phase, Stream st, const char* label = nullptr) {
      if (timed) clock.mark(phase, st, label);
    };
    const LayerOffsets& o = L.layers[l];
    mark(kAttention, s);
    gpu::rmsnorm_forward(nullptr, a.ln1, a.rstd1, h_in, P(o.attn_norm), N, C, cfg.rms_eps, s);
    float* q32 = cfg.qk_norm ? a.q_raw : sc.q32;
    float* k32 = cfg.qk_norm ? a.k_raw : sc.k32;
    mark(kAttention, s, "f.qkv");
    Stream sk = s, sv = s;  // k's and v's chains (side streams with ov)
    if (ov) {
      ov->fork(s, 2);
      sk = ov->side[0];
      sv = ov->side[1];
    }
    gpu::gemm_forward(q32, a.ln1, P16(o.wq), P(o.bq), N, QD, C, false, s);
    gpu::gemm_forward(k32, a.ln1, P16(o.wk), P(o.bk), N, KVD, C, false, sk);
    gpu::gemm_forward(sc.v32, a.ln1, P16(o.wv), P(o.bv), N, KVD, C, false, sv);
    float* qr = q32;
    float* kr = k32;
    if (cfg.qk_norm) {
      gpu::rmsnorm_forward(sc.qn32, nullptr, a.q_rstd, q32, P(o.q_norm), N * NH, HD, cfg.rms_eps, s);
      gpu::rmsnorm_forward(sc.kn32, nullptr, a.k_rstd, k32, P(o.k_norm), N * KVH, HD, cfg.rms_eps, sk);
      qr = sc.qn32;
      kr = sc.kn32;
    }
    gpu::rope_forward_bf16(a.q, qr, pos, rope_cos, rope_sin, N, NH, HD, s);
    gpu::rope_forward_bf16(a.k, kr, pos, rope_cos, rope_sin, N, KVH, HD, sk);
    gpu::cast_f32_to_bf16(a.v, sc.v32, (size_t)N * KVD, sv);
    if (ov) {
      ov->join(s, 0);
      ov->join(s, 1);
    }
    mark(kAttention, s, "f.attn");
    if (paged) {
      gpu::kv_cache_write(paged->kv, l, a.k, a.v, KVD, paged->rows, s);
      gpu::paged_attention(a.att, a.q, QD, NH, paged->kv, l, paged->rows, s);
    } else {
      gpu::attention_forward(a.att, a.att_lse, a.q, a.k, a.v, A.cu, *in.shape, s);
    }
    mark(kAttention, s, "f.o_proj");
    gpu::gemm_forward_residual(h_mid, h_in, a.att, P16(o.wo), N, C, QD, s);
    mark(kExperts, s);
    gpu::rmsnorm_forward(nullptr, a.ln2, a.rstd2, h_mid, P(o.mlp_norm), N, C, cfg.rms_eps, s);
    // Gate/up products and SwiGLU: one GEMM with SwiGLU in its epilogue where the device has it (the same bits as
    // the three calls). A trainer's forward keeps the fp32 products for its backward; the rollout keeps none.
    const bool fused_glu = glu_epilogue && gpu::gemm_swiglu_available();
    const bool keep_gate_up = paged == nullptr;
    auto dense_glu = [&](bf16_bits* act, float* gate, float* up, const bf16_bits* Wg, const bf16_bits* Wu, int width,
                         Stream st) {
      if (fused_glu) {
        gpu::gemm_swiglu_forward(act, a.ln2, Wg, Wu, N, width, C, st, keep_gate_up ? gate : nullptr,
                                 keep_gate_up ? up : nullptr);
      } else {
        gpu::gemm_forward(gate, a.ln2, Wg, nullptr, N, width, C, false, st);
        gpu::gemm_forward(up, a.ln2, Wu, nullptr, N, width, C, false, st);
        gpu::swiglu_forward(act, gate, up, (size_t)N * width, st);
      }
    };
    if (cfg.layer_is_moe[l]) {
      // The shared expert reads ln2 alone and writes its own buffers: with ov it runs beside the routed path,
      // joined before the combine.
      auto shared_expert = [&](Stream ss) {
        dense_glu(a.s_act, a.s_gate, a.s_up, P16(o.shared_gate), P16(o.shared_up), HS, ss);
        gpu::gemm_forward(a.s_out, a.s_act, P16(o.shared_down), nullptr, N, C, HS, false, ss);
        gpu::gemm_forward(a.s_logit, a.ln2, pad16 + pad_sgate[l], nullptr, N, 8, C, false, ss);
      };
      const bool shared_beside = ov && HS > 0;
      if (shared_beside) {
        ov->fork(s, 1);
        shared_expert(ov->side[0]);
      }
      mark(kExperts, s, "f.router");
      gpu::gemm_forward(a.rlogits, a.ln2, router16(l), nullptr, N, Ep, C, false, s);
      gpu::router_forward(a.probs, a.weights, experts, a.rlogits, Ep, N, E, K, cfg.norm_topk_prob, s);
      if (replay) gpu::router_replay(a.weights, experts, a.probs, replay, N, E, K, cfg.norm_topk_prob, s);
      if (probsum) gpu::column_sums(probsum, a.probs, E, N, E, s);
      mark(kExperts, s, "f.permute");
      gpu::moe_permute(a.order, a.pos_of, a.offsets, counts, experts, (int)NK, E, s);
      gpu::moe_gather(a.xg, a.ln2, a.order, (int)NK, K, C, s);
      mark(kExperts, s, "f.experts");
      if (comm) {
        ep_experts_forward(l, a, N, counts, s);  // a.xg: the rows to send; a.y: their outputs, same order
      } else if (fused_glu) {
        gpu::grouped_gemm_swiglu_forward(a.act, a.xg, P16(o.expert_gate), P16(o.expert_up), a.offsets, E,
                                         (int64_t)NK, H, C, s, keep_gate_up ? a.gate : nullptr,
                                         keep_gate_up ? a.up : nullptr);
        mark(kExperts, s, "f.experts.down");
        gpu::grouped_gemm_forward(a.y, a.act, P16(o.expert_down), a.offsets, E, (int64_t)NK, C, H, s);
      } else {
        gpu::grouped_gemm_forward(a.gate, a.xg, P16(o.expert_gate), a.offsets, E, (int64_t)NK, H, C, s);
        gpu::grouped_gemm_forward(a.up, a.xg, P16(o.expert_up), a.offsets, E, (int64_t)NK, H, C, s);
        mark(kExperts, s, "f.experts.swiglu");
        gpu::swiglu_forward(a.act, a.gate, a.up, NK * H, s);
        mark(kExperts, s, "f.experts.down");
        gpu::grouped_gemm_forward(a.y, a.act, P16(o.expert_down), a.offsets, E, (int64_t)NK, C, H, s);
      }
      if (shared_beside) {
        ov->join(s, 0);
      } else if (HS > 0) {
        mark(kExperts, s, "f.shared");
        shared_expert(s);
      }
      mark(kExperts, s, "f.combine");
      gpu::moe_combine_forward(h_out, a.y, a.pos_of, a.weights, HS > 0 ? a.s_out : nullptr,
                               HS > 0 ? a.s_logit : nullptr, 8, N, C, K, s, h_mid);
    } else {
      dense_glu(a.m_act, a.m_gate, a.m_up, P16(o.dense_gate), P16(o.dense_up), HDm, s);
      gpu::gemm_forward_residual(h_out, h_mid, a.m_act, P16(o.dense_down), N, C, HDm, s);
    }
  }

  // logits_out: [N,V] the caller wants; kept_logits: where a training forward keeps them for the backward.
  gpu::AttentionShape attention_shape(const BatchInfo& bi) const {
    gpu::AttentionShape shape;
    shape.N = bi.N;
    shape.B = bi.B;
    shape.max_seqlen = bi.max_len;
    shape.NH = NH;
    shape.KVH = KVH;
    shape.HD = HD;
    shape.q_stride = QD;
    shape.kv_stride = KVD;
    return shape;
  }

  void forward_pass(const BatchInfo& bi, bool replay, float temperature, bool want_entropy, float* logits_out,
                    float* kept_logits = nullptr) {
    const int N = bi.N;
    const size_t NK = (size_t)N * K;
    const Stream s = stream;
    const Overlap* ov = train_overlap && overlap.side[0] ? &overlap : nullptr;
    clock.reset();
    clock.mark(kOther, s);
    gpu::embedding_forward(A.h, A.tokens, P(L.embed), N, C, s);
    const gpu::AttentionShape shape = attention_shape(bi);
    AttnIn attn_in;
    attn_in.pos = A.pos;
    attn_in.rope_cos = rope_cos;
    attn_in.rope_sin = rope_sin;
    attn_in.shape = &shape;
    int moe_idx = 0;
    for (int l = 0; l < cfg.layers; l++) {
      LayerActs& a = A.layers[l];
      float* h_in = A.h + (size_t)(2 * l) * N * C;
      float* h_mid = h_in + (size_t)N * C;
      float* h_out = h_mid + (size_t)N * C;
      const bool moe = cfg.layer_is_moe[l];
      layer_forward(l, a, A.sc, h_in, h_mid, h_out, N, attn_in,
                    replay && moe ? A.replay + (size_t)moe_idx * NK : nullptr, moe ? a.experts : nullptr,
                    moe ? A.probsum + (size_t)moe_idx * E : nullptr, moe ? A.counts + (size_t)moe_idx * E : nullptr,
                    true, s, ov);
      if (moe) moe_idx++;
    }
    clock.mark(kLmHead, s);
    const float* h_last = A.h + (size_t)(2 * cfg.layers) * N * C;
    gpu::rmsnorm_forward(nullptr, A.lnf, A.rstdf, h_last, P(L.final_norm), N, C, cfg.rms_eps, s);
    float* logits = logits_out ? logits_out : kept_logits;
    const gpu::LmHeadSide side{overlap.side[0], overlap.fork_ev, overlap.join_ev[0]};
    gpu::lm_head_forward(A.logprob, A.lse, want_entropy ? A.entropy : nullptr, logits, A.lnf, P16(L.lm_head),
                         A.target, N, C, V, temperature, A.sc.lm, s, logits && ov ? &side : nullptr);
    clock.mark(kOther, s);
  }

  // Router outputs of every MoE layer, compacted from the padded logits.
  void collect_router(int N, bool logits, bool experts, ForwardResult& r) {
    if (ML == 0) return;
    if (logits) r.router_logits.assign((size_t)ML * N * E, 0.f);
    if (experts) r.experts.assign((size_t)ML * N * K, 0);
    std::vector<float> tmp(logits ? (size_t)N * Ep : 0);
    int mi = 0;
    for (int l = 0; l < cfg.layers; l++) {
      if (!cfg.layer_is_moe[l]) continue;
      const LayerActs& a = A.layers[l];
      if (logits) {
        download(tmp.data(), a.rlogits, tmp.size());
        sync();
        for (int i = 0; i < N; i++)
          std::memcpy(&r.router_logits[((size_t)mi * N + i) * E], &tmp[(size_t)i * Ep], E * sizeof(float));
      }
      if (experts) download(r.experts.data() + (size_t)mi * N * K, a.experts, (size_t)N * K);
      mi++;
    }
    r.expert_tokens.assign((size_t)ML * E, 0);
    download(r.expert_tokens.data(), A.counts, (size_t)ML * E);
    sync();
  }

  // ------------------------------------------------------------------ backward
  // g [N] and aux_dp [E] already on the device (A.g, A.aux_dp when use_aux), or queued ahead on the stream.
  // after_forward: the clock keeps the forward's marks (read once the whole pass has run).
  void backward_pass(const BatchInfo& bi, float temperature, bool use_aux, bool after_forward = false) {
    const int N = bi.N;
    const size_t NK = (size_t)N * K;
    const Stream s = stream;
    Scratch& sc = A.sc;
    const gpu::AttentionShape shape = attention_shape(bi);
    // One rank: the shared expert's backward runs on side stream 0 beside the routed experts', and the attention
    // block's weight gradients (o, q, k, v) on side stream 1 beside the input gradients that the layers below wait
    // for (under expert parallelism the exchange's host synchronisation sits in the routed path: one stream).
    const Overlap* ov = train_overlap && overlap.side[0] && !comm ? &overlap : nullptr;
    // Side stream 1 reads d16, dq16, dk16 and dv16 until joined: before the next write of any of them, and at the end.
    // A weight gradient is its own product (gemm_backward with dA or dW null): the same bits on either stream.
    SideWork dense_dw{ov, s, 1};
    // Weight gradients that nothing later in the pass reads, in the background (background_dw): the LM head's on
    // side stream 3, the routed experts' on side stream 2. Their streams have the lowest priority, so their blocks
    // take the SMs that the input-gradient chain leaves idle (the chain's small and memory-bound kernels, the gaps
    // between kernels) rather than delaying it. That holds for the routed dW's short-lived blocks; cuBLASLt's kernel
    // for the LM head's dW is persistent and, once started, holds every SM until it is done (1.6 ms at the A2.7B
    // shape; elsewhere in the backward it measured no faster: bench/train-gpu.notes.md, stop 27). Side stream 2
    // reads a layer's dy and d gate | d up until joined: before the next layer's MLP block writes them, and at the
    // end (side stream 4 likewise, with the gate projection's: see dw_split); side stream 3 is joined at the end.
    const bool routed_dw_beside = ov && background_dw;
    SideWork routed_dw{routed_dw_beside ? ov : nullptr, s, 2};
    // The gate projection's dW on side stream 4, beside the down and up projections' on side stream 2
    // (routed_dw_two_streams): each launch's last wave shares the SMs with the other stream's blocks instead of
    // idling them before the next launch on the same stream.
    const bool dw_split = routed_dw_beside && routed_dw_two_streams;
    SideWork routed_dw2{dw_split ? ov : nullptr, s, 4};
    // The norms' weight gradients (column sums over the rows of dln and the norm's input) beside the chain too: the
    // MLP norm's on side stream 1 before the o projection's weight gradient, the attention norm's (and the final
    // norm's) on side stream 0, which reads dln until joined before the next layer's MLP block clears it.
    const bool norm_beside = ov != nullptr;
    SideWork norm_dw{norm_beside ? ov : nullptr, s, 0};
    auto norm_backward = [&](size_t w, const float* inp, const float* rstd, bool accumulate, SideWork& side,
                             bf16_bits* d16) {
      gpu::rmsnorm_backward(sc.dh, norm_beside ? nullptr : G(w), sc.dln, inp, P(w), rstd, N, C, accumulate, s, d16);
      if (norm_beside) gpu::rmsnorm_backward_dweight(G(w), sc.dln, inp, rstd, N, C, side.fork());
    };
    if (after_forward)
      clock.begin_segment();
    else
      clock.reset();
    clock.mark(kLmHead, s);
    // After zero_grad every dense weight's gradient is written by exactly one GEMM of this pass (the LM head's
    // first: a tied embedding's rows are added after it), so those GEMMs overwrite instead of adding to zeros.
    const bool acc = !grads_zero;
    const bool lm_dw_beside = ov && background_dw && A.dlogits;
    gpu::lm_head_backward(sc.dln, lm_dw_beside ? nullptr : G(L.lm_head), A.g, A.lse, A.logits, A.lnf, P16(L.lm_head),
                          A.target, N, C, V, temperature, sc.lm, s, acc, A.dlogits);
    SideWork lm_dw{lm_dw_beside ? ov : nullptr, s, 3};
    if (lm_dw_beside)  // (from the whole vocabulary's dlogits: one product)
      gpu::gemm_backward(nullptr, G(L.lm_head), nullptr, A.dlogits, A.lnf, P16(L.lm_head), N, V, C, false, acc,
                         lm_dw.fork());
    clock.mark(kOther, s);
    const float* h_last = A.h + (size_t)(2 * cfg.layers) * N * C;
    norm_backward(L.final_norm, h_last, A.rstdf, false, norm_dw, nullptr);
    for (int l = cfg.layers - 1; l >= 0; l--) {
      const LayerOffsets& o = L.layers[l];
      const LayerActs& a = A.layers[l];
      const float* h_in = A.h + (size_t)(2 * l) * N * C;
      const float* h_mid = h_in + (size_t)N * C;
      // MLP block: h_out = h_mid + f(rmsnorm(h_mid)); dh holds d h_out and becomes d h_mid.
      clock.mark(kExperts, s);
      auto clear_dln = [&] {
        norm_dw.join();
        MP_GPU_CHECK(gpu::memset_async(sc.dln, 0, (size_t)N * C * sizeof(float), s));
      };
      if (!cfg.layer_is_moe[l]) clear_dln();
      routed_dw.join();
      routed_dw2.join();
      if (cfg.layer_is_moe[l]) {
        clock.mark(kExperts, s, "b.combine");
        gpu::moe_combine_backward(sc.dy, sc.dweights, sc.ds_out, sc.ds_logit, sc.dh, a.y, a.pos_of, a.weights,
                                  HS > 0 ? a.s_out : nullptr, HS > 0 ? a.s_logit : nullptr, 8, N, C, K, s);
        clear_dln();  // (after the combine: side stream 0's norm weight gradient runs beside it)
        // The shared expert adds its input gradients into dln first, the routed experts' come after (moe_scatter_add
        // of dxa), then the router's: one order of the sum whether the shared expert runs beside the routed experts
        // (ov: a side stream, joined before the scatter; pad_dw is the router's again only after it) or before them.
        auto shared_backward = [&](Stream ss, float* dact, bf16_bits* dg, bf16_bits* du) {
          gpu::gemm_backward(dact, G(o.shared_down), nullptr, sc.ds_out, a.s_act, P16(o.shared_down), N, C, HS,
                             false, acc, ss);
          gpu::swiglu_backward(dg, du, dact, a.s_gate, a.s_up, (size_t)N * HS, ss);
          gpu::gemm_backward(sc.dln, G(o.shared_gate), nullptr, dg, a.ln2, P16(o.shared_gate), N, HS, C, true, acc,
                             ss);
          gpu::gemm_backward(sc.dln, G(o.shared_up), nullptr, du, a.ln2, P16(o.shared_up), N, HS, C, true, acc, ss);
          MP_GPU_CHECK(gpu::memset_async(pad_dw, 0, (size_t)8 * C * sizeof(float), ss));
          gpu::gemm_backward(sc.dln, pad_dw, nullptr, sc.ds_logit, a.ln2, pad16 + pad_sgate[l], N, 8, C, true, ss);
          gpu::add_inplace(G(o.shared_expert_gate), pad_dw, C, ss);
        };
        const bool shared_beside = ov && HS > 0;  // (its own dact, dg16 and du16: s_dact, s_dg16, s_du16)
        if (shared_beside) {
          ov->fork(s, 1);
          shared_backward(ov->side[0], sc.s_dact, sc.s_dg16, sc.s_du16);
        } else if (HS > 0) {
          clock.mark(kExperts, s, "b.shared");
          shared_backward(s, sc.dact, sc.dg16, sc.du16);
        }
        clock.mark(kExperts, s, "b.experts");
        if (comm) {
          ep_experts_backward(l, s);  // sc.dxa: each row's input gradient (gate + up paths), send order
          clock.mark(kExperts, s, "b.router");
          gpu::moe_scatter_add(sc.dln, sc.dxa, nullptr, a.pos_of, N, C, K, s);
        } else {
          // In the background each weight gradient is its own launch, the input gradients' product another (the same
          // bits as the two in one call).
          if (routed_dw_beside)
            expert_backward(nullptr, true, o.expert_down, sc.dy, a.act, a.offsets, E, (int64_t)NK, C, H, acc,
                            routed_dw.fork());
          expert_backward(sc.dact, !routed_dw_beside, o.expert_down, sc.dy, a.act, a.offsets, E, (int64_t)NK, C, H,
                          acc, s);
          // d gate | d up side by side, then one product for both paths' input gradient.
          gpu::swiglu_backward(sc.dg16, sc.dg16 + H, sc.dact, a.gate, a.up, NK * H, s, H, 2 * H);
          if (dw_split) {
            expert_backward(nullptr, true, o.expert_gate, sc.dg16, a.xg, a.offsets, E, (int64_t)NK, H, C, acc,
                            routed_dw2.fork(), 2 * H);
            expert_backward(nullptr, true, o.expert_up, sc.dg16 + H, a.xg, a.offsets, E, (int64_t)NK, H, C, acc,
                            routed_dw.fork(), 2 * H);
          } else if (routed_dw_beside)
            expert_backward_pair(nullptr, true, o.expert_gate, o.expert_up, sc.dg16, a.xg, a.offsets, E,
                                 (int64_t)NK, H, C, acc, routed_dw.fork());
          expert_backward_pair(sc.dxa, !routed_dw_beside, o.expert_gate, o.expert_up, sc.dg16, a.xg, a.offsets, E,
                               (int64_t)NK, H, C, acc, s);
          if (shared_beside) ov->join(s, 0);
          clock.mark(kExperts, s, "b.router");
          gpu::moe_scatter_add(sc.dln, sc.dxa, nullptr, a.pos_of, N, C, K, s);
        }
        gpu::router_backward(sc.dlogits, Ep, sc.dweights, use_aux ? A.aux_dp : nullptr, a.probs, a.weights,
                             a.experts, N, E, K, cfg.norm_topk_prob, s);
        if (pad_router[l] == SIZE_MAX) {
          gpu::gemm_backward(sc.dln, G(o.router), nullptr, sc.dlogits, a.ln2, router16(l), N, E, C, true, acc, s);
        } else {
          MP_GPU_CHECK(gpu::memset_async(pad_dw, 0, (size_t)Ep * C * sizeof(float), s));
          gpu::gemm_backward(sc.dln, pad_dw, nullptr, sc.dlogits, a.ln2, router16(l), N, Ep, C, true, s);
          gpu::add_inplace(G(o.router), pad_dw, (size_t)E * C, s);
        }
      } else {
        dense_dw.join();
        gpu::cast_f32_to_bf16(sc.d16, sc.dh, (size_t)N * C, s);
        gpu::gemm_backward(sc.dact, G(o.dense_down), nullptr, sc.d16, a.m_act, P16(o.dense_down), N, C, HDm, false,
                           acc, s);
        gpu::swiglu_backward(sc.dg16, sc.du16, sc.dact, a.m_gate, a.m_up, (size_t)N * HDm, s);
        gpu::gemm_backward(sc.dln, G(o.dense_gate), nullptr, sc.dg16, a.ln2, P16(o.dense_gate), N, HDm, C, true, acc,
                           s);
        gpu::gemm_backward(sc.dln, G(o.dense_up), nullptr, sc.du16, a.ln2, P16(o.dense_up), N, HDm, C, true, acc, s);
      }
      // (dense_dw first: side stream 1 may still read d16, which the norm's backward writes beside dh)
      dense_dw.join();
      norm_backward(o.mlp_norm, h_mid, a.rstd2, true, dense_dw, sc.d16);
      // Attention block: h_mid = h_in + o_proj(attention(...)); dh becomes d h_in.
      clock.mark(kAttention, s);
      gpu::gemm_backward(nullptr, G(o.wo), nullptr, sc.d16, a.att, P16(o.wo), N, C, QD, false, acc, dense_dw.fork());
      gpu::gemm_backward_dA_bf16(sc.datt16, sc.d16, P16(o.wo), N, C, QD, s);
      clock.mark(kAttention, s, "b.attn");
      gpu::attention_backward(sc.dq, sc.dk, sc.dv, sc.datt16, a.att, a.att_lse, a.q, a.k, a.v, A.cu, shape, s);
      if (cfg.qk_norm) {
        gpu::rope_backward(sc.dq, A.pos, rope_cos, rope_sin, N, NH, HD, s);
        gpu::rope_backward(sc.dk, A.pos, rope_cos, rope_sin, N, KVH, HD, s);
        gpu::rmsnorm_backward(sc.dq2, G(o.q_norm), sc.dq, a.q_raw, P(o.q_norm), a.q_rstd, N * NH, HD, false, s);
        gpu::rmsnorm_backward(sc.dk2, G(o.k_norm), sc.dk, a.k_raw, P(o.k_norm), a.k_rstd, N * KVH, HD, false, s);
        clock.mark(kAttention, s, "b.qkv");
        gpu::cast_f32_to_bf16(sc.dq16, sc.dq2, (size_t)N * QD, s);
        gpu::cast_f32_to_bf16(sc.dk16, sc.dk2, (size_t)N * KVD, s);
      } else {  // the rotation's backward writes the GEMMs' bf16 operands itself
        gpu::rope_backward_bf16(sc.dq16, sc.dq, A.pos, rope_cos, rope_sin, N, NH, HD, s);
        gpu::rope_backward_bf16(sc.dk16, sc.dk, A.pos, rope_cos, rope_sin, N, KVH, HD, s);
        clock.mark(kAttention, s, "b.qkv");
      }
      gpu::cast_f32_to_bf16(sc.dv16, sc.dv, (size_t)N * KVD, s);
      if (norm_beside) dense_dw.join();  // (side stream 1 read dln for the MLP norm's weight; q, k, v write it below)
      const Stream sw = dense_dw.fork();
      gpu::gemm_backward(nullptr, G(o.wq), G(o.bq), sc.dq16, a.ln1, P16(o.wq), N, QD, C, false, acc, sw);
      gpu::gemm_backward(nullptr, G(o.wk), G(o.bk), sc.dk16, a.ln1, P16(o.wk), N, KVD, C, false, acc, sw);
      gpu::gemm_backward(nullptr, G(o.wv), G(o.bv), sc.dv16, a.ln1, P16(o.wv), N, KVD, C, false, acc, sw);
      gpu::gemm_backward(sc.dln, nullptr, nullptr, sc.dq16, a.ln1, P16(o.wq), N, QD, C, false, acc, s);
      gpu::gemm_backward(sc.dln, nullptr, nullptr, sc.dk16, a.ln1, P16(o.wk), N, KVD, C, true, acc, s);
      gpu::gemm_backward(sc.dln, nullptr, nullptr, sc.dv16, a.ln1, P16(o.wv), N, KVD, C, true, acc, s);
      norm_backward(o.attn_norm, h_in, a.rstd1, true, norm_dw, nullptr);
    }
    norm_dw.join();
    dense_dw.join();
    routed_dw.join();
    routed_dw2.join();
    lm_dw.join();  // (before the embedding backward: a tied embedding adds into the LM head's)
    clock.mark(kOther, s);
    gpu::embedding_backward(G(L.embed), sc.dh, A.emb_order, A.emb_starts, A.emb_uniq, bi.U, C, s);
    clock.mark(kOther, s);
  }
};

// ==================================================================== GpuModel
GpuModel::GpuModel(const ModelConfig& cfg, const ParamLayout& layout, int device, bool weights_only,
                   bool expert_grads_bf16)
    : impl_(new Impl) {
  Impl& m = *impl_;
  m.weights_only = weights_only;
  cfg.validate();
  int count = 0;
  const gpu::Status st = gpu::device_count(&count);
  MP_CHECK_ARG(st == gpu::kSuccess, std::string("to_device: no usable CUDA device (") + gpu::status_string(st) + ")");
  MP_CHECK_ARG(device >= 0 && device < count, "to_device: device " + std::to_string(device) + " does not exist (" +
                                                  std::to_string(count) + " visible)");
  m.cfg = cfg;
  m.L = layout;
  m.device = device;
  m.C = cfg.hidden;
  m.NH = cfg.heads;
  m.KVH = cfg.kv_heads;
  m.HD = cfg.head_dim;
  m.QD = m.NH * m.HD;
  m.KVD = m.KVH * m.HD;
  m.ML = cfg.moe_layer_count();
  m.E = m.ML > 0 ? cfg.num_experts : 0;
  m.Ep = pad8(m.E);
  m.K = m.ML > 0 ? cfg.top_k : 0;
  m.H = m.ML > 0 ? cfg.moe_intermediate : 0;
  m.HS = m.ML > 0 ? cfg.shared_intermediate : 0;
  m.HDm = cfg.dense_intermediate;
  m.V = cfg.vocab;
  m.e0 = m.ML > 0 ? cfg.expert_begin : 0;
  m.El = m.ML > 0 ? cfg.local_experts() : 0;
  m.shard_b = 0;
  m.shard_e = layout.dense_total;
  m.ep.assign(cfg.layers, Impl::EpLayer{});
  auto mult8 = [](int v, const char* name) {
    MP_CHECK_ARG(v % 8 == 0, std::string("to_device: ") + name + " must be a multiple of 8 for the GPU GEMMs, got " +
                                 std::to_string(v));
  };
  mult8(m.C, "hidden_size");
  mult8(m.QD, "num_attention_heads * head_dim");
  mult8(m.KVD, "num_key_value_heads * head_dim");
  mult8(m.V, "vocab_size");
  if (m.ML > 0) mult8(m.H, "moe_intermediate_size");
  if (m.HS > 0) mult8(m.HS, "shared_expert_intermediate_size");
  if (m.ML < cfg.layers) mult8(m.HDm, "intermediate_size");
  MP_CHECK_ARG(m.HD == 16 || m.HD == 32 || m.HD == 64 || m.HD == 128,
               "to_device: head_dim must be 16, 32, 64 or 128 for the GPU attention, got " + std::to_string(m.HD));
  m.inv_freq = cfg.rope_inv_freq();
  MP_GPU_CHECK(gpu::set_device(device));
  // The main stream and side streams 0 and 1 one step above the default priority, side streams 2 to 4 (a training
  // backward's background weight gradients) at the default, the lowest: where both have blocks waiting, the
  // input-gradient chain's go first and the weight gradients fill the SMs it leaves idle. (Measured on H100: at equal
  // priority the same overlap made the pass slower.) The expert-parallel exchange's stream keeps the highest.
  int least = 0, greatest = 0;
  MP_GPU_CHECK(gpu::stream_priority_range(&least, &greatest));
  const int fore = least - greatest >= 2 ? greatest + 1 : greatest;
  MP_GPU_CHECK(gpu::stream_create_with_priority(&m.stream, fore));
  m.overlap.create(fore, least);
  const size_t T = layout.total;
  m.params = m.alloc<float>(weights_only ? layout.dense_total : T);
  m.params16 = m.alloc<bf16_bits>(T);
  if (!weights_only) {
    const size_t D = layout.dense_total;
    m.grads = m.alloc<float>(expert_grads_bf16 ? D : T);
    if (expert_grads_bf16) m.grads16 = m.alloc<bf16_bits>(T - D);
    m.clear_grads();
  }
  size_t pad = 0;
  m.pad_router.assign(cfg.layers, SIZE_MAX);
  m.pad_sgate.assign(cfg.layers, SIZE_MAX);
  for (int l = 0; l < cfg.layers; l++) {
    if (!cfg.layer_is_moe[l]) continue;
    if (m.E % 8 != 0) m.pad_router[l] = pad, pad += (size_t)m.Ep * m.C;
    if (m.HS > 0) m.pad_sgate[l] = pad, pad += (size_t)8 * m.C;
  }
  m.pad16 = m.alloc<bf16_bits>(pad);
  if (!weights_only) m.pad_dw = m.alloc<float>((size_t)std::max(m.Ep, 8) * m.C);
  m.norm_scratch = m.alloc<double>(gpu::kSumSquaresBlocks + 1);
  m.sync();
}

GpuModel::~GpuModel() = default;

int GpuModel::device() const { return impl_->device; }
bool GpuModel::weights_only() const { return impl_->weights_only; }

GpuModel::Memory GpuModel::memory(bool reset_peak) const {
  const gpu::MemoryStats st = gpu::memory_stats(impl_->device);
  if (reset_peak) gpu::reset_memory_peak(impl_->device);
  return Memory{st.current, st.peak};
}

void GpuModel::set_parallel(std::shared_ptr<Collectives> comm, const std::vector<int>& bounds) {
  Impl& m = *impl_;
  m.require_training("set_parallel");
  MP_CHECK_ARG(comm != nullptr, "set_parallel: a communicator is required");
  MP_CHECK_ARG(!m.comm, "set_parallel: the GPU engine is already expert-parallel");
  MP_CHECK_ARG(m.m == nullptr, "set_parallel: must come before the first optimizer step (the GPU engine keeps the "
                               "dense AdamW state of its shard only)");
  const int W = comm->size(), r = comm->rank();
  MP_CHECK_ARG((int)bounds.size() == W + 1 && bounds[0] == 0 && bounds[W] == m.cfg.num_experts &&
                   bounds[r] == m.cfg.expert_begin && bounds[r + 1] == m.cfg.expert_end,
               "set_parallel: expert bounds must span [0, num_experts) and give rank " + std::to_string(r) +
                   " this engine's experts [" + std::to_string(m.cfg.expert_begin) + ", " +
                   std::to_string(m.cfg.expert_end) + ")");
  NcclHandles h;
  try {
    h = nccl_handles(*comm);
  } catch (const Error& e) {
    throw Error(ErrorCode::InvalidArgument,
                std::string("set_parallel: a GPU engine exchanges device buffers and needs the NCCL communicator "
                            "(comm 'nccl'): ") + e.what());
  }
  MP_CHECK_ARG(h.device == m.device, "set_parallel: rank " + std::to_string(r) + "'s NCCL communicator is on device " +
                                         std::to_string(h.device) + " but the engine is on device " +
                                         std::to_string(m.device) + " (one GPU per rank: both on the same device)");
  MP_GPU_CHECK(gpu::set_device(m.device));
  const size_t D = m.L.dense_total;
  m.shard_b = D * (size_t)r / (size_t)W;
  m.shard_e = D * (size_t)(r + 1) / (size_t)W;
  m.gshard = m.alloc<float>(m.shard_e - m.shard_b);
  m.W = W;
  m.rank = r;
  m.bounds = bounds;
  m.comm = std::move(comm);
}

bool GpuModel::parallel() const { return impl_->comm != nullptr; }

void GpuModel::all_reduce_dense_grads() {
  Impl& m = *impl_;
  if (!m.comm) return;
  m.require_training("all_reduce_dense_grads");
  MP_GPU_CHECK(gpu::set_device(m.device));
  m.sync();
  m.comm->all_reduce_sum(m.grads, m.L.dense_total);  // device buffer, in place
}

void GpuModel::upload_params(const float* params) {
  Impl& m = *impl_;
  MP_GPU_CHECK(gpu::set_device(m.device));
  const size_t fp32 = m.weights_only ? m.L.dense_total : m.L.total;
  m.upload(m.params, params, fp32);
  gpu::cast_f32_to_bf16(m.params16, m.params, fp32, m.stream);
  m.refresh_padded();
  m.sync();
  if (m.weights_only) m.upload_experts_bf16(params);
}
void GpuModel::download_params(float* params) {
  Impl& m = *impl_;
  MP_GPU_CHECK(gpu::set_device(m.device));
  m.download(params, m.params, m.weights_only ? m.L.dense_total : m.L.total);
  m.sync();
  if (m.weights_only) m.download_experts_widened(params);
}
void GpuModel::upload_grads(const float* grads) {
  Impl& m = *impl_;
  m.require_training("upload_grads");
  m.grads_zero = false;  // whatever the host held
  MP_GPU_CHECK(gpu::set_device(m.device));
  m.upload(m.grads, grads, m.grads16 ? m.L.dense_total : m.L.total);
  if (m.grads16)  // (rounded as the backward rounds)
    m.over_experts_staged([&](float* stage, size_t at, size_t c) {
      m.upload(stage, grads + at, c);
      gpu::cast_f32_to_bf16(m.grads16 + (at - m.L.dense_total), stage, c, m.stream);
    });
  m.sync();
}
void GpuModel::download_grads(float* grads) {
  Impl& m = *impl_;
  m.require_training("download_grads");
  MP_GPU_CHECK(gpu::set_device(m.device));
  m.download(grads, m.grads, m.grads16 ? m.L.dense_total : m.L.total);
  if (m.grads16)
    m.over_experts_staged([&](float* stage, size_t at, size_t c) {
      gpu::cast_bf16_to_f32(stage, m.grads16 + (at - m.L.dense_total), c, m.stream);
      m.download(grads + at, stage, c);
    });
  m.sync();
}
bool GpuModel::expert_grads_bf16() const { return impl_->grads16 != nullptr; }
bool GpuModel::has_optimizer_state() const { return impl_->m != nullptr; }
void GpuModel::upload_optimizer_state(const float* dense_m, const float* dense_v, const float* expert_m,
                                      const float* expert_v) {
  Impl& m = *impl_;
  m.require_training("upload_optimizer_state");
  MP_GPU_CHECK(gpu::set_device(m.device));
  const size_t D = m.L.dense_total, T = m.L.total, Ds = m.shard_e - m.shard_b;
  if (!m.m) {
    m.m = m.alloc<float>(Ds + T - D);
    m.v = m.alloc<float>(Ds + T - D);
  }
  m.upload(m.m, dense_m, Ds);
  m.upload(m.v, dense_v, Ds);
  m.upload(m.m + Ds, expert_m, T - D);
  m.upload(m.v + Ds, expert_v, T - D);
  m.sync();
}
void GpuModel::download_optimizer_state(float* dense_m, float* dense_v, float* expert_m, float* expert_v) {
  Impl& m = *impl_;
  MP_GPU_CHECK(gpu::set_device(m.device));
  MP_CHECK_INTERNAL(m.m != nullptr, "download_optimizer_state: no optimizer state on the device");
  const size_t D = m.L.dense_total, T = m.L.total, Ds = m.shard_e - m.shard_b;
  m.download(dense_m, m.m, Ds);
  m.download(dense_v, m.v, Ds);
  m.download(expert_m, m.m + Ds, T - D);
  m.download(expert_v, m.v + Ds, T - D);
  m.sync();
}

void GpuModel::zero_grad() {
  Impl& m = *impl_;
  m.require_training("zero_grad");
  MP_GPU_CHECK(gpu::set_device(m.device));
  m.clear_grads();
  m.sync();
  m.grads_zero = true;
}

ForwardResult GpuModel::forward(const Batch& batch, const ForwardRequest& req) {
  Impl& m = *impl_;
  MP_CHECK_ARG(req.temperature > 0, "forward: temperature must be > 0");
  m.check_experts_held();
  MP_GPU_CHECK(gpu::set_device(m.device));
  m.a2a_ms = 0;
  m.a2a_bytes = 0;
  ForwardResult r;
  if (batch.tokens.empty() && m.comm) {  // an idle rank: the exchanges only
    m.ensure_acts(1);
    m.ep_idle_forward();
    r.expert_tokens.assign((size_t)m.ML * m.E, 0);
    r.phases.alltoall_ms = m.a2a_ms;
    r.phases.alltoall_bytes = m.a2a_bytes;
    return r;
  }
  const Impl::BatchInfo bi = m.upload_batch(batch);
  const int N = bi.N;
  float* logits = nullptr;
  if (req.want_logits) logits = m.alloc<float>((size_t)N * m.V);
  try {
    m.forward_pass(bi, !batch.replay_experts.empty(), req.temperature, req.want_entropy, logits);
    r.phases = m.clock.finish();
    r.phases.alltoall_ms = m.a2a_ms;
    r.phases.alltoall_bytes = m.a2a_bytes;
    if (req.want_logits) {
      r.logits.assign((size_t)N * m.V, 0.f);
      m.download(r.logits.data(), logits, r.logits.size());
    }
    if (req.want_logprobs) {
      r.logprobs.assign(N, 0.f);
      m.download(r.logprobs.data(), m.A.logprob, N);
    }
    if (req.want_entropy) {
      r.entropy.assign(N, 0.f);
      m.download(r.entropy.data(), m.A.entropy, N);
    }
    m.collect_router(N, req.want_router_logits, req.want_experts, r);
    m.sync();
  } catch (...) {
    if (logits) gpu::free_device(logits);
    throw;
  }
  if (logits) gpu::free_device(logits);
  return r;
}

LossResult GpuModel::forward_backward(const Batch& batch, const LossSpec& spec) {
  Impl& m = *impl_;
  m.require_training("forward_backward");
  m.check_experts_held();
  MP_GPU_CHECK(gpu::set_device(m.device));
  const int N = (int)batch.tokens.size(), B = (int)batch.seq_lens.size();
  check_loss_spec(spec, N);
  // Host side of the pass under MOEPILOT_GPU_PROFILE (the GPU's phases are the clock's): where the host time
  // between the device's work goes.
  using HostClock = std::chrono::steady_clock;
  std::vector<std::pair<const char*, HostClock::time_point>> host_marks;
  auto host_mark = [&](const char* what) {
    if (m.clock.profile) host_marks.emplace_back(what, HostClock::now());
  };
  host_mark("entry");
  const bool idle = N == 0 && m.comm;  // a rank without sequences: the exchanges only
  // One rank: the loss gradient is made on the device from the forward's logprobs (gpu::policy_grad and
  // gpu::aux_load_grad, policy_loss's arithmetic), so the backward follows the forward with no host round trip in
  // between; the loss's figures come from the same logprobs on the host once the pass has run. Under expert
  // parallelism the load-balancing sums are reduced over the ranks on the host between the two.
  const bool device_loss = !m.comm;
  const float coef = spec.aux_loss_coef >= 0 ? spec.aux_loss_coef : m.cfg.router_aux_loss_coef;
  const float aux_coef = (float)(coef * spec.aux_scale);
  const bool use_aux = aux_coef != 0.f && m.ML > 0;
  m.a2a_ms = 0;
  m.a2a_bytes = 0;
  Impl::BatchInfo bi;
  bi.seq_off.assign(1, 0);
  LossResult r;
  // The forward's results for the host, queued on the stream before the phase clock waits for its last event (queued
  // after it, the copies would start only once the host had read the clock: the GPU idle meanwhile).
  float* h_logprob = nullptr;
  float* h_entropy = nullptr;
  float* h_probsum = nullptr;
  int32_t* h_counts = nullptr;
  auto queue_downloads = [&] {
    const size_t ME = (size_t)m.ML * m.E;
    h_logprob = m.pinned.take<float>(N);
    h_entropy = m.pinned.take<float>(N);
    h_probsum = m.pinned.take<float>(ME);
    h_counts = m.pinned.take<int32_t>(ME);
    m.download(h_logprob, m.A.logprob, N);
    m.download(h_entropy, m.A.entropy, N);
    m.download(h_probsum, m.A.probsum, ME);
    m.download(h_counts, m.A.counts, ME);
  };
  if (idle) {
    m.ensure_acts(1);
    m.ep_idle_forward();
  } else {
    bi = m.upload_batch(batch);
    const gpu::PolicyGradArgs grad_args = device_loss ? m.upload_loss_rows(spec, bi) : gpu::PolicyGradArgs{};
    host_mark("upload");
    m.forward_pass(bi, !batch.replay_experts.empty(), spec.temperature, true, nullptr, m.A.logits);
    host_mark("forward launched");
    m.upload_embedding_order(batch, bi);
    if (device_loss) {
      const size_t forward_marks = m.clock.used;
      gpu::policy_grad(m.A.g, m.A.logprob, m.A.loss_w, grad_args, N, m.stream);
      if (use_aux) gpu::aux_load_grad(m.A.aux_dp, m.A.counts, m.ML, m.E, N, aux_coef, m.stream);
      m.backward_pass(bi, spec.temperature, use_aux, /*after_forward=*/true);
      host_mark("backward launched");
      m.grads_zero = false;
      queue_downloads();
      r.forward_phases = m.clock.finish(0, forward_marks);
      r.backward_phases = m.clock.finish();
      host_mark("pass done");
    } else {
      queue_downloads();
      r.forward_phases = m.clock.finish();
      host_mark("forward done");
    }
  }
  r.forward_phases.alltoall_ms = m.a2a_ms;
  r.forward_phases.alltoall_bytes = m.a2a_bytes;
  std::vector<float> logprob(N), entropy(N), probsum((size_t)m.ML * m.E, 0.f);
  r.expert_tokens.assign((size_t)m.ML * m.E, 0);
  if (!idle) {
    m.sync();
    std::copy(h_logprob, h_logprob + N, logprob.begin());
    std::copy(h_entropy, h_entropy + N, entropy.begin());
    std::copy(h_probsum, h_probsum + probsum.size(), probsum.begin());
    std::copy(h_counts, h_counts + r.expert_tokens.size(), r.expert_tokens.begin());
  }

  // Load balancing over all MoE layers (as forward.cpp): F_e = assignments to e / (moe_layers * N),
  // P_e = probability mass of e / (moe_layers * N); aux = E * sum F_e P_e; d aux / d p = E * F_e / (ml * N).
  // Under expert parallelism the sums and N are over every rank's tokens (the loss of the global batch).
  const int E = m.E, ML = m.ML;
  std::vector<double> F(E, 0.0), Pm(E, 0.0);
  double aux = 0;
  double n_global = N;
  if (ML > 0) {
    for (int l = 0; l < ML; l++)
      for (int e = 0; e < E; e++) {
        F[e] += r.expert_tokens[(size_t)l * E + e];
        Pm[e] += probsum[(size_t)l * E + e];
      }
    if (m.comm) {
      std::vector<double> sums(2 * (size_t)E + 1);
      std::copy(F.begin(), F.end(), sums.begin());
      std::copy(Pm.begin(), Pm.end(), sums.begin() + E);
      sums[2 * (size_t)E] = N;
      m.comm->all_reduce_sum(sums.data(), sums.size());
      std::copy(sums.begin(), sums.begin() + E, F.begin());
      std::copy(sums.begin() + E, sums.begin() + 2 * E, Pm.begin());
      n_global = sums[2 * (size_t)E];
    }
    const double denom = (double)ML * std::max(n_global, 1.0);
    for (int e = 0; e < E; e++) {
      F[e] /= denom;
      aux += F[e] * (Pm[e] / denom);
    }
    aux *= E;
  }

  std::vector<float> g;
  if (device_loss)  // (the weights upload_loss_rows made)
    policy_loss(spec, bi.loss_w, bi.loss_tokens, logprob.data(), entropy.data(), N, r, g);
  else
    policy_loss(spec, bi.seq_off.data(), B, bi.target.data(), logprob.data(), entropy.data(), N, r, g);
  r.aux_loss = aux;
  r.logprobs = logprob;
  if (idle) {
    m.ep_idle_backward();
    m.grads_zero = false;
    r.backward_phases.alltoall_ms = m.a2a_ms - r.forward_phases.alltoall_ms;
    r.backward_phases.alltoall_bytes = m.a2a_bytes - r.forward_phases.alltoall_bytes;
    return r;
  }
  if (!device_loss) {
    std::vector<float> aux_dp(std::max(E, 1), 0.f);
    if (use_aux)
      for (int e = 0; e < E; e++) aux_dp[e] = (float)(aux_coef * E * F[e] / ((double)ML * std::max(n_global, 1.0)));
    m.upload_pinned(m.A.g, g.data(), N);
    m.upload_pinned(m.A.aux_dp, aux_dp.data(), aux_dp.size());
    host_mark("loss");
    m.backward_pass(bi, spec.temperature, use_aux);
    host_mark("backward launched");
    m.grads_zero = false;
    r.backward_phases = m.clock.finish();
  }
  r.backward_phases.alltoall_ms = m.a2a_ms - r.forward_phases.alltoall_ms;
  r.backward_phases.alltoall_bytes = m.a2a_bytes - r.forward_phases.alltoall_bytes;
  m.sync();
  host_mark(device_loss ? "results" : "backward done");
  if (!host_marks.empty()) {
    std::string line = "host (ms):";
    for (size_t i = 1; i < host_marks.size(); i++)
      line += std::string(" | ") + host_marks[i].first + " " +
              std::to_string(std::chrono::duration<double, std::milli>(host_marks[i].second - host_marks[i - 1].second).count());
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  return r;
}

void GpuModel::fill_params_random(uint64_t seed, float scale) {
  Impl& m = *impl_;
  MP_GPU_CHECK(gpu::set_device(m.device));
  const size_t D = m.L.dense_total;
  // Weights-only: an expert tensor is drawn into a scratch buffer, then rounded into its bf16 place (the same
  // values as the full copy's fill + cast).
  size_t stage_n = 0;
  if (m.weights_only)
    for (const ParamInfo& p : m.L.tensors)
      if (p.offset >= D) stage_n = std::max(stage_n, p.numel);
  float* stage = stage_n ? m.alloc<float>(stage_n) : nullptr;
  for (size_t t = 0; t < m.L.tensors.size(); t++) {
    const ParamInfo& p = m.L.tensors[t];
    const std::string& n = p.name;
    const bool norm = n.size() >= 11 && n.compare(n.size() - 11, 11, "norm.weight") == 0;
    float* dst = m.weights_only && p.offset >= D ? stage : m.params + p.offset;
    if (p.shape.size() >= 2)
      gpu::fill_uniform(dst, p.numel, seed + t, scale, m.stream);
    else
      gpu::fill_constant(dst, norm ? 1.f : 0.f, p.numel, m.stream);
    if (dst == stage) gpu::cast_f32_to_bf16(m.params16 + p.offset, stage, p.numel, m.stream);
  }
  gpu::cast_f32_to_bf16(m.params16, m.params, m.weights_only ? D : m.L.total, m.stream);
  m.refresh_padded();
  m.sync();
  if (stage) gpu::free_device(stage);
}

double GpuModel::adamw_step(const AdamWConfig& opt, int64_t step) {
  Impl& m = *impl_;
  m.require_training("adamw_step");
  MP_GPU_CHECK(gpu::set_device(m.device));
  const size_t T = m.L.total, D = m.L.dense_total, sb = m.shard_b, se = m.shard_e, Ds = se - sb;
  if (!m.m) {
    m.m = m.alloc<float>(Ds + T - D);
    m.v = m.alloc<float>(Ds + T - D);
    MP_GPU_CHECK(gpu::memset_async(m.m, 0, (Ds + T - D) * sizeof(float), m.stream));
    MP_GPU_CHECK(gpu::memset_async(m.v, 0, (Ds + T - D) * sizeof(float), m.stream));
  }
  // The dense gradient this rank updates with: its shard of the sum over ranks (reduce-scatter, rank order), or the
  // whole buffer on one rank. The state of flat index i: m[i - sb] in the dense shard, m[Ds + i - D] for experts
  // (on one rank both are m[i]).
  const float* gdense = m.grads;
  if (m.comm) {
    std::vector<int64_t> counts(m.W);
    for (int r = 0; r < m.W; r++) counts[r] = (int64_t)(D * (r + 1) / m.W - D * r / m.W);
    m.sync();
    m.comm->reduce_scatter_sum(m.grads, m.gshard, counts);
    gdense = m.gshard;
  }
  // Sum of squares of a device range (fp32 or bf16), read back (in double).
  auto sum_sq = [&](const auto* x, size_t n) {
    double r = 0;
    gpu::sum_squares(m.norm_scratch + gpu::kSumSquaresBlocks, x, n, m.norm_scratch, m.stream);
    m.download(&r, m.norm_scratch + gpu::kSumSquaresBlocks, 1);
    m.sync();
    return r;
  };
  auto expert_sq = [&] { return m.grads16 ? sum_sq(m.grads16, T - D) : sum_sq(m.grads + D, T - D); };
  double sq = 0;
  if (m.comm || m.grads16) {
    // This rank's dense shard (the whole dense range on one rank) and its experts (fp32 or bf16), added in double on
    // the host; over the ranks, the global norm.
    sq = sum_sq(gdense, Ds);
    sq += expert_sq();
    if (m.comm) m.comm->all_reduce_sum(&sq, 1);
  } else {
    sq = sum_sq(m.grads, T);
  }
  const double norm = std::sqrt(sq);
  MP_CHECK_ARG(std::isfinite(norm), "adamw: gradient norm is not finite (NaN or Inf in the gradients)");
  const float clip =
      (opt.max_grad_norm > 0 && norm > opt.max_grad_norm) ? (float)(opt.max_grad_norm / (norm + 1e-6)) : 1.f;
  const float bc1 = 1.f - std::pow(opt.beta1, (float)step), bc2 = 1.f - std::pow(opt.beta2, (float)step);
  // Weight decay on matrices only (engine.cpp); consecutive pieces with the same decay in the same region (dense
  // shard or experts) go in one launch. A dense tensor is clipped to the shard.
  size_t run_begin = 0, run_end = 0;
  float run_wd = 0.f;
  bool run_dense = true;
  auto flush = [&] {
    if (run_end <= run_begin) return;
    const size_t st = run_dense ? run_begin - sb : Ds + (run_begin - D);
    if (!run_dense && m.grads16) {
      gpu::adamw_update(m.params + run_begin, m.params16 + run_begin, m.grads16 + (run_begin - D), m.m + st, m.v + st,
                        run_end - run_begin, opt.lr, opt.beta1, opt.beta2, bc1, bc2, opt.eps, run_wd, clip, m.stream);
      return;
    }
    const float* g = run_dense ? gdense + (run_begin - (m.comm ? sb : 0)) : m.grads + run_begin;
    gpu::adamw_update(m.params + run_begin, m.params16 + run_begin, g, m.m + st, m.v + st, run_end - run_begin, opt.lr,
                      opt.beta1, opt.beta2, bc1, bc2, opt.eps, run_wd, clip, m.stream);
  };
  for (const ParamInfo& p : m.L.tensors) {
    const float wd = p.shape.size() >= 2 ? opt.weight_decay : 0.f;
    const bool dense = p.kind == ParamKind::Dense;
    const size_t b = dense ? std::max(p.offset, sb) : p.offset;
    const size_t e = dense ? std::min(p.offset + p.numel, se) : p.offset + p.numel;
    if (b >= e) continue;
    if (b == run_end && wd == run_wd && dense == run_dense && run_end > run_begin) {
      run_end = e;
      continue;
    }
    flush();
    run_begin = b;
    run_end = e;
    run_wd = wd;
    run_dense = dense;
  }
  flush();
  if (m.comm) {
    // Every rank's updated shard to every rank (fp32), then the bf16 copy of the whole dense range.
    std::vector<int64_t> counts(m.W);
    for (int r = 0; r < m.W; r++) counts[r] = (int64_t)(D * (r + 1) / m.W - D * r / m.W);
    MP_GPU_CHECK(gpu::memcpy_async(m.gshard, m.params + sb, Ds * sizeof(float), m.stream));
    m.sync();
    m.comm->all_gather(m.gshard, m.params, counts);
    gpu::cast_f32_to_bf16(m.params16, m.params, D, m.stream);
  }
  m.refresh_padded();
  m.sync();
  return norm;
}

// ==================================================================== GpuRollout
namespace {

int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// One iteration's inputs as 4-byte words, every array starting 16 bytes in: R rows, NS sequences of MB blocks,
// G groups, S samples.
struct RolloutIn {
  size_t tokens, pos, row_seq, tables, group_rows, shared_len, sample_row, temps, params, words = 0;
  RolloutIn(int R, int NS, int MB, int G, int S) {
    auto take = [&](size_t n) {
      const size_t at = words;
      words += (n + 3) / 4 * 4;
      return at;
    };
    static_assert(sizeof(gen::SamplingParams) % 4 == 0, "SamplingParams is a whole number of words");
    tokens = take(R);
    pos = take(R);
    row_seq = take(R);
    tables = take((size_t)NS * MB);
    group_rows = take((size_t)G + 1);
    shared_len = take(G);
    sample_row = take(S);
    temps = take(S);
    params = take((size_t)S * (sizeof(gen::SamplingParams) / 4));
  }
};

// Its outputs: tokens, logprobs, status [S], then the router's experts [ML, R, K] (copied back when asked).
struct RolloutOut {
  size_t tokens, logprobs, status, experts, head_words = 0, words = 0;
  RolloutOut(int S, int R, int ML, int K) {
    auto take = [&](size_t n) {
      const size_t at = words;
      words += (n + 3) / 4 * 4;
      return at;
    };
    tokens = take(S);
    logprobs = take(S);
    status = take(S);
    head_words = words;
    experts = take((size_t)std::max(ML, 1) * R * std::max(K, 1));
  }
};

}  // namespace

struct GpuRollout::Impl {
  GpuModel::Impl& m;
  Stream stream = nullptr;
  gpu::Event model_done = nullptr;  // recorded on the model's stream: each step starts after the trainer's work
  gpu::PagedKv kv;
  size_t block_elems = 0;  // bf16 elements of one block (every layer's K and V)
  int num_blocks = 0;      // the scheduler's; block num_blocks is the padding rows' scratch
  // RoPE tables of the rollout's own (the trainer's may be reallocated under a captured graph) [rope_p, HD/2].
  float *rope_cos = nullptr, *rope_sin = nullptr;
  int rope_p = 0;
  // Activations for up to cap_rows rows and cap_samples samples: one allocation; one layer's worth, reused by
  // every layer (no backward).
  void* act_mem = nullptr;
  int cap_rows = 0, cap_samples = 0;
  LayerActs a{};
  Scratch sc{};
  float* h = nullptr;         // [R,C] residual stream
  float* hs = nullptr;        // [S,C] the rows samples draw from
  bf16_bits* lnf = nullptr;   // [S,C]
  float *rstdf = nullptr, *lse = nullptr;  // [S]
  float* logits = nullptr;    // [S,V]
  float* lm = nullptr;        // lm_head_scratch_floats(S, V)
  int32_t* counts = nullptr;  // [E]
  void* sample_scratch = nullptr;
  // Inputs and outputs: pinned host staging and device buffers, one copy each way per iteration.
  int32_t *in_host = nullptr, *in_dev = nullptr, *out_host = nullptr, *out_dev = nullptr;
  size_t in_cap = 0, out_cap = 0;  // words
  // Decode graphs by bucket (rows), with the block-table width they were captured at.
  struct Captured {
    gpu::GraphExec exec = nullptr;
    int max_blocks = 0;
  };
  std::map<int, Captured> graphs;
  bool use_graphs = true;
  Overlap overlap;  // side streams of the layers' independent products

  explicit Impl(GpuModel::Impl& model) : m(model) {}

  // Expert parallelism: every iteration is collective (the scheduler steps every rank while any rank has rows,
  // an idle rank with none), the MoE layers exchange their rows as the trainer's do (layer_forward ->
  // ep_experts_forward on this stream), and iterations run eagerly and unpadded: the exchange synchronises with
  // the host, which a CUDA graph cannot hold (the peer-write dispatch of cuda/ep_dispatch.h could, later).
  // An idle rank's iteration: the MoE layers' exchanges only, with no rows (it still runs its experts).
  void idle_step() {
    MP_GPU_CHECK(gpu::event_record(model_done, m.stream));
    MP_GPU_CHECK(gpu::stream_wait(stream, model_done));
    ensure_acts(1, 1);
    for (int l = 0; l < m.cfg.layers; l++)
      if (m.cfg.layer_is_moe[l]) m.ep_experts_forward(l, a, 0, nullptr, stream);
    MP_GPU_CHECK(gpu::stream_sync(stream));
  }

  ~Impl() {
    gpu::set_device(m.device);
    if (stream) gpu::stream_sync(stream);
    drop_graphs();
    for (void* p : {(void*)kv.pool, (void*)rope_cos, (void*)rope_sin, act_mem, (void*)in_dev, (void*)out_dev})
      if (p) gpu::free_device(p);
    for (void* p : {(void*)in_host, (void*)out_host})
      if (p) gpu::free_host(p);
    if (model_done) gpu::event_destroy(model_done);
    overlap.destroy();
    if (stream) gpu::stream_destroy(stream);
  }

  void drop_graphs() {
    for (auto& [b, g] : graphs) gpu::graph_exec_destroy(g.exec);
    graphs.clear();
  }

  void plan(Arena& ar, int R, int S) {
    m.plan_layer(ar, a, R, m.ML > 0, m.ML < m.cfg.layers);
    sc = Scratch{};
    sc.q32 = ar.take<float>((size_t)R * m.QD);
    sc.k32 = ar.take<float>((size_t)R * m.KVD);
    sc.v32 = ar.take<float>((size_t)R * m.KVD);
    sc.qn32 = ar.take<float>((size_t)R * m.QD);
    sc.kn32 = ar.take<float>((size_t)R * m.KVD);
    h = ar.take<float>((size_t)R * m.C);
    hs = ar.take<float>((size_t)S * m.C);
    lnf = ar.take<bf16_bits>((size_t)S * m.C);
    rstdf = ar.take<float>(S);
    lse = ar.take<float>(S);
    logits = ar.take<float>((size_t)S * m.V);
    lm = ar.take<float>(gpu::lm_head_scratch_floats(S, m.V));
    counts = ar.take<int32_t>(std::max(m.E, 1));
    const size_t ss = gpu::sample_rows_scratch_bytes(S, m.V);
    sample_scratch = ss ? ar.take<char>(ss) : nullptr;
  }

  // Every regrowth drops the graphs (they hold the old pointers).
  void ensure_acts(int R, int S) {
    if (R <= cap_rows && S <= cap_samples && act_mem) return;
    MP_GPU_CHECK(gpu::stream_sync(stream));
    drop_graphs();
    if (act_mem) gpu::free_device(act_mem);
    act_mem = nullptr;
    cap_rows = std::max(R, cap_rows);
    cap_samples = std::max(S, cap_samples);
    Arena sizing;
    plan(sizing, cap_rows, cap_samples);
    MP_GPU_CHECK(gpu::malloc_device(&act_mem, sizing.off + 256));
    Arena real{static_cast<char*>(act_mem), 0};
    plan(real, cap_rows, cap_samples);
  }

  void ensure_io(size_t in_words, size_t out_words) {
    if (in_words <= in_cap && out_words <= out_cap) return;
    MP_GPU_CHECK(gpu::stream_sync(stream));
    drop_graphs();
    if (in_words > in_cap) {
      if (in_dev) gpu::free_device(in_dev);
      if (in_host) gpu::free_host(in_host);
      in_dev = in_host = nullptr;
      in_cap = std::max(in_words, 2 * in_cap);
      in_dev = m.alloc<int32_t>(in_cap);
      MP_GPU_CHECK(gpu::malloc_host(reinterpret_cast<void**>(&in_host), in_cap * 4));
    }
    if (out_words > out_cap) {
      if (out_dev) gpu::free_device(out_dev);
      if (out_host) gpu::free_host(out_host);
      out_dev = out_host = nullptr;
      out_cap = std::max(out_words, 2 * out_cap);
      out_dev = m.alloc<int32_t>(out_cap);
      MP_GPU_CHECK(gpu::malloc_host(reinterpret_cast<void**>(&out_host), out_cap * 4));
    }
  }

  void ensure_rope(int P) {
    if (P <= rope_p) return;
    std::vector<float> cs, sn;
    gpu::rope_tables(cs, sn, P, m.inv_freq);
    MP_GPU_CHECK(gpu::stream_sync(stream));
    drop_graphs();
    if (rope_cos) gpu::free_device(rope_cos);
    if (rope_sin) gpu::free_device(rope_sin);
    rope_cos = rope_sin = nullptr;
    rope_cos = m.alloc<float>(cs.size());
    rope_sin = m.alloc<float>(sn.size());
    MP_GPU_CHECK(gpu::memcpy_async(rope_cos, cs.data(), cs.size() * sizeof(float), stream));
    MP_GPU_CHECK(gpu::memcpy_async(rope_sin, sn.data(), sn.size() * sizeof(float), stream));
    MP_GPU_CHECK(gpu::stream_sync(stream));  // the host vectors die here
    rope_p = P;
  }

  // The iteration's work on the stream, reading the inputs at in_dev (layout `in`) and writing the outputs at
  // out_dev (layout `out`). Only launches: what a graph captures.
  void forward(const RolloutIn& in, const RolloutOut& out, int R, int S, int MB, int G, int max_pos) {
    const Stream s = stream;
    const int32_t* I = in_dev;
    GpuModel::Impl::PagedCall pc;
    pc.kv = kv;
    pc.rows.R = R;
    pc.rows.row_seq = I + in.row_seq;
    pc.rows.row_pos = I + in.pos;
    pc.rows.block_tables = I + in.tables;
    pc.rows.max_blocks = MB;
    pc.rows.groups = G;
    pc.rows.group_rows = I + in.group_rows;
    pc.rows.shared_len = I + in.shared_len;
    pc.rows.max_pos = max_pos;
    GpuModel::Impl::AttnIn ai;
    ai.pos = I + in.pos;
    ai.rope_cos = rope_cos;
    ai.rope_sin = rope_sin;
    ai.paged = &pc;
    gpu::embedding_forward(h, I + in.tokens, m.P(m.L.embed), R, m.C, s);
    int mi = 0;
    for (int l = 0; l < m.cfg.layers; l++) {
      const bool moe = m.cfg.layer_is_moe[l];
      int32_t* experts = moe ? out_dev + out.experts + (size_t)mi * R * m.K : nullptr;
      m.layer_forward(l, a, sc, h, h, h, R, ai, nullptr, experts, nullptr, moe ? counts : nullptr, false, s, &overlap);
      if (moe) mi++;
    }
    // The rows samples draw from (a prompt's last row once per sample), the final norm, the LM head at each
    // sample's temperature, then the draws with the head's lse (the trainer's logprob).
    gpu::embedding_forward(hs, I + in.sample_row, h, S, m.C, s);
    gpu::rmsnorm_forward(nullptr, lnf, rstdf, hs, m.P(m.L.final_norm), S, m.C, m.cfg.rms_eps, s);
    gpu::lm_head_forward_rows(nullptr, lse, nullptr, logits, lnf, m.P16(m.L.lm_head), nullptr,
                              reinterpret_cast<const float*>(I + in.temps), S, m.C, m.V, lm, s);
    gpu::sample_rows(logits, m.V, S, m.V, reinterpret_cast<const gen::SamplingParams*>(I + in.params), lse,
                     out_dev + out.tokens, reinterpret_cast<float*>(out_dev + out.logprobs), nullptr,
                     out_dev + out.status, sample_scratch, s);
  }

  void capture(int bucket, const RolloutIn& in, const RolloutOut& out, int R, int S, int MB, int G, int max_pos) {
    gpu::Graph g = nullptr;
    MP_GPU_CHECK(gpu::stream_begin_capture(stream));
    try {
      forward(in, out, R, S, MB, G, max_pos);
    } catch (...) {
      gpu::Graph partial = nullptr;
      gpu::stream_end_capture(stream, &partial);
      if (partial) gpu::graph_destroy(partial);
      gpu::last_error();
      throw;
    }
    MP_GPU_CHECK(gpu::stream_end_capture(stream, &g));
    gpu::GraphExec exec = nullptr;
    const gpu::Status st = gpu::graph_instantiate(&exec, g);
    gpu::graph_destroy(g);
    MP_GPU_CHECK(st);
    graphs[bucket] = Captured{exec, MB};
  }

  void step(const RolloutBatch& b, RolloutResult& res) {
    MP_GPU_CHECK(gpu::set_device(m.device));
    const int R = (int)b.tokens.size(), S = (int)b.sample_row.size(), MB = b.max_blocks;
    if (m.comm && R == 0) {
      idle_step();
      res.tokens.clear();
      res.logprobs.clear();
      res.experts.clear();
      return;
    }
    m.check_experts_held();
    MP_CHECK_INTERNAL(R > 0 && S > 0 && MB > 0 && b.pos.size() == (size_t)R && b.row_seq.size() == (size_t)R &&
                          b.params.size() == (size_t)S && b.block_tables.size() % MB == 0 &&
                          b.group_rows.size() == b.shared_len.size() + 1 && !b.shared_len.empty(),
                      "rollout: inconsistent batch");
    const int NS = (int)(b.block_tables.size() / MB), G = (int)b.shared_len.size();
    const int bs = kv.block_size;
    int max_pos = 0;
    for (int i = 0; i < R; i++) {
      MP_CHECK_INTERNAL(b.pos[i] >= 0 && b.pos[i] < MB * bs && b.row_seq[i] >= 0 && b.row_seq[i] < NS &&
                            b.tokens[i] >= 0 && b.tokens[i] < m.V,
                        "rollout: row " + std::to_string(i) + " out of range");
      max_pos = std::max(max_pos, b.pos[i]);
    }
    for (int32_t blk : b.block_tables) MP_CHECK_INTERNAL(blk >= 0 && blk < num_blocks, "rollout: bad block id");
    for (int32_t r : b.sample_row) MP_CHECK_INTERNAL(r >= 0 && r < R, "rollout: bad sample row");
    // Decode: rows padded to a power-of-two bucket (so that a handful of graphs serve every batch size), the
    // padding rows being token 0 at position 0 of a scratch sequence (its table all the spare block), in one
    // group of their own, drawn greedily; the group count is fixed at bucket + 1 (empty groups at the end).
    const bool padded = b.decode && !m.comm;  // expert parallelism: eager and unpadded (see idle_step)
    if (padded) MP_CHECK_INTERNAL(S == R && NS == R, "rollout: a decode batch has one row and one sample per sequence");
    const int Rp = padded ? pow2_at_least(R) : R;
    const int Sp = padded ? Rp : S;
    const int NSp = padded ? Rp + 1 : NS;
    const int Gp = padded ? Rp + 1 : G;
    if (padded) max_pos = MB * bs - 1;
    ensure_rope(MB * bs);
    ensure_acts(Rp, Sp);
    const RolloutIn in(Rp, NSp, MB, Gp, Sp);
    const RolloutOut out(Sp, Rp, m.ML, m.K);
    ensure_io(in.words, out.words);

    int32_t* H = in_host;
    std::memset(H, 0, in.words * 4);
    std::copy(b.tokens.begin(), b.tokens.end(), H + in.tokens);
    std::copy(b.pos.begin(), b.pos.end(), H + in.pos);
    std::copy(b.row_seq.begin(), b.row_seq.end(), H + in.row_seq);
    std::copy(b.block_tables.begin(), b.block_tables.end(), H + in.tables);
    std::copy(b.group_rows.begin(), b.group_rows.end(), H + in.group_rows);
    std::copy(b.shared_len.begin(), b.shared_len.end(), H + in.shared_len);
    std::copy(b.sample_row.begin(), b.sample_row.end(), H + in.sample_row);
    std::vector<gen::SamplingParams> params(b.params);
    if (padded) {
      for (int i = R; i < Rp; i++) {
        H[in.row_seq + i] = NSp - 1;
        H[in.sample_row + i] = i;
      }
      for (int t = NS; t < NSp; t++)
        for (int j = 0; j < MB; j++) H[in.tables + (size_t)t * MB + j] = num_blocks;
      int g = G;
      if (R < Rp) H[in.group_rows + ++g] = Rp;  // the padding group [R, Rp)
      for (int k = g + 1; k <= Gp; k++) H[in.group_rows + k] = Rp;  // empty groups
      gen::SamplingParams greedy;
      greedy.temperature = 0.f;
      params.resize(Sp, greedy);
    }
    float* temps = reinterpret_cast<float*>(H + in.temps);
    for (int i = 0; i < Sp; i++) temps[i] = params[i].temperature > 0 ? params[i].temperature : 1.f;
    std::memcpy(H + in.params, params.data(), params.size() * sizeof(gen::SamplingParams));

    MP_GPU_CHECK(gpu::event_record(model_done, m.stream));
    MP_GPU_CHECK(gpu::stream_wait(stream, model_done));
    MP_GPU_CHECK(gpu::memcpy_async(in_dev, in_host, in.words * 4, stream));
    if (padded && use_graphs) {
      auto it = graphs.find(Rp);
      if (it != graphs.end() && it->second.max_blocks != MB) {
        gpu::graph_exec_destroy(it->second.exec);
        graphs.erase(it);
        it = graphs.end();
      }
      if (it != graphs.end()) {
        MP_GPU_CHECK(gpu::graph_launch(it->second.exec, stream));
      } else {
        // First time at this bucket: eagerly (this iteration's results; every kernel's one-time set-up done
        // outside any capture), then capture for the next ones.
        forward(in, out, Rp, Sp, MB, Gp, max_pos);
        MP_GPU_CHECK(gpu::stream_sync(stream));
        capture(Rp, in, out, Rp, Sp, MB, Gp, max_pos);
      }
    } else {
      forward(in, out, Rp, Sp, MB, Gp, max_pos);
    }
    const size_t back = b.want_experts ? out.words : out.head_words;
    MP_GPU_CHECK(gpu::memcpy_async(out_host, out_dev, back * 4, stream));
    MP_GPU_CHECK(gpu::stream_sync(stream));

    const int32_t* O = out_host;
    for (int i = 0; i < S; i++)
      if (O[out.status + i] != gpu::kSampleOk)
        throw Error(ErrorCode::Internal, "rollout: sample " + std::to_string(i) + " of the iteration could not be drawn (" +
                                             (O[out.status + i] == gpu::kSampleBadLogits ? "NaN or infinite logits"
                                                                                           : "bad sampling parameters") +
                                             ")");
    res.tokens.assign(O + out.tokens, O + out.tokens + S);
    res.logprobs.resize(S);
    std::memcpy(res.logprobs.data(), O + out.logprobs, S * sizeof(float));
    res.experts.clear();
    if (b.want_experts && m.ML > 0) {
      const int ML = m.ML, K = m.K;
      res.experts.resize((size_t)R * ML * K);
      for (int l = 0; l < ML; l++)
        for (int r = 0; r < R; r++)
          for (int k = 0; k < K; k++)
            res.experts[((size_t)r * ML + l) * K + k] = O[out.experts + ((size_t)l * Rp + r) * K + k];
    }
  }
};

GpuRollout::GpuRollout(GpuModel& model, int num_blocks, int block_size) : impl_(new Impl(model.impl())) {
  Impl& r = *impl_;
  GpuModel::Impl& m = r.m;
  MP_CHECK_ARG(num_blocks > 0 && block_size > 0, "kv cache: num_blocks and block_size must be > 0");
  MP_GPU_CHECK(gpu::set_device(m.device));
  MP_GPU_CHECK(gpu::stream_create(&r.stream));
  MP_GPU_CHECK(gpu::event_create(&r.model_done));
  r.overlap.create();
  r.num_blocks = num_blocks;
  r.kv.num_blocks = num_blocks + 1;
  r.kv.block_size = block_size;
  r.kv.layers = m.cfg.layers;
  r.kv.KVH = m.KVH;
  r.kv.HD = m.HD;
  r.block_elems = (size_t)m.cfg.layers * 2 * block_size * m.KVD;
  const size_t n = (size_t)(num_blocks + 1) * r.block_elems;
  r.kv.pool = m.alloc<bf16_bits>(n);
  MP_GPU_CHECK(gpu::memset_async(r.kv.pool, 0, n * sizeof(bf16_bits), r.stream));
  MP_GPU_CHECK(gpu::stream_sync(r.stream));
}

GpuRollout::~GpuRollout() = default;

void GpuRollout::step(const RolloutBatch& batch, RolloutResult& out) { impl_->step(batch, out); }

void GpuRollout::copy_block(int dst, int src) {
  Impl& r = *impl_;
  MP_CHECK_INTERNAL(dst >= 0 && dst < r.num_blocks && src >= 0 && src < r.num_blocks, "rollout: bad block copy");
  MP_GPU_CHECK(gpu::set_device(r.m.device));
  MP_GPU_CHECK(gpu::memcpy_async(r.kv.pool + (size_t)dst * r.block_elems, r.kv.pool + (size_t)src * r.block_elems,
                                 r.block_elems * sizeof(bf16_bits), r.stream));
}

void GpuRollout::set_cuda_graphs(bool on) {
  impl_->use_graphs = on;
  if (!on) {
    MP_GPU_CHECK(gpu::set_device(impl_->m.device));
    MP_GPU_CHECK(gpu::stream_sync(impl_->stream));
    impl_->drop_graphs();
  }
}

int GpuRollout::graphs_captured() const { return (int)impl_->graphs.size(); }

}  // namespace moepilot
