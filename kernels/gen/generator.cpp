// Rollout generation: admission against a block reservation, group prefill with shared prompt blocks,
// batched decode, sampling, stops.
#include "gen/generator.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "cpu/matmul_rows.h"
#include "cpu/ops.h"
#include "model/blocks.h"
#include "moepilot/comm.h"

namespace moepilot::gen {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None: return "";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
  }
  return "";
}

namespace {

// The CPU backend: rows through the engine's host parameters over the host cache (pool's rows), then each sample
// drawn from its row's logits by the CPU sampler.
class CpuBackend final : public Backend {
 public:
  CpuBackend(std::shared_ptr<Engine> engine, KvPool& pool)
      : engine_(std::move(engine)), pool_(pool), inv_freq_(engine_->config().rope_inv_freq()) {}

  void run(const std::vector<IterRow>& rows, const std::vector<IterSample>& samples, bool want_experts, bool decode,
           IterResult& out) override {
    // Logits only for the rows that samples draw from (the decode rows and each new prompt's last row).
    std::vector<int> logit_rows, slot(rows.size(), -1);
    for (const IterSample& sm : samples)
      if (slot[sm.row] < 0) {
        slot[sm.row] = (int)logit_rows.size();
        logit_rows.push_back(sm.row);
      }
    std::vector<float> logits;
    forward_rows(rows, logit_rows, logits, want_experts ? &out.experts : nullptr);
    const int V = engine_->config().vocab;
    out.tokens.assign(samples.size(), 0);
    out.logprobs.assign(samples.size(), 0.f);
    std::vector<float> scratch(V);
    for (size_t i = 0; i < samples.size(); i++) {
      const float* row = &logits[(size_t)slot[samples[i].row] * V];
      sample_one(row, samples[i].params, scratch, out.tokens[i], out.logprobs[i]);
    }
  }

  void copy_block(int dst, int src) override { pool_.copy_block(dst, src); }

 private:
  void forward_rows(const std::vector<IterRow>& rows, const std::vector<int>& logit_rows, std::vector<float>& logits,
                    std::vector<int32_t>* experts);

  // Samples the next token from one logits row, with its logprob computed by the trainer's own row function
  // (scale, then log-softmax), so rollout and trainer logprobs agree exactly.
  void sample_one(const float* logits, const SamplingParams& p, std::vector<float>& scratch, int32_t& token,
                  float& logprob) {
    const int V = engine_->config().vocab;
    const SampleResult res = sample_row(logits, V, p, scratch.data());
    const float T = p.temperature > 0 ? p.temperature : 1.f;
    std::memcpy(scratch.data(), logits, V * sizeof(float));
    cpu::scale_logits(scratch.data(), V, T);
    const cpu::LogSoftmaxRow ls = cpu::log_softmax_row(scratch.data(), V, false);
    token = res.token;
    logprob = scratch[res.token] - ls.lse;
  }

  std::shared_ptr<Engine> engine_;
  KvPool& pool_;
  std::vector<double> inv_freq_;
};

}  // namespace

Generator::Generator(std::shared_ptr<Engine> engine, int num_blocks, int block_size)
    : engine_(std::move(engine)),
      on_device_(engine_->on_device()),
      pool_(num_blocks, block_size, engine_->config().layers, engine_->config().kv_heads * engine_->config().head_dim,
            !on_device_) {
  MP_CHECK_ARG(engine_->config().local_experts() == engine_->config().num_experts || engine_->comm() != nullptr,
               "generator: this engine holds experts [" + std::to_string(engine_->config().expert_begin) + ", " +
                   std::to_string(engine_->config().expert_end) + ") only and is not part of an expert-parallel group");
  if (on_device_)
    backend_ = make_gpu_backend(engine_, num_blocks, block_size);
  else
    backend_ = std::make_unique<CpuBackend>(engine_, pool_);
}

Generator::~Generator() = default;

int Generator::blocks_needed(int prompt_len, int n, int max_new_tokens) const {
  const int bs = pool_.block_size();
  const int full = prompt_len / bs, partial = prompt_len % bs;
  // The cache never holds the last sampled token: at most prompt_len + max_new_tokens - 1 positions.
  const int own_tokens = partial + max_new_tokens - 1;
  const int own = (own_tokens + bs - 1) / bs;
  return full + (partial > 0 ? 1 : 0) + n * own;  // the prompt's partial block lives until the fork
}

void Generator::add_group(GroupSpec spec) {
  const ModelConfig& cfg = engine_->config();
  MP_CHECK_ARG(!spec.prompt.empty(), "generate: the prompt is empty");
  MP_CHECK_ARG(!spec.samples.empty(), "generate: a group needs at least one sample");
  MP_CHECK_ARG(spec.max_new_tokens >= 1, "generate: max_new_tokens must be >= 1");
  MP_CHECK_ARG(groups_.count(spec.group_id) == 0, "generate: group id " + std::to_string(spec.group_id) + " is in use");
  for (int32_t t : spec.prompt)
    MP_CHECK_ARG(t >= 0 && t < cfg.vocab, "generate: prompt token " + std::to_string(t) + " is outside the vocabulary");
  for (int32_t t : spec.stop_ids)
    MP_CHECK_ARG(t >= 0 && t < cfg.vocab, "generate: stop token " + std::to_string(t) + " is outside the vocabulary");
  for (const SampleSpec& s : spec.samples) validate_sampling_params(s.params, cfg.vocab);
  const int need = blocks_needed((int)spec.prompt.size(), (int)spec.samples.size(), spec.max_new_tokens);
  MP_CHECK_ARG(need <= pool_.num_blocks(),
               "generate: the group needs " + std::to_string(need) + " KV blocks at worst but the cache has " +
                   std::to_string(pool_.num_blocks()) + " in all (raise the cache size or lower max_new_tokens / n)");
  backend_->reserve_positions((int)spec.prompt.size() + spec.max_new_tokens - 1);
  Group g;
  g.reserved = need;
  g.live = (int)spec.samples.size();
  const int64_t id = spec.group_id;
  g.spec = std::move(spec);
  groups_.emplace(id, std::move(g));
  queue_.push_back(id);
}

// Runs rows through the model, writing their K/V into the cache first so that row r attends positions
// [0, pos_r] of its own sequence. Same ops, same order as the trainer's forward (model/forward.cpp).
void CpuBackend::forward_rows(const std::vector<IterRow>& rows, const std::vector<int>& logit_rows,
                              std::vector<float>& logits, std::vector<int32_t>* experts) {
  const ModelConfig& cfg = engine_->config();
  const ParamLayout& L = engine_->layout();
  float* params = engine_->params();
  const int R = (int)rows.size();
  const int C = cfg.hidden, NH = cfg.heads, KVH = cfg.kv_heads, HD = cfg.head_dim;
  const int QD = NH * HD, KVD = KVH * HD, K = cfg.top_k, ML = cfg.moe_layer_count();
  const int bs = pool_.block_size();
  const float scale = 1.f / std::sqrt((float)HD);
  std::vector<int32_t> pos(R);
  for (int r = 0; r < R; r++) pos[r] = rows[r].pos;
  if (experts) experts->assign((size_t)R * ML * K, 0);

  Vec h((size_t)R * C), ln((size_t)R * C), rstd(R), q((size_t)R * QD), k((size_t)R * KVD), v((size_t)R * KVD);
  Vec att((size_t)R * QD), tmp((size_t)R * C), qn, kn, qr, kr;
  for (int r = 0; r < R; r++)
    std::memcpy(&h[(size_t)r * C], params + L.embed + (size_t)rows[r].token * C, C * sizeof(float));
  int moe_idx = 0;
  for (int l = 0; l < cfg.layers; l++) {
    Weights W{L.layers[l], params};
    cpu::rmsnorm_forward(ln.data(), rstd.data(), h.data(), W.at(W.o.attn_norm), R, C, cfg.rms_eps);
    cpu::matmul_forward(q.data(), ln.data(), W.at(W.o.wq), W.at(W.o.bq), R, C, QD);
    cpu::matmul_forward(k.data(), ln.data(), W.at(W.o.wk), W.at(W.o.bk), R, C, KVD);
    cpu::matmul_forward(v.data(), ln.data(), W.at(W.o.wv), W.at(W.o.bv), R, C, KVD);
    if (cfg.qk_norm) {
      qn.assign((size_t)R * QD, 0.f);
      kn.assign((size_t)R * KVD, 0.f);
      qr.assign((size_t)R * NH, 0.f);
      kr.assign((size_t)R * KVH, 0.f);
      cpu::rmsnorm_forward(qn.data(), qr.data(), q.data(), W.at(W.o.q_norm), R * NH, HD, cfg.rms_eps);
      cpu::rmsnorm_forward(kn.data(), kr.data(), k.data(), W.at(W.o.k_norm), R * KVH, HD, cfg.rms_eps);
      q.swap(qn);
      k.swap(kn);
    }
    cpu::rope_forward(q.data(), pos.data(), R, NH, HD, inv_freq_.data());
    cpu::rope_forward(k.data(), pos.data(), R, KVH, HD, inv_freq_.data());
    for (int r = 0; r < R; r++) {
      const int blk = (*rows[r].blocks)[rows[r].pos / bs], off = rows[r].pos % bs;
      std::memcpy(pool_.k(blk, l) + (size_t)off * KVD, &k[(size_t)r * KVD], KVD * sizeof(float));
      std::memcpy(pool_.v(blk, l) + (size_t)off * KVD, &v[(size_t)r * KVD], KVD * sizeof(float));
    }
    const int group = NH / KVH;
#pragma omp parallel for collapse(2) if (R * NH > 16)
    for (int r = 0; r < R; r++) {
      for (int hh = 0; hh < NH; hh++) {
        std::vector<float> probs(rows[r].pos + 1);
        const std::vector<int>& bt = *rows[r].blocks;
        const int kvh = hh / group;
        cpu::attention_row(&att[(size_t)r * QD + hh * HD], probs.data(), &q[(size_t)r * QD + hh * HD], rows[r].pos + 1,
                           HD, scale,
                           [&](int j) { return pool_.k(bt[j / bs], l) + (size_t)(j % bs) * KVD + kvh * HD; },
                           [&](int j) { return pool_.v(bt[j / bs], l) + (size_t)(j % bs) * KVD + kvh * HD; });
      }
    }
    cpu::matmul_forward(tmp.data(), att.data(), W.at(W.o.wo), nullptr, R, QD, C);
    for (size_t i = 0; i < h.size(); i++) h[i] += tmp[i];
    cpu::rmsnorm_forward(ln.data(), rstd.data(), h.data(), W.at(W.o.mlp_norm), R, C, cfg.rms_eps);
    if (cfg.layer_is_moe[l]) {
      MoeActs a;
      ExpertParallel ep{engine_->comm(), engine_->expert_bounds()};
      moe_forward(cfg, W, ln.data(), tmp.data(), a, R, nullptr, engine_->comm() ? &ep : nullptr);
      if (experts)
        for (int r = 0; r < R; r++)
          for (int kk = 0; kk < K; kk++) (*experts)[((size_t)r * ML + moe_idx) * K + kk] = a.experts[(size_t)r * K + kk];
      moe_idx++;
    } else {
      MlpActs a;
      mlp_forward(cfg, W, ln.data(), tmp.data(), a, R);
    }
    for (size_t i = 0; i < h.size(); i++) h[i] += tmp[i];
  }
  const int LR = (int)logit_rows.size();
  Vec hs((size_t)LR * C), lnf((size_t)LR * C), rf(LR);
  for (int i = 0; i < LR; i++) std::memcpy(&hs[(size_t)i * C], &h[(size_t)logit_rows[i] * C], C * sizeof(float));
  cpu::rmsnorm_forward(lnf.data(), rf.data(), hs.data(), params + L.final_norm, LR, C, cfg.rms_eps);
  logits.assign((size_t)LR * cfg.vocab, 0.f);
  cpu::matmul_forward(logits.data(), lnf.data(), params + L.lm_head, nullptr, LR, C, cfg.vocab);
}

void Generator::accept(Sequence& s, int32_t token, float logprob, SampleEvent& ev) {
  ev.tokens.push_back(token);
  ev.logprobs.push_back(logprob);
  s.next = token;
  s.generated++;
  const Group& g = groups_.at(s.group);
  if (std::find(g.spec.stop_ids.begin(), g.spec.stop_ids.end(), token) != g.spec.stop_ids.end())
    finish(s, FinishReason::Stop);
  else if (s.generated >= g.spec.max_new_tokens)
    finish(s, FinishReason::Length);
}

void Generator::finish(Sequence& s, FinishReason why) {
  s.finished = why;
  for (int b : s.blocks) pool_.release(b);
  s.blocks.clear();
  Group& g = groups_.at(s.group);
  if (--g.live == 0) {
    reserved_ -= g.reserved;
    groups_.erase(s.group);
  }
}

std::vector<int64_t> Generator::admit() {
  // Admit in arrival order while the reservation allows (no overtaking: a large group is not starved).
  std::vector<int64_t> admitted;
  while (!queue_.empty()) {
    Group& g = groups_.at(queue_.front());
    if (reserved_ + g.reserved > pool_.num_blocks()) break;
    reserved_ += g.reserved;
    const int P = (int)g.spec.prompt.size(), bs = pool_.block_size();
    for (int b = 0; b < (P + bs - 1) / bs; b++) g.prompt_blocks.push_back(pool_.alloc());
    admitted.push_back(queue_.front());
    queue_.pop_front();
  }
  return admitted;
}

// After the prefill forward: each sample of the group gets the shared full prompt blocks (one reference
// each) and its own copy of the partial last block (each sample writes its own tokens after the prompt),
// then takes its first token, drawn from the prompt's last logits.
void Generator::fork_group(int64_t group_id, const int32_t* tokens, const float* logprobs, StepResult& out) {
  Group& g = groups_.at(group_id);
  const int bs = pool_.block_size();
  const int P = (int)g.spec.prompt.size();
  const int full = P / bs;
  const bool partial = P % bs != 0;
  const std::vector<int> prompt_blocks = std::move(g.prompt_blocks);
  // A sample may finish at its first token (and the last one to finish retires the group): iterate a copy.
  const std::vector<SampleSpec> samples = g.spec.samples;
  for (size_t i = 0; i < samples.size(); i++) {
    const SampleSpec& ss = samples[i];
    Sequence s;
    s.id = ss.sample_id;
    s.group = group_id;
    s.params = ss.params;
    s.len = P;
    for (int b = 0; b < full; b++) {
      pool_.retain(prompt_blocks[b]);
      s.blocks.push_back(prompt_blocks[b]);
    }
    if (partial) {
      const int copy = pool_.alloc();
      backend_->copy_block(copy, prompt_blocks[full]);
      s.blocks.push_back(copy);
    }
    SampleEvent ev;
    ev.sample_id = s.id;
    ev.group_id = s.group;
    seqs_.push_back(std::move(s));
    Sequence& sr = seqs_.back();
    accept(sr, tokens[i], logprobs[i], ev);
    ev.finished = sr.finished;
    out.events.push_back(std::move(ev));
  }
  for (int b : prompt_blocks) pool_.release(b);  // the group's own reference
}

StepResult Generator::step(int max_steps) {
  // The CPU rollout reads the host copy of the parameters: on a GPU engine, refresh it after optimizer steps
  // (the GPU backend reads the device's).
  if (!on_device_) engine_->sync_params_to_host();
  StepResult out;
  for (SampleEvent& ev : cancelled_) out.events.push_back(std::move(ev));
  cancelled_.clear();
  Collectives* comm = engine_->comm();
  const int bs = pool_.block_size();
  std::map<int64_t, size_t> event_of;  // sample id -> index in out.events
  out.global_active = true;
  for (int st = 0; st < max_steps; st++) {
    // One forward per iteration over the decode rows of running samples and the prompt rows of newly
    // admitted groups (prefill and decode share the batch).
    const std::vector<int64_t> admitted = admit();
    std::vector<IterRow> rows;
    std::vector<IterSample> samples;
    bool want_experts = false;
    const size_t decoding = seqs_.size();
    for (Sequence& s : seqs_) {
      if ((int)s.blocks.size() <= s.len / bs) s.blocks.push_back(pool_.alloc());
      const Group& g = groups_.at(s.group);
      rows.push_back(IterRow{s.next, s.len, &s.blocks, s.group, (int)g.spec.prompt.size() / bs * bs});
      IterSample sm{(int)rows.size() - 1, s.params};
      sm.params.step = (uint32_t)s.generated;
      samples.push_back(sm);
      want_experts |= g.spec.want_experts;
    }
    std::vector<size_t> prompt_row0, sample0;
    for (int64_t id : admitted) {
      Group& g = groups_.at(id);
      prompt_row0.push_back(rows.size());
      for (int p = 0; p < (int)g.spec.prompt.size(); p++)
        rows.push_back(IterRow{g.spec.prompt[p], p, &g.prompt_blocks, id, 0});
      sample0.push_back(samples.size());
      for (const SampleSpec& ss : g.spec.samples) {
        IterSample sm{(int)rows.size() - 1, ss.params};
        sm.params.step = 0;
        samples.push_back(sm);
      }
      want_experts |= g.spec.want_experts;
    }
    // With expert parallelism every rank runs the same number of forwards (its token exchanges meet the
    // others'), with no rows if it has nothing to do; the phase ends when no rank has rows.
    if (comm) {
      double counts[2] = {(double)rows.size(), want_experts ? 1.0 : 0.0};
      comm->all_reduce_sum(counts, 2);
      if (counts[0] == 0) {
        out.global_active = false;
        break;
      }
      want_experts = counts[1] > 0;  // the experts are collected where asked; the exchange is the same
    } else if (rows.empty()) {
      out.global_active = false;
      break;
    }
    IterResult res;
    backend_->run(rows, samples, want_experts, admitted.empty(), res);
    const std::vector<int32_t>& experts = res.experts;
    const size_t per_row = want_experts && !rows.empty() ? experts.size() / rows.size() : 0;
    bool any_finished = false;
    for (size_t i = 0; i < decoding; i++) {
      Sequence& s = seqs_[i];
      s.len++;
      auto it = event_of.find(s.id);
      if (it == event_of.end()) {
        SampleEvent ev;
        ev.sample_id = s.id;
        ev.group_id = s.group;
        out.events.push_back(std::move(ev));
        it = event_of.emplace(s.id, out.events.size() - 1).first;
      }
      SampleEvent& ev = out.events[it->second];
      if (groups_.at(s.group).spec.want_experts)
        ev.experts.insert(ev.experts.end(), experts.begin() + i * per_row, experts.begin() + (i + 1) * per_row);
      accept(s, res.tokens[i], res.logprobs[i], ev);
      ev.finished = s.finished;
      any_finished |= s.finished != FinishReason::None;
    }
    for (size_t gi = 0; gi < admitted.size(); gi++) {
      const Group& g = groups_.at(admitted[gi]);
      if (g.spec.want_experts) {
        const size_t r0 = prompt_row0[gi], P = g.spec.prompt.size();
        out.prefills.push_back(GroupPrefill{admitted[gi], std::vector<int32_t>(experts.begin() + r0 * per_row,
                                                                                 experts.begin() + (r0 + P) * per_row)});
      }
      const size_t first_event = out.events.size();
      fork_group(admitted[gi], &res.tokens[sample0[gi]], &res.logprobs[sample0[gi]], out);
      for (size_t e = first_event; e < out.events.size(); e++) {
        event_of[out.events[e].sample_id] = e;
        any_finished |= out.events[e].finished != FinishReason::None;
      }
    }
    seqs_.erase(std::remove_if(seqs_.begin(), seqs_.end(), [](const Sequence& s) { return s.finished != FinishReason::None; }),
                seqs_.end());
    // One rank alone: return as soon as a sample finishes, so that it streams out promptly. With several
    // ranks the step count must stay the same everywhere, so finished samples wait for the step's end.
    if (!comm && any_finished) break;
  }
  if (!comm) out.global_active = !idle();
  return out;
}

void Generator::cancel(int64_t sample_id) {
  for (size_t i = 0; i < seqs_.size(); i++) {
    if (seqs_[i].id != sample_id) continue;
    SampleEvent ev;
    ev.sample_id = sample_id;
    ev.group_id = seqs_[i].group;
    finish(seqs_[i], FinishReason::Cancelled);
    ev.finished = FinishReason::Cancelled;
    cancelled_.push_back(std::move(ev));
    seqs_.erase(seqs_.begin() + i);
    return;
  }
  // A queued group's sample: drop the whole group's sample from the spec before admission.
  for (auto& [gid, g] : groups_) {
    auto& ss = g.spec.samples;
    auto it = std::find_if(ss.begin(), ss.end(), [&](const SampleSpec& s) { return s.sample_id == sample_id; });
    if (it == ss.end()) continue;
    MP_CHECK_ARG(std::find(queue_.begin(), queue_.end(), gid) != queue_.end(), "cancel: sample already finished");
    ss.erase(it);
    SampleEvent ev;
    ev.sample_id = sample_id;
    ev.group_id = gid;
    ev.finished = FinishReason::Cancelled;
    cancelled_.push_back(std::move(ev));
    if (--g.live == 0) {
      queue_.erase(std::find(queue_.begin(), queue_.end(), gid));
      groups_.erase(gid);
    } else {
      g.reserved = blocks_needed((int)g.spec.prompt.size(), (int)ss.size(), g.spec.max_new_tokens);
    }
    return;
  }
  MP_CHECK_ARG(false, "cancel: no running sample with id " + std::to_string(sample_id));
}

GeneratorStats Generator::stats() const {
  GeneratorStats s;
  s.block_size = pool_.block_size();
  s.num_blocks = pool_.num_blocks();
  s.free_blocks = pool_.free_blocks();
  s.reserved_blocks = reserved_;
  s.active_samples = (int)seqs_.size();
  s.waiting_groups = (int)queue_.size();
  return s;
}

int Generator::group_blocks(int64_t group_id) const {
  std::vector<int> all;
  for (const Sequence& s : seqs_)
    if (s.group == group_id) all.insert(all.end(), s.blocks.begin(), s.blocks.end());
  std::sort(all.begin(), all.end());
  return (int)(std::unique(all.begin(), all.end()) - all.begin());
}

}  // namespace moepilot::gen
