// Each part of the addon registers its JS functions/classes here; addon.cpp calls them all.
#pragma once
#include <napi.h>

#include <memory>

namespace moepilot {
class Engine;
}

namespace moepilot::addon {

// Per-environment data of the addon (constructors other modules check against); no process globals.
struct AddonData {
  Napi::FunctionReference engine_ctor;
};

void register_engine(Napi::Env env, Napi::Object exports);
void register_generator(Napi::Env env, Napi::Object exports);

// The native engine behind a JS `Engine` object; throws InvalidArgument for anything else.
std::shared_ptr<Engine> engine_from_js(Napi::Env env, const Napi::Value& value);

void register_sampler(Napi::Env env, Napi::Object exports);
}  // namespace moepilot::addon
