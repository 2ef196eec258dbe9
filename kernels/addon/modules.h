// Each part of the addon registers its JS functions/classes here; addon.cpp calls them all.
#pragma once
#include <napi.h>

#include <memory>

#include "addon/async.h"

namespace moepilot {
class Engine;
namespace gen {
struct SamplingParams;
}
}  // namespace moepilot

namespace moepilot::addon {

// Per-environment data of the addon (constructors other modules check against); no process globals.
struct AddonData {
  Napi::FunctionReference engine_ctor;
  CallClock calls;  // every run_async call of this environment, by name
};

// The environment's CallClock as { name: { calls, queuedMs, runMs, resolveMs } } (sums since load): Engine.callTimes().
Napi::Value call_times_js(Napi::Env env);

void register_engine(Napi::Env env, Napi::Object exports);
void register_generator(Napi::Env env, Napi::Object exports);

// Sampling parameters from their JS object (src/engine/sampler.ts SamplingParams; seed/requestId bigint).
gen::SamplingParams sampling_params_from_js(const Napi::Object& o);

// The native engine behind a JS `Engine` object; throws InvalidArgument for anything else.
std::shared_ptr<Engine> engine_from_js(Napi::Env env, const Napi::Value& value);

void register_sampler(Napi::Env env, Napi::Object exports);
void register_comm(Napi::Env env, Napi::Object exports);
}  // namespace moepilot::addon
