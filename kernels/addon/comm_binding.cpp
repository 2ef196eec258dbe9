// JS class `Communicator` over moepilot::Collectives; the typed wrapper is src/dist/communicator.ts.
//
// Each communicator owns one thread that runs its collectives in call order: collectives block for
// up to the timeout, and libuv's 4 pool threads are the engine's. Results come back to the JS thread
// through a thread-safe function, which is referenced only while calls are pending so that an idle
// communicator does not keep the process alive.
//
// Rendezvous: Gloo's connectFullMesh asks a key-value store; ours forwards set/get to two async JS
// functions (routed over gRPC to the coordinator by the TS side) and waits for their promises.
#include <napi.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <thread>

#include "addon/async.h"
#include "addon/comm_handle.h"
#include "addon/convert.h"
#include "addon/modules.h"
#include "comm/nccl.h"
#include "moepilot/comm.h"

namespace moepilot::addon {
namespace {

using std::chrono::milliseconds;

// Extra time the native side waits for a JS store call beyond the store's own deadline: the JS side
// enforces the deadline (gRPC) and its error is the better one to show.
constexpr milliseconds kStoreGrace{5000};

constexpr napi_type_tag kCommTypeTag = {0x6d6f6570696c6f74ULL, 0x636f6d6d756e6963ULL};

ErrorCode code_from_js(const std::string& code) {
  if (code == "TIMEOUT" || code == "DEADLINE_EXCEEDED") return ErrorCode::Timeout;
  if (code == "INVALID_ARGUMENT") return ErrorCode::InvalidArgument;
  return ErrorCode::Comm;
}

struct Job;

// State shared between the JS object, its worker thread and queued jobs.
struct CommState {
  Napi::ThreadSafeFunction tsfn;
  GlooOptions options;
  // "gloo" (CPU, TCP) or "nccl" (GPUs; host buffers are staged through the device).
  std::string backend = "gloo";
  int device = -1;  // nccl: CUDA device, -1 for rank modulo the visible devices

  std::mutex mutex;
  std::condition_variable cv;
  std::deque<Job*> queue;
  bool stopping = false;  // no more jobs are accepted; the thread exits once the queue is empty
  std::shared_ptr<Collectives> comm;

  // JS thread only.
  int pending = 0;
  Napi::FunctionReference store_set;
  Napi::FunctionReference store_get;

  // The JS thread resets the references before letting go (settle of the last job, connect's
  // completion, the wrap's finalizer); should the state still die on the worker thread (the
  // environment went away first), it must not call into Node from there.
  ~CommState() {
    store_set.SuppressDestruct();
    store_get.SuppressDestruct();
  }
};

struct Job {
  std::shared_ptr<CommState> state;
  std::function<void()> work;
  std::function<Napi::Value(Napi::Env)> done;
  std::unique_ptr<Napi::Promise::Deferred> deferred;  // null for internal jobs
  bool last = false;                                  // the thread exits after this job
  bool failed = false;
  const char* code = "INTERNAL";
  std::string error;
};

void run_job(Job* job) {
  try {
    job->work();
  } catch (const Error& e) {
    job->failed = true;
    job->code = error_code_name(e.code());
    job->error = e.what();
  } catch (const std::bad_alloc&) {
    job->failed = true;
    job->code = "OUT_OF_MEMORY";
    job->error = "out of host memory";
  } catch (const std::exception& e) {
    job->failed = true;
    job->code = "INTERNAL";
    job->error = e.what();
  } catch (...) {
    job->failed = true;
    job->code = "INTERNAL";
    job->error = "unknown native exception";
  }
}

void resolve(Napi::Env env, Job* job) {
  if (job->failed) {
    job->deferred->Reject(make_engine_error(env, job->error, job->code).Value());
    return;
  }
  try {
    job->deferred->Resolve(job->done ? job->done(env) : env.Undefined());
  } catch (const Napi::Error& e) {
    job->deferred->Reject(e.Value());
  } catch (const std::exception& e) {
    job->deferred->Reject(make_engine_error(env, e.what(), "INTERNAL").Value());
  }
}

// Runs on the JS thread once a job finished on the worker.
void settle(Napi::Env env, Job* job) {
  std::unique_ptr<Job> owned(job);
  CommState& s = *job->state;
  if (job->deferred) {  // internal jobs are never counted as pending
    if (--s.pending == 0) s.tsfn.Unref(env);
    resolve(env, job);
  }
  if (job->last) {
    // The thread-safe function is released here, on the JS thread, and not by the worker after its
    // last call: once the promise above settles the process may exit, and a release racing with
    // the environment's teardown aborts the process. JS references are dropped on this thread too.
    s.store_set.Reset();
    s.store_get.Reset();
    s.tsfn.Release();
  }
}

void worker_loop(std::shared_ptr<CommState> s) {
  for (;;) {
    Job* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(s->mutex);
      s->cv.wait(lock, [&] { return !s->queue.empty() || s->stopping; });
      if (s->queue.empty()) break;
      job = s->queue.front();
      s->queue.pop_front();
    }
    run_job(job);
    bool last = job->last;
    if (s->tsfn.BlockingCall([job](Napi::Env env, Napi::Function) { settle(env, job); }) != napi_ok) {
      delete job;  // the environment is going away; nobody waits for this promise any more
    }
    // After the last job's call the thread-safe function belongs to the JS thread (see settle).
    if (last) break;
  }
}

// The store Gloo meets its peers through, answered by the JS functions set(key, value) and
// get(keys, timeoutMs) -> Uint8Array[].
class JsStore : public RendezvousStore {
 public:
  explicit JsStore(std::shared_ptr<CommState> s) : s_(std::move(s)) {}

  void set(const std::string& key, const std::vector<char>& value) override {
    auto result = std::make_shared<std::promise<void>>();
    std::future<void> f = result->get_future();
    // The lambdas hold the shared state, not `this`: after a timed-out wait the store is gone while
    // the JS thread may still run them.
    call("set(" + key + ")", f, result, [s = s_, key, value, result](Napi::Env env) {
      if (s->store_set.IsEmpty()) throw Error(ErrorCode::Comm, "the communicator no longer has a store");
      Napi::Buffer<char> buf = Napi::Buffer<char>::Copy(env, value.data(), value.size());
      Napi::Value p = s->store_set.Call({Napi::String::New(env, key), buf});
      then(env, p, result, [result](Napi::Env, Napi::Value) { result->set_value(); });
    }, s_->options.timeout);
    f.get();
  }

  std::vector<std::vector<char>> get(const std::vector<std::string>& keys, milliseconds timeout) override {
    using Values = std::vector<std::vector<char>>;
    auto result = std::make_shared<std::promise<Values>>();
    std::future<Values> f = result->get_future();
    std::string what = "get(";
    for (size_t i = 0; i < keys.size(); i++) what += (i ? ", " : "") + keys[i];
    what += ")";
    call(what, f, result, [s = s_, keys, timeout, result](Napi::Env env) {
      if (s->store_get.IsEmpty()) throw Error(ErrorCode::Comm, "the communicator no longer has a store");
      Napi::Array arr = Napi::Array::New(env, keys.size());
      for (size_t i = 0; i < keys.size(); i++) arr.Set((uint32_t)i, Napi::String::New(env, keys[i]));
      Napi::Value p = s->store_get.Call({arr, Napi::Number::New(env, (double)timeout.count())});
      size_t n = keys.size();
      then(env, p, result, [result, n](Napi::Env, Napi::Value v) {
        Values out;
        if (!v.IsArray() || v.As<Napi::Array>().Length() != n) {
          throw Error(ErrorCode::Internal, "rendezvous store get() must resolve with one Uint8Array per key");
        }
        Napi::Array a = v.As<Napi::Array>();
        for (uint32_t i = 0; i < n; i++) {
          Napi::Value e = a.Get(i);
          if (!e.IsTypedArray()) throw Error(ErrorCode::Internal, "rendezvous store get() value is not a Uint8Array");
          Napi::TypedArray t = e.As<Napi::TypedArray>();
          const char* d = static_cast<const char*>(t.ArrayBuffer().Data()) + t.ByteOffset();
          out.emplace_back(d, d + t.ByteLength());
        }
        result->set_value(std::move(out));
      });
    }, timeout);
    return f.get();
  }

 private:
  // Runs `invoke` on the JS thread and waits (bounded) for the promise it settles.
  template <class Future, class P>
  void call(const std::string& what, Future& f, std::shared_ptr<P> result, std::function<void(Napi::Env)> invoke,
            milliseconds timeout) {
    napi_status st = s_->tsfn.BlockingCall([invoke, result, what](Napi::Env env, Napi::Function) {
      // Nothing may escape into Node from here: a synchronous throw becomes this call's error.
      try {
        invoke(env);
      } catch (const Napi::Error& e) {
        set_error(result, Error(ErrorCode::Comm, "rendezvous store " + what + ": " + e.Message()));
      } catch (const std::exception& e) {
        set_error(result, Error(ErrorCode::Comm, "rendezvous store " + what + ": " + e.what()));
      } catch (...) {
        set_error(result, Error(ErrorCode::Comm, "rendezvous store " + what + ": unknown exception"));
      }
    });
    if (st != napi_ok) throw Error(ErrorCode::Comm, "rendezvous store " + what + ": the JS environment is shutting down");
    if (f.wait_for(timeout + kStoreGrace) != std::future_status::ready) {
      throw Error(ErrorCode::Timeout, "rendezvous store " + what + " got no answer within " +
                                          std::to_string((timeout + kStoreGrace).count()) + " ms");
    }
  }

  template <class P>
  static void set_error(const std::shared_ptr<P>& result, const Error& e) {
    try {
      result->set_exception(std::make_exception_ptr(e));
    } catch (const std::future_error&) {
      // Already settled.
    }
  }

  // Attaches resolve/reject handlers to the JS promise `p`; a rejection becomes a moepilot::Error
  // with the JS error's message and code.
  template <class P>
  static void then(Napi::Env env, Napi::Value p, std::shared_ptr<P> result,
                   std::function<void(Napi::Env, Napi::Value)> on_ok) {
    auto reject = [result](const std::string& msg, const std::string& code) {
      set_error(result, Error(code_from_js(code), msg));
    };
    if (!p.IsPromise()) {
      reject("rendezvous store function did not return a promise", "INTERNAL");
      return;
    }
    Napi::Object promise = p.As<Napi::Object>();
    Napi::Function ok = Napi::Function::New(env, [on_ok, reject](const Napi::CallbackInfo& info) {
      try {
        on_ok(info.Env(), info[0]);
      } catch (const Error& e) {
        reject(e.what(), error_code_name(e.code()));
      } catch (const std::future_error&) {
      } catch (const std::exception& e) {
        reject(e.what(), "INTERNAL");
      }
    });
    Napi::Function bad = Napi::Function::New(env, [reject](const Napi::CallbackInfo& info) {
      std::string msg = "rendezvous store call failed";
      std::string code = "COMM";
      Napi::Value e = info[0];
      if (e.IsObject()) {
        Napi::Object o = e.As<Napi::Object>();
        Napi::Value m = o.Get("message");
        if (m.IsString()) msg = m.As<Napi::String>().Utf8Value();
        Napi::Value c = o.Get("code");
        if (c.IsString()) code = c.As<Napi::String>().Utf8Value();
      } else if (e.IsString()) {
        msg = e.As<Napi::String>().Utf8Value();
      }
      reject(msg, code);
    });
    promise.Get("then").As<Napi::Function>().Call(promise, {ok, bad});
  }

  std::shared_ptr<CommState> s_;
};

DType dtype_of(const Napi::TypedArray& a, const char* what) {
  switch (a.TypedArrayType()) {
    case napi_float32_array: return DType::F32;
    case napi_float64_array: return DType::F64;
    case napi_int32_array: return DType::I32;
    case napi_uint8_array: return DType::U8;
    default: break;
  }
  throw Error(ErrorCode::InvalidArgument,
              std::string(what) + " must be a Float32Array, Float64Array, Int32Array or Uint8Array");
}

// A private copy of a typed array's bytes: JS may change its array while the collective runs.
struct HostArray {
  DType type = DType::F32;
  std::vector<char> bytes;
  size_t length() const { return bytes.size() / dtype_size(type); }
  char* data() { return bytes.data(); }
};

HostArray copy_in(const Napi::Value& v, const char* what) {
  MP_CHECK_ARG(v.IsTypedArray(), std::string(what) + " must be a typed array");
  Napi::TypedArray t = v.As<Napi::TypedArray>();
  HostArray h;
  h.type = dtype_of(t, what);
  const char* d = static_cast<const char*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  h.bytes.assign(d, d + t.ByteLength());
  return h;
}

Napi::Value copy_out(Napi::Env env, DType type, const char* data, size_t n) {
  size_t nbytes = n * dtype_size(type);
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, nbytes);
  if (nbytes) std::memcpy(ab.Data(), data, nbytes);
  switch (type) {
    case DType::F32: return Napi::Float32Array::New(env, n, ab, 0);
    case DType::F64: return Napi::Float64Array::New(env, n, ab, 0);
    case DType::I32: return Napi::Int32Array::New(env, n, ab, 0);
    case DType::U8: return Napi::Uint8Array::New(env, n, ab, 0);
  }
  return env.Undefined();
}

std::vector<int64_t> counts_in(const Napi::Value& v, const char* what) {
  MP_CHECK_ARG(v.IsArray(), std::string(what) + " must be an array of counts");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<int64_t> out(a.Length());
  for (uint32_t i = 0; i < a.Length(); i++) {
    Napi::Value e = a.Get(i);
    MP_CHECK_ARG(e.IsNumber(), std::string(what) + " must hold numbers");
    out[i] = e.As<Napi::Number>().Int64Value();
  }
  return out;
}

int64_t sum(const std::vector<int64_t>& c) {
  int64_t s = 0;
  for (int64_t x : c) s += x;
  return s;
}

class CommWrap : public Napi::ObjectWrap<CommWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "Communicator",
                       {
                           InstanceMethod("connect", &CommWrap::connect),
                           InstanceMethod("allToAllV", &CommWrap::all_to_all_v),
                           InstanceMethod("allReduceSum", &CommWrap::all_reduce_sum),
                           InstanceMethod("reduceScatterSum", &CommWrap::reduce_scatter_sum),
                           InstanceMethod("allGather", &CommWrap::all_gather),
                           InstanceMethod("broadcast", &CommWrap::broadcast),
                           InstanceMethod("barrier", &CommWrap::barrier),
                           InstanceMethod("abort", &CommWrap::abort),
                           InstanceMethod("dispose", &CommWrap::dispose),
                       });
  }

  // new Communicator({rank, size, host, iface, timeoutMs, backend?, device?}, {set, get}): nothing is
  // connected yet. backend: "gloo" (default) or "nccl"; device: the nccl backend's CUDA device.
  explicit CommWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CommWrap>(info) {
    Napi::Env env = info.Env();
    try {
      MP_CHECK_ARG(info.Length() == 2 && info[0].IsObject() && info[1].IsObject(),
                   "Communicator(options, store) expected");
      Napi::Object o = info[0].As<Napi::Object>();
      Napi::Object store = info[1].As<Napi::Object>();
      auto s = std::make_shared<CommState>();
      s->options.rank = get_int(o, "rank");
      s->options.size = get_int(o, "size");
      s->options.host = is_null(o, "host") ? "" : get_string(o, "host");
      s->options.iface = is_null(o, "iface") ? "" : get_string(o, "iface");
      s->options.timeout = milliseconds((int64_t)get_number(o, "timeoutMs"));
      if (!is_null(o, "backend")) s->backend = get_string(o, "backend");
      MP_CHECK_ARG(s->backend == "gloo" || s->backend == "nccl",
                   "backend must be 'gloo' or 'nccl', got '" + s->backend + "'");
      if (!is_null(o, "device")) s->device = get_int(o, "device");
      Napi::Value set = field(store, "set");
      Napi::Value get = field(store, "get");
      MP_CHECK_ARG(set.IsFunction() && get.IsFunction(), "store.set and store.get must be functions");
      s->store_set = Napi::Persistent(set.As<Napi::Function>());
      s->store_get = Napi::Persistent(get.As<Napi::Function>());
      s->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}),
                                              "moepilot.comm", 0, 1);
      s->tsfn.Unref(env);
      state_ = s;
      // Tagged so that comm_from_js can tell our objects from other wrapped objects before unwrapping.
      napi_type_tag_object(env, info.This(), &kCommTypeTag);
      std::thread(worker_loop, s).detach();
    } catch (...) {
      rethrow_as_js(env);
    }
  }

  ~CommWrap() override {
    // Collected without dispose(): let the thread finish what is queued, close, and exit.
    if (state_ && !disposed_) {
      state_->store_set.Reset();
      state_->store_get.Reset();
      submit_internal(state_, [s = state_] { close_comm(*s, "communicator collected without dispose()"); }, true);
    }
  }

  std::shared_ptr<Collectives> collectives() {
    MP_CHECK_ARG(state_ != nullptr, "not a Communicator");
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (disposed_ || !state_->comm) throw Error(ErrorCode::Comm, "communicator is not connected or already disposed");
    return state_->comm;
  }

 private:
  static void close_comm(CommState& s, const std::string& why) {
    std::shared_ptr<Collectives> c;
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      c = std::move(s.comm);
    }
    if (!c) return;
    // dispose() after the last collective closes quietly; anything else (collected without dispose, or
    // already failed) aborts so that peers waiting on this rank fail fast.
    if (why == "communicator disposed" && !c->aborted()) c->close();
    else c->abort(why);
  }

  static void submit_internal(const std::shared_ptr<CommState>& s, std::function<void()> work, bool last) {
    auto* job = new Job();
    job->state = s;
    job->work = std::move(work);
    job->last = last;
    std::lock_guard<std::mutex> lock(s->mutex);
    if (s->stopping) {
      delete job;
      return;
    }
    if (last) s->stopping = true;
    s->queue.push_back(job);
    s->cv.notify_one();
    // Internal jobs do not count as pending: nothing waits for them, they must not keep Node alive.
  }

  Napi::Value submit(Napi::Env env, std::function<void()> work, std::function<Napi::Value(Napi::Env)> done,
                     bool last = false) {
    MP_CHECK_ARG(!disposed_, "communicator is disposed");
    auto* job = new Job();
    job->state = state_;
    job->work = std::move(work);
    job->done = std::move(done);
    job->deferred = std::make_unique<Napi::Promise::Deferred>(Napi::Promise::Deferred::New(env));
    job->last = last;
    Napi::Promise p = job->deferred->Promise();
    if (state_->pending++ == 0) state_->tsfn.Ref(env);
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      if (last) state_->stopping = true;
      state_->queue.push_back(job);
    }
    state_->cv.notify_one();
    return p;
  }

  template <class F>
  Napi::Value guarded(const Napi::CallbackInfo& info, F&& f) {
    try {
      return f(info.Env());
    } catch (...) {
      rethrow_as_js(info.Env());
    }
  }

  Napi::Value connect(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) {
      MP_CHECK_ARG(!connect_called_, "connect() was already called");
      connect_called_ = true;
      auto s = state_;
      return submit(
          env,
          [s] {
            JsStore store(s);
            std::shared_ptr<Collectives> c;
            if (s->backend == "nccl") {
              NcclOptions n;
              n.rank = s->options.rank;
              n.size = s->options.size;
              n.device = s->device;
              n.timeout = s->options.timeout;
              c = create_nccl_collectives(n, store);
            } else {
              c = create_gloo_collectives(s->options, store);
            }
            std::lock_guard<std::mutex> lock(s->mutex);
            s->comm = std::move(c);
          },
          [s](Napi::Env e) {
            // The store is needed for the connection only; drop the JS functions (JS thread).
            s->store_set.Reset();
            s->store_get.Reset();
            return e.Undefined();
          });
    });
  }

  // The connected collectives, looked up on the worker thread when a queued call runs.
  static std::shared_ptr<Collectives> current(CommState& s) {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.comm) throw Error(ErrorCode::Comm, "communicator is not connected (connect failed or was not called) or disposed");
    return s.comm;
  }

  // allToAllV(send, sendCounts, recvCounts | null) -> Promise<typed array of sum(recvCounts)>.
  // With null, the counts are exchanged first, on the worker thread (Collectives::exchange_counts).
  Napi::Value all_to_all_v(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) {
      MP_CHECK_ARG(info.Length() == 3, "allToAllV(send, sendCounts, recvCounts) expected");
      auto in = std::make_shared<HostArray>(copy_in(info[0], "send"));
      auto sc = counts_in(info[1], "sendCounts");
      const bool exchange = info[2].IsNull();
      auto rc = exchange ? std::vector<int64_t>() : counts_in(info[2], "recvCounts");
      MP_CHECK_ARG(sum(sc) == (int64_t)in->length(),
                   "allToAllV: send has " + std::to_string(in->length()) + " elements but sendCounts sum to " +
                       std::to_string(sum(sc)));
      auto out = std::make_shared<std::vector<char>>();
      auto s = state_;
      return submit(
          env,
          [s, in, sc, rc, out, exchange] {
            std::shared_ptr<Collectives> c = current(*s);
            std::vector<int64_t> counts = exchange ? c->exchange_counts(sc) : rc;
            out->resize((size_t)sum(counts) * dtype_size(in->type));
            c->all_to_all_v(in->data(), sc, out->data(), counts, in->type);
          },
          [in, out](Napi::Env e) { return copy_out(e, in->type, out->data(), out->size() / dtype_size(in->type)); });
    });
  }

  // allReduceSum(data) -> Promise<new typed array with the sums>
  Napi::Value all_reduce_sum(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) {
      MP_CHECK_ARG(info.Length() == 1, "allReduceSum(data) expected");
      auto buf = std::make_shared<HostArray>(copy_in(info[0], "data"));
      auto s = state_;
      return submit(
          env, [s, buf] { current(*s)->all_reduce_sum(buf->data(), buf->length(), buf->type); },
          [buf](Napi::Env e) { return copy_out(e, buf->type, buf->data(), buf->length()); });
    });
  }

  // reduceScatterSum(data, recvCounts) -> Promise<typed array of recvCounts[rank]>
  Napi::Value reduce_scatter_sum(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) {
      MP_CHECK_ARG(info.Length() == 2, "reduceScatterSum(data, recvCounts) expected");
      auto in = std::make_shared<HostArray>(copy_in(info[0], "data"));
      auto rc = counts_in(info[1], "recvCounts");
      MP_CHECK_ARG(sum(rc) == (int64_t)in->length(),
                   "reduceScatterSum: data has " + std::to_string(in->length()) + " elements but recvCounts sum to " +
                       std::to_string(sum(rc)));
      int rank = state_->options.rank;
      MP_CHECK_ARG((int)rc.size() == state_->options.size, "reduceScatterSum: recvCounts needs one entry per rank");
      auto out = std::make_shared<std::vector<char>>((size_t)rc[rank] * dtype_size(in->type));
      auto s = state_;
      return submit(
          env, [s, in, rc, out] { current(*s)->reduce_scatter_sum(in->data(), out->data(), rc, in->type); },
          [in, out](Napi::Env e) { return copy_out(e, in->type, out->data(), out->size() / dtype_size(in->type)); });
    });
  }

  // allGather(data, counts) -> Promise<typed array of sum(counts)>
  Napi::Value all_gather(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) {
      MP_CHECK_ARG(info.Length() == 2, "allGather(data, counts) expected");
      auto in = std::make_shared<HostArray>(copy_in(info[0], "data"));
      auto counts = counts_in(info[1], "counts");
      MP_CHECK_ARG((int)counts.size() == state_->options.size, "allGather: counts needs one entry per rank");
      MP_CHECK_ARG(counts[state_->options.rank] == (int64_t)in->length(),
                   "allGather: data has " + std::to_string(in->length()) + " elements but counts[rank] is " +
                       std::to_string(counts[state_->options.rank]));
      auto out = std::make_shared<std::vector<char>>((size_t)sum(counts) * dtype_size(in->type));
      auto s = state_;
      return submit(
          env, [s, in, counts, out] { current(*s)->all_gather(in->data(), out->data(), counts, in->type); },
          [in, out](Napi::Env e) { return copy_out(e, in->type, out->data(), out->size() / dtype_size(in->type)); });
    });
  }

  // broadcast(data, root) -> Promise<new typed array: root's data on every rank>
  Napi::Value broadcast(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) {
      MP_CHECK_ARG(info.Length() == 2 && info[1].IsNumber(), "broadcast(data, root) expected");
      auto buf = std::make_shared<HostArray>(copy_in(info[0], "data"));
      int root = info[1].As<Napi::Number>().Int32Value();
      auto s = state_;
      return submit(
          env, [s, buf, root] { current(*s)->broadcast(buf->data(), buf->length(), root, buf->type); },
          [buf](Napi::Env e) { return copy_out(e, buf->type, buf->data(), buf->length()); });
    });
  }

  Napi::Value barrier(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) {
      auto s = state_;
      return submit(env, [s] { current(*s)->barrier(); }, nullptr);
    });
  }

  // abort(reason): synchronous, from the JS thread, also while a collective is in flight.
  Napi::Value abort(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) {
      std::string reason = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value()
                                                                   : "aborted by the application";
      std::shared_ptr<Collectives> c;
      {
        std::lock_guard<std::mutex> lock(state_->mutex);
        c = state_->comm;
      }
      if (c) c->abort(reason);
      return env.Undefined();
    });
  }

  // dispose(): waits for queued calls, closes the connections, stops the thread.
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    return guarded(info, [&](Napi::Env env) -> Napi::Value {
      if (disposed_) return dispose_promise_.Value();
      auto s = state_;
      Napi::Value p = submit(env, [s] { close_comm(*s, "communicator disposed"); }, nullptr, true);
      disposed_ = true;
      dispose_promise_ = Napi::Persistent(p);
      return p;
    });
  }

  std::shared_ptr<CommState> state_;
  bool connect_called_ = false;
  bool disposed_ = false;
  Napi::Reference<Napi::Value> dispose_promise_;
};

}  // namespace

std::shared_ptr<Collectives> comm_from_js(const Napi::Value& value) {
  MP_CHECK_ARG(value.IsObject(), "a Communicator object expected");
  Napi::Object o = value.As<Napi::Object>();
  // The TS Communicator keeps its native object under `native`; accept either.
  if (o.Has("native") && o.Get("native").IsObject()) o = o.Get("native").As<Napi::Object>();
  Napi::Env env = value.Env();
  bool tagged = false;
  napi_check_object_type_tag(env, o, &kCommTypeTag, &tagged);
  MP_CHECK_ARG(tagged, "not a Communicator object");
  CommWrap* w = nullptr;
  napi_status st = napi_unwrap(env, o, reinterpret_cast<void**>(&w));
  MP_CHECK_ARG(st == napi_ok && w != nullptr, "not a Communicator object");
  return w->collectives();
}

// communicatorInfo(comm) -> {rank, size, timeoutMs, aborted}: what native code sees through
// comm_from_js (logging, and the check that the handle reaches the C++ object).
Napi::Value communicator_info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    MP_CHECK_ARG(info.Length() == 1, "communicatorInfo(communicator) expected");
    std::shared_ptr<Collectives> c = comm_from_js(info[0]);
    Napi::Object o = Napi::Object::New(env);
    o.Set("rank", c->rank());
    o.Set("size", c->size());
    o.Set("timeoutMs", (double)c->timeout().count());
    o.Set("aborted", c->aborted());
    return o;
  } catch (...) {
    rethrow_as_js(env);
  }
}

void register_comm(Napi::Env env, Napi::Object exports) {
  exports.Set("Communicator", CommWrap::define(env));
  exports.Set("communicatorInfo", Napi::Function::New(env, communicator_info, "communicatorInfo"));
  // Whether backend "nccl" is in this build (GPU builds with NCCL only).
  exports.Set("ncclAvailable", Napi::Boolean::New(env, nccl_available()));
}

}  // namespace moepilot::addon
