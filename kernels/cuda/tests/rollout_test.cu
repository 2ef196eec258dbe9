// The rollout on the GPU (gen::Generator over an engine on a device: GpuRollout's paged cache, LM head, sampler,
// CUDA graphs) against the GPU trainer's forward, without Node (and under compute-sanitizer memcheck with
// --quick): a small random model with a MoE layer (6 experts: a padded router; a shared expert) and a dense one,
// GRPO groups of mixed prompt lengths (a 70-token prompt: a whole attention tile shared by its samples).
//   - every rollout logprob == Engine::forward's logprob of the same token at the same temperature, bit for bit
//     (T = 0.7 with top-p 0.9, T = 1 with top-k 5, greedy);
//   - the router's experts of every fed row == Engine::forward's;
//   - CUDA graphs == eager, bit for bit; every KV block free again at the end.
// Prints one line per check; exit status 1 on any failure.
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "gen/generator.h"
#include "moepilot/engine.h"
#include "moepilot/error.h"

using namespace moepilot;

static int failures = 0;
static void report(bool ok, const std::string& what, const std::string& detail) {
  if (!ok) failures++;
  std::printf("%s %s: %s\n", ok ? "ok  " : "FAIL", what.c_str(), detail.c_str());
}

static uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

static ModelConfig small_config() {
  ModelConfig c;
  c.family = Family::Qwen2Moe;
  c.vocab = 512;
  c.hidden = 64;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.rope_theta = 10000.f;
  c.num_experts = 6;
  c.top_k = 2;
  c.moe_intermediate = 32;
  c.shared_intermediate = 64;
  c.dense_intermediate = 64;
  c.qkv_bias = true;
  c.layer_is_moe = {1, 0};
  c.expert_begin = 0;
  c.expert_end = 6;
  return c;
}

struct Run {
  std::map<int64_t, std::vector<int32_t>> tokens, experts;
  std::map<int64_t, std::vector<float>> logprobs;
  std::map<int64_t, std::vector<int32_t>> prefill_experts;  // by group
};

struct Case {
  float temperature;
  float top_p;
  int top_k;
};

static std::vector<std::vector<int32_t>> prompts() {
  std::vector<std::vector<int32_t>> p = {{5, 9, 33, 2}, {7, 8, 100, 200, 300, 4, 17}, {11}};
  std::vector<int32_t> longp(70);
  for (int i = 0; i < 70; i++) longp[i] = 1 + (i * 37) % 251;
  p.push_back(longp);
  return p;
}

static Run generate(std::shared_ptr<Engine> engine, bool graphs, const Case& cs, int n, bool want_experts) {
  gen::Generator g(engine, 512, 4);
  g.set_cuda_graphs(graphs);
  const auto ps = prompts();
  for (size_t i = 0; i < ps.size(); i++) {
    gen::GroupSpec spec;
    spec.group_id = (int64_t)i;
    spec.prompt = ps[i];
    spec.max_new_tokens = 5 + 3 * (int)i;
    spec.want_experts = want_experts;
    for (int s = 0; s < n; s++) {
      gen::SampleSpec ss;
      ss.sample_id = (int64_t)(i * 100 + s);
      ss.params.temperature = cs.temperature;
      ss.params.top_p = cs.top_p;
      ss.params.top_k = cs.top_k;
      ss.params.seed = 1234;
      ss.params.request_id = 77 + i;
      ss.params.sample_index = (uint32_t)s;
      spec.samples.push_back(ss);
    }
    g.add_group(spec);
  }
  Run r;
  int guard = 0;
  while (!g.idle() && guard++ < 1000) {
    const gen::StepResult st = g.step(3);
    for (const gen::SampleEvent& ev : st.events) {
      auto& t = r.tokens[ev.sample_id];
      t.insert(t.end(), ev.tokens.begin(), ev.tokens.end());
      auto& l = r.logprobs[ev.sample_id];
      l.insert(l.end(), ev.logprobs.begin(), ev.logprobs.end());
      auto& e = r.experts[ev.sample_id];
      e.insert(e.end(), ev.experts.begin(), ev.experts.end());
    }
    for (const gen::GroupPrefill& p : st.prefills) r.prefill_experts[p.group_id] = p.experts;
  }
  const gen::GeneratorStats s = g.stats();
  report(g.idle() && s.free_blocks == s.num_blocks && s.reserved_blocks == 0,
         std::string("blocks returned (graphs ") + (graphs ? "on" : "off") + ")",
         std::to_string(s.free_blocks) + "/" + std::to_string(s.num_blocks) + " free, " +
             std::to_string(s.reserved_blocks) + " reserved");
  return r;
}

// Rollout logprobs (and experts) vs Engine::forward over prompt + completion.
static void check_exact(const std::string& what, Engine& engine, const Run& r, int n, float temperature) {
  const auto ps = prompts();
  Batch b;
  std::vector<std::pair<int64_t, size_t>> seqs;  // sample id, prompt index
  for (size_t i = 0; i < ps.size(); i++)
    for (int s = 0; s < n; s++) {
      const int64_t id = (int64_t)(i * 100 + s);
      const auto& t = r.tokens.at(id);
      b.tokens.insert(b.tokens.end(), ps[i].begin(), ps[i].end());
      b.tokens.insert(b.tokens.end(), t.begin(), t.end());
      b.seq_lens.push_back((int32_t)(ps[i].size() + t.size()));
      seqs.push_back({id, i});
    }
  ForwardRequest req;
  req.want_logprobs = true;
  req.want_experts = !r.experts.empty() && !r.experts.begin()->second.empty();
  req.temperature = temperature;
  const ForwardResult f = engine.forward(b, req);
  const ModelConfig& cfg = engine.config();
  const int ML = cfg.moe_layer_count(), K = cfg.top_k;
  const size_t N = b.tokens.size();
  size_t o = 0, checked = 0, bad = 0, ebad = 0, echecked = 0;
  std::string first;
  for (size_t q = 0; q < seqs.size(); q++) {
    const auto& lp = r.logprobs.at(seqs[q].first);
    const size_t P = ps[seqs[q].second].size();
    for (size_t j = 0; j < lp.size(); j++) {
      const float want = f.logprobs[o + P - 1 + j];
      if (bits(want) != bits(lp[j])) {
        if (bad++ == 0)
          first = "; first: sample " + std::to_string(seqs[q].first) + " token " + std::to_string(j) + " rollout " +
                  std::to_string(lp[j]) + " forward " + std::to_string(want);
      }
      checked++;
    }
    if (req.want_experts) {
      // The sample's experts: its decode rows [tokens - 1, ML, K] after the group's prompt rows [P, ML, K].
      const auto& pe = r.prefill_experts.at((int64_t)seqs[q].second);
      const auto& se = r.experts.at(seqs[q].first);
      const size_t fed = P + lp.size() - 1;
      for (size_t row = 0; row < fed; row++)
        for (int l = 0; l < ML; l++)
          for (int k = 0; k < K; k++) {
            const int32_t got = row < P ? pe[(row * ML + l) * K + k] : se[((row - P) * ML + l) * K + k];
            ebad += got != f.experts[((size_t)l * N + o + row) * K + k];
            echecked++;
          }
    }
    o += b.seq_lens[q];
  }
  report(bad == 0 && checked > 0, what + " logprobs == forward",
         std::to_string(checked) + " checked, " + std::to_string(bad) + " differ" + first);
  if (req.want_experts)
    report(ebad == 0 && echecked > 0, what + " experts == forward",
           std::to_string(echecked) + " checked, " + std::to_string(ebad) + " differ");
}

static void compare(const std::string& what, const Run& a, const Run& b) {
  size_t total = 0, diff = 0;
  for (const auto& [id, t] : a.tokens) {
    const auto& u = b.tokens.at(id);
    const auto& la = a.logprobs.at(id);
    const auto& lb = b.logprobs.at(id);
    if (t.size() != u.size()) {
      diff++;
      continue;
    }
    for (size_t j = 0; j < t.size(); j++) {
      total++;
      diff += t[j] != u[j] || bits(la[j]) != bits(lb[j]);
    }
  }
  report(diff == 0 && total > 0, what, std::to_string(total) + " tokens, " + std::to_string(diff) + " differ");
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  try {
    auto engine = std::make_shared<Engine>(small_config());
    engine->to_device(0);
    engine->fill_params_random(7, 0.2f);
    const std::vector<Case> cases = quick ? std::vector<Case>{{0.7f, 0.9f, 0}}
                                          : std::vector<Case>{{0.7f, 0.9f, 0}, {1.f, 1.f, 5}, {0.f, 1.f, 0}};
    for (const Case& cs : cases) {
      const std::string name = "T=" + std::to_string(cs.temperature) + " top-p " + std::to_string(cs.top_p) +
                               " top-k " + std::to_string(cs.top_k);
      const int n = cs.temperature == 0.f ? 1 : 5;  // 5 samples x 4 groups: decode buckets 32 down to 1
      const Run g = generate(engine, true, cs, n, true);
      check_exact(name + " (graphs)", *engine, g, n, cs.temperature > 0 ? cs.temperature : 1.f);
      const Run e = generate(engine, false, cs, n, false);
      check_exact(name + " (eager)", *engine, e, n, cs.temperature > 0 ? cs.temperature : 1.f);
      compare(name + " graphs == eager", g, e);
    }
  } catch (const std::exception& ex) {
    report(false, "rollout_test", std::string("threw: ") + ex.what());
  }
  std::printf("rollout_test: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
