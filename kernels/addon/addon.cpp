// The Node addon's entry point and the shared error conversion.
#include <napi.h>

#include "addon/async.h"
#include "addon/modules.h"

namespace moepilot::addon {

Napi::Error make_engine_error(Napi::Env env, const std::string& message, const char* code) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("name", Napi::String::New(env, "EngineError"));
  err.Set("code", Napi::String::New(env, code));
  return err;
}

void rethrow_as_js(Napi::Env env) {
  try {
    throw;
  } catch (const Napi::Error&) {
    throw;
  } catch (const moepilot::Error& e) {
    throw make_engine_error(env, e.what(), error_code_name(e.code()));
  } catch (const std::bad_alloc&) {
    throw make_engine_error(env, "out of host memory", "OUT_OF_MEMORY");
  } catch (const std::exception& e) {
    throw make_engine_error(env, e.what(), "INTERNAL");
  }
}

CallClock* call_clock(Napi::Env env) {
  AddonData* data = env.GetInstanceData<AddonData>();
  return data ? &data->calls : nullptr;
}

Napi::Value call_times_js(Napi::Env env) {
  Napi::Object out = Napi::Object::New(env);
  if (CallClock* clock = call_clock(env)) {
    for (const auto& [name, t] : *clock) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("calls", t.calls);
      o.Set("queuedMs", t.queued_ms);
      o.Set("runMs", t.run_ms);
      o.Set("resolveMs", t.resolve_ms);
      out.Set(name, o);
    }
  }
  return out;
}

}  // namespace moepilot::addon

static Napi::Object init_addon(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new moepilot::addon::AddonData());
  moepilot::addon::register_engine(env, exports);
  moepilot::addon::register_generator(env, exports);
  moepilot::addon::register_sampler(env, exports);
  moepilot::addon::register_comm(env, exports);
  return exports;
}

NODE_API_MODULE(moepilot, init_addon)
