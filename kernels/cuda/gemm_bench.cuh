// Benchmark and test hooks of gemm.cu (not part of the engine contract in gemm.h).
#pragma once

namespace moepilot::gpu {

// Forces one tile configuration for every GEMM kernel launch of the process; 0 restores the automatic choice.
//   mma.sync (sm_80+): 1 = 128x256, 2 = 128x128, 3 = 64x64, 4 = 64x128, 10 = 64x128 with 2 stages
//   wgmma (sm_90a, forward GEMMs only): 5 = 128x256 (2 warpgroups), 6 = 64x256 (1), 7 = 128x128 (2),
//     8 = 64x256 (2), 9 = 128x256 (4), 11 = 64x64 (1)
//   wgmma (sm_90a, grouped dA only, W transposed in shared memory): 12 = 128x256 (2), 13 = 64x256 (2)
// Within one instruction family every tile gives the same bits (the K order per element does not depend on the
// tile); forward calls use one family per device (wgmma where gemm_wgmma_available()); on H100 the two families
// were measured bitwise equal as well. An id that does not fit the call (a wgmma id where wgmma is unavailable, a
// forward id for the grouped backward, 12/13 for anything but the grouped dA) falls back to the automatic choice.
// Not thread-safe against GEMMs running on other threads.
void gemm_set_tile_override(int tile);

// Whether the forward GEMMs of the current device run the wgmma kernel.
bool gemm_wgmma_available();

// Turns the wgmma kernel off (false) or back on for the process: the mma.sync family then serves every forward
// call (A/B comparisons, and a fallback while the Hopper path is young).
void gemm_set_wgmma_enabled(bool on);

}  // namespace moepilot::gpu
