#include "moepilot/engine.h"
#include "moepilot/error.h"
namespace moepilot {
ForwardResult Engine::forward(const Batch&, const ForwardRequest&) { MP_CHECK_INTERNAL(false, "forward: in progress"); return {}; }
LossResult Engine::forward_backward(const Batch&, const LossSpec&) { MP_CHECK_INTERNAL(false, "backward: in progress"); return {}; }
}
