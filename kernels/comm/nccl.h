// Collectives over NCCL: the same interface and failure contract as the Gloo backend (comm.h), on
// GPUs. Buffers may be device pointers (used in place) or host pointers (staged through a device
// buffer, so the CPU engine's expert-parallel exchange can run over NCCL too).
//
// Built only where the CUDA runtime and the NCCL headers are found (kernels/CMakeLists.txt defines
// MOEPILOT_WITH_NCCL); elsewhere create_nccl_collectives throws Error(InvalidArgument) saying so.
#pragma once
#include <chrono>
#include <memory>

#include "moepilot/comm.h"

namespace moepilot {

struct NcclOptions {
  int rank = 0;
  int size = 1;
  // CUDA device of this rank; -1: rank modulo the number of visible devices (one process per GPU).
  int device = -1;
  // Bound on the rendezvous, the communicator's initialization and every collective.
  std::chrono::milliseconds timeout{60000};
  // Non-blocking communicator (the default): every NCCL call returns at once and completion is polled
  // against the timeout, so a lost peer ends in ncclCommAbort and an error instead of a hang. Off
  // only for code that drives NCCL directly and has its own bound (benchmarks).
  bool nonblocking = true;
};

// Whether this build has the NCCL backend.
bool nccl_available();

// Runs a kernel self-test on the device, takes rank 0's ncclUniqueId from `store` (rank 0 puts it
// there), and initializes the communicator, all bounded by options.timeout. Throws Error naming the
// rank and the stage that failed.
std::shared_ptr<Collectives> create_nccl_collectives(const NcclOptions& options, RendezvousStore& store);

// For GPU code that issues its own NCCL calls on the same communicator (the expert-parallel
// dispatch): the ncclComm_t, the device and the communicator's cudaStream_t, as opaque pointers so
// this header needs neither CUDA nor NCCL. Throws Error(InvalidArgument) for a non-NCCL Collectives.
struct NcclHandles {
  void* comm = nullptr;
  int device = -1;
  void* stream = nullptr;
};
NcclHandles nccl_handles(Collectives& c);

}  // namespace moepilot
