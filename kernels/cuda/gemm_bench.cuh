// Benchmark and test hooks of gemm.cu (not part of the engine contract in gemm.h).
#pragma once

namespace moepilot::gpu {

// Forces one tile configuration for every GEMM kernel launch of the process; 0 restores the automatic choice.
//   mma.sync (sm_80+): 1 = 128x256, 2 = 128x128, 3 = 64x64, 4 = 64x128, 10 = 64x128 with 2 stages
//   wgmma (sm_90a, forward GEMMs only): 5 = 128x256 (2 warpgroups), 6 = 64x256 (1), 7 = 128x128 (2),
//     8 = 64x256 (2), 9 = 128x256 (4), 11 = 64x64 (1)
// Within one instruction family every tile gives the same bits (the K order per element does not depend on the
// tile); forward calls use one family per device (wgmma where gemm_wgmma_available()). A wgmma id where wgmma is
// unavailable, or for the grouped backward, falls back to the automatic mma.sync choice. Not thread-safe against
// GEMMs running on other threads.
void gemm_set_tile_override(int tile);

// Whether the forward GEMMs of the current device run the wgmma kernel.
bool gemm_wgmma_available();

// Turns the wgmma kernel off (false) or back on for the process: the mma.sync family then serves every forward
// call (A/B comparisons, and a fallback while the Hopper path is young).
void gemm_set_wgmma_enabled(bool on);

}  // namespace moepilot::gpu
