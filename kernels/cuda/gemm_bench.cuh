// Benchmark and test hooks of gemm.cu (not part of the engine contract in gemm.h).
#pragma once

#include "cuda/vendor.h"

namespace moepilot::gpu {

// Forces one tile configuration for every GEMM kernel launch of the process; 0 restores the automatic choice.
//   mma.sync (sm_80+): 1 = 128x256, 2 = 128x128, 3 = 64x64, 4 = 64x128, 10 = 64x128 with 2 stages
//   wgmma (sm_90a, forward GEMMs only): 5 = 128x256 (2 warpgroups), 6 = 64x256 (1), 7 = 128x128 (2),
//     8 = 64x256 (2), 9 = 128x256 (4), 11 = 64x64 (1)
//   wgmma (sm_90a, grouped dA only, W read MN-major): 12 = 128x256 (2), 13 = 64x256 (2)
//   grouped dW only (tile, epilogue; see DwEpi in gemm.cu): mma.sync 14 = 64x64 red, 15 = 64x64 bulk,
//     16 = 128x128 load, 17 = 128x128 red, 18 = 128x128 bulk, 19 = 64x128 bulk, 20 = 128x256 bulk,
//     21 = 64x128 (2 stages) bulk; wgmma (sm_90a) 22 = 128x128 bulk, 23 = 128x256 bulk, 24 = 128x128 red
//   wgmma (sm_90a, forward and grouped dA): 25 = 192x128 (3), 26 = 192x256 (3)
//   grouped dW only, mma.sync with dW's tile in shared memory (kEpiSmem): 27 = 128x128, 28 = 64x128 (2x2 warps),
//     29 = 64x128 (1x4 warps)
// Within one instruction family every tile gives the same bits (the K order per element does not depend on the
// tile); forward calls use one family per device (wgmma where gemm_wgmma_available()); on H100 the two families
// were measured bitwise equal as well. An id that does not fit the call (a wgmma id where wgmma is unavailable, a
// forward id for the grouped backward, 12/13 for anything but the grouped dA, 14-24 and 27-29 for anything but the grouped dW)
// falls back to the automatic choice. The grouped dW ids of one instruction family give the same bits (each
// computes dW + the product summed from 0).
// Not thread-safe against GEMMs running on other threads.
void gemm_set_tile_override(int tile);

// Whether the forward GEMMs of the current device run the wgmma kernel.
bool gemm_wgmma_available();

// Turns the wgmma kernel off (false) or back on for the process: the mma.sync family then serves every forward
// call (A/B comparisons, and a fallback while the Hopper path is young).
void gemm_set_wgmma_enabled(bool on);

// Turns gemm_forward's cuBLASLt path (calls of many rows; bit-identical to the own kernel, see lt_forward in
// gemm.cu) off (false) or back on for the process. Returns false where the build has no cuBLASLt.
bool gemm_set_lt_forward_enabled(bool on);
// Whether that path serves the current device: a cuBLASLt build, MOEPILOT_GEMM_LT_FORWARD not 0, and the device's
// check (cuBLASLt's bits equal to the own kernel's) passed; runs the check on `s` at its first call.
bool gemm_lt_forward_ready(Stream s);

}  // namespace moepilot::gpu
