// Engine errors: every failure in native code is a moepilot::Error with a stable code, thrown as a C++
// exception and turned into a JS exception (name "EngineError", property `code`) by the addon layer.
// Native code never exits or aborts the host process.
#pragma once
#include <stdexcept>
#include <string>

namespace moepilot {

enum class ErrorCode { InvalidArgument, OutOfMemory, Io, Comm, Timeout, Internal };

inline const char* error_code_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::InvalidArgument: return "INVALID_ARGUMENT";
    case ErrorCode::OutOfMemory: return "OUT_OF_MEMORY";
    case ErrorCode::Io: return "IO";
    case ErrorCode::Comm: return "COMM";
    case ErrorCode::Timeout: return "TIMEOUT";
    case ErrorCode::Internal: return "INTERNAL";
  }
  return "INTERNAL";
}

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& msg) : std::runtime_error(msg), code_(code) {}
  ErrorCode code() const { return code_; }
 private:
  ErrorCode code_;
};

// CHECK_ARG(cond, msg): argument validation that names what is wrong.
#define MP_CHECK_ARG(cond, msg)                                                          \
  do {                                                                                   \
    if (!(cond)) throw ::moepilot::Error(::moepilot::ErrorCode::InvalidArgument, (msg)); \
  } while (0)
#define MP_CHECK_INTERNAL(cond, msg)                                                                   \
  do {                                                                                                 \
    if (!(cond))                                                                                       \
      throw ::moepilot::Error(::moepilot::ErrorCode::Internal,                                         \
                              std::string(msg) + " (" + __FILE__ + ":" + std::to_string(__LINE__) + ")"); \
  } while (0)

}  // namespace moepilot
