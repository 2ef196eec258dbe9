// The one place that names the GPU vendor's runtime and collective library. Everything under
// kernels/cuda and kernels/comm/nccl.cpp goes through these aliases and wrappers, so a port to HIP and
// RCCL (whose APIs mirror these call for call) is a change of this header alone.
//
// Errors: gpu_check/ccl_check turn a failed call into moepilot::Error naming the call and the site.
#pragma once
#include <cuda.h>  // (types only: CUtensorMap; the driver entry point is fetched through the runtime)
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "moepilot/error.h"

#ifdef MOEPILOT_WITH_NCCL
#include <nccl.h>
#endif

namespace moepilot::gpu {

using Stream = cudaStream_t;
using Event = cudaEvent_t;
using Status = cudaError_t;
constexpr Status kSuccess = cudaSuccess;
constexpr Status kNotReady = cudaErrorNotReady;

inline const char* status_string(Status s) { return cudaGetErrorString(s); }

inline void check(Status s, const char* what, const char* file, int line) {
  if (s == kSuccess) return;
  ErrorCode code = s == cudaErrorMemoryAllocation ? ErrorCode::OutOfMemory : ErrorCode::Internal;
  throw Error(code, std::string(what) + " failed: " + status_string(s) + " (" + file + ":" + std::to_string(line) + ")");
}

// Device runtime calls, renamed once.
inline Status set_device(int d) { return cudaSetDevice(d); }
inline Status get_device(int* d) { return cudaGetDevice(d); }
inline Status device_count(int* n) { return cudaGetDeviceCount(n); }

// Device memory the engine holds, per device: every allocation goes through malloc_device / free_device, which
// keep the bytes held now and the most held since the last reset (benchmarks report a step's peak from it; the
// driver's own figure would also count the context and other processes). Process-wide, like the device itself.
struct MemoryStats {
  size_t current = 0, peak = 0;
};
struct MemoryLedger {
  std::mutex mu;
  std::unordered_map<void*, std::pair<int, size_t>> blocks;  // pointer -> (device, bytes)
  std::map<int, MemoryStats> per_device;
};
inline MemoryLedger& memory_ledger() {
  static MemoryLedger ledger;
  return ledger;
}
inline Status malloc_device(void** p, size_t n) {
  const Status s = cudaMalloc(p, n);
  if (s != kSuccess) return s;
  int d = 0;
  cudaGetDevice(&d);
  MemoryLedger& l = memory_ledger();
  std::lock_guard<std::mutex> g(l.mu);
  l.blocks[*p] = {d, n};
  MemoryStats& st = l.per_device[d];
  st.current += n;
  if (st.current > st.peak) st.peak = st.current;
  return s;
}
inline Status free_device(void* p) {
  if (p) {
    MemoryLedger& l = memory_ledger();
    std::lock_guard<std::mutex> g(l.mu);
    auto it = l.blocks.find(p);
    if (it != l.blocks.end()) {
      l.per_device[it->second.first].current -= it->second.second;
      l.blocks.erase(it);
    }
  }
  return cudaFree(p);
}
inline MemoryStats memory_stats(int device) {
  MemoryLedger& l = memory_ledger();
  std::lock_guard<std::mutex> g(l.mu);
  return l.per_device[device];
}
inline void reset_memory_peak(int device) {
  MemoryLedger& l = memory_ledger();
  std::lock_guard<std::mutex> g(l.mu);
  MemoryStats& st = l.per_device[device];
  st.peak = st.current;
}
inline Status malloc_host(void** p, size_t n) { return cudaMallocHost(p, n); }  // pinned
inline Status free_host(void* p) { return cudaFreeHost(p); }
inline Status memcpy_async(void* dst, const void* src, size_t n, Stream s) {
  return cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, s);
}
inline Status memset_async(void* p, int v, size_t n, Stream s) { return cudaMemsetAsync(p, v, n, s); }
inline Status stream_create(Stream* s) { return cudaStreamCreateWithFlags(s, cudaStreamNonBlocking); }
// Stream priorities: a lower number is scheduled first; greatest <= least (0, the default, is the least).
inline Status stream_priority_range(int* least, int* greatest) {
  return cudaDeviceGetStreamPriorityRange(least, greatest);
}
inline Status stream_create_with_priority(Stream* s, int priority) {
  return cudaStreamCreateWithPriority(s, cudaStreamNonBlocking, priority);
}
// A stream of the device's highest priority: communication kernels queued there are scheduled ahead
// of the copies running beside them.
inline Status stream_create_high_priority(Stream* s) {
  int least = 0, greatest = 0;
  const Status st = stream_priority_range(&least, &greatest);
  return st != kSuccess ? st : stream_create_with_priority(s, greatest);
}
inline Status stream_destroy(Stream s) { return cudaStreamDestroy(s); }
inline Status stream_query(Stream s) { return cudaStreamQuery(s); }
inline Status stream_sync(Stream s) { return cudaStreamSynchronize(s); }
inline Status stream_wait(Stream s, Event e) { return cudaStreamWaitEvent(s, e, 0); }
inline Status event_create(Event* e) { return cudaEventCreate(e); }
// An event that only orders streams (no timestamp to take when it is recorded).
inline Status event_create_untimed(Event* e) { return cudaEventCreateWithFlags(e, cudaEventDisableTiming); }
inline Status event_destroy(Event e) { return cudaEventDestroy(e); }
inline Status event_record(Event e, Stream s) { return cudaEventRecord(e, s); }
inline Status event_sync(Event e) { return cudaEventSynchronize(e); }
inline Status event_elapsed_ms(float* ms, Event a, Event b) { return cudaEventElapsedTime(ms, a, b); }
inline Status last_error() { return cudaGetLastError(); }
inline Status sm_count(int device, int* n) { return cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, device); }
inline Status compute_capability_major(int device, int* major) {
  return cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
}
// Kernels that take more than the default 48 KB of dynamic shared memory must say so once per device.
template <typename Kernel>
inline Status set_max_dynamic_smem(Kernel k, int bytes) {
  return cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
using FuncAttributes = cudaFuncAttributes;
template <typename Kernel>
inline Status func_attributes(FuncAttributes* a, Kernel k) { return cudaFuncGetAttributes(a, k); }
inline Status memcpy_sync(void* dst, const void* src, size_t n) { return cudaMemcpy(dst, src, n, cudaMemcpyDefault); }

// TMA descriptors (Hopper's tensor memory accelerator): a row-major bf16 matrix [rows, cols] (rows ld elements
// apart) read in boxes of [box_rows, 64] elements, 128-byte swizzled (the layout wgmma reads); rows or columns past
// the end read as zeros. The driver's encoder is fetched once through the runtime, so nothing links libcuda directly.
using TensorMap = CUtensorMap;
inline Status tensor_map_bf16(TensorMap* m, const void* base, uint64_t rows, uint64_t cols, uint64_t ld,
                              uint32_t box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  if (!encode) return cudaErrorNotSupported;
  cuuint64_t dims[2] = {cols, rows};
  cuuint64_t strides[1] = {ld * 2};
  cuuint32_t box[2] = {64, box_rows};
  cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, elem,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? kSuccess : cudaErrorInvalidValue;
}
inline Status max_smem_per_block_optin(int device, int* n) {
  return cudaDeviceGetAttribute(n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}
inline Status max_smem_per_sm(int device, int* n) {
  return cudaDeviceGetAttribute(n, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
}
// A launch whose blocks form thread-block clusters of `cluster` blocks along x (Hopper's distributed shared
// memory; cluster 1 is a plain launch). HIP has no clusters: a port keeps the cluster-1 shapes only.
// The launch configuration of such a launch; `attr` holds the cluster attribute the configuration points to.
inline cudaLaunchConfig_t clustered_config(cudaLaunchAttribute* attr, unsigned grid, unsigned block, size_t smem,
                                           Stream s, unsigned cluster) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  if (cluster > 1) {
    attr->id = cudaLaunchAttributeClusterDimension;
    attr->val.clusterDim.x = cluster;
    attr->val.clusterDim.y = 1;
    attr->val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cfg;
}
template <typename... Params, typename... Args>
inline Status launch_clustered(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem, Stream s,
                               unsigned cluster, Args&&... args) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = clustered_config(&attr, grid, block, smem, s, cluster);
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}
// How many blocks (cluster 1) or clusters of `cluster` blocks along x of this kernel and launch shape the device
// runs at once: a cluster must sit inside one GPC, so SMs left over in a GPC count for nothing.
template <typename... Params>
inline Status max_active_clusters(int* n, void (*kernel)(Params...), unsigned block, size_t smem, unsigned cluster) {
  if (cluster <= 1) {
    int dev = 0, sms = 0, per_sm = 0;
    Status st = cudaGetDevice(&dev);
    if (st == kSuccess) st = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (st == kSuccess) st = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, (int)block, smem);
    *n = sms * per_sm;
    return st;
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = clustered_config(&attr, cluster, block, smem, nullptr, cluster);
  return cudaOccupancyMaxActiveClusters(n, kernel, &cfg);
}
// CUDA graphs: a stream's work recorded once (begin/end capture) and replayed by one launch. Capture is
// thread-local: other threads' runtime calls neither join nor break it.
using Graph = cudaGraph_t;
using GraphExec = cudaGraphExec_t;
inline Status stream_begin_capture(Stream s) { return cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal); }
inline Status stream_end_capture(Stream s, Graph* g) { return cudaStreamEndCapture(s, g); }
inline Status stream_is_capturing(Stream s, bool* yes) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  const Status r = cudaStreamIsCapturing(s, &st);
  *yes = st != cudaStreamCaptureStatusNone;
  return r;
}
inline Status graph_instantiate(GraphExec* e, Graph g) { return cudaGraphInstantiate(e, g, 0); }
inline Status graph_launch(GraphExec e, Stream s) { return cudaGraphLaunch(e, s); }
inline Status graph_destroy(Graph g) { return cudaGraphDestroy(g); }
inline Status graph_exec_destroy(GraphExec e) { return cudaGraphExecDestroy(e); }
// Memory shared between processes (one rank per GPU): a handle names a device allocation, and a peer
// process maps it into its address space (peer access over NVLink enabled on first use).
using IpcHandle = cudaIpcMemHandle_t;
inline Status ipc_get_handle(IpcHandle* h, void* p) { return cudaIpcGetMemHandle(h, p); }
inline Status ipc_open(void** p, const IpcHandle& h) { return cudaIpcOpenMemHandle(p, h, cudaIpcMemLazyEnablePeerAccess); }
inline Status ipc_close(void* p) { return cudaIpcCloseMemHandle(p); }
inline Status device_name(int d, std::string* name) {
  cudaDeviceProp p{};
  Status s = cudaGetDeviceProperties(&p, d);
  if (s == kSuccess) *name = p.name;
  return s;
}
// Whether p is memory the device can address directly (device or managed); host memory is staged.
inline bool is_device_pointer(const void* p) {
  if (p == nullptr) return false;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // an unknown host pointer may set a sticky-free error on old runtimes
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

#ifdef MOEPILOT_WITH_NCCL
using CclComm = ncclComm_t;
using CclResult = ncclResult_t;
using CclUniqueId = ncclUniqueId;
using CclDataType = ncclDataType_t;
constexpr CclResult kCclSuccess = ncclSuccess;
constexpr CclResult kCclInProgress = ncclInProgress;
inline const char* ccl_string(CclResult r) { return ncclGetErrorString(r); }
#endif

}  // namespace moepilot::gpu

#define MP_GPU_CHECK(call) ::moepilot::gpu::check((call), #call, __FILE__, __LINE__)
// After a kernel launch: the launch itself reports errors only through the last-error slot.
#define MP_GPU_CHECK_LAUNCH(name) ::moepilot::gpu::check(::moepilot::gpu::last_error(), name, __FILE__, __LINE__)
