// One promise-worker template for every long native call: `work` runs on a worker thread (never on the
// Node event loop), `done` converts its result to JS on the main thread. Any exception from `work`
// rejects the promise with an Error named "EngineError" carrying the native message and code.
#pragma once
#include <napi.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "moepilot/error.h"

namespace moepilot::addon {

Napi::Error make_engine_error(Napi::Env env, const std::string& message, const char* code);

// Converts a caught C++ exception (moepilot::Error or std::exception) into a thrown JS error.
// Used by synchronous bindings: wrap their body in try { } catch (...) { rethrow_as_js(env); }.
[[noreturn]] void rethrow_as_js(Napi::Env env);

// Where the long calls of one name spent their time: queued for a thread of libuv's pool (which file I/O and
// crypto share: a checkpoint being written can hold it), running there, and waiting for the event loop to take the
// result (a busy main thread). The sums tell a slow engine from a starved pool or a blocked loop. Main thread only.
struct CallTimes {
  double calls = 0, queued_ms = 0, run_ms = 0, resolve_ms = 0;
};
using CallClock = std::map<std::string, CallTimes>;

// The environment's clock (AddonData's), for PromiseWorker; defined in addon.cpp.
CallClock* call_clock(Napi::Env env);

class PromiseWorker : public Napi::AsyncWorker {
 public:
  using Work = std::function<void()>;
  using Done = std::function<Napi::Value(Napi::Env)>;
  using Clock = std::chrono::steady_clock;

  PromiseWorker(Napi::Env env, const char* name, Work work, Done done)
      : Napi::AsyncWorker(env, name), deferred_(Napi::Promise::Deferred::New(env)),
        work_(std::move(work)), done_(std::move(done)), name_(name), clock_(call_clock(env)),
        queued_(Clock::now()) {}

  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    started_ = Clock::now();
    struct Stop {
      PromiseWorker* w;
      ~Stop() { w->finished_ = Clock::now(); }
    } stop{this};
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
    record();
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
    record();
    deferred_.Reject(make_engine_error(Env(), e.Message(), code_).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  Work work_;
  Done done_;
  const char* code_ = "INTERNAL";
  const char* name_;
  CallClock* clock_;
  Clock::time_point queued_, started_, finished_;

  void record() {
    if (!clock_) return;
    auto ms = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
    CallTimes& t = (*clock_)[name_];
    t.calls += 1;
    t.queued_ms += ms(queued_, started_);
    t.run_ms += ms(started_, finished_);
    t.resolve_ms += ms(finished_, Clock::now());
  }
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
