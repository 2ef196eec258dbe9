// JS class `Engine`: the typed wrapper is src/engine/engine.ts. Bulk tensors cross as typed arrays;
// params and grads are zero-copy views of the native buffers.
#include <napi.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "addon/async.h"
#include "addon/comm_handle.h"
#include "addon/convert.h"
#include "addon/modules.h"
#include "cuda/gpu_model.h"
#include "moepilot/comm.h"
#include "moepilot/engine.h"

namespace moepilot::addon {
namespace {

Napi::Object phases_to_js(Napi::Env env, const PhaseTimes& t) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("attentionMs", t.attention_ms);
  o.Set("expertsMs", t.experts_ms);
  o.Set("alltoallMs", t.alltoall_ms);
  o.Set("alltoallBytes", t.alltoall_bytes);
  o.Set("lmHeadMs", t.lm_head_ms);
  o.Set("totalMs", t.total_ms);
  return o;
}

ModelConfig config_from_js(const Napi::Object& o) {
  ModelConfig c;
  c.family = (Family)get_int(o, "family");
  c.vocab = get_int(o, "vocab");
  c.hidden = get_int(o, "hidden");
  c.layers = get_int(o, "layers");
  c.heads = get_int(o, "heads");
  c.kv_heads = get_int(o, "kvHeads");
  c.head_dim = get_int(o, "headDim");
  c.rope_theta = (float)get_number(o, "ropeTheta");
  c.rms_eps = (float)get_number(o, "rmsEps");
  const std::string rope_dtype = get_string(o, "ropeFreqDtype");
  if (rope_dtype == "float32") c.rope_freq_dtype = ModelConfig::RopeFreqDtype::F32;
  else if (rope_dtype == "bfloat16") c.rope_freq_dtype = ModelConfig::RopeFreqDtype::BF16;
  else if (rope_dtype == "float16") c.rope_freq_dtype = ModelConfig::RopeFreqDtype::F16;
  else MP_CHECK_ARG(false, "ropeFreqDtype must be float32, bfloat16 or float16, got '" + rope_dtype + "'");
  c.num_experts = get_int(o, "numExperts");
  c.top_k = get_int(o, "topK");
  c.norm_topk_prob = get_bool(o, "normTopkProb");
  c.moe_intermediate = get_int(o, "moeIntermediate");
  c.shared_intermediate = get_int(o, "sharedIntermediate");
  c.dense_intermediate = get_int(o, "denseIntermediate");
  c.qkv_bias = get_bool(o, "qkvBias");
  c.qk_norm = get_bool(o, "qkNorm");
  c.tie_embeddings = get_bool(o, "tieEmbeddings");
  c.router_aux_loss_coef = (float)get_number(o, "routerAuxLossCoef");
  Napi::Value moe = field(o, "layerIsMoe");
  MP_CHECK_ARG(moe.IsArray(), "field 'layerIsMoe' must be an array of booleans");
  Napi::Array arr = moe.As<Napi::Array>();
  for (uint32_t i = 0; i < arr.Length(); i++) c.layer_is_moe.push_back(arr.Get(i).ToBoolean().Value() ? 1 : 0);
  c.expert_begin = get_int(o, "expertBegin");
  c.expert_end = get_int(o, "expertEnd");
  return c;
}

Batch batch_from_js(const Napi::Object& o) {
  Batch b;
  b.tokens = get_i32(o, "tokens");
  b.seq_lens = get_i32(o, "seqLens");
  if (!is_null(o, "replayExperts")) b.replay_experts = get_i32(o, "replayExperts");
  return b;
}

LossSpec loss_from_js(const Napi::Object& o) {
  LossSpec s;
  std::string type = get_string(o, "type");
  MP_CHECK_ARG(type == "sft" || type == "grpo", "loss type must be 'sft' or 'grpo', got '" + type + "'");
  s.type = type == "sft" ? LossType::Sft : LossType::Grpo;
  s.mask = get_f32(o, "mask");
  if (s.type == LossType::Grpo) {
    s.advantages = get_f32(o, "advantages");
    s.old_logprobs = get_f32(o, "oldLogprobs");
    if (!is_null(o, "refLogprobs")) s.ref_logprobs = get_f32(o, "refLogprobs");
    s.eps_low = (float)get_number(o, "epsLow");
    s.eps_high = (float)get_number(o, "epsHigh");
    s.beta = (float)get_number(o, "beta");
    std::string kl = get_string(o, "kl");
    MP_CHECK_ARG(kl == "k1" || kl == "k3", "kl estimator must be 'k1' or 'k3', got '" + kl + "'");
    s.kl = kl == "k1" ? KlEstimator::K1 : KlEstimator::K3;
  }
  std::string agg = get_string(o, "aggregation");
  if (agg == "token-mean") s.aggregation = Aggregation::TokenMean;
  else if (agg == "seq-mean-token-mean") s.aggregation = Aggregation::SeqMeanTokenMean;
  else if (agg == "seq-mean-token-sum-norm") s.aggregation = Aggregation::SeqMeanTokenSumNorm;
  else MP_CHECK_ARG(false, "aggregation must be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm, got '" + agg + "'");
  s.total_tokens = get_number(o, "totalTokens");
  s.total_seqs = get_number(o, "totalSeqs");
  s.norm_length = get_number(o, "normLength");
  s.temperature = (float)get_number(o, "temperature");
  s.aux_loss_coef = (float)get_number(o, "auxLossCoef");
  s.aux_scale = get_number(o, "auxScale");
  return s;
}

class EngineWrap : public Napi::ObjectWrap<EngineWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "Engine",
                       {
                           InstanceMethod("paramTable", &EngineWrap::param_table),
                           InstanceMethod("params", &EngineWrap::params),
                           InstanceMethod("grads", &EngineWrap::grads),
                           InstanceMethod("forward", &EngineWrap::forward),
                           InstanceMethod("forwardBackward", &EngineWrap::forward_backward),
                           InstanceMethod("zeroGrad", &EngineWrap::zero_grad),
                           InstanceMethod("adamwStep", &EngineWrap::adamw_step),
                           InstanceMethod("setParallel", &EngineWrap::set_parallel),
                           InstanceMethod("allReduceDenseGrads", &EngineWrap::all_reduce_dense_grads),
                           InstanceMethod("optimizerState", &EngineWrap::optimizer_state),
                           InstanceMethod("setOptimizerSteps", &EngineWrap::set_optimizer_steps),
                           InstanceMethod("toDevice", &EngineWrap::to_device),
                           InstanceMethod("syncToHost", &EngineWrap::sync_to_host),
                           InstanceMethod("callTimes", &EngineWrap::call_times),
                           InstanceMethod("syncToDevice", &EngineWrap::sync_to_device),
                           InstanceMethod("device", &EngineWrap::device),
                           InstanceMethod("deviceMemory", &EngineWrap::device_memory),
                           InstanceMethod("fillParamsRandom", &EngineWrap::fill_params_random),
                       });
  }

  explicit EngineWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EngineWrap>(info) {
    try {
      MP_CHECK_ARG(info.Length() == 1 && info[0].IsObject(), "Engine(config): config object expected");
      engine_ = std::make_shared<Engine>(config_from_js(info[0].As<Napi::Object>()));
    } catch (...) {
      rethrow_as_js(info.Env());
    }
  }

  std::shared_ptr<Engine> engine() const { return engine_; }

 private:
  Napi::Value param_table(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const ParamLayout& L = engine_->layout();
    Napi::Array out = Napi::Array::New(env, L.tensors.size());
    for (size_t i = 0; i < L.tensors.size(); i++) {
      const ParamInfo& p = L.tensors[i];
      Napi::Object t = Napi::Object::New(env);
      t.Set("name", p.name);
      t.Set("offset", (double)p.offset);
      t.Set("numel", (double)p.numel);
      Napi::Array shape = Napi::Array::New(env, p.shape.size());
      for (size_t d = 0; d < p.shape.size(); d++) shape.Set((uint32_t)d, (double)p.shape[d]);
      t.Set("shape", shape);
      t.Set("kind", p.kind == ParamKind::Expert ? "expert" : "dense");
      t.Set("layer", p.layer);
      t.Set("expert", p.expert);
      out.Set((uint32_t)i, t);
    }
    return out;
  }

  // Zero-copy Float32Array over a native buffer; the closure keeps the engine alive while JS holds it.
  // Node makes external ArrayBuffers through its Buffer type, which holds at most 4 GiB, and on failure frees
  // the finalizer data that node-addon-api frees again: larger buffers get a clear error instead.
  Napi::Value view(Napi::Env env, float* data, size_t n) {
    if (n == 0) return Napi::Float32Array::New(env, 0);
    MP_CHECK_ARG(n * sizeof(float) <= (size_t{1} << 32),
                 "a host view of " + std::to_string(n) + " floats exceeds Node's 4 GiB limit on external buffers");
    auto* keep = new std::shared_ptr<Engine>(engine_);
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(
        env, data, n * sizeof(float), [](Napi::Env, void*, std::shared_ptr<Engine>* k) { delete k; }, keep);
    return Napi::Float32Array::New(env, n, ab, 0);
  }
  // The range [offset, offset + count) of a flat buffer of n floats: (offset, count) from the call's arguments, or
  // the whole buffer when none are given. One view holds at most 4 GiB: a rank whose parameters exceed that reads
  // them tensor by tensor (Engine.paramsByName).
  Napi::Value range_view(const Napi::CallbackInfo& info, float* data, size_t n, const char* what) {
    size_t off = 0, count = n;
    if (info.Length() > 0) {
      MP_CHECK_ARG(info.Length() == 2 && info[0].IsNumber() && info[1].IsNumber(),
                   std::string(what) + "(offset, count) expected: two numbers, or no arguments for the whole buffer");
      const double o = info[0].As<Napi::Number>().DoubleValue(), c = info[1].As<Napi::Number>().DoubleValue();
      MP_CHECK_ARG(o >= 0 && c >= 0 && o == std::floor(o) && c == std::floor(c) && o + c <= (double)n,
                   std::string(what) + "(offset, count): [" + std::to_string(o) + ", " + std::to_string(o + c) +
                       ") is not a range of the " + std::to_string(n) + " floats");
      off = (size_t)o, count = (size_t)c;
    }
    return view(info.Env(), data + off, count);
  }
  Napi::Value params(const Napi::CallbackInfo& info) {
    try {
      return range_view(info, engine_->params(), engine_->num_params(), "params");
    } catch (...) {
      rethrow_as_js(info.Env());
    }
  }
  Napi::Value grads(const Napi::CallbackInfo& info) {
    try {
      return range_view(info, engine_->grads(), engine_->num_params(), "grads");
    } catch (...) {
      rethrow_as_js(info.Env());
    }
  }
  // Views of n floats in pieces of at most `chunk` (each within the 4 GiB a view may hold), in order.
  Napi::Value chunked(Napi::Env env, float* data, size_t n, size_t chunk) {
    const size_t pieces = n == 0 ? 0 : (n + chunk - 1) / chunk;
    Napi::Array a = Napi::Array::New(env, pieces);
    for (size_t i = 0; i < pieces; i++) a.Set((uint32_t)i, view(env, data + i * chunk, std::min(chunk, n - i * chunk)));
    return a;
  }

  Napi::Value forward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 2 && info[0].IsObject() && info[1].IsObject(), "forward(batch, request) expected");
      auto batch = std::make_shared<Batch>(batch_from_js(info[0].As<Napi::Object>()));
      Napi::Object r = info[1].As<Napi::Object>();
      ForwardRequest req;
      req.want_logits = get_bool(r, "logits");
      req.want_logprobs = get_bool(r, "logprobs");
      req.want_router_logits = get_bool(r, "routerLogits");
      req.want_experts = get_bool(r, "experts");
      req.want_entropy = get_bool(r, "entropy");
      req.temperature = (float)get_number(r, "temperature");
      auto result = std::make_shared<ForwardResult>();
      auto eng = engine_;
      return run_async(
          env, "moepilot.forward",
          [eng, batch, req, result] {
            std::lock_guard<std::mutex> g(eng->mu);
            *result = eng->forward(*batch, req);
          },
          [result](Napi::Env env) -> Napi::Value {
            Napi::Object o = Napi::Object::New(env);
            o.Set("logits", to_f32(env, result->logits));
            o.Set("logprobs", to_f32(env, result->logprobs));
            o.Set("routerLogits", to_f32(env, result->router_logits));
            o.Set("entropy", to_f32(env, result->entropy));
            o.Set("experts", to_i32(env, result->experts));
            o.Set("expertTokens", to_i32(env, result->expert_tokens));
            o.Set("phases", phases_to_js(env, result->phases));
            return o;
          });
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  Napi::Value forward_backward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 2 && info[0].IsObject() && info[1].IsObject(), "forwardBackward(batch, loss) expected");
      auto batch = std::make_shared<Batch>(batch_from_js(info[0].As<Napi::Object>()));
      auto spec = std::make_shared<LossSpec>(loss_from_js(info[1].As<Napi::Object>()));
      auto result = std::make_shared<LossResult>();
      auto eng = engine_;
      return run_async(
          env, "moepilot.forwardBackward",
          [eng, batch, spec, result] {
            std::lock_guard<std::mutex> g(eng->mu);
            *result = eng->forward_backward(*batch, *spec);
          },
          [result](Napi::Env env) -> Napi::Value {
            Napi::Object o = Napi::Object::New(env);
            o.Set("loss", result->loss);
            o.Set("auxLoss", result->aux_loss);
            o.Set("tokens", result->tokens);
            o.Set("klSum", result->kl_sum);
            o.Set("clipLowCount", result->clip_low_count);
            o.Set("clipHighCount", result->clip_high_count);
            o.Set("ratioSum", result->ratio_sum);
            o.Set("entropySum", result->entropy_sum);
            o.Set("logprobSum", result->logprob_sum);
            o.Set("logprobs", to_f32(env, result->logprobs));
            o.Set("expertTokens", to_i32(env, result->expert_tokens));
            o.Set("forwardPhases", phases_to_js(env, result->forward_phases));
            o.Set("backwardPhases", phases_to_js(env, result->backward_phases));
            return o;
          });
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  Napi::Value zero_grad(const Napi::CallbackInfo& info) {
    try {
      std::lock_guard<std::mutex> g(engine_->mu);
      engine_->zero_grad();
    } catch (...) {
      rethrow_as_js(info.Env());
    }
    return info.Env().Undefined();
  }

  Napi::Value adamw_step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 1 && info[0].IsObject(), "adamwStep(options) expected");
      Napi::Object o = info[0].As<Napi::Object>();
      AdamWConfig c;
      c.lr = (float)get_number(o, "lr");
      c.beta1 = (float)get_number(o, "beta1");
      c.beta2 = (float)get_number(o, "beta2");
      c.eps = (float)get_number(o, "eps");
      c.weight_decay = (float)get_number(o, "weightDecay");
      c.max_grad_norm = (float)get_number(o, "maxGradNorm");
      auto norm = std::make_shared<double>(0);
      auto eng = engine_;
      return run_async(
          env, "moepilot.adamwStep",
          [eng, c, norm] {
            std::lock_guard<std::mutex> g(eng->mu);
            *norm = eng->adamw_step(c);
          },
          [norm](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, *norm); });
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  // setParallel(communicator, expertBounds: Int32Array [ranks + 1])
  Napi::Value set_parallel(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 2 && info[1].IsTypedArray(), "setParallel(communicator, expertBounds) expected");
      std::shared_ptr<Collectives> comm = comm_from_js(info[0]);
      Napi::Int32Array b = info[1].As<Napi::Int32Array>();
      std::vector<int> bounds(b.Data(), b.Data() + b.ElementLength());
      std::lock_guard<std::mutex> g(engine_->mu);
      engine_->set_parallel(std::move(comm), std::move(bounds));
    } catch (...) {
      rethrow_as_js(env);
    }
    return env.Undefined();
  }

  Napi::Value all_reduce_dense_grads(const Napi::CallbackInfo& info) {
    auto eng = engine_;
    return run_async(info.Env(), "moepilot.allReduceDenseGrads", [eng] {
      std::lock_guard<std::mutex> g(eng->mu);
      eng->all_reduce_dense_grads();
    });
  }

  // AdamW state of this rank (checkpoints): zero-copy views, allocated on first use and never moved.
  Napi::Value optimizer_state(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      // Each moment buffer as views of at most `chunk` floats (default 2^28: 1 GiB), so that a rank's state may
      // exceed the 4 GiB one view holds.
      size_t chunk = size_t{1} << 28;
      if (info.Length() > 0 && !info[0].IsUndefined()) {
        MP_CHECK_ARG(info[0].IsNumber() && info[0].As<Napi::Number>().DoubleValue() >= 1 &&
                         info[0].As<Napi::Number>().DoubleValue() <= (double)(size_t{1} << 30),
                     "optimizerState(chunkFloats): chunkFloats must be a number in [1, 2^30]");
        chunk = (size_t)info[0].As<Napi::Number>().DoubleValue();
      }
      std::lock_guard<std::mutex> g(engine_->mu);
      Engine::OptimizerShard s = engine_->optimizer_shard();
      Napi::Object o = Napi::Object::New(env);
      o.Set("step", (double)engine_->optimizer_steps());
      o.Set("denseBegin", (double)s.dense_begin);
      o.Set("denseEnd", (double)s.dense_end);
      o.Set("denseM", chunked(env, s.dense_m->data(), s.dense_m->size(), chunk));
      o.Set("denseV", chunked(env, s.dense_v->data(), s.dense_v->size(), chunk));
      o.Set("expertM", chunked(env, s.expert_m->data(), s.expert_m->size(), chunk));
      o.Set("expertV", chunked(env, s.expert_v->data(), s.expert_v->size(), chunk));
      return o;
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  Napi::Value set_optimizer_steps(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 1 && info[0].IsNumber() && info[0].As<Napi::Number>().DoubleValue() >= 0,
                   "setOptimizerSteps(steps >= 0) expected");
      std::lock_guard<std::mutex> g(engine_->mu);
      engine_->set_optimizer_steps((int64_t)info[0].As<Napi::Number>().DoubleValue());
    } catch (...) {
      rethrow_as_js(env);
    }
    return env.Undefined();
  }

  // toDevice(index, weightsOnly?, expertGradsBf16?): moves the model to GPU `index` (uploads parameters, gradients,
  // optimizer state; with weightsOnly the bf16 weights alone: forward and rollout, no training; with expertGradsBf16
  // the routed experts' gradients in bf16).
  Napi::Value to_device(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      auto flag = [&](size_t i) { return info.Length() <= i || info[i].IsBoolean() || info[i].IsUndefined(); };
      MP_CHECK_ARG(info.Length() >= 1 && info.Length() <= 3 && info[0].IsNumber() && flag(1) && flag(2),
                   "toDevice(deviceIndex, weightsOnly?, expertGradsBf16?) expected");
      const double d = info[0].As<Napi::Number>().DoubleValue();
      MP_CHECK_ARG(d >= 0 && d == (double)(int)d, "toDevice: device index must be an integer >= 0");
      auto on = [&](size_t i) { return info.Length() > i && info[i].IsBoolean() && info[i].As<Napi::Boolean>().Value(); };
      const bool weights_only = on(1), expert_grads_bf16 = on(2);
      auto eng = engine_;
      const int device = (int)d;
      return run_async(env, "moepilot.toDevice", [eng, device, weights_only, expert_grads_bf16] {
        std::lock_guard<std::mutex> g(eng->mu);
        eng->to_device(device, weights_only, expert_grads_bf16);
      });
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  // deviceMemory(resetPeak?): { current, peak } bytes the engine holds on its GPU (peak since the last reset);
  // zeros on the CPU. Synchronous: bookkeeping only, no device call.
  Napi::Value device_memory(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 0 || info[0].IsBoolean(), "deviceMemory(resetPeak?) expected");
      const bool reset = info.Length() == 1 && info[0].As<Napi::Boolean>().Value();
      const auto [current, peak] = engine_->device_memory(reset);
      Napi::Object o = Napi::Object::New(env);
      o.Set("current", Napi::Number::New(env, (double)current));
      o.Set("peak", Napi::Number::New(env, (double)peak));
      return o;
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  // syncToHost({ gradients = true }?): downloads parameters, gradients (unless gradients: false) and optimizer
  // state into the host buffers (the views).
  Napi::Value sync_to_host(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    bool with_grads = true;
    try {
      if (info.Length() >= 1 && !info[0].IsUndefined()) {
        MP_CHECK_ARG(info[0].IsObject(), "syncToHost(options?): options must be an object");
        Napi::Value g = info[0].As<Napi::Object>().Get("gradients");
        MP_CHECK_ARG(g.IsUndefined() || g.IsBoolean(), "syncToHost: 'gradients' must be a boolean");
        if (g.IsBoolean()) with_grads = g.As<Napi::Boolean>().Value();
      }
    } catch (...) {
      rethrow_as_js(env);
    }
    auto eng = engine_;
    return run_async(env, "moepilot.syncToHost", [eng, with_grads] {
      std::lock_guard<std::mutex> g(eng->mu);
      eng->sync_to_host(with_grads);
    });
  }

  // callTimes(): the addon's CallClock (addon/async.h), every native object's calls by name.
  Napi::Value call_times(const Napi::CallbackInfo& info) { return call_times_js(info.Env()); }

  // syncToDevice(): uploads the host buffers (after a checkpoint was restored into the views).
  Napi::Value sync_to_device(const Napi::CallbackInfo& info) {
    auto eng = engine_;
    return run_async(info.Env(), "moepilot.syncToDevice", [eng] {
      std::lock_guard<std::mutex> g(eng->mu);
      eng->sync_to_device();
    });
  }

  // fillParamsRandom(seed, scale): benchmarks' weights, made on the device (GpuModel::fill_params_random).
  Napi::Value fill_params_random(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 2 && info[0].IsNumber() && info[1].IsNumber(), "fillParamsRandom(seed, scale) expected");
      MP_CHECK_ARG(engine_->on_device(), "fillParamsRandom: the engine is not on a GPU (call toDevice first)");
      const uint64_t seed = (uint64_t)info[0].As<Napi::Number>().Int64Value();
      const float scale = info[1].As<Napi::Number>().FloatValue();
      auto eng = engine_;
      return run_async(env, "moepilot.fillParamsRandom", [eng, seed, scale] {
        std::lock_guard<std::mutex> g(eng->mu);
        eng->fill_params_random(seed, scale);
      });
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  // device(): the GPU index, or -1 on the CPU.
  Napi::Value device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), engine_->device()); }

  std::shared_ptr<Engine> engine_;
};

}  // namespace

void register_engine(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = EngineWrap::define(env);
  env.GetInstanceData<AddonData>()->engine_ctor = Napi::Persistent(ctor);
  exports.Set("Engine", ctor);
}

std::shared_ptr<Engine> engine_from_js(Napi::Env env, const Napi::Value& value) {
  AddonData* data = env.GetInstanceData<AddonData>();
  MP_CHECK_ARG(value.IsObject() && value.As<Napi::Object>().InstanceOf(data->engine_ctor.Value()),
               "an Engine object is required");
  return EngineWrap::Unwrap(value.As<Napi::Object>())->engine();
}

}  // namespace moepilot::addon
