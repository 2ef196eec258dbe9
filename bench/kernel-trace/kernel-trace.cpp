// A CUDA injection library that records every kernel a process runs (start, end, stream, graph node, grid, name)
// through CUPTI's activity API, for where-does-the-time-go questions that phase clocks cannot answer: kernels
// inside CUDA graphs and kernels that overlap on side streams. The device machines have CUPTI but no Nsight
// Systems. Built and used by bench/kernel-trace/trace.sh; the CUDA driver loads it through CUDA_INJECTION64_PATH
// and calls InitializeInjection at its own initialisation, so the traced program needs no change.
//
// Memory copies and sets on the device's streams are recorded too, as lines named "[memcpy HtoD 4096 B]" or
// "[memset 4096 B]" (grid 0,0,0): the GPU's idle time between kernels is otherwise unexplained.
//
// Output: one tab-separated line per kernel to $KERNEL_TRACE_OUT (a "%p" in it becomes the process id, so that the
// processes of a multi-process run, which all inherit the injection, write files of their own):
//   start_ns end_ns stream graph_id graph_node_id grid_x,grid_y,grid_z block_x registers mangled_name
// KERNEL_RECORD, MEMCPY_RECORD and MEMSET_RECORD name the CUPTI record structs of the installed version (trace.sh
// finds them in cupti_activity.h).
#include <cupti.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#if !defined(KERNEL_RECORD) || !defined(MEMCPY_RECORD) || !defined(MEMSET_RECORD)
#error "define KERNEL_RECORD, MEMCPY_RECORD and MEMSET_RECORD as this CUPTI's record structs (see trace.sh)"
#endif

namespace {

FILE* g_out = nullptr;
std::mutex g_out_mutex;
constexpr size_t kBufferBytes = 16u << 20;

void report(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return;
  const char* msg = nullptr;
  cuptiGetResultString(r, &msg);
  std::fprintf(stderr, "kernel-trace: %s failed: %s\n", what, msg ? msg : "unknown error");
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(64, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(g_out_mutex);
  CUpti_Activity* rec = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY || rec->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const bool copy = rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY;
      unsigned long long start, end, bytes;
      unsigned stream;
      std::string what;
      if (copy) {
        const auto* m = reinterpret_cast<const MEMCPY_RECORD*>(rec);
        start = m->start, end = m->end, bytes = m->bytes, stream = m->streamId;
        const int kind = m->copyKind;
        what = kind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "HtoD"
               : kind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "DtoH"
               : kind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOD ? "DtoD"
               : kind == CUPTI_ACTIVITY_MEMCPY_KIND_PTOP ? "PtoP"
                                                          : "kind" + std::to_string(kind);
      } else {
        const auto* m = reinterpret_cast<const MEMSET_RECORD*>(rec);
        start = m->start, end = m->end, bytes = m->bytes, stream = m->streamId;
      }
      if (g_out)
        std::fprintf(g_out, "%llu\t%llu\t%u\t0\t0\t0,0,0\t0\t0\t[%s%s%s %llu B]\n", start, end, stream,
                     copy ? "memcpy" : "memset", copy ? " " : "", what.c_str(), bytes);
      continue;
    }
    if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && rec->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const auto* k = reinterpret_cast<const KERNEL_RECORD*>(rec);
    if (g_out)
      std::fprintf(g_out, "%llu\t%llu\t%u\t%u\t%llu\t%d,%d,%d\t%d\t%u\t%s\n", (unsigned long long)k->start,
                   (unsigned long long)k->end, k->streamId, k->graphId, (unsigned long long)k->graphNodeId, k->gridX,
                   k->gridY, k->gridZ, k->blockX, (unsigned)k->registersPerThread, k->name ? k->name : "?");
  }
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped) == CUPTI_SUCCESS && dropped)
    std::fprintf(stderr, "kernel-trace: %zu records dropped\n", dropped);
  std::free(buffer);
}

void flush_at_exit() {
  report(cuptiActivityFlushAll(1), "cuptiActivityFlushAll");
  std::lock_guard<std::mutex> lock(g_out_mutex);
  if (g_out) std::fclose(g_out);
  g_out = nullptr;
}

}  // namespace

extern "C" int InitializeInjection() {
  const char* path = std::getenv("KERNEL_TRACE_OUT");
  if (!path) {
    std::fprintf(stderr, "kernel-trace: KERNEL_TRACE_OUT is not set; tracing nothing\n");
    return 1;
  }
  std::string file = path;
  if (const size_t at = file.find("%p"); at != std::string::npos) file.replace(at, 2, std::to_string(getpid()));
  g_out = std::fopen(file.c_str(), "w");
  if (!g_out) {
    std::fprintf(stderr, "kernel-trace: cannot open %s\n", file.c_str());
    return 1;
  }
  report(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "cuptiActivityRegisterCallbacks");
  report(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable(CONCURRENT_KERNEL)");
  report(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "cuptiActivityEnable(MEMCPY)");
  report(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET), "cuptiActivityEnable(MEMSET)");
  std::atexit(flush_at_exit);
  return 1;
}
