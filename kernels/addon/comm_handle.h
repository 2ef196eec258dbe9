// Reaching a communicator created from JS (createCommunicator) from other native code: the engine
// takes the JS Communicator object and holds the native Collectives for its expert all-to-all.
#pragma once
#include <napi.h>

#include <memory>

#include "moepilot/comm.h"

namespace moepilot::addon {

// The Collectives behind a connected JS Communicator (the object createCommunicator resolved with,
// or its native handle). Throws moepilot::Error(InvalidArgument) for anything else and
// Error(Comm) when it is not connected or already disposed. Call on the JS thread; the returned
// pointer may then be used from any thread (calls are serialized inside).
std::shared_ptr<Collectives> comm_from_js(const Napi::Value& value);

}  // namespace moepilot::addon
