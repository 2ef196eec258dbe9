// One promise-worker template for every long native call: `work` runs on a worker thread (never on the
// Node event loop), `done` converts its result to JS on the main thread. Any exception from `work`
// rejects the promise with an Error named "EngineError" carrying the native message and code.
#pragma once
#include <napi.h>

#include <functional>
#include <memory>
#include <string>

#include "moepilot/error.h"

namespace moepilot::addon {

Napi::Error make_engine_error(Napi::Env env, const std::string& message, const char* code);

// Converts a caught C++ exception (moepilot::Error or std::exception) into a thrown JS error.
// Used by synchronous bindings: wrap their body in try { } catch (...) { rethrow_as_js(env); }.
[[noreturn]] void rethrow_as_js(Napi::Env env);

class PromiseWorker : public Napi::AsyncWorker {
 public:
  using Work = std::function<void()>;
  using Done = std::function<Napi::Value(Napi::Env)>;

  PromiseWorker(Napi::Env env, const char* name, Work work, Done done)
      : Napi::AsyncWorker(env, name), deferred_(Napi::Promise::Deferred::New(env)),
        work_(std::move(work)), done_(std::move(done)) {}

  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      work_();
    } catch (const moepilot::Error& e) {
      code_ = error_code_name(e.code());
      SetError(e.what());
    } catch (const std::bad_alloc&) {
      code_ = "OUT_OF_MEMORY";
      SetError("out of host memory");
    } catch (const std::exception& e) {
      code_ = "INTERNAL";
      SetError(e.what());
    } catch (...) {
      code_ = "INTERNAL";
      SetError("unknown native exception");
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    try {
      deferred_.Resolve(done_ ? done_(env) : env.Undefined());
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (const std::exception& e) {
      deferred_.Reject(make_engine_error(env, e.what(), "INTERNAL").Value());
    }
  }
  void OnError(const Napi::Error& e) override {
    deferred_.Reject(make_engine_error(Env(), e.Message(), code_).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  Work work_;
  Done done_;
  const char* code_ = "INTERNAL";
};

// run_async(env, "name", work, done): queue `work` off the event loop, resolve with done(env).
inline Napi::Promise run_async(Napi::Env env, const char* name, PromiseWorker::Work work,
                               PromiseWorker::Done done = nullptr) {
  auto* w = new PromiseWorker(env, name, std::move(work), std::move(done));
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

}  // namespace moepilot::addon
