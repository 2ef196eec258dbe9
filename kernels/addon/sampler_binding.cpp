// JS functions `sampleRows`, `filteredProbs` and `philox4x32`: the typed wrapper is src/engine/sampler.ts,
// which validates and fills every field; this layer only converts. Field names match SamplingParams in
// kernels/gen/sampling.h (camelCase here).
#include <napi.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "addon/async.h"
#include "addon/convert.h"
#include "addon/modules.h"
#include "gen/sampling.h"

namespace moepilot::addon {
namespace {

using gen::SampleResult;
using gen::SamplingParams;

uint64_t get_u64(const Napi::Object& o, const char* name) {
  Napi::Value v = field(o, name);
  MP_CHECK_ARG(v.IsBigInt(), std::string("field '") + name + "' must be a bigint");
  bool lossless = false;
  uint64_t x = v.As<Napi::BigInt>().Uint64Value(&lossless);
  MP_CHECK_ARG(lossless, std::string("field '") + name + "' must fit in an unsigned 64-bit integer");
  return x;
}

}  // namespace

SamplingParams sampling_params_from_js(const Napi::Object& o) {
  SamplingParams p;
  p.temperature = (float)get_number(o, "temperature");
  p.top_p = (float)get_number(o, "topP");
  p.min_p = (float)get_number(o, "minP");
  p.top_k = get_int(o, "topK");
  p.seed = get_u64(o, "seed");
  p.request_id = get_u64(o, "requestId");
  p.sample_index = (uint32_t)get_number(o, "sampleIndex");
  p.step = (uint32_t)get_number(o, "step");
  return p;
}

namespace {

Napi::Float32Array f32_arg(const Napi::CallbackInfo& info, size_t i, const char* what) {
  MP_CHECK_ARG(info[i].IsTypedArray() && info[i].As<Napi::TypedArray>().TypedArrayType() == napi_float32_array,
               std::string(what) + " must be a Float32Array");
  return info[i].As<Napi::Float32Array>();
}

// sampleRows(logits: Float32Array [R*V], V: number, params: object[R])
//   -> Promise<{ tokens: Int32Array [R], logprobs: Float32Array [R], rounds: Int32Array [R] }>
// The logits are read in place on a worker thread (no copy): the caller must not modify them until the
// promise settles. A reference keeps the array alive meanwhile.
Napi::Value sample_rows_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    MP_CHECK_ARG(info.Length() == 3 && info[1].IsNumber() && info[2].IsArray(),
                 "sampleRows(logits, vocab, params[]) expected");
    Napi::Float32Array logits = f32_arg(info, 0, "logits");
    int V = info[1].As<Napi::Number>().Int32Value();
    Napi::Array arr = info[2].As<Napi::Array>();
    const size_t R = arr.Length();
    MP_CHECK_ARG(V >= 1, "vocab must be >= 1");
    MP_CHECK_ARG(logits.ElementLength() == R * (size_t)V,
                 "logits has " + std::to_string(logits.ElementLength()) + " elements, expected rows*vocab = " +
                     std::to_string(R) + "*" + std::to_string(V));
    auto params = std::make_shared<std::vector<SamplingParams>>(R);
    for (size_t r = 0; r < R; r++) {
      Napi::Value v = arr.Get((uint32_t)r);
      MP_CHECK_ARG(v.IsObject(), "params[" + std::to_string(r) + "] must be an object");
      (*params)[r] = sampling_params_from_js(v.As<Napi::Object>());
    }
    auto keep = std::make_shared<Napi::Reference<Napi::Float32Array>>(Napi::Persistent(logits));
    const float* data = logits.Data();
    auto results = std::make_shared<std::vector<SampleResult>>(R);
    auto rounds = std::make_shared<std::vector<int32_t>>(R);
    return run_async(
        env, "moepilot.sampleRows",
        [data, V, params, results, rounds, keep] {
          gen::sample_rows(data, (int)params->size(), V, params->data(), results->data(), rounds->data());
        },
        [results, rounds, keep](Napi::Env env) -> Napi::Value {
          const size_t n = results->size();
          Napi::Int32Array tokens = Napi::Int32Array::New(env, n);
          Napi::Float32Array logprobs = Napi::Float32Array::New(env, n);
          for (size_t r = 0; r < n; r++) tokens[r] = (*results)[r].token, logprobs[r] = (*results)[r].logprob;
          Napi::Object o = Napi::Object::New(env);
          o.Set("tokens", tokens);
          o.Set("logprobs", logprobs);
          o.Set("rounds", to_i32(env, *rounds));
          return o;
        });
  } catch (...) {
    rethrow_as_js(env);
  }
}

// filteredProbs(logits: Float32Array [V], params: object) -> Float64Array [V]. Test oracle, synchronous.
Napi::Value filtered_probs_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    MP_CHECK_ARG(info.Length() == 2 && info[1].IsObject(), "filteredProbs(logits, params) expected");
    Napi::Float32Array logits = f32_arg(info, 0, "logits");
    SamplingParams p = sampling_params_from_js(info[1].As<Napi::Object>());
    const size_t V = logits.ElementLength();
    std::vector<double> out(V);
    gen::exact_filtered_probs(logits.Data(), (int)V, p, out.data());
    Napi::Float64Array a = Napi::Float64Array::New(env, V);
    if (V) std::memcpy(a.Data(), out.data(), V * sizeof(double));
    return a;
  } catch (...) {
    rethrow_as_js(env);
  }
}

// philox4x32(counter: Uint32Array [4], key: Uint32Array [2]) -> Uint32Array [4]. Test hook for the
// known-answer vectors.
Napi::Value philox_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    auto u32 = [&](size_t i, size_t n, const char* what) {
      MP_CHECK_ARG(info.Length() > i && info[i].IsTypedArray() &&
                       info[i].As<Napi::TypedArray>().TypedArrayType() == napi_uint32_array &&
                       info[i].As<Napi::TypedArray>().ElementLength() == n,
                   std::string(what) + " must be a Uint32Array of length " + std::to_string(n));
      return info[i].As<Napi::Uint32Array>();
    };
    Napi::Uint32Array c = u32(0, 4, "counter"), k = u32(1, 2, "key");
    gen::Philox4 r = gen::philox4x32_10(gen::Philox4{{c[0], c[1], c[2], c[3]}}, k[0], k[1]);
    Napi::Uint32Array out = Napi::Uint32Array::New(env, 4);
    for (size_t i = 0; i < 4; i++) out[i] = r.v[i];
    return out;
  } catch (...) {
    rethrow_as_js(env);
  }
}

}  // namespace

void register_sampler(Napi::Env env, Napi::Object exports) {
  exports.Set("sampleRows", Napi::Function::New(env, sample_rows_js, "sampleRows"));
  exports.Set("filteredProbs", Napi::Function::New(env, filtered_probs_js, "filteredProbs"));
  exports.Set("philox4x32", Napi::Function::New(env, philox_js, "philox4x32"));
}

}  // namespace moepilot::addon
