// Benchmark-only hook of gemm.cu (not part of the engine contract in gemm.h).
#pragma once

namespace moepilot::gpu {

// Forces one tile configuration for every GEMM kernel launch of the process: 1 = 128x256, 2 = 128x128,
// 3 = 64x64, 4 = 64x128; 0 restores the automatic choice. Results are bitwise identical whichever tile runs
// (the K order per element does not depend on it); only speed changes. Not thread-safe against running GEMMs.
void gemm_set_tile_override(int tile);

}  // namespace moepilot::gpu
