// JS class `Generator` over gen::Generator; the typed wrapper with scheduling, streaming and stop strings
// is src/engine/generator.ts.
#include <napi.h>

#include <memory>

#include "addon/async.h"
#include "addon/convert.h"
#include "addon/modules.h"
#include "gen/generator.h"

namespace moepilot::addon {
namespace {

class GeneratorWrap : public Napi::ObjectWrap<GeneratorWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "Generator",
                       {
                           InstanceMethod("addGroup", &GeneratorWrap::add_group),
                           InstanceMethod("step", &GeneratorWrap::step),
                           InstanceMethod("cancel", &GeneratorWrap::cancel),
                           InstanceMethod("stats", &GeneratorWrap::stats),
                           InstanceMethod("groupBlocks", &GeneratorWrap::group_blocks),
                           InstanceMethod("blocksNeeded", &GeneratorWrap::blocks_needed),
                       });
  }

  // new Generator(engine, { numBlocks, blockSize, cudaGraphs? }): on an engine on a GPU the rows run there
  // (cudaGraphs, default true: decode iterations under CUDA graphs; false runs them eagerly).
  explicit GeneratorWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GeneratorWrap>(info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 2 && info[1].IsObject(), "Generator(engine, {numBlocks, blockSize, cudaGraphs}) expected");
      std::shared_ptr<Engine> engine = engine_from_js(env, info[0]);
      Napi::Object o = info[1].As<Napi::Object>();
      gen_ = std::make_shared<gen::Generator>(engine, get_int(o, "numBlocks"), get_int(o, "blockSize"));
      const Napi::Value graphs = o.Get("cudaGraphs");  // optional (null or absent: on)
      gen_->set_cuda_graphs(graphs.IsUndefined() || graphs.IsNull() ? true : get_bool(o, "cudaGraphs"));
      engine_ = engine;
    } catch (...) {
      rethrow_as_js(env);
    }
  }

 private:
  // Calls between steps only (the TS scheduler serialises); the lock guards against misuse.
  Napi::Value add_group(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 1 && info[0].IsObject(), "addGroup(group) expected");
      Napi::Object o = info[0].As<Napi::Object>();
      gen::GroupSpec g;
      g.group_id = (int64_t)get_number(o, "groupId");
      g.prompt = get_i32(o, "prompt");
      g.max_new_tokens = get_int(o, "maxNewTokens");
      g.stop_ids = get_i32(o, "stopIds");
      g.want_experts = get_bool(o, "wantExperts");
      Napi::Value samples = field(o, "samples");
      MP_CHECK_ARG(samples.IsArray(), "field 'samples' must be an array");
      Napi::Array arr = samples.As<Napi::Array>();
      for (uint32_t i = 0; i < arr.Length(); i++) {
        Napi::Value sv = arr.Get(i);
        MP_CHECK_ARG(sv.IsObject(), "samples[" + std::to_string(i) + "] must be an object");
        gen::SampleSpec s;
        s.sample_id = (int64_t)get_number(sv.As<Napi::Object>(), "sampleId");
        s.params = sampling_params_from_js(sv.As<Napi::Object>());
        g.samples.push_back(s);
      }
      std::lock_guard<std::mutex> lock(gen_->mu);
      gen_->add_group(std::move(g));
    } catch (...) {
      rethrow_as_js(env);
    }
    return env.Undefined();
  }

  Napi::Value step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 1 && info[0].IsNumber(), "step(maxSteps) expected");
      const int max_steps = info[0].As<Napi::Number>().Int32Value();
      MP_CHECK_ARG(max_steps >= 1, "step: maxSteps must be >= 1");
      auto result = std::make_shared<gen::StepResult>();
      auto g = gen_;
      auto eng = engine_;
      return run_async(
          env, "moepilot.generate",
          [g, eng, result, max_steps] {
            // Engine lock first: weights must not change under a step (an optimizer step waits).
            std::lock_guard<std::mutex> le(eng->mu);
            std::lock_guard<std::mutex> lg(g->mu);
            *result = g->step(max_steps);
          },
          [result](Napi::Env env) -> Napi::Value {
            Napi::Object o = Napi::Object::New(env);
            Napi::Array events = Napi::Array::New(env, result->events.size());
            for (size_t i = 0; i < result->events.size(); i++) {
              const gen::SampleEvent& ev = result->events[i];
              Napi::Object e = Napi::Object::New(env);
              e.Set("sampleId", (double)ev.sample_id);
              e.Set("groupId", (double)ev.group_id);
              e.Set("tokens", to_i32(env, ev.tokens));
              e.Set("logprobs", to_f32(env, ev.logprobs));
              e.Set("experts", to_i32(env, ev.experts));
              e.Set("finished", gen::finish_reason_name(ev.finished));
              events.Set((uint32_t)i, e);
            }
            o.Set("events", events);
            Napi::Array prefills = Napi::Array::New(env, result->prefills.size());
            for (size_t i = 0; i < result->prefills.size(); i++) {
              Napi::Object p = Napi::Object::New(env);
              p.Set("groupId", (double)result->prefills[i].group_id);
              p.Set("experts", to_i32(env, result->prefills[i].experts));
              prefills.Set((uint32_t)i, p);
            }
            o.Set("prefills", prefills);
            o.Set("globalActive", result->global_active);
            return o;
          });
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  Napi::Value cancel(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 1 && info[0].IsNumber(), "cancel(sampleId) expected");
      std::lock_guard<std::mutex> lock(gen_->mu);
      gen_->cancel((int64_t)info[0].As<Napi::Number>().DoubleValue());
    } catch (...) {
      rethrow_as_js(env);
    }
    return env.Undefined();
  }

  Napi::Value stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::lock_guard<std::mutex> lock(gen_->mu);
    const gen::GeneratorStats s = gen_->stats();
    Napi::Object o = Napi::Object::New(env);
    o.Set("blockSize", s.block_size);
    o.Set("numBlocks", s.num_blocks);
    o.Set("freeBlocks", s.free_blocks);
    o.Set("reservedBlocks", s.reserved_blocks);
    o.Set("activeSamples", s.active_samples);
    o.Set("waitingGroups", s.waiting_groups);
    return o;
  }

  Napi::Value group_blocks(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 1 && info[0].IsNumber(), "groupBlocks(groupId) expected");
      std::lock_guard<std::mutex> lock(gen_->mu);
      return Napi::Number::New(env, gen_->group_blocks((int64_t)info[0].As<Napi::Number>().DoubleValue()));
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  Napi::Value blocks_needed(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 3, "blocksNeeded(promptLen, n, maxNewTokens) expected");
      return Napi::Number::New(env, gen_->blocks_needed(info[0].As<Napi::Number>().Int32Value(),
                                                        info[1].As<Napi::Number>().Int32Value(),
                                                        info[2].As<Napi::Number>().Int32Value()));
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  std::shared_ptr<gen::Generator> gen_;
  std::shared_ptr<Engine> engine_;
};

}  // namespace

void register_generator(Napi::Env env, Napi::Object exports) { exports.Set("Generator", GeneratorWrap::define(env)); }

}  // namespace moepilot::addon
