// Each part of the addon registers its JS functions/classes here; addon.cpp calls them all.
#pragma once
#include <napi.h>

namespace moepilot::addon {
void register_engine(Napi::Env env, Napi::Object exports);
void register_comm(Napi::Env env, Napi::Object exports);
}  // namespace moepilot::addon
